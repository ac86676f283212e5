"""Backend pools: the targets of an API, what is known of each, and which one a dial takes.

Every API has a pool: the `targets` of its websocket-upgrade, or its one `target-url`.
A Pool is rebuilt from the configuration on each reload, but the state of a target
(TargetState: its connections, health, ejection, drain, counters) is kept by (API, URL),
so that a reload that keeps a target keeps what is known of it.

`Pool.pick` chooses the target of one dial among the *candidates*: the targets not
draining, not already tried by this upgrade, healthy (active checks) and not ejected
(passive checks). When none is, the targets not draining and not tried are the candidates
(failing open, as Envoy's panic threshold does: a pool whose checks all fail still tries).
Draining targets are never chosen. Weights hold in every mode:

- round-robin: smooth weighted round robin (nginx's);
- least-connections: the fewest connections per unit of weight; ties broken by the smooth
  weighted round robin (as nginx's least_conn), so that weights hold for short connections too;
- random: two random choices in proportion to weight, the fewer connections per weight wins;
- consistent-hash: rendezvous (highest random weight) hashing, weighted: each candidate
  scores weight / -ln(u), u a uniform draw in (0, 1) hashed from (key, its URL); the highest
  score wins, so that a target wins weight / total of the keys. Removing a target moves only
  the keys it had, adding one moves keys only to it, and a key whose target is ejected or
  tried goes to its next-best target and comes back with it. No table is built (a ring with
  points per unit of weight took seconds to build at weight 1000), and a pick costs one
  hash of the key plus a few integer operations per target. The hashes are blake2b (the same
  in every worker, node and run). An upgrade without the key (no such header or parameter)
  falls back to least-connections.

Everything here runs on the event loop of one process (one worker): connection counts are
this process's.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastgw.observe.logs import url_without_query

#: Why a dial of a target failed (fastgw_target_dial_failures_total{reason}).
DIAL_FAILURE_REASONS = ("refused", "unreachable", "dns", "reset", "tls", "timeout", "status",
                        "handshake")

#: The results of an active health check (fastgw_target_health_checks_total{result}).
HEALTH_RESULTS = ("success", "failure")

#: The longest ejection (s) of the outlier detection, however often it doubled.
MAX_EJECTION = 300.0


@dataclass(frozen=True, slots=True)
class PoolEntry:
    """A configured target (routing compiles it; pure data)."""

    url: str                       # as configured
    endpoint: object               # config.Target
    weight: int = 1


class TargetState:
    """What one process knows of one target of one API's pool."""

    __slots__ = ("api", "url", "label", "endpoint", "weight", "active", "conns", "draining",
                 "healthy", "check_streak", "last_check", "ejected_until", "ejections",
                 "fails_in_row", "dial_failures", "health_checks", "current", "seed")

    def __init__(self, api: str, entry: PoolEntry):
        self.api = api
        self.url = entry.url
        self.label = url_without_query(entry.url)   # for metrics, events, logs and /targets
        self.endpoint = entry.endpoint
        self.weight = entry.weight
        self.active = 0                 # dials under way and live connections through it
        self.conns: dict = {}           # connection id -> Connection, the live ones
        self.draining = False           # an operator's drain: never chosen
        self.healthy = True             # the active checks' verdict (True without checks)
        self.check_streak = 0           # checks in a row that disagree with `healthy`
        self.last_check: dict | None = None   # {"result", "at" (wall s), "detail"}
        self.ejected_until = 0.0        # clock.now() until which the outlier ejected it
        self.ejections = 0              # ejections in a row (each one twice as long)
        self.fails_in_row = 0           # real dials that failed in a row
        self.dial_failures: dict[str, int] = {}     # reason -> count
        self.health_checks: dict[str, int] = {}     # result -> count
        self.current = 0                # smooth weighted round robin's current weight
        self.seed = _hash64(entry.url)  # consistent-hash: this target's part of each score

    def up(self, now: float) -> bool:
        """Healthy and not ejected: what fastgw_target_up says."""
        return self.healthy and self.ejected_until <= now

    def state(self, now: float) -> str:
        """"draining", "unhealthy", "ejected" or "healthy"."""
        if self.draining:
            return "draining"
        if not self.healthy:
            return "unhealthy"
        if self.ejected_until > now:
            return "ejected"
        return "healthy"

    def describe(self, now: float) -> dict:
        """The admin API's view (GET /targets)."""
        return {"api": self.api, "target": self.label, "weight": self.weight,
                "state": self.state(now), "up": self.up(now), "connections": self.active,
                "dial_failures": sum(self.dial_failures.values()),
                "ejected_for": max(0.0, round(self.ejected_until - now, 3)),
                "health_check": self.last_check}


_MASK64 = (1 << 64) - 1


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that spreads every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Pool:
    """The targets of one API and the balance between them."""

    def __init__(self, api: str, upgrade, known: dict | None = None):
        """`upgrade` is the API's routing.Upgrade; `known` the TargetStates of the pools
        before a reload, by (api, url): those kept are reused (with the new weight)."""
        self.api = api
        self.upgrade = upgrade
        self.balance = upgrade.balance
        self.hash_key = upgrade.hash_key
        self.retries = upgrade.retries
        self.targets: list[TargetState] = []
        for entry in upgrade.targets:
            state = (known or {}).get((api, entry.url))
            if state is None:
                state = TargetState(api, entry)
            else:
                state.weight, state.endpoint = entry.weight, entry.endpoint
            self.targets.append(state)
        self.by_label = {t.label: t for t in self.targets}
        self.by_url = {t.url: t for t in self.targets}

    def find(self, target: str) -> TargetState | None:
        """The target named by its URL as configured, or without its query."""
        return self.by_url.get(target) or self.by_label.get(target)

    def candidates(self, tried, now: float) -> list[TargetState]:
        """The targets not draining and not tried: those up, or all of them (fail open)."""
        fit, up = [], []
        for t in self.targets:
            if t.draining or t in tried:
                continue
            fit.append(t)
            if t.healthy and t.ejected_until <= now:     # t.up(now), inline: once per dial
                up.append(t)
        return up or fit

    def pick(self, key: str | None, tried, now: float) -> TargetState | None:
        """The target of the next dial (see the module's docstring), or None when every
        target is draining or tried. `key` is the hash key's value (consistent-hash)."""
        if len(self.targets) == 1:              # one target-url: as before pools
            t = self.targets[0]
            return None if t.draining or t in tried else t
        cands = self.candidates(tried, now)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        mode = self.balance
        if mode == "consistent-hash" and key is not None:
            return self._by_hash(key, cands)
        if mode == "round-robin":
            return self._round_robin(cands)
        if mode == "random":
            a, b = random.choices(cands, weights=[t.weight for t in cands], k=2)
            return a if a.active * b.weight <= b.active * a.weight else b
        return self._least(cands)

    def _least(self, cands: list[TargetState]) -> TargetState:
        best = cands[0]
        tied = None
        for t in cands[1:]:
            d = t.active * best.weight - best.active * t.weight   # t's load minus best's
            if d < 0:
                best, tied = t, None
            elif d == 0:
                if tied is None:
                    tied = [best]
                tied.append(t)
        return best if tied is None else self._round_robin(tied)

    def _round_robin(self, cands: list[TargetState]) -> TargetState:
        total = 0
        best = None
        for t in cands:
            t.current += t.weight
            total += t.weight
            if best is None or t.current > best.current:
                best = t
        best.current -= total
        return best

    def _by_hash(self, key: str, cands: list[TargetState]) -> TargetState:
        h = _hash64(key)
        best, top = cands[0], -1.0
        for t in cands:
            u = (_mix64(h ^ t.seed) + 1) / 18446744073709551617.0    # in (0, 1): / (2**64 + 1)
            score = t.weight / -math.log(u)
            if score > top:
                best, top = t, score
        return best

    # ---- what dials tell (the passive checks) ----------------------------------------

    def dial_ok(self, t: TargetState, now: float) -> None:
        """A dial of `t` succeeded: its failures in a row start again, and so do its
        ejections once it is back."""
        t.fails_in_row = 0
        if t.ejected_until <= now:
            t.ejections = 0

    def dial_failed(self, t: TargetState, refusal, now: float) -> float:
        """A dial of `t` failed with `refusal` (its `cause` counted). With `outlier`, a
        failure of the instance (not a 4xx answer) counts towards `failures` in a row,
        which eject it for `eject`, doubled at each ejection in a row (MAX_EJECTION at
        most, or `eject` if longer). Returns the ejection's length (s), or 0."""
        cause = refusal.cause or "handshake"
        t.dial_failures[cause] = t.dial_failures.get(cause, 0) + 1
        outlier = self.upgrade.outlier
        if outlier is None or not (refusal.retry or cause == "timeout"):
            return 0.0
        t.fails_in_row += 1
        if t.fails_in_row < outlier.failures or t.ejected_until > now:
            return 0.0
        t.fails_in_row = 0
        t.ejections += 1
        eject = min(float(outlier.eject) * 2 ** (t.ejections - 1),
                    max(MAX_EJECTION, float(outlier.eject)))
        t.ejected_until = now + eject
        return eject


def hash_value(hash_key: str | None, admission, headers, query: str) -> str | None:
    """The value that consistent-hash hashes for one upgrade, or None (absent): the client's
    identity (client-id: its id, else its address), its address (client-ip, after trusted
    X-Forwarded-For), a request header (header:NAME) or a query parameter (query:NAME).
    `headers` is the request's (name, value) list with lower-case names."""
    if hash_key is None:
        return None
    if hash_key == "client-id":
        return admission.client_key
    if hash_key == "client-ip":
        return admission.client_ip
    kind, _, name = hash_key.partition(":")
    if kind == "header":
        name = name.lower()
        for k, v in headers:
            if k == name:
                return v
        return None
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == name:
            return v
    return None


def build_pools(router, old: dict[str, Pool] | None = None) -> dict[str, Pool]:
    """One Pool per API of `router`, keeping the TargetStates of `old` (a reload)."""
    known = {(t.api, t.url): t for p in (old or {}).values() for t in p.targets}
    return {api.name: Pool(api.name, api.upgrade, known) for api in router.apis}
