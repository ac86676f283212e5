"""The one place that turns configuration into runtime objects.

A configuration is compiled once into a Router holding one CompiledApi per API:
its pre-upgrade policies in assembly order, and the message policies of its
request and response flows. Nothing on the connection path reads a
configuration struct afterwards.

`CompiledApi.admit(zone, request)` is the pre-upgrade phase, sans I/O: it takes
a parsed request (headers, query, peer address, clocks) and returns an
Admission (who the client is, the leases it holds, the message rules of its
plan) or raises Refusal with the HTTP answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastgw import config as cfgmod
from fastgw import identity
from fastgw._core import Action, Lease, LimitZone, RateRule, Scope, key_hash
from fastgw.upstream import make_ssl_context
from fastgw.config.web import normalize_host

# The configuration's names of the core's enums (policy_decl.pxi): "reject" -> Action.ACTION_REJECT.
ACTIONS = {a.name.removeprefix("ACTION_").lower(): a for a in Action}
SCOPES = {s.name.removeprefix("SCOPE_").lower(): s for s in Scope}

# Retry-After for a count limit: there is no time at which a slot is due.
COUNT_LIMIT_RETRY_AFTER = 1

# The answer when the limit table has no slot for a key (limits.max-keys).
TABLE_FULL_REASON = "the gateway's limit table is full"


class Refusal(Exception):
    """An HTTP answer instead of the upgrade.

    `kind` names the reason for metrics and events: bad_request, not_found,
    unauthorized, forbidden, count_limit, rate_limit, capacity, upstream_error,
    upstream_timeout (or timeout / internal for the gateway's own). `table_full`
    names the policy (count-limit, rate-limit) whose key found no slot in the
    limit table, for fastgw_limit_table_full_total.
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None,
                 kind: str | None = None, table_full: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []
        self.kind = kind or _KIND_OF_STATUS.get(status, "bad_request")
        self.client = None             # the client key, when the refusal came after identity
        self.table_full = table_full


_KIND_OF_STATUS = {400: "bad_request", 404: "not_found", 405: "bad_request", 426: "bad_request",
                   431: "bad_request", 408: "timeout", 401: "unauthorized", 403: "forbidden",
                   429: "rate_limit", 503: "capacity", 502: "upstream_error", 504: "upstream_timeout",
                   500: "internal"}


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A compiled websocket-upgrade policy."""

    target: object                 # config.Target
    ssl_context: object            # ssl.SSLContext or None (ws://)
    server_name: str | None
    timeout: float
    idle_timeout: float | None
    max_lifetime: float | None
    max_frame_size: int
    max_message_size: int
    subprotocols: frozenset[str] | None
    # Liveness per side, (client, backend): (ping interval, ping timeout), 0.0 for none.
    liveness: tuple = ((0.0, 0.0), (0.0, 0.0))

    def backend_url(self, rest: str, drop_params: frozenset[str] = frozenset()) -> str:
        """The backend URL for the part of the request path after the API's prefix.
        The client's query parameters named in `drop_params` are left out (those of
        the target URL are kept)."""
        t = self.target
        path, _, query = t.path.partition("?")
        rest_path, sep, rest_query = rest.partition("?")
        if rest_path:
            path = path.rstrip("/") + rest_path
        if drop_params:
            rest_query = identity.remove_query_params(rest_query, drop_params)
        if rest_query:
            query = f"{query}&{rest_query}" if query else rest_query
        scheme = "wss" if t.secure else "ws"
        host = f"[{t.host}]" if ":" in t.host else t.host
        url = f"{scheme}://{host}:{t.port}{path or '/'}"
        return f"{url}?{query}" if query else url


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What the pre-upgrade policies look at."""

    headers: list[tuple[str, str]]     # lower-case names, in order
    query: str                         # raw query string, without "?"
    peer_ip: str
    now: float                         # monotonic seconds (buckets)
    wall: float                        # Unix time (token expiry)

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class Admission:
    """The outcome of the pre-upgrade phase for one connection.

    `strip_headers` (lower-case names) and `strip_query` (parameter names) are what the
    request sent to the backend must not carry (the credential when hidden, a client's
    own identity headers); `add_headers` is the identity the gateway vouches for.
    `peer_trusted`: the TCP peer is a trusted proxy (its forwarding headers are kept)."""

    client_ip: str
    client_id: str | None
    plan: str
    expires_at: float | None
    leases: list = field(default_factory=list)
    request_rules: list = field(default_factory=list)
    response_rules: list = field(default_factory=list)
    request_max_size: int = 0
    response_max_size: int = 0
    peer_trusted: bool = False
    strip_headers: frozenset = frozenset()
    strip_query: frozenset = frozenset()
    add_headers: tuple = ()

    @property
    def client_key(self) -> str:
        """The identity limits and events use: the client id, else the address."""
        return self.client_id if self.client_id is not None else self.client_ip

    def release(self) -> None:
        """Give back every connection slot held (safe to call again)."""
        for lease in self.leases:
            lease.release()


@dataclass(frozen=True, slots=True)
class Propagation:
    """What an api-key or jwt policy changes in the request sent to the backend."""

    hide_credentials: bool = False
    client_id_header: str | None = None      # as configured
    plan_header: str | None = None

    @property
    def identity_headers(self) -> frozenset[str]:
        """The headers the gateway sets (lower case): a client's own are always removed."""
        return frozenset(h.lower() for h in (self.client_id_header, self.plan_header) if h)

    def apply(self, adm: "Admission", who: identity.Identity) -> None:
        strip = set(self.identity_headers)
        if self.hide_credentials and who.credential is not None:
            where, name = who.credential
            if where == "header":
                strip.add(name)
            else:
                adm.strip_query = frozenset((name,))
        adm.strip_headers = frozenset(strip)
        add = []
        if self.client_id_header and who.client_id is not None:
            add.append((self.client_id_header, identity.header_value(who.client_id)))
        if self.plan_header:
            add.append((self.plan_header, identity.header_value(who.plan)))
        adm.add_headers = tuple(add)


@dataclass(frozen=True, slots=True)
class CountLimitRule:
    index: int
    key: str                       # client-ip | client-id | api | global
    max: cfgmod.PerPlan


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    index: int
    key: str
    policy: cfgmod.RateLimit


@dataclass(frozen=True, slots=True)
class MessageRules:
    """The message policies of one flow (request or response)."""

    flow: str                      # "request" | "response"
    rates: tuple                   # (index, MessageRateLimit)
    sizes: tuple                   # MessageSizeLimit

    def for_connection(self, api: str, plan: str, client_key: str) -> list[RateRule]:
        """The flow's rate limits for Leg.set_policies, with the values of the plan."""
        out = []
        for index, p in self.rates:
            rate = p.messages.for_plan(plan) if p.messages is not None else None
            brate = p.bytes.for_plan(plan) if p.bytes is not None else None
            base = f"m|{api}|{self.flow}|{index}|" + (client_key if p.scope == "client" else "")
            out.append(RateRule(
                p.name, ACTIONS[p.action], SCOPES[p.scope],
                msg_rate=rate.per_second if rate else 0.0, msg_burst=p.burst_for(plan) or 1.0,
                byte_rate=brate.per_second if brate else 0.0,
                byte_burst=float(p.byte_burst_for(plan) or 1),
                msg_key=key_hash(base + "|m"), byte_key=key_hash(base + "|b"),
            ))
        return out

    def max_size(self, plan: str, ceiling: int) -> int:
        size = ceiling
        for p in self.sizes:
            size = min(size, int(p.max.for_plan(plan)))
        return size


def _limit_key(prefix: str, key: str, api: str, client_ip: str, client_id: str | None) -> str:
    """The table key of a pre-upgrade limit: per policy, except `global`, shared by all APIs."""
    if key == "global":
        return f"{prefix[0]}|global"
    if key == "client-ip":
        return f"{prefix}|{api}|ip|{client_ip}"
    if key == "client-id":
        return f"{prefix}|{api}|id|{client_id}"
    return f"{prefix}|{api}"        # key: api


@dataclass(frozen=True, slots=True)
class CompiledApi:
    name: str
    prefix: str                    # without trailing slash; "" for "/"
    host: str | None               # lower-case, or None for any host
    upgrade: Upgrade
    origins: frozenset | None = None
    auth: object = None            # identity.ApiKeyAuth | identity.JwtAuth | None
    propagation: Propagation | None = None   # of the auth policy
    close_on_expiry: bool = False
    trusted: tuple = ()            # networks whose X-Forwarded-For is believed
    pre: tuple = ()                # CountLimitRule | RateLimitRule, in assembly order
    request: MessageRules | None = None
    response: MessageRules | None = None
    schemes: frozenset = frozenset(("ws", "wss"))   # what clients may reach it with

    def admit(self, zone: LimitZone, req: UpgradeRequest) -> Admission:
        """The pre-upgrade phase: identity, origin, connection and attempt limits."""
        if self.origins is not None:
            identity.check_origin(req.get("origin"), self.origins)
        if self.auth is not None:
            who = self.auth.authenticate(req.headers, req.query, self.name, now=req.wall)
        else:
            who = identity.Identity(None, cfgmod.DEFAULT_PLAN, None)
        xff = [v for k, v in req.headers if k == "x-forwarded-for"]
        ip = identity.client_ip(req.peer_ip, xff, self.trusted) if self.trusted else req.peer_ip
        trusted_peer = bool(self.trusted) and identity.peer_is_trusted(req.peer_ip, self.trusted)
        adm = Admission(ip, who.client_id, who.plan, who.expires_at, peer_trusted=trusted_peer)
        if self.propagation is not None:
            self.propagation.apply(adm, who)
        try:
            for rule in self.pre:
                kind = "c" if isinstance(rule, CountLimitRule) else "r"
                k = key_hash(_limit_key(f"{kind}{rule.index}", rule.key, self.name, ip, who.client_id))
                if isinstance(rule, CountLimitRule):
                    limit = int(rule.max.for_plan(who.plan))
                    self._acquire(zone, adm, k, limit, Refusal(
                        429, f"too many connections ({limit} allowed per {rule.key})",
                        [("Retry-After", str(COUNT_LIMIT_RETRY_AFTER))], kind="count_limit"))
                else:
                    p = rule.policy
                    rate = p.rate.for_plan(who.plan)
                    wait = zone.take_py(k, rate.per_second, p.burst_for(who.plan), req.now, 1.0)
                    if wait < 0.0:
                        raise Refusal(503, TABLE_FULL_REASON, kind="capacity", table_full="rate-limit")
                    if wait > 0.0:
                        raise Refusal(429, f"too many upgrade attempts ({rate} per {rule.key})",
                                      [("Retry-After", str(max(1, math.ceil(wait))))], kind="rate_limit")
        except BaseException as exc:
            adm.release()
            if isinstance(exc, Refusal):
                exc.client = adm.client_key
            raise
        up = self.upgrade
        if self.request is not None:
            adm.request_rules = self.request.for_connection(self.name, who.plan, adm.client_key)
            adm.request_max_size = self.request.max_size(who.plan, up.max_message_size)
        else:
            adm.request_max_size = up.max_message_size
        if self.response is not None:
            adm.response_rules = self.response.for_connection(self.name, who.plan, adm.client_key)
            adm.response_max_size = self.response.max_size(who.plan, up.max_message_size)
        else:
            adm.response_max_size = up.max_message_size
        return adm

    @staticmethod
    def _acquire(zone: LimitZone, adm: Admission, key: int, limit: int, refusal: Refusal) -> None:
        got = zone.try_acquire([(key, limit)])
        if isinstance(got, Lease):
            adm.leases.append(got)
            return
        if got == -1:
            raise Refusal(503, TABLE_FULL_REASON, kind="capacity", table_full="count-limit")
        raise refusal


def compile_upgrade(policy, profiles) -> Upgrade:
    target = cfgmod.parse_target(policy.target_url)
    ctx = None
    server_name = None
    if target.secure:
        profile = profiles.get(policy.tls_profile) if policy.tls_profile else None
        ctx = make_ssl_context(profile)
        if profile is not None:
            server_name = profile.server_name
    return Upgrade(
        target=target,
        ssl_context=ctx,
        server_name=server_name,
        timeout=float(policy.timeout),
        idle_timeout=policy.idle_timeout,
        max_lifetime=policy.max_lifetime,
        max_frame_size=int(policy.max_frame_size),
        max_message_size=int(policy.max_message_size),
        subprotocols=frozenset(policy.subprotocols) if policy.subprotocols is not None else None,
        liveness=tuple(_liveness(policy, side) for side in ("client", "backend")),
    )


def _liveness(policy, side: str) -> tuple[float, float]:
    """(ping interval, ping timeout) of one side; the timeout defaults to the interval."""
    interval = getattr(policy.ping_interval, side) if policy.ping_interval is not None else None
    if not interval:
        return (0.0, 0.0)
    timeout = getattr(policy.ping_timeout, side) if policy.ping_timeout is not None else None
    return (float(interval), float(timeout or interval))


class Router:
    """Longest-prefix routing on path segments, optionally by Host."""

    def __init__(self, apis: list[CompiledApi]):
        # Longest prefix first; an API bound to a host before one for any host.
        self.apis = sorted(apis, key=lambda a: (len(a.prefix), a.host is not None), reverse=True)

    def route(self, path: str, host: str | None) -> tuple[CompiledApi, str] | None:
        """The API for a request target, and the rest of the target after its prefix."""
        only_path, sep, query = path.partition("?")
        host = host.lower() if host else None
        for api in self.apis:
            if api.host is not None and api.host != host:
                continue
            p = api.prefix
            if only_path == p or only_path.startswith(p + "/") or (p == "" and only_path.startswith("/")):
                rest = only_path[len(p):]
                return api, rest + (sep + query if sep else "")
        return None


def compile_auth(policy, config):
    """An identity.ApiKeyAuth or identity.JwtAuth from an api-key or jwt policy."""
    if isinstance(policy, cfgmod.ApiKey):
        clients = identity.api_key_clients(config.clients)
        return identity.ApiKeyAuth(clients, header=policy.header.lower() if policy.header else None,
                                   query=policy.query)
    jwks = identity.JwtAuth.load_jwks(policy.jwks_file) if policy.jwks_file else None
    public = None
    if policy.public_key:
        with open(policy.public_key, "rb") as f:
            public = f.read()
    secret = identity.read_secret(policy.secret_env, policy.secret_file)
    return identity.JwtAuth(
        policy.algorithms, secret=secret, public_key_pem=public, jwks=jwks,
        issuer=policy.issuer, audience=policy.audience, client_id_claim=policy.client_id_claim,
        plan_claim=policy.plan_claim, required_scopes=policy.required_scopes or (),
        query=policy.query, leeway=float(policy.leeway))


def compile_flow(flow: str, policies) -> MessageRules | None:
    if not policies:
        return None
    rates = tuple((i, p) for i, p in enumerate(policies) if isinstance(p, cfgmod.MessageRateLimit))
    sizes = tuple(p for p in policies if isinstance(p, cfgmod.MessageSizeLimit))
    return MessageRules(flow, rates, sizes)


def compile_api(api, config) -> CompiledApi:
    upgrade = api.assembly[-1]
    auth = None
    propagation = None
    close_on_expiry = False
    pre = []
    for index, policy in enumerate(api.assembly[:-1]):
        if isinstance(policy, cfgmod.IDENTITY_POLICY_TYPES):
            auth = compile_auth(policy, config)
            propagation = Propagation(policy.hide_credentials, policy.client_id_header,
                                      policy.plan_header)
            close_on_expiry = isinstance(policy, cfgmod.Jwt) and policy.close_on_expiry
        elif isinstance(policy, cfgmod.CountLimit):
            pre.append(CountLimitRule(index, policy.key, policy.max))
        elif isinstance(policy, cfgmod.RateLimit):
            pre.append(RateLimitRule(index, policy.key, policy))
    return CompiledApi(
        name=api.name,
        prefix=api.path.rstrip("/"),
        host=normalize_host(api.host) if api.host else None,
        upgrade=compile_upgrade(upgrade, config.tls_profiles),
        origins=frozenset(api.origins) if api.origins is not None else None,
        auth=auth,
        propagation=propagation,
        close_on_expiry=close_on_expiry,
        trusted=identity.trusted_networks(config.trusted_proxies),
        pre=tuple(pre),
        request=compile_flow("request", upgrade.request),
        response=compile_flow("response", upgrade.response),
        schemes=frozenset(api.schemes),
    )


def compile_config(config) -> Router:
    return Router([compile_api(api, config) for api in config.apis])
