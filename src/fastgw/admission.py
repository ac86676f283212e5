"""The identify and admit phases of the upgrade, sans-I/O.

`identify(api, request)` checks the Origin and the credentials and returns who the
client is (an identity.Identity) or a Refusal (401, 403). `admit(api, store, request,
who)` then finds the client's address (behind trusted proxies), takes the connection
slots and upgrade attempts of the API's count-limit and rate-limit policies from the
limit store, and returns an Admission (the leases held, the message rules of the
client's plan, what the backend request must carry) or a Refusal (429, 503). Time is
the request's (`now`, `wall`: the gateway's clock), never read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastgw import config as cfgmod
from fastgw import identity
from fastgw._core import Lease, key_hash
from fastgw.verdicts import Refusal

if TYPE_CHECKING:
    from fastgw._core import LimitStore
    from fastgw.routing import CompiledApi

# Retry-After for a count limit: there is no time at which a slot is due.
COUNT_LIMIT_RETRY_AFTER = 1

# The answer when the limit table has no slot for a key (limits.max-keys).
TABLE_FULL_REASON = "the gateway's limit table is full"


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What the pre-upgrade policies look at."""

    headers: list[tuple[str, str]]     # lower-case names, in order
    query: str                         # raw query string, without "?"
    peer_ip: str
    now: float                         # monotonic seconds (buckets): clock.now()
    wall: float                        # Unix time (token expiry): clock.wall()

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
    leases: list | None = None        # the connection slots held, once one is (a list)
    request_rules: list | None = None     # RateRules of each flow, if it has rate limits
    response_rules: list | None = None    # (shared between connections: never changed)
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
        for lease in self.leases or ():
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

    def apply(self, adm: Admission, who: identity.Identity) -> None:
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
    cluster: bool = True           # shared by the gateway nodes (with a `cluster` section)


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    index: int
    key: str
    policy: cfgmod.RateLimit


def _limit_key(prefix: str, key: str, api: str, client_ip: str, client_id: str | None) -> str:
    """The table key of a pre-upgrade limit: per policy, except `global`, shared by all APIs."""
    if key == "global":
        return f"{prefix[0]}|global"
    if key == "client-ip":
        return f"{prefix}|{api}|ip|{client_ip}"
    if key == "client-id":
        return f"{prefix}|{api}|id|{client_id}"
    return f"{prefix}|{api}"        # key: api


def identify(api: CompiledApi, req: UpgradeRequest) -> identity.Identity | Refusal:
    """The identify phase: the Origin, then the credentials of the API's identity policy."""
    try:
        if api.origins is not None:
            identity.check_origin(req.get("origin"), api.origins)
        if api.auth is not None:
            return api.auth.authenticate(req.headers, req.query, api.name, now=req.wall)
    except identity.AuthError as refusal:
        return refusal
    return identity.Identity(None, cfgmod.DEFAULT_PLAN, None)


def client_address(api: CompiledApi, req: UpgradeRequest) -> str:
    """The client's address: the TCP peer's, or the one its trusted proxies forwarded."""
    return identity.client_ip(req.peer_ip, [v for k, v in req.headers if k == "x-forwarded-for"],
                              api.trusted) if api.trusted else req.peer_ip


def _pre_keys(api: CompiledApi, client_ip: str, client_id: str | None):
    """(rule, table key) of the API's count-limit and rate-limit policies, in assembly order."""
    for rule in api.pre:
        prefix = f"{'c' if isinstance(rule, CountLimitRule) else 'r'}{rule.index}"
        yield rule, key_hash(_limit_key(prefix, rule.key, api.name, client_ip, client_id))


@dataclass(frozen=True, slots=True)
class SharedLimit:
    """One limit of a connection that the gateway nodes share (a `cluster` section): its
    table key, `count` (max slots) or `bucket` (rate per second and burst), and the name of
    its policy for metrics (no client identity in it)."""

    key: int
    kind: str                      # "count" | "bucket"
    policy: str
    limit: float
    burst: float = 0.0


def shared_limits(api: CompiledApi, req: UpgradeRequest, who: identity.Identity) -> list[SharedLimit]:
    """The cluster-wide limits an upgrade of `who` needs (count-limit, rate-limit, and the
    client- or api-scoped message-rate-limits), exactly the table keys admit() and the
    relay's message rules use; a policy with `cluster: false` is not one."""
    out = []
    for rule, k in _pre_keys(api, client_address(api, req), who.client_id):
        if isinstance(rule, CountLimitRule):
            if rule.cluster:
                out.append(SharedLimit(k, "count", f"{api.name}/count-limit#{rule.index}",
                                       int(rule.max.for_plan(who.plan))))
        elif rule.policy.cluster:
            p = rule.policy
            out.append(SharedLimit(k, "bucket", f"{api.name}/rate-limit#{rule.index}",
                                   p.rate.for_plan(who.plan).per_second, p.burst_for(who.plan)))
    client_key = who.client_id if who.client_id is not None else client_address(api, req)
    for flow in (api.request, api.response):
        if flow is None:
            continue
        for (index, p), rule in zip(flow.rates, flow.for_connection(api.name, who.plan, client_key)):
            if p.scope == "connection" or not p.cluster:
                continue
            name = f"{api.name}/{flow.flow}/{p.name}#{index}"
            if rule.msg_rate > 0:
                out.append(SharedLimit(rule.msg_key, "bucket", name + "/messages", rule.msg_rate,
                                       rule.msg_burst))
            if rule.byte_rate > 0:
                out.append(SharedLimit(rule.byte_key, "bucket", name + "/bytes", rule.byte_rate,
                                       rule.byte_burst))
    return out


def admit(api: CompiledApi, store: LimitStore, req: UpgradeRequest,
          who: identity.Identity) -> Admission | Refusal:
    """The admit phase: the client's address, its connection slots and upgrade attempts
    (in assembly order), the message rules of its plan. A refused client holds no slot."""
    ip = client_address(api, req)
    trusted_peer = bool(api.trusted) and identity.peer_is_trusted(req.peer_ip, api.trusted)
    adm = Admission(ip, who.client_id, who.plan, who.expires_at, peer_trusted=trusted_peer)
    if api.propagation is not None:
        api.propagation.apply(adm, who)
    try:
        refusal = _take_limits(api, store, req, who, adm)
    except BaseException:
        adm.release()
        raise
    if refusal is not None:
        adm.release()
        refusal.client = adm.client_key
        return refusal
    up = api.upgrade
    if api.request is not None:
        adm.request_rules = api.request.for_connection(api.name, who.plan, adm.client_key)
        adm.request_max_size = api.request.max_size(who.plan, up.max_message_size)
    else:
        adm.request_max_size = up.max_message_size
    if api.response is not None:
        adm.response_rules = api.response.for_connection(api.name, who.plan, adm.client_key)
        adm.response_max_size = api.response.max_size(who.plan, up.max_message_size)
    else:
        adm.response_max_size = up.max_message_size
    return adm


def _take_limits(api: CompiledApi, store: LimitStore, req: UpgradeRequest,
                 who: identity.Identity, adm: Admission) -> Refusal | None:
    for rule, k in _pre_keys(api, adm.client_ip, who.client_id):
        if isinstance(rule, CountLimitRule):
            limit = int(rule.max.for_plan(who.plan))
            got = store.try_acquire([(k, limit)])
            if isinstance(got, Lease):
                if adm.leases is None:
                    adm.leases = []
                adm.leases.append(got)
                continue
            if got == -1:
                return Refusal(503, TABLE_FULL_REASON, kind="capacity", table_full="count-limit")
            return Refusal(429, f"too many connections ({limit} allowed per {rule.key})",
                           [("Retry-After", str(COUNT_LIMIT_RETRY_AFTER))], kind="count_limit")
        p = rule.policy
        rate = p.rate.for_plan(who.plan)
        wait = store.take_py(k, rate.per_second, p.burst_for(who.plan), req.now, 1.0)
        if wait < 0.0:
            return Refusal(503, TABLE_FULL_REASON, kind="capacity", table_full="rate-limit")
        if wait > 0.0:
            return Refusal(429, f"too many upgrade attempts ({rate} per {rule.key})",
                           [("Retry-After", str(max(1, math.ceil(wait))))], kind="rate_limit")
    return None
