"""What a phase of the upgrade returns: continue (None), or one Refusal.

A refusal is the HTTP answer a client gets instead of a 101. Its `kind` names
the reason in metrics (`fastgw_upgrades_rejected_total{reason}`), in events
(`RejectEvent.reason`) and in logs; its `blame` says who caused it: the
client, the backend or the gateway (as Pingora's errors do). The kinds, their
statuses and who is to blame are declared here once (`KINDS`), and the
README's refusal table lists exactly these statuses (tests/unit/test_verdicts.py).

The phases (fastgw.http.handshake) return a Refusal rather than raise it; a
Refusal is an exception too so that deep sans-I/O checks (identity's JWT
verification, `identity.AuthError`) may raise it to the phase that returns it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypeAlias

Blame: TypeAlias = Literal["client", "backend", "gateway"]


class Kind(NamedTuple):
    statuses: tuple[int, ...]      # the HTTP statuses a refusal of this kind answers with
    blame: Blame
    description: str


# In the order of the events' schema (fastgw.observe.events.RejectReason).
KINDS: dict[str, Kind] = {
    "bad_request": Kind((400, 405, 426, 431), "client",
                        "malformed request, wrong method, not an upgrade, bad version"),
    "not_found": Kind((404,), "client", "no API at the path or Host"),
    "unauthorized": Kind((401,), "client", "missing or invalid credentials"),
    "forbidden": Kind((403,), "client",
                      "a valid client without access, an Origin not allowed, scopes, ws:// for wss"),
    "count_limit": Kind((429,), "client", "over a count-limit"),
    "rate_limit": Kind((429,), "client", "over a rate-limit on upgrade attempts"),
    "capacity": Kind((503,), "gateway", "a limit table full, draining"),
    "upstream_error": Kind((502,), "backend",
                           "backend unreachable or refused, bad certificate, bad subprotocol"),
    "upstream_timeout": Kind((504,), "backend", "backend did not answer in time"),
    "timeout": Kind((408,), "client", "request head not complete within the handshake timeout"),
    "internal": Kind((500,), "gateway", "a bug in the gateway"),
}

REJECT_REASONS: tuple[str, ...] = tuple(KINDS)
"""Every refusal kind, in the order above."""

# Not a refusal (no HTTP answer): a connection closed at accept() by
# limits.max-handshakes-per-ip, counted with api="" under this reason.
HANDSHAKE_LIMIT = "handshake_limit"

# The kind of a status that only one kind answers with.
_KIND_OF_STATUS: dict[int, str] = {}
for _name, _kind in KINDS.items():
    for _status in _kind.statuses:
        _KIND_OF_STATUS[_status] = None if _status in _KIND_OF_STATUS else _name  # type: ignore[assignment]
del _name, _kind, _status

STATUSES: frozenset[int] = frozenset(_KIND_OF_STATUS)
"""Every HTTP status a refusal may answer with."""


class Refusal(Exception):
    """An HTTP answer instead of the upgrade.

    `kind` defaults to the one kind of `status` (a status that several kinds
    share, 429, needs it named). `api` is the API the request was routed to
    (None before routing), `client` the client key once identified.
    `table_full` names the policy (count-limit, rate-limit) whose key found no
    slot in the limit table, for fastgw_limit_table_full_total.
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None,
                 kind: str | None = None, table_full: str | None = None):
        super().__init__(reason)
        if kind is None:
            kind = _KIND_OF_STATUS.get(status)
            if kind is None:
                raise ValueError(f"HTTP {status}: name the refusal's kind")
        elif status not in KINDS[kind].statuses:
            raise ValueError(f"a {kind} refusal answers {KINDS[kind].statuses}, not {status}")
        self.status = status
        self.reason = reason
        self.headers = list(headers) if headers else []
        self.kind = kind
        self.table_full = table_full
        self.api: str | None = None
        self.client: str | None = None
        # A failed dial (fastgw.upstream.Dial): why (pool.DIAL_FAILURE_REASONS), and whether
        # another target of the pool may be tried (not after a time-out or a 4xx answer).
        self.cause: str | None = None
        self.retry = False

    @property
    def blame(self) -> Blame:
        return KINDS[self.kind].blame

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.reason!r}, kind={self.kind!r})"
