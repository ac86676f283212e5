"""Structured connection events: one JSON object per line, written without blocking the relay.

Every connection that reaches the gateway ends up as events:

* an accepted connection gives one :class:`UpgradeEvent` when its 101 is sent and one
  :class:`CloseEvent` when it ends, however it ends;
* a refused one gives one :class:`RejectEvent` (the HTTP answer it got instead of a 101).

The schema
==========

This is the contract that consumers of the event stream rely on. Each line is one JSON object;
its first key is ``event``, which names the type; every field listed is always present (``null``
where the type allows it), and field names are snake_case. New fields may be added later; fields
are never renamed or removed without a note in the changelog.

``upgrade`` (:class:`UpgradeEvent`): a connection was accepted and relayed.
    ``time`` (float, Unix seconds), ``id`` (int, the connection id, unique within one process),
    ``api`` (str, the API's name), ``client`` (str, the client key: the API key's client, the
    JWT subject or the peer address, as the API identifies clients), ``remote`` (str, the peer
    address), ``subprotocol`` (str or null, the one the backend chose), ``handshake_ms`` (float,
    from the accept to the 101), ``plan`` (str, the client's plan).

``reject`` (:class:`RejectEvent`): an upgrade request was answered with an HTTP error.
    ``time``, ``api`` (str or null: null when no API matched), ``reason`` (one of
    :data:`REJECT_REASONS`), ``status`` (int, the HTTP status sent), ``client`` (str or null:
    null when the client was not identified yet), ``remote`` (str), ``detail`` (str, the
    human-readable reason, as in the answer's body or the log).

``close`` (:class:`CloseEvent`): an accepted connection ended.
    ``time``, ``id``, ``api``, ``client``, ``code`` (int, the close code the client got or sent;
    1006 when there was none), ``reason`` (str, the close reason, possibly empty), ``side``
    (``"client"``, ``"backend"`` or ``"gateway"``: who ended it), ``duration_s`` (float, from
    the 101 to the end), ``messages_in``, ``messages_out``, ``bytes_in``, ``bytes_out`` (int;
    "in" is the request flow, client to backend; "out" is the response flow, backend to client),
    ``rejected``, ``delayed``, ``dropped`` (int: messages of both flows that the message limits
    rejected, delayed or dropped).

An example line::

    {"event":"close","time":1767225600.25,"id":42,"api":"quotes","client":"acme","code":1000,
     "reason":"","side":"client","duration_s":12.5,"messages_in":3,"messages_out":120,
     "bytes_in":96,"bytes_out":18230,"rejected":0,"delayed":0,"dropped":0}

(one line in the stream; wrapped here). :func:`decode_event` turns a line back into a Struct.

Writing
=======

:class:`EventSink` takes events on the event loop (``emit``: encode and append to a bounded
in-memory queue, about a microsecond) and writes them from a background thread, which gathers
what arrives within 20 ms into one write (one wake-up per burst, not one per event). When the queue is
full, new events are dropped and counted; the relay never waits for the disk or for a slow
reader of standard output.

This module imports nothing else from fastgw.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import stat
import sys
import threading
import time
from time import time as _now
from typing import Literal, TypeAlias

import msgspec

from fastgw.verdicts import REJECT_REASONS

__all__ = [
    "REJECT_REASONS",
    "CloseEvent",
    "CloseSide",
    "Event",
    "EventSink",
    "RejectEvent",
    "RejectReason",
    "TargetDownEvent",
    "TargetDrainEvent",
    "TargetUpEvent",
    "UpgradeEvent",
    "decode_event",
]

# --------------------------------------------------------------------------- the schema

RejectReason: TypeAlias = Literal[REJECT_REASONS]  # type: ignore[valid-type]
"""Why an upgrade was refused: the ``reason`` field of a :class:`RejectEvent` (the kinds
declared in :data:`fastgw.verdicts.KINDS`, in that order)."""

CloseSide: TypeAlias = Literal["client", "backend", "gateway"]
"""Who ended a connection: the ``side`` field of a :class:`CloseEvent`."""


class _EventBase(msgspec.Struct, kw_only=True, tag_field="event"):
    """Fields common to all events. ``time`` defaults to now (Unix seconds)."""

    time: float = msgspec.field(default_factory=_now)


class UpgradeEvent(_EventBase, kw_only=True, tag="upgrade"):
    """A connection was accepted: the backend answered 101 and the client got its 101."""

    id: int
    api: str
    client: str
    remote: str
    subprotocol: str | None
    handshake_ms: float
    plan: str


class RejectEvent(_EventBase, kw_only=True, tag="reject"):
    """An upgrade request was refused with an HTTP error instead of a 101."""

    api: str | None
    reason: RejectReason
    status: int
    client: str | None
    remote: str
    detail: str


class CloseEvent(_EventBase, kw_only=True, tag="close"):
    """An accepted connection ended. Emitted exactly once per :class:`UpgradeEvent`."""

    id: int
    api: str
    client: str
    code: int
    reason: str
    side: CloseSide
    duration_s: float
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    rejected: int
    delayed: int
    dropped: int


class TargetDownEvent(_EventBase, kw_only=True, tag="target_down"):
    """A target of an API's pool went out of it: its active checks failed
    (``reason: health-check``) or its dials did (``reason: outlier``, ejected for
    ``eject_s``)."""

    api: str
    target: str                    # its URL as configured, without the query
    reason: Literal["health-check", "outlier"]
    detail: str
    eject_s: float | None = None


class TargetUpEvent(_EventBase, kw_only=True, tag="target_up"):
    """A target is back in its pool: its active checks passed again, its ejection ended,
    or an operator enabled it (``reason: enable``)."""

    api: str
    target: str
    reason: Literal["health-check", "outlier", "enable"]


class TargetDrainEvent(_EventBase, kw_only=True, tag="target_drain"):
    """An operator began draining a target: no new connection goes to it, and its
    ``connections`` live ones are closed with 1001 over ``grace_s``."""

    api: str
    target: str
    grace_s: float
    connections: int


Event: TypeAlias = (UpgradeEvent | RejectEvent | CloseEvent | TargetDownEvent | TargetUpEvent
                    | TargetDrainEvent)

_decoder = msgspec.json.Decoder(Event)


def decode_event(line: bytes | str) -> Event:
    """Decode one line of the event stream (a trailing newline is allowed) into its Struct.

    Raises ``msgspec.ValidationError`` (or ``msgspec.DecodeError`` for malformed JSON) when the
    line does not follow the schema, e.g. an unknown ``event`` or a missing field.
    """
    return _decoder.decode(line)


# --------------------------------------------------------------------------- the sink

_STDOUT_TARGETS = ("-", "stdout")

# The writer thread takes at most this many lines per write(), so that the memory held outside
# the queue (which is what max_queue bounds) stays small.
_BATCH_LINES = 1024
_GATHER_SECONDS = 0.02


class EventSink:
    """Writes events as JSON lines to standard output or to a file, off the event loop.

    ``target`` is ``"-"`` or ``"stdout"`` for standard output, a file path (opened for
    appending, created with mode 0644 if missing), or ``None`` for a disabled sink, whose
    :meth:`emit` returns at once. Opening happens here, so a bad path raises ``OSError`` from
    the constructor (a FIFO without a reader too, rather than blocking).

    :meth:`emit` is called on the event loop's thread: it encodes the event with a reusable
    ``msgspec.json.Encoder`` and appends the bytes to a ``collections.deque``. If ``max_queue``
    events are already waiting, the event is dropped and counted in :attr:`dropped`. Callers on
    a hot path may test :attr:`enabled` before building an event at all.

    Why a thread of our own rather than ``loop.run_in_executor``: the writer must keep going
    however slow the target is, and a blocked write must not occupy a worker of the loop's
    default executor, which the gateway also uses for DNS lookups when dialling backends. A
    dedicated daemon thread blocks only itself; it needs no running loop (the CLI and tests can
    use the sink synchronously), and it wakes through a ``threading.Event`` that ``emit`` sets
    only when the writer is idle, so a busy stream costs no lock per event. It takes everything
    queued (up to 1024 lines at a time) and writes it with one ``write()`` call (more only if
    the kernel accepts part of it), unbuffered, so nothing waits in a user-space buffer.

    A write that fails (disk full, standard output closed by its reader) never raises into the
    loop: the lines it lost are counted in :attr:`dropped`, one warning goes to standard error
    (once per sink), and later batches are tried again. If a failure cut a line in half, the
    next batch starts with a newline, so that every later line is still valid JSON.

    Counters: :attr:`emitted` counts ``emit`` calls on an enabled sink, :attr:`written` the lines
    written, :attr:`dropped` the lines lost (queue full, write error, emitted after or left over
    at :meth:`close`). Once :meth:`close` has returned with the writer stopped,
    ``emitted == written + dropped``.

    :meth:`close` (or ``await`` :meth:`aclose` from a coroutine) writes what is queued and stops
    the writer, waiting at most ``timeout`` seconds. It must be called: the writer is a daemon
    thread, and what is still queued when the process exits is lost.

    One sink per process: with ``workers: N``, create it in each worker after the fork (threads
    do not survive ``fork``). Several processes may append to the same file; each batch is one
    ``write()`` on a file opened with ``O_APPEND``, so their lines do not interleave on a local
    file system. To a pipe, a FIFO or a terminal (standard output under a supervisor or a log
    collector) only a write of at most ``PIPE_BUF`` (4096) bytes is atomic, so there a batch is
    written in blocks of whole lines of at most that size (a longer line alone).
    """

    def __init__(self, target: str | None, *, max_queue: int = 10000) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, not {max_queue}")
        self.target = target
        self.max_queue = max_queue
        self._queue: collections.deque[bytes] | None = None
        self._emitted = 0
        self._written = 0            # updated by the writer thread only
        self._dropped_full = 0       # updated by the emitting thread only
        self._dropped_write = 0      # updated by the writer thread only
        self._dropped_close = 0      # updated by close() only
        self._closed = False
        if target is None:
            return

        self._file, self._owns_file = _open_target(target)
        self._block = _atomic_block(self._file.fileno())
        self._encode = msgspec.json.Encoder().encode
        self._queue = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._torn = False           # the last failed write ended in the middle of a line
        self._warned = False
        self._thread = threading.Thread(
            target=self._run, name=f"fastgw-events:{target}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ loop side

    @property
    def enabled(self) -> bool:
        """True if events go somewhere (the target was not None and the sink is not closed)."""
        return self._queue is not None and not self._closed

    @property
    def emitted(self) -> int:
        """How many events were passed to :meth:`emit` (on an enabled sink)."""
        return self._emitted

    @property
    def written(self) -> int:
        """How many lines were written to the target."""
        return self._written

    @property
    def dropped(self) -> int:
        """How many events were lost: queue full, write error, or emitted after close."""
        return self._dropped_full + self._dropped_write + self._dropped_close

    @property
    def queued(self) -> int:
        """How many events wait in the queue now."""
        return len(self._queue) if self._queue is not None else 0

    def emit(self, event: Event) -> None:
        """Queue one event for writing; never blocks. Drops it (counted) if the queue is full.

        Call it from one thread (the event loop's). An object that msgspec cannot encode raises
        here: that is a bug in the caller, not a condition of the target.
        """
        queue = self._queue
        if queue is None:
            return
        self._emitted += 1
        if len(queue) >= self.max_queue or self._closed:
            self._dropped_full += 1
            return
        queue.append(self._encode(event))
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, stop the writer and close the file; wait at most ``timeout`` s.

        If the writer is still stuck after ``timeout`` (a reader that never reads), the events
        left in the queue are counted as dropped and the file is left open to the (daemon)
        writer thread, which closes it when it gets unstuck. Calling it again does nothing.
        """
        if self._queue is None or self._closed:
            self._closed = True
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Whatever the writer has not taken yet is lost. Take it out of the queue, so that
            # a late wake-up of the writer does not write (and count) it as well.
            while True:
                try:
                    self._queue.popleft()
                except IndexError:
                    break
                self._dropped_close += 1

    async def aclose(self, timeout: float = 2.0) -> None:
        """:meth:`close` from a coroutine: the waiting happens in a thread, not on the loop."""
        await asyncio.to_thread(self.close, timeout)

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        """The writer thread: sleep until woken, write everything queued, repeat until stopped."""
        queue = self._queue
        assert queue is not None
        while True:
            self._wake.wait()
            if not self._stopping:
                # Let a burst gather: one wake-up and one write per interval, not one per
                # event (each wake-up of this thread costs the event loop a GIL hand-off).
                time.sleep(_GATHER_SECONDS)
            # Clear before draining: an emit after this point sets the event again, so an event
            # appended after the drain below found the queue empty is never left behind.
            self._wake.clear()
            stopping = self._stopping
            while queue:
                batch = []
                while len(batch) < _BATCH_LINES:
                    try:
                        batch.append(queue.popleft())
                    except IndexError:
                        break
                self._write_batch(batch)
            if stopping:
                if self._owns_file:
                    try:
                        self._file.close()
                    except Exception:  # noqa: BLE001 - e.g. a failed final flush
                        pass
                return

    def _write_batch(self, lines: list[bytes]) -> None:
        """Write ``lines`` (JSON without newlines) as one block; count the lines lost on error."""
        if self._block is not None:
            for block in _blocks(lines, self._block):
                self._write_block(block)
        else:
            self._write_block(lines)

    def _write_block(self, lines: list[bytes]) -> None:
        prefix = b"\n" if self._torn else b""
        data = prefix + b"\n".join(lines) + b"\n"
        done = 0
        try:
            view = memoryview(data)
            while done < len(data):
                n = self._file.write(view[done:])
                if n is None:  # a non-blocking target that is full
                    raise BlockingIOError("the target would block")
                done += n
            self._file.flush()
        except Exception as exc:  # noqa: BLE001 - the writer must outlive any error
            complete = data.count(b"\n", len(prefix), done) if done > len(prefix) else 0
            self._written += complete
            self._dropped_write += len(lines) - complete
            if done > 0:
                self._torn = data[done - 1] != 0x0A
            self._warn(exc)
            return
        self._torn = False
        self._written += len(lines)

    def _warn(self, exc: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        try:
            sys.stderr.write(
                f"fastgw: event sink {self.target!r}: write failed ({exc}); "
                "events are being dropped (see the dropped counter)\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - no stderr either: nothing more to do
            pass


def _atomic_block(fd: int) -> int | None:
    """Bytes one write() to `fd` may hold without interleaving with another process's writes:
    None for a regular file (O_APPEND writes are atomic), PIPE_BUF for anything else."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return select.PIPE_BUF
    return None if stat.S_ISREG(mode) else select.PIPE_BUF


def _blocks(lines: list[bytes], limit: int):
    """`lines` in runs whose joined size (a newline each, one more for a torn line before) is at
    most `limit`; a longer line makes a run of its own."""
    block: list[bytes] = []
    size = 1
    for line in lines:
        n = len(line) + 1
        if block and size + n > limit:
            yield block
            block, size = [], 1
        block.append(line)
        size += n
    if block:
        yield block


def _open_target(target: str):
    """Open the target for unbuffered binary writing; return (file, whether we close it)."""
    if target in _STDOUT_TARGETS:
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, ValueError, OSError):
            fd = 1  # sys.stdout replaced by something without a descriptor (or None)
        try:
            sys.stdout.flush()  # what was printed before comes first
        except (AttributeError, ValueError, OSError):
            pass
        return open(fd, "wb", buffering=0, closefd=False), False
    # O_NONBLOCK only for the open itself: a FIFO without a reader fails (ENXIO) instead of
    # blocking the caller forever. Writes are blocking: they happen in the writer thread.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open the event file: {exc.strerror}", target) from None
    os.set_blocking(fd, True)
    return open(fd, "wb", buffering=0), True
