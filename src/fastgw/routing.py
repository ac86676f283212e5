"""Configuration compiled into routes and upgrade policies.

A configuration is compiled once into a Router holding one CompiledApi per API:
its websocket-upgrade policy (Upgrade), its identity policy, its pre-upgrade
limits in assembly order (admission.py runs them) and the message policies of
its request and response flows (policies.py). Nothing on the connection path
reads a configuration struct afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastgw import config as cfgmod
from fastgw import identity
from fastgw.admission import CountLimitRule, Propagation, RateLimitRule
from fastgw.config.web import normalize_host
from fastgw.policies import MessageRules, compile_flow
from fastgw.pool import PoolEntry
from fastgw.upstream import make_ssl_context


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A compiled websocket-upgrade policy."""

    target: object                 # config.Target: the first (or only) target's
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
    # The pool (fastgw.pool): one entry for a target-url.
    targets: tuple = ()            # pool.PoolEntry, in configuration order
    balance: str = "least-connections"
    hash_key: str | None = None    # consistent-hash: client-id, client-ip, header:N, query:N
    retries: int = 2
    health: object = None          # config.HealthCheck or None
    outlier: object = None         # config.Outlier or None
    extensions: str = "pass"       # "pass" (permessage-deflate negotiated) or "none"

    def backend_url(self, rest: str, drop_params: frozenset[str] = frozenset(),
                    target=None) -> str:
        """The backend URL for the part of the request path after the API's prefix, on
        `target` (a config.Target; default: the first target). The client's query
        parameters named in `drop_params` are left out (those of the target URL are kept)."""
        t = self.target if target is None else target
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


def compile_upgrade(policy, profiles) -> Upgrade:
    if policy.targets is not None:
        entries = tuple(PoolEntry(t.url, cfgmod.parse_target(t.url), t.weight)
                        for t in policy.targets)
    else:
        entries = (PoolEntry(policy.target_url, cfgmod.parse_target(policy.target_url), 1),)
    target = entries[0].endpoint
    ctx = None
    server_name = None
    if any(e.endpoint.secure for e in entries):
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
        targets=entries,
        balance=policy.balance,
        hash_key=(policy.hash_key or "client-id") if policy.balance == "consistent-hash" else None,
        retries=policy.retries,
        health=policy.health_check,
        outlier=policy.outlier,
        extensions=policy.extensions,
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
            pre.append(CountLimitRule(index, policy.key, policy.max, policy.cluster))
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
