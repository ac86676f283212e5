"""Typed stub of the fastgw core (src/fastgw/_core.pyx and its .pxi files): what Python calls."""

from __future__ import annotations

import enum
from typing import Any, Callable

from fastgw.clock import Clock

class Verdict(enum.IntEnum):
    """A message policy's verdict on one data frame."""

    PASS = 0
    REJECT = 1
    DELAY = 2
    DROP = 3

class Action(enum.IntEnum):
    """What a message-rate-limit does to a message over it."""

    ACTION_REJECT = 0
    ACTION_DELAY = 1
    ACTION_DROP = 2

class Scope(enum.IntEnum):
    """Whose bucket a message-rate-limit takes from."""

    SCOPE_CONNECTION = 0
    SCOPE_CLIENT = 1
    SCOPE_API = 2

def key_hash(key: str | bytes) -> int:
    """Stable 64-bit hash of a key (never 0 nor 2**64 - 1)."""

class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float
    def __init__(self, rate: float, burst: float, now: float) -> None: ...
    def take(self, now: float, cost: float = 1.0) -> float: ...

class Lease:
    """The connection counts one connection holds (LimitStore.try_acquire)."""

    released: bool
    def release(self) -> None: ...
    def __len__(self) -> int: ...

class LimitStore:
    """Where limits keep their state; time is passed in."""

    def take_py(self, key: int, rate: float, burst: float, now: float, cost: float = 1.0) -> float:
        """0.0 admitted, > 0 seconds to wait, -1.0 no room for the key."""
    def acquire_py(self, key: int, limit: int) -> int:
        """1 counted, 0 at the limit, -1 no room."""
    def release_py(self, key: int) -> None: ...
    def try_acquire(self, keys: list[tuple[int, int]]) -> Lease | int:
        """A Lease, or the index of the first key at its limit, or -1 (no room)."""

class ShareMode(enum.IntEnum):
    SHARE_LEASED = 0
    SHARE_LOCAL = 1
    SHARE_CLOSED = 2

class ShareKind(enum.IntEnum):
    SHARE_COUNT = 1
    SHARE_BUCKET = 2

class ClusterStore(LimitStore):
    """One process's leased shares of cluster-wide keys (cluster_decl.pxi); other keys
    go to `local`."""

    local: LimitStore
    idle_wait: float
    def __init__(self, local: LimitStore, idle_wait: float = 0.05) -> None: ...
    def add(self, key: int, kind: ShareKind, now: float) -> bool: ...
    def remove(self, key: int) -> bool: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: int) -> bool: ...
    def set_count(self, key: int, slots: int, mode: ShareMode = ...) -> None: ...
    def set_bucket(self, key: int, rate: float, burst: float, credit: float, now: float,
                   mode: ShareMode = ..., valid_until: float = ...,
                   expired_mode: ShareMode = ...) -> float: ...
    def report(self, key: int) -> tuple: ...
    def due(self, now: float, idle_after: float) -> list[int]: ...
    def info(self, key: int) -> dict[str, Any]: ...
    def used(self, key: int) -> int: ...
    def room(self, key: int, limit: int) -> int: ...
    def note_refused(self, key: int) -> None: ...

class LimitZone(LimitStore):
    """The shared-memory LimitStore of a process and its forked workers,
    exact across them (atomics; process slots and shares, see limits_decl.pxi)."""

    def __init__(self, max_keys: int, workers: int = 1) -> None: ...
    workers: int
    worker: int
    def set_worker(self, slot: int) -> None:
        """In a worker after fork: its process slot (records os.getpid())."""
    def beat(self, now: float) -> None: ...
    def worker_info(self, slot: int) -> dict[str, Any]:
        """{"pid": int, "beat": float, "held": int}."""
    def reconcile(self, slot: int) -> int:
        """Supervisor, after the slot's process is dead: give back what it held."""
    def count(self, key: int) -> int: ...
    def room(self, key: int, limit: int) -> int: ...
    def share(self, key: int, slot: int) -> int: ...
    def bucket(self, key: int) -> float | None: ...
    def buckets_used(self, now: float) -> int: ...
    def counts_used(self) -> int: ...
    def home_slot(self, key: int) -> int: ...
    def layout(self) -> dict[str, int]: ...
    capacity: int
    overflows: int
    message_overflows: int
    count_overflows: int
    bucket_reuses: int
    count_reuses: int
    lease_leaks: int
    lock_steals: int
    lock_timeouts: int
    unquiet: int
    pending_ops: int

class HdrArray:
    """The counts of an HdrHistogram, recorded from C (hdr.pxi)."""

    counts_len: int
    lowest: int
    highest: int
    sig_figs: int
    min_value: int
    max_value: int
    overflows: int
    total_count: int
    def __init__(self, lowest: int = 1, highest: int = 3_600_000_000,
                 significant_figures: int = 3) -> None: ...
    def counts_index(self, value: int) -> int: ...
    def count_at_index(self, index: int) -> int: ...
    def record_py(self, value: int, n: int = 1) -> bool: ...
    def record_many(self, values: Any) -> int: ...
    def reset(self) -> None: ...
    def to_hdr(self) -> Any: ...
    def copy_and_reset(self) -> Any: ...
    def merge_into(self, hdr: Any) -> None: ...
    def cumulative(self, bounds: list[int]) -> list[int]: ...

class FlowStats:
    """Counters of one flow (request or response) of one API."""

    messages: int
    bytes: int
    rejected: int
    delayed: int
    dropped: int
    held: HdrArray | None
    held_interval: HdrArray | None
    def __init__(self, histograms: bool = True, intervals: bool = False) -> None: ...
    def size_buckets(self) -> list[tuple[int | None, int]]: ...

class RateRule:
    """One message-rate-limit of a flow with the values of a connection's plan."""

    name: str
    action: Action
    scope: Scope
    msg_rate: float
    msg_burst: float
    byte_rate: float
    byte_burst: float
    msg_key: int
    byte_key: int
    def __init__(self, name: str, action: Action, scope: Scope, *, msg_rate: float = 0.0,
                 msg_burst: float = 1.0, byte_rate: float = 0.0, byte_burst: float = 1.0,
                 msg_key: int = 0, byte_key: int = 0) -> None: ...

class MessagePolicy:
    wait: float

class SizeLimit(MessagePolicy):
    max: int
    def __init__(self, max: int) -> None: ...

class RateLimit(MessagePolicy):
    all_local: bool
    def __init__(self, rules: list[RateRule], store: LimitStore | None = None,
                 now: float = 0.0) -> None: ...
    def limited(self) -> list[int]: ...

class Leg:
    """One side of a relayed connection (the asyncio buffered protocol of its transport)."""

    # the asyncio protocol
    def connection_made(self, transport: Any) -> None: ...
    def get_buffer(self, sizehint: int) -> Leg: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> None: ...
    @property
    def data_received(self) -> Callable[[bytes], None]: ...   # feed(); missing until connected
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    # the server's
    def feed(self, data: bytes) -> None: ...
    def set_policies(self, rules: list[RateRule], store: LimitStore | None = None,
                     max_message_size: int | None = None, now: float | None = None,
                     stats: FlowStats | None = None) -> None: ...
    def decide(self, opcode: int, fin: bool, size: int, now: float,
               retry: bool = False) -> tuple[Verdict, float]: ...
    def rule_limited(self) -> list[int]: ...
    def set_compression(self, on: bool) -> None: ...
    def send_ping(self, payload: bytes) -> bool: ...
    def abort_transport(self) -> None: ...
    connected: bool
    closing: bool
    paused: bool
    input_buffer: tuple[int, int]
    reads: int
    messages: int
    frames: int
    bytes: int
    rejected: int
    delayed: int
    dropped: int
    compression: bool

class Relay:
    """A proxied connection: a client leg, a backend leg and its end of life."""

    client: Leg
    backend: Leg
    ended: bool
    aborted: bool
    failed: bool
    info: Any
    clock: Clock
    end_code: int
    end_reason: bytes
    end_side: str | None
    messages: tuple[int, int]
    bytes: tuple[int, int]
    activity: int
    def __init__(self, on_end: Callable[[Relay], Any] | None, info: Any = None, *,
                 clock: Clock | None = None, max_frame_size: int = 16 * 1024 * 1024,
                 max_early_bytes: int = 256 * 1024, close_timeout: float = 5.0) -> None: ...
    def close(self, client_code: int = 1001, reason: str | bytes = "",
              backend_code: int = 1001) -> None: ...
    def lost(self, client_side: bool, reason: str | bytes) -> None: ...
    def abort(self) -> None: ...


class Request:
    """A parsed HTTP request head (fastgw.http.head re-exports it)."""
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    def __init__(self, method: str, target: str, version: str,
                 headers: list[tuple[str, str]]) -> None: ...
    def get_all(self, name: str) -> list[str]: ...
    def get(self, name: str) -> str | None: ...
    def count(self, name: str) -> int: ...
    def tokens(self, name: str) -> list[str]: ...

def parse_request_head(head: bytes) -> Request | str: ...
def parse_response_head(head: bytes) -> tuple[int, dict[str, str]] | str: ...

NOT_FORWARDED: frozenset[str]
def check_request(req: Request) -> tuple[int, str, list[tuple[str, str]]] | None: ...
def check_websocket(req: Request, allowed: frozenset[str] | None
                    ) -> list[str] | tuple[int, str, list[tuple[str, str]]]: ...
def backend_headers(req: Request, peer_ip: str, node: str, secure: bool, offered: list[str],
                    admission: object = None, extensions: str | None = None
                    ) -> list[tuple[str, str]]: ...
def upgrade_request(start: str, key: str, headers: list[tuple[str, str]]) -> bytes: ...
