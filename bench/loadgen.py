#!/usr/bin/env python3
"""fastgw load generator: a picows WebSocket client on uvloop.

Modes
-----
throughput
    ``--connections`` connections, each keeping ``--inflight`` messages in flight (pipelined
    echo: send W messages, then one more for each one received) for ``--duration`` seconds
    after ``--warmup`` seconds. All frames sent in reaction to one socket read go out in one
    write. Every echoed message is checked (length and the sequence number in its first 8 bytes;
    with ``--verify full`` the whole payload) and lost / out-of-order / corrupted messages are
    counted: they must be 0. Reports messages/s, payload MB/s (one direction, MB = 10^6 bytes)
    and the client's own CPU use (process CPU time / wall time over the measured window, summed
    over worker processes), so that a saturated client is visible.

latency
    Request/response (one message in flight per connection) on ``--connections`` connections at
    a fixed total ``--rate``. Message k is *intended* to leave at t0 + k/rate on connection
    k % connections; if that connection is still waiting for its previous answer, message k
    waits in line. Each round trip is recorded (µs) into ``HdrHistogram(1, 60_000_000, 3)``
    from the intended send time (corrected for coordinated omission); a second histogram from
    the actual send time is reported as ``service``. The schedule is driven by a Linux timerfd
    watched by the event loop (µs precision; uvloop's own timers have 1 ms granularity),
    falling back to ``loop.call_at`` elsewhere.

connrate
    Connection rate: ``--connections`` workers, each repeating for ``--duration`` seconds after
    ``--warmup`` seconds one whole connection cycle: TCP connect + WebSocket upgrade (bounded
    by 5 s), one message of ``--size`` bytes and its echo (checked as above, bounded by 5 s),
    then a normal close handshake (CLOSE 1000, wait up to 2 s for the peer's CLOSE and for the
    peer to hang up, RFC 6455 7.1.1, so that the TIME_WAIT sockets stay on the server side).
    The handshake time (from just before the TCP connect until the upgrade completed, µs) of
    every successful cycle that *started* inside the measured window is recorded into
    ``HdrHistogram(1, 60_000_000, 3)``; ``upgrades`` counts those cycles, so the histogram's
    total count equals ``upgrades``. Failed cycles (of the warmup too) are counted in
    ``failures`` (up to 5 distinct error texts in ``errors``); a worker whose cycle failed
    waits 10 ms before the next one. ``--processes`` splits the workers over processes as in
    throughput mode (counts and CPU summed, histograms added). JSON keys: mode, connections, size, duration, upgrades,
    upgrades_per_s, failures, errors, handshake_us, hist (base64 HDR), client_cpu_pct, lost.

idle
    Held idle connections: raises the RLIMIT_NOFILE soft limit to the hard limit, then opens
    ``--connections`` connections with at most ``--concurrency`` upgrades in flight and prints
    one line ``{"event": "holding", "open", "failed", "open_seconds"}`` on stdout (flushed).
    It then holds them, sending nothing, until a line arrives on stdin, stdin reaches EOF or
    ``--duration`` seconds passed (default 5: give e.g. ``--duration 3600`` when a parent
    process decides through stdin). Then every held connection gets one message of ``--size``
    bytes (at most ``--concurrency`` outstanding) and ``alive`` counts the right echoes; all
    are closed (CLOSE 1000, up to 5 s in all, then the rest are aborted) and a second line
    ``{"mode": "idle", "connections", "open", "failed", "alive", "open_seconds", "errors",
    "client_cpu_pct"}`` is printed (``client_cpu_pct``: over the whole run). All connections share one mask key and picows' smallest
    read buffer (2 KiB, grown on demand), so a held connection costs little client memory.

Output: one JSON object on stdout (idle: the holding line, then the result); a human summary
on stderr. Exit status 1 when messages were lost, corrupted or a connection failed (connrate:
``failures`` > 0 or ``lost`` > 0; idle: ``failed`` > 0 or ``alive`` < ``open``).

Client frames are masked as RFC 6455 requires. Each connection (connrate: each worker; idle: the
whole run) draws one random, non-zero 4-byte mask key (os.urandom) at start and uses it for every frame it sends. The payload is an
8-byte big-endian sequence number followed by fixed filler, so the masked filler is computed
once and only the 8 sequence bytes are masked per message. The receiver still unmasks every
byte, as it would for a per-frame random key.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import os
import ssl
import struct
import sys
import time
from typing import Any

from picows import WSListener, WSMsgType, WSTransport, ws_connect

from fastgw.loops import loop_runner

# --ca FILE: wss:// with this CA (TLS 1.3 only); None: plain ws (unchanged).
TLS_CONTEXT: "ResumingContext | None" = None
TLS_RESUME = False  # --tls-resume: connrate offers the last connection's TLS 1.3 ticket


class ResumingContext(ssl.SSLContext):
    """A client context that passes ``self.session`` to every new SSL object: uvloop's SSL
    transport calls wrap_bio() without a session, so this is how create_connection resumes."""

    session: Any = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                session if session is not None else self.session)


def make_tls_context(ca: str) -> ResumingContext:
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx

_CONT = int(WSMsgType.CONTINUATION)
_TEXT = int(WSMsgType.TEXT)
_BINARY = int(WSMsgType.BINARY)
_CLOSE = int(WSMsgType.CLOSE)

_SEQ = struct.Struct("!Q")
_SEQ_unpack_from = _SEQ.unpack_from
_MV_THRESHOLD = 2048
HIST_ARGS = (1, 60_000_000, 3)  # µs, 1 µs .. 60 s, 3 significant digits
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


# ---------------------------------------------------------------------------------------------
# frames


def _filler(n: int) -> bytes:
    pattern = bytes(range(33, 127))  # printable, so TEXT would be valid too
    return (pattern * (n // len(pattern) + 1))[:n]


class FrameMaker:
    """Builds masked client BINARY frames: header + mask key + masked(seq) + masked(filler)."""

    def __init__(self, size: int):
        if size < 8:
            raise ValueError("--size must be >= 8 (the sequence number takes 8 bytes)")
        self.size = size
        self.filler = _filler(size - 8)
        key = b"\x00\x00\x00\x00"
        while key == b"\x00\x00\x00\x00":
            key = os.urandom(4)
        if size < 126:
            head = bytes((0x80 | _BINARY, 0x80 | size))
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | _BINARY, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | _BINARY, 0x80 | 127, size)
        self.prefix = head + key
        self.seq_mask = int.from_bytes(key * 2, "big")
        # The filler starts at payload offset 8, a multiple of 4: the key applies unrotated.
        n = len(self.filler)
        if n:
            keystream = (key * (n // 4 + 1))[:n]
            self.masked_filler = (
                int.from_bytes(self.filler, "big") ^ int.from_bytes(keystream, "big")
            ).to_bytes(n, "big")
        else:
            self.masked_filler = b""

    def append(self, out: bytearray, seq: int) -> None:
        out += self.prefix
        out += (seq ^ self.seq_mask).to_bytes(8, "big")
        out += self.masked_filler

    def frame(self, seq: int) -> bytearray:
        out = bytearray()
        self.append(out, seq)
        return out


# ---------------------------------------------------------------------------------------------
# throughput


class ThroughputConn(WSListener):  # type: ignore[misc]
    def __init__(self, size: int, inflight: int, verify_full: bool):
        super().__init__()
        self.maker = FrameMaker(size)
        self.size = size
        self.inflight = inflight
        self.verify_full = verify_full
        self.transport: WSTransport | None = None
        self.write: Any = None
        self.out = bytearray()
        self.sent = 0
        self.received = 0
        self.expect = 0
        self.out_of_order = 0
        self.bad = 0
        self.stopping = False
        self.closed_by_peer: tuple[int, str] | None = None
        self.frag: bytearray | None = None
        self.drained: asyncio.Future[None] | None = None
        self.disconnected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write

    def start(self) -> None:
        out = self.out
        for _ in range(self.inflight):
            self.maker.append(out, self.sent)
            self.sent += 1
        self._flush()

    def _flush(self) -> None:
        out = self.out
        if out:
            self.out = bytearray()  # uvloop may keep a view of what it could not send yet
            self.write(out)

    def _check(self, payload: Any) -> None:
        """Check one whole message (bytes, bytearray or memoryview)."""
        if len(payload) != self.size:
            self.bad += 1
            return
        seq = _SEQ.unpack_from(payload)[0]
        if seq != self.expect:
            self.out_of_order += 1
        self.expect = seq + 1
        if self.verify_full and bytes(payload[8:]) != self.maker.filler:
            self.bad += 1

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        # The common path (a whole BINARY message, then one new frame) is written out inline:
        # a Python call costs ~0.15 µs and this client shares a CPU with the backend in bench/run.py.
        try:
            mt = frame.msg_type
            if mt <= _BINARY:  # CONTINUATION, TEXT, BINARY
                if mt and frame.fin and self.frag is None:
                    n = frame.payload_size
                    if n == self.size:
                        p = frame.get_payload_as_bytes() if n <= _MV_THRESHOLD \
                            else frame.get_payload_as_memoryview()
                        seq = _SEQ_unpack_from(p)[0]
                        if seq != self.expect:
                            self.out_of_order += 1
                        self.expect = seq + 1
                        if self.verify_full and bytes(p[8:]) != self.maker.filler:
                            self.bad += 1
                    else:
                        self.bad += 1
                else:  # a fragmented message (the echo path should not produce one)
                    if self.frag is None:
                        self.frag = bytearray()
                    self.frag += frame.get_payload_as_memoryview()
                    if not frame.fin:
                        return
                    self._check(self.frag)
                    self.frag = None
                self.received += 1
                out = self.out
                if not self.stopping:
                    m = self.maker
                    out += m.prefix
                    out += (self.sent ^ m.seq_mask).to_bytes(8, "big")
                    out += m.masked_filler
                    self.sent += 1
                elif self.received == self.sent and self.drained is not None:
                    if not self.drained.done():
                        self.drained.set_result(None)
                if frame.last_in_buffer and out:
                    self.out = bytearray()  # uvloop may keep a view of what it could not send yet
                    self.write(out)
            elif mt == _CLOSE:
                self.closed_by_peer = _answer_close(transport, frame)
            elif frame.last_in_buffer:
                self._flush()
        except Exception as exc:  # never let picows see an exception
            print(f"loadgen: error in on_ws_frame: {exc!r}", file=sys.stderr)
            self.bad += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:  # bounded by --inflight; nothing to do
        pass

    def resume_writing(self) -> None:
        pass


def _answer_close(transport: WSTransport, frame: Any) -> tuple[int, str]:
    """The peer closed first: answer with its code (1000 if none) and hang up."""
    if frame.payload_size >= 2:
        code, reason = int(frame.get_close_code()), frame.get_close_reason()
    else:
        code, reason = 1005, ""
    if not transport.is_close_frame_sent:
        transport.send_close(1000 if code in (1005, 1006, 1015) or code < 1000 else code)
    transport.disconnect()
    return code, reason


async def _connect(url: str, listener: WSListener, max_frame: int) -> WSTransport:
    async with asyncio.timeout(10):
        transport, _ = await ws_connect(
            lambda: listener,
            url,
            use_aiofastnet=False,
            ssl_context=TLS_CONTEXT,
            max_frame_size=max_frame,
            websocket_handshake_timeout=5,
            logger_name="fastgw.loadgen",
        )
    return transport


async def _close_all(conns: list[Any], timeout: float = 2.0) -> None:
    for c in conns:
        t = c.transport
        if t is not None and not c.disconnected:
            try:
                t.send_close(1000, b"loadgen done")
            except Exception:
                pass
    deadline = time.monotonic() + timeout
    for c in conns:
        t = c.transport
        if t is None:
            continue
        try:
            await asyncio.wait_for(t.wait_disconnected(), max(0.01, deadline - time.monotonic()))
        except (asyncio.TimeoutError, Exception):
            t.disconnect(False)


async def _sleep_until_wall(t_wall: float | None) -> None:
    if t_wall is not None:
        delay = t_wall - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_throughput(
    url: str,
    connections: int = 8,
    inflight: int = 64,
    size: int = 64,
    duration: float = 5.0,
    warmup: float = 1.0,
    verify: str = "seq",
    start_at: float | None = None,
) -> dict[str, Any]:
    conns = [ThroughputConn(size, inflight, verify == "full") for _ in range(connections)]
    errors: list[str] = []
    max_frame = max(10 * 1024 * 1024, 2 * size)
    results = await asyncio.gather(
        *(_connect(url, c, max_frame) for c in conns), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for c in conns:
            if c.transport is not None:
                c.transport.disconnect(False)
        return {"ok": False, "errors": [f"connect: {failed[0]!r}"], "connections_failed": len(failed)}

    await _sleep_until_wall(start_at)
    gc.disable()  # per-message objects are acyclic; keep collector pauses out of the figures
    for c in conns:
        c.start()
    await asyncio.sleep(warmup)
    r0 = sum(c.received for c in conns)
    cpu0, w0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    r1 = sum(c.received for c in conns)
    cpu1, w1 = time.process_time(), time.perf_counter()
    gc.enable()

    # Stop sending, wait for what is in flight.
    loop = asyncio.get_running_loop()
    waits = []
    for c in conns:
        c.stopping = True
        c.drained = loop.create_future()
        if c.received == c.sent or c.disconnected:
            c.drained.set_result(None)
        waits.append(c.drained)
    try:
        await asyncio.wait_for(asyncio.gather(*waits), 5.0)
    except asyncio.TimeoutError:
        errors.append("timeout waiting for in-flight messages")
    for c in conns:
        if c.closed_by_peer is not None:
            errors.append(f"peer closed: {c.closed_by_peer}")
        elif c.disconnected:
            errors.append("connection lost")
    await _close_all(conns)

    wall = w1 - w0
    msgs = r1 - r0
    sent = sum(c.sent for c in conns)
    received = sum(c.received for c in conns)
    out = {
        "mode": "throughput",
        "url": url,
        "connections": connections,
        "inflight": inflight,
        "size": size,
        "duration": wall,
        "warmup": warmup,
        "messages": msgs,
        "msgs_per_s": msgs / wall if wall > 0 else 0.0,
        "mb_per_s": msgs * size / wall / 1e6 if wall > 0 else 0.0,
        "sent_total": sent,
        "received_total": received,
        "lost": sent - received,
        "out_of_order": sum(c.out_of_order for c in conns),
        "bad_payload": sum(c.bad for c in conns),
        "client_cpu": (cpu1 - cpu0) / wall if wall > 0 else 0.0,
        "client_cpu_us_per_msg": (cpu1 - cpu0) / msgs * 1e6 if msgs else None,
        "errors": errors[:10],
    }
    out["ok"] = (
        not errors and out["lost"] == 0 and out["out_of_order"] == 0 and out["bad_payload"] == 0
    )
    return out


def _worker(conn: Any, kwargs: dict[str, Any], fn_name: str,
            run: Any) -> None:  # pragma: no cover - child process
    try:
        res = run(globals()[fn_name](**kwargs))
    except BaseException as exc:
        res = {"ok": False, "errors": [f"worker: {exc!r}"]}
    conn.send(res)
    conn.close()


def _run_processes(fn_name: str, processes: int, kwargs: dict[str, Any],
                   start_delay: float) -> list[dict[str, Any]]:
    """Fork ``processes`` workers running ``fn_name(**kwargs)`` (each its own loop) on a share
    of ``kwargs["connections"]``, all starting at the same wall time; their results in order."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    total = kwargs.pop("connections")
    if total < processes:
        raise SystemExit("--connections must be >= --processes")
    run = _loop_runner()                # chosen (and warned about) once, for every worker
    start_at = time.time() + start_delay
    procs = []
    for i in range(processes):
        kw = dict(kwargs, connections=total // processes + (1 if i < total % processes else 0))
        kw["start_at"] = start_at
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(child, kw, fn_name, run), daemon=True)
        p.start()
        child.close()
        procs.append((p, parent))
    parts = []
    limit = time.time() + kwargs.get("warmup", 1) + kwargs.get("duration", 5) + 30 + 0.05 * total
    for p, parent in procs:
        if parent.poll(max(0.1, limit - time.time())):
            parts.append(parent.recv())
        else:
            parts.append({"ok": False, "errors": ["worker timed out"]})
        p.join(1)
        if p.is_alive():
            p.kill()
    return parts


def run_throughput_processes(processes: int, **kwargs: Any) -> dict[str, Any]:
    """Fork ``processes`` workers (each its own loop), split the connections, sum the results."""
    start_delay = 0.5 + 0.05 * kwargs["connections"]  # time to open the connections first
    return merge_throughput(_run_processes("run_throughput", processes, kwargs, start_delay),
                            processes)


def merge_throughput(parts: list[dict[str, Any]], processes: int) -> dict[str, Any]:
    good = [p for p in parts if "msgs_per_s" in p]
    errors = [e for p in parts for e in p.get("errors", [])]
    if not good:
        return {"mode": "throughput", "ok": False, "errors": errors or ["no result"]}
    out = dict(good[0])
    for key in ("connections", "messages", "msgs_per_s", "mb_per_s", "sent_total",
                "received_total", "lost", "out_of_order", "bad_payload", "client_cpu"):
        out[key] = sum(p[key] for p in good)
    out["duration"] = max(p["duration"] for p in good)
    cpu_s = sum(p["client_cpu"] * p["duration"] for p in good)
    out["client_cpu_us_per_msg"] = cpu_s / out["messages"] * 1e6 if out["messages"] else None
    out["processes"] = processes
    out["errors"] = errors[:10]
    out["ok"] = len(good) == len(parts) and all(p.get("ok") for p in parts)
    return out


# ---------------------------------------------------------------------------------------------
# latency


class _TimerFD:
    """A periodic CLOCK_MONOTONIC timerfd (Linux), read by the event loop."""

    CLOCK_MONOTONIC = 1
    TFD_NONBLOCK = os.O_NONBLOCK
    TFD_CLOEXEC = os.O_CLOEXEC
    TFD_TIMER_ABSTIME = 1

    class _TS(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class _ITS(ctypes.Structure):
        pass

    _ITS._fields_ = [("it_interval", _TS), ("it_value", _TS)]

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._create = libc.timerfd_create
        self._settime = libc.timerfd_settime
        self.fd = self._create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")

    def arm(self, first_ns: int, interval_ns: int) -> None:
        its = self._ITS()
        its.it_value.tv_sec, its.it_value.tv_nsec = divmod(first_ns, 1_000_000_000)
        its.it_interval.tv_sec, its.it_interval.tv_nsec = divmod(interval_ns, 1_000_000_000)
        if self._settime(self.fd, self.TFD_TIMER_ABSTIME, ctypes.byref(its), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def read(self) -> int:
        try:
            return int.from_bytes(os.read(self.fd, 8), sys.byteorder)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


class LatencyConn(WSListener):  # type: ignore[misc]
    def __init__(self, gen: LatencyGen, size: int, verify_full: bool):
        super().__init__()
        self.gen = gen
        self.maker = FrameMaker(size)
        self.size = size
        self.verify_full = verify_full
        self.transport: WSTransport | None = None
        self.write: Any = None
        self.waiting: tuple[int, int, int] | None = None  # (seq, intended_ns, sent_ns)
        self.queue: collections.deque[tuple[int, int]] = collections.deque()
        self.disconnected = False
        self.closed_by_peer: tuple[int, str] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write

    def submit(self, seq: int, intended_ns: int) -> None:
        if self.waiting is None:
            self._send(seq, intended_ns)
        else:
            self.queue.append((seq, intended_ns))

    def _send(self, seq: int, intended_ns: int) -> None:
        self.waiting = (seq, intended_ns, time.monotonic_ns())
        self.write(self.maker.frame(seq))

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        try:
            now = time.monotonic_ns()
            mt = frame.msg_type
            if mt == _BINARY or mt == _TEXT:
                w = self.waiting
                if w is None:
                    self.gen.unexpected += 1
                    return
                payload = frame.get_payload_as_bytes()
                ok = len(payload) == self.size and _SEQ.unpack_from(payload)[0] == w[0]
                if ok and self.verify_full and not payload.endswith(self.maker.filler):
                    ok = False
                if not ok:
                    self.gen.bad += 1
                self.waiting = None
                self.gen.record(w[1], w[2], now)
                if self.queue:
                    self._send(*self.queue.popleft())
            elif mt == _CLOSE:
                self.closed_by_peer = _answer_close(transport, frame)
        except Exception as exc:
            print(f"loadgen: error in on_ws_frame: {exc!r}", file=sys.stderr)
            self.gen.bad += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        self.gen.check_done()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class LatencyGen:
    def __init__(self, connections: int, size: int, rate: float, duration: float, warmup: float,
                 verify_full: bool):
        from hdrh.histogram import HdrHistogram

        self.conns = [LatencyConn(self, size, verify_full) for _ in range(connections)]
        self.rate = rate
        self.interval_ns = max(1, round(1e9 / rate))
        self.total = int((warmup + duration) * rate)
        self.n_warm = int(warmup * rate)
        self.corrected = HdrHistogram(*HIST_ARGS)
        self.service = HdrHistogram(*HIST_ARGS)
        self.completed = 0
        self.recorded = 0
        self.bad = 0
        self.unexpected = 0
        self.next_k = 0
        self.t0 = 0
        self.measure_from_ns = 0
        self.max_sched_lag_ns = 0
        self.done: asyncio.Future[None] | None = None

    def record(self, intended_ns: int, sent_ns: int, now_ns: int) -> None:
        self.completed += 1
        if intended_ns >= self.measure_from_ns:
            self.recorded += 1
            self.corrected.record_value(min(HIST_ARGS[1], max(1, (now_ns - intended_ns + 500) // 1000)))
            self.service.record_value(min(HIST_ARGS[1], max(1, (now_ns - sent_ns + 500) // 1000)))
        self.check_done()

    def check_done(self) -> None:
        if self.done is None or self.done.done():
            return
        if self.completed >= self.total or all(c.disconnected for c in self.conns):
            self.done.set_result(None)

    def dispatch(self, upto: int) -> None:
        """Submit every message whose intended time has come (k < upto)."""
        conns = self.conns
        n = len(conns)
        upto = min(upto, self.total)
        now = time.monotonic_ns()
        while self.next_k < upto:
            k = self.next_k
            self.next_k = k + 1
            intended = self.t0 + k * self.interval_ns
            lag = now - intended
            if lag > self.max_sched_lag_ns:
                self.max_sched_lag_ns = lag
            c = conns[k % n]
            if not c.disconnected:
                c.submit(k, intended)

    async def run(self, url: str) -> tuple[str, list[str]]:
        loop = asyncio.get_running_loop()
        max_frame = 10 * 1024 * 1024
        results = await asyncio.gather(
            *(_connect(url, c, max_frame) for c in self.conns), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for c in self.conns:
                if c.transport is not None:
                    c.transport.disconnect(False)
            return "none", [f"connect: {failed[0]!r}"]
        errors: list[str] = []
        self.done = loop.create_future()
        self.t0 = time.monotonic_ns() + 5_000_000
        self.measure_from_ns = self.t0 + self.n_warm * self.interval_ns
        end_ns = self.t0 + self.total * self.interval_ns
        timer_kind = "timerfd"
        try:
            tfd: _TimerFD | None = _TimerFD()
        except (OSError, AttributeError):
            tfd = None
            timer_kind = "loop.call_at (1 ms granularity)"
        if tfd is not None:
            fires = 0

            def on_timer() -> None:
                nonlocal fires
                fires += tfd.read()
                self.dispatch(fires)  # expiration i (1-based) is message i-1, at t0 + (i-1)*interval
                if self.next_k >= self.total:
                    loop.remove_reader(tfd.fd)

            tfd.arm(self.t0, self.interval_ns)
            loop.add_reader(tfd.fd, on_timer)
        else:
            mono_to_loop = loop.time() - time.monotonic_ns() / 1e9

            def on_tick() -> None:
                now = time.monotonic_ns()
                self.dispatch((now - self.t0) // self.interval_ns + 1)
                if self.next_k < self.total:
                    nxt = self.t0 + self.next_k * self.interval_ns
                    loop.call_at(nxt / 1e9 + mono_to_loop, on_tick)

            loop.call_at(self.t0 / 1e9 + mono_to_loop, on_tick)
        try:
            grace = (end_ns - time.monotonic_ns()) / 1e9 + 5.0
            await asyncio.wait_for(asyncio.shield(self.done), grace)
        except asyncio.TimeoutError:
            errors.append("timeout waiting for answers")
        finally:
            if tfd is not None:
                loop.remove_reader(tfd.fd)
                tfd.close()
        for c in self.conns:
            if c.closed_by_peer is not None:
                errors.append(f"peer closed: {c.closed_by_peer}")
            elif c.disconnected:
                errors.append("connection lost")
        await _close_all(self.conns)
        return timer_kind, errors


def _percentiles(h: Any) -> dict[str, Any]:
    if h.get_total_count() == 0:
        return {"count": 0}
    out: dict[str, Any] = {"count": h.get_total_count()}
    for p in PERCENTILES:
        out[f"p{p:g}"] = h.get_value_at_percentile(p)
    out["max"] = h.get_max_value()
    out["mean"] = round(h.get_mean_value(), 1)
    return out


async def run_latency(
    url: str,
    connections: int = 8,
    size: int = 64,
    rate: float = 5000.0,
    duration: float = 5.0,
    warmup: float = 1.0,
    verify: str = "seq",
) -> dict[str, Any]:
    gen = LatencyGen(connections, size, rate, duration, warmup, verify == "full")
    cpu0, w0 = time.process_time(), time.perf_counter()
    gc.disable()  # see run_throughput
    try:
        timer_kind, errors = await gen.run(url)
    finally:
        gc.enable()
    cpu1, w1 = time.process_time(), time.perf_counter()
    lost = gen.total - gen.completed
    out = {
        "mode": "latency",
        "url": url,
        "connections": connections,
        "size": size,
        "rate": rate,
        "duration": duration,
        "warmup": warmup,
        "scheduled": gen.total,
        "completed": gen.completed,
        "recorded": gen.recorded,
        "lost": lost,
        "bad_payload": gen.bad + gen.unexpected,
        "unit": "us",
        "latency_us": _percentiles(gen.corrected),
        "service_us": _percentiles(gen.service),
        "max_schedule_lag_us": gen.max_sched_lag_ns // 1000,
        "timer": timer_kind,
        "client_cpu": (cpu1 - cpu0) / (w1 - w0) if w1 > w0 else 0.0,
        "histogram": gen.corrected.encode().decode("ascii") if gen.recorded else None,
        "errors": errors[:10],
    }
    out["ok"] = not errors and lost == 0 and out["bad_payload"] == 0 and gen.recorded > 0
    return out


# ---------------------------------------------------------------------------------------------
# connrate and idle: one message at a time per connection

CONNECT_TIMEOUT = 5.0  # s, TCP connect + upgrade
ECHO_TIMEOUT = 5.0  # s, one message and its echo
CLOSE_TIMEOUT = 2.0  # s, our CLOSE until the peer hung up
READ_BUFFER = 2048  # picows' smallest initial read buffer; it grows when a frame needs more
MAX_ERRORS = 5  # distinct error texts kept


def _note(errors: list[str], text: str) -> None:
    if len(errors) < MAX_ERRORS and text not in errors:
        errors.append(text)


class EchoConn(WSListener):  # type: ignore[misc]
    """A connection that has at most one message out: ``send()`` it, the echo resolves the
    future with "" (right echo) or an error text. Used by the connrate and idle modes; kept
    small, as idle mode holds thousands of them."""

    __slots__ = ("maker", "verify_full", "transport", "seq", "echo", "stray", "closed_by_peer",
                 "close_answered", "disconnected")

    def __init__(self, maker: FrameMaker, verify_full: bool = False):
        super().__init__()
        self.maker = maker
        self.verify_full = verify_full
        self.transport: WSTransport | None = None
        self.seq = -1
        self.echo: asyncio.Future[str] | None = None
        self.stray = 0  # messages that came when none was expected
        self.closed_by_peer: tuple[int, str] | None = None
        self.close_answered = False
        self.disconnected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send(self, seq: int, echo: asyncio.Future[str]) -> None:
        assert self.transport is not None
        self.seq = seq
        self.echo = echo
        self.transport.underlying_transport.write(self.maker.frame(seq))

    def _answer(self, result: str) -> None:
        echo, self.echo = self.echo, None
        if echo is not None and not echo.done():
            echo.set_result(result)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        try:
            mt = frame.msg_type
            if mt == _CLOSE:
                if transport.is_close_frame_sent:
                    self.close_answered = True  # the answer to ours: the server hangs up
                else:
                    self.closed_by_peer = _answer_close(transport, frame)
                    self._answer(f"peer closed: {self.closed_by_peer}")
                return
            if mt > _BINARY:  # PING (picows answers it) or PONG
                return
            if self.echo is None:
                self.stray += 1
                return
            m = self.maker
            p = frame.get_payload_as_bytes()
            ok = (mt != _CONT and frame.fin and len(p) == m.size
                  and _SEQ_unpack_from(p)[0] == self.seq
                  and (not self.verify_full or p.endswith(m.filler)))
            self._answer("" if ok else "echo did not match")
        except Exception as exc:  # never let picows see an exception
            self._answer(f"error in on_ws_frame: {exc!r}")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        self._answer("connection lost before the echo")

    def pause_writing(self) -> None:  # one small message at a time; nothing to do
        pass

    def resume_writing(self) -> None:
        pass


async def _open(url: str, conn: EchoConn, size: int) -> WSTransport:
    """TCP connect + upgrade, bounded by CONNECT_TIMEOUT (picows aborts a late handshake)."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        transport, _ = await ws_connect(
            lambda: conn,
            url,
            use_aiofastnet=False,
            ssl_context=TLS_CONTEXT,
            max_frame_size=max(1024 * 1024, 2 * size),
            websocket_handshake_timeout=CONNECT_TIMEOUT,
            read_buffer_init_size=READ_BUFFER,
            logger_name="fastgw.loadgen",
        )
    return transport


def _failure_text(stage: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"{stage}: timeout"
    return f"{stage}: {exc!r}"


class ConnRateGen:
    def __init__(self, url: str, size: int, verify_full: bool):
        from hdrh.histogram import HdrHistogram

        self.url = url
        self.size = size
        self.verify_full = verify_full
        self.hist = HdrHistogram(*HIST_ARGS)
        self.measuring = False  # cycles started while True are counted
        self.stopping = False  # no new cycle once True
        self.upgrades = 0
        self.failures = 0
        self.lost = 0
        self.errors: list[str] = []
        self.tls_cycles = self.tls_resumed = 0
        self.tls_info: dict[str, Any] = {}

    async def worker(self) -> None:
        maker = FrameMaker(self.size)
        seq = 0
        while not self.stopping:
            counted = self.measuring
            try:
                handshake_ns = await self.cycle(maker, seq)
            except Exception as exc:  # a bug here must not look like a good run
                handshake_ns = None
                _note(self.errors, f"cycle: {exc!r}")
                self.failures += 1
            seq += 1
            if handshake_ns is None:
                await asyncio.sleep(0.01)  # do not spin on a refusing port
            elif counted:
                self.upgrades += 1
                self.hist.record_value(min(HIST_ARGS[1], max(1, (handshake_ns + 500) // 1000)))

    def note_tls(self, transport: WSTransport) -> None:
        """After the echo (the server's TLS 1.3 tickets have arrived): count a resumed
        handshake, keep this connection's session for the next one (--tls-resume)."""
        sslobj = transport.underlying_transport.get_extra_info("ssl_object")
        if sslobj is None:
            return
        self.tls_cycles += 1
        if sslobj.session_reused:
            self.tls_resumed += 1
        self.tls_info = {"version": sslobj.version(), "cipher": sslobj.cipher()[0]}
        if TLS_RESUME:
            sess = sslobj.session
            if sess is not None and sess.has_ticket:
                TLS_CONTEXT.session = sess

    def fail(self, text: str) -> None:
        self.failures += 1
        _note(self.errors, text)

    async def cycle(self, maker: FrameMaker, seq: int) -> int | None:
        """One connect / echo / close cycle: the handshake time in ns, None when it failed."""
        conn = EchoConn(maker, self.verify_full)
        t0 = time.perf_counter_ns()
        try:
            transport = await _open(self.url, conn, self.size)
        except Exception as exc:
            self.fail(_failure_text("connect", exc))
            return None
        handshake_ns = time.perf_counter_ns() - t0
        try:
            echo: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            conn.send(seq, echo)
            try:
                async with asyncio.timeout(ECHO_TIMEOUT):
                    result = await echo
            except TimeoutError:
                result = "echo: timeout"
            if result:
                if result != "echo did not match":
                    self.lost += 1
                self.fail(result)
                return None
            if conn.stray:
                self.fail("unexpected message")
                return None
            if TLS_CONTEXT is not None:
                self.note_tls(transport)
            transport.send_close(1000)
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await transport.wait_disconnected()
            except TimeoutError:
                self.fail("close: timeout")
                return None
            if not conn.close_answered:
                self.fail("close: the peer hung up without answering our CLOSE")
                return None
            return handshake_ns
        finally:
            if not conn.disconnected:
                transport.disconnect(False)


async def run_connrate(
    url: str,
    connections: int = 8,
    size: int = 64,
    duration: float = 5.0,
    warmup: float = 1.0,
    verify: str = "seq",
    start_at: float | None = None,
) -> dict[str, Any]:
    if size < 8:
        raise ValueError("size must be >= 8 (the sequence number takes 8 bytes)")
    gen = ConnRateGen(url, size, verify == "full")
    await _sleep_until_wall(start_at)
    gen.measuring = warmup <= 0
    cpu0, w0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.ensure_future(gen.worker()) for _ in range(connections)]
    if warmup > 0:
        await asyncio.sleep(warmup)
        gen.measuring = True
        cpu0, w0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    gen.stopping = True
    cpu1, w1 = time.process_time(), time.perf_counter()
    # Cycles started in the window still count: let them finish (each step is bounded).
    _, pending = await asyncio.wait(tasks, timeout=CONNECT_TIMEOUT + ECHO_TIMEOUT + CLOSE_TIMEOUT + 1)
    for t in pending:
        t.cancel()
        gen.fail("worker did not finish")
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            gen.fail(f"worker: {t.exception()!r}")
    wall = w1 - w0
    res = _connrate_result(connections, size, wall, gen.upgrades, gen.failures, gen.lost,
                           gen.errors, gen.hist, (cpu1 - cpu0) / wall * 100 if wall > 0 else 0.0)
    if TLS_CONTEXT is not None:
        res["tls"] = dict(gen.tls_info, cycles=gen.tls_cycles, resumed=gen.tls_resumed,
                          resume=TLS_RESUME)
        if TLS_RESUME and gen.tls_cycles and gen.tls_resumed == 0:
            res["failures"] += 1
            res["errors"].append("tls: --tls-resume but no handshake was resumed")
    return res


def _connrate_result(connections: int, size: int, wall: float, upgrades: int, failures: int,
                     lost: int, errors: list[str], hist: Any, cpu_pct: float) -> dict[str, Any]:
    return {
        "mode": "connrate",
        "connections": connections,
        "size": size,
        "duration": wall,
        "upgrades": upgrades,
        "upgrades_per_s": upgrades / wall if wall > 0 else 0.0,
        "failures": failures,
        "errors": errors[:MAX_ERRORS],
        "handshake_us": _percentiles(hist),
        "hist": hist.encode().decode("ascii"),
        "client_cpu_pct": round(cpu_pct, 1),
        "lost": lost,
    }


def run_connrate_processes(processes: int, **kwargs: Any) -> dict[str, Any]:
    """connrate in ``processes`` forked workers: counts, rates and CPU summed, histograms added."""
    from hdrh.histogram import HdrHistogram

    parts = _run_processes("run_connrate", processes, kwargs, start_delay=0.5)
    hist = HdrHistogram(*HIST_ARGS)
    errors: list[str] = []
    upgrades = failures = lost = connections = 0
    wall = cpu_pct = 0.0
    for part in parts:
        for e in part.get("errors", []):
            _note(errors, e)
        if part.get("mode") != "connrate":  # the worker died: count it as a failure
            failures += 1
            continue
        hist.decode_and_add(part["hist"])
        upgrades += part["upgrades"]
        failures += part["failures"]
        lost += part["lost"]
        connections += part["connections"]
        wall = max(wall, part["duration"])
        cpu_pct += part["client_cpu_pct"]
    out = _connrate_result(connections, kwargs.get("size", 64), wall, upgrades, failures, lost,
                           errors, hist, cpu_pct)
    # Each process measured over the same wall window (common start time): add their rates.
    out["upgrades_per_s"] = sum(p["upgrades_per_s"] for p in parts if p.get("mode") == "connrate")
    return out


def _raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. an infinite hard limit above the kernel's nr_open
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stdin_line(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future resolved when a line is read on stdin or stdin reaches EOF.

    A daemon thread reads file descriptor 0 with os.read (no Python-level lock, so a thread
    still blocked at exit does not stop the interpreter), whatever stdin is: pipe, terminal,
    file or /dev/null. When stdin cannot be read at all, the future never resolves."""
    import threading

    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def read() -> None:
        try:
            while True:
                chunk = os.read(0, 4096)
                if not chunk or b"\n" in chunk:
                    break
        except OSError:
            return
        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed already
            pass

    threading.Thread(target=read, name="loadgen-stdin", daemon=True).start()
    return done


async def _bounded(n: int, limit: int, fn: Any) -> None:
    """Await fn(i) for i in range(n), at most ``limit`` at a time."""
    todo = iter(range(n))

    async def lane() -> None:
        for i in todo:
            await fn(i)

    await asyncio.gather(*(lane() for _ in range(min(limit, n))))


async def run_idle(
    url: str,
    connections: int = 100,
    size: int = 64,
    concurrency: int = 200,
    duration: float = 5.0,
    verify: str = "seq",
    on_holding: Any = None,
    release: Any = None,
) -> dict[str, Any]:
    """Open, hold, check and close ``connections`` connections (see the module docstring).

    ``on_holding(event)`` is called with the holding event once all are open (the command line
    prints it); the hold ends when the awaitable ``release`` completes (default: a line or EOF
    on stdin) or after ``duration`` seconds."""
    if size < 8:
        raise ValueError("size must be >= 8 (the sequence number takes 8 bytes)")
    nofile = _raise_nofile_limit()
    if nofile < connections + 32:
        print(f"loadgen: RLIMIT_NOFILE is {nofile}: not enough for {connections} connections",
              file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    maker = FrameMaker(size)
    conns = [EchoConn(maker, verify == "full") for _ in range(connections)]
    errors: list[str] = []
    failed = 0
    cpu0, w0 = time.process_time(), time.perf_counter()

    async def open_one(i: int) -> None:
        nonlocal failed
        try:
            await _open(url, conns[i], size)
        except Exception as exc:
            failed += 1
            _note(errors, _failure_text("connect", exc))

    await _bounded(connections, concurrency, open_one)
    open_seconds = time.perf_counter() - w0
    held = [c for c in conns if c.transport is not None and not c.disconnected]
    vanished = connections - failed - len(held)
    if vanished:  # upgraded, then closed by the peer before all were open
        failed += vanished
        _note(errors, f"connect: {vanished} connection(s) closed by the peer while opening")
    event = {"event": "holding", "open": len(held), "failed": failed,
             "open_seconds": round(open_seconds, 3)}
    if on_holding is not None:
        on_holding(event)

    if release is None:
        release = _stdin_line(loop)
    try:
        async with asyncio.timeout(duration):
            await release
    except TimeoutError:
        pass

    alive = 0

    async def check_one(i: int) -> None:
        nonlocal alive
        c = held[i]
        if c.disconnected:
            _note(errors, f"peer closed: {c.closed_by_peer}" if c.closed_by_peer
                  else "connection lost while held")
            return
        echo: asyncio.Future[str] = loop.create_future()
        c.send(i, echo)
        try:
            async with asyncio.timeout(ECHO_TIMEOUT):
                result = await echo
        except TimeoutError:
            result = "echo: timeout"
        if not result and c.stray:
            result = "unexpected message"
        if result:
            _note(errors, result)
        else:
            alive += 1

    await _bounded(len(held), concurrency, check_one)
    await _close_all(held, timeout=5.0)
    aborted = sum(1 for c in held if c.closed_by_peer is None and not c.close_answered
                  and c.transport is not None and c.transport.is_close_frame_sent)
    if aborted:
        _note(errors, f"close: {aborted} connection(s) aborted without a CLOSE answer")
    cpu1, w1 = time.process_time(), time.perf_counter()
    return {
        "mode": "idle",
        "connections": connections,
        "open": len(held),
        "failed": failed,
        "alive": alive,
        "open_seconds": round(open_seconds, 3),
        "errors": errors[:MAX_ERRORS],
        "client_cpu_pct": round((cpu1 - cpu0) / (w1 - w0) * 100, 1) if w1 > w0 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# CLI


def summary(res: dict[str, Any]) -> str:
    if res.get("mode") == "connrate":
        hs = res["handshake_us"]
        return (
            f"connrate {res['size']} B on {res['connections']} workers: "
            f"{res['upgrades_per_s']:,.0f} upgrades/s ({res['upgrades']} in {res['duration']:.2f} s), "
            + (f"handshake p50 {hs['p50']} p99 {hs['p99']} max {hs['max']} µs, " if hs["count"] else "")
            + f"failures {res['failures']} lost {res['lost']}, "
            f"client CPU {res['client_cpu_pct']:.0f}%"
            + (f"  errors {res['errors']}" if res["errors"] else "")
        )
    if res.get("mode") == "idle":
        return (
            f"idle: {res['open']} of {res['connections']} open in {res['open_seconds']:.2f} s, "
            f"{res['failed']} failed, {res['alive']} alive after the hold, "
            f"client CPU {res['client_cpu_pct']:.0f}%"
            + (f"  errors {res['errors']}" if res["errors"] else "")
        )
    if "msgs_per_s" in res:
        return (
            f"throughput {res['size']} B x {res['connections']} conn x {res['inflight']} in flight: "
            f"{res['msgs_per_s']:,.0f} msg/s, {res['mb_per_s']:.1f} MB/s, "
            f"client CPU {res['client_cpu'] * 100:.0f}%, "
            f"sent {res['sent_total']} received {res['received_total']} lost {res['lost']} "
            f"out-of-order {res['out_of_order']} bad {res['bad_payload']}"
            + ("" if res["ok"] else f"  NOT OK {res['errors']}")
        )
    if "latency_us" in res and res["latency_us"].get("count"):
        lat = res["latency_us"]
        svc = res["service_us"]
        return (
            f"latency {res['size']} B at {res['rate']:g} msg/s on {res['connections']} conn "
            f"({lat['count']} recorded, timer {res['timer']}): "
            f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} p99.9 {lat['p99.9']} "
            f"max {lat['max']} µs (from intended send); service p50 {svc['p50']} p99 {svc['p99']} µs; "
            f"lost {res['lost']}, client CPU {res['client_cpu'] * 100:.0f}%"
            + ("" if res["ok"] else f"  NOT OK {res['errors']}")
        )
    return f"FAILED: {res.get('errors')}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fastgw WebSocket load generator (picows + uvloop)")
    p.add_argument("--url", default="ws://127.0.0.1:9000/")
    p.add_argument("--mode", choices=("throughput", "latency", "connrate", "idle"),
                   default="throughput")
    p.add_argument("--connections", type=int, default=8,
                   help="connections (connrate: workers, each one connection at a time)")
    p.add_argument("--concurrency", type=int, default=200,
                   help="idle: most upgrades (and checks) in flight at a time")
    p.add_argument("--inflight", type=int, default=64, help="throughput: messages in flight per connection")
    p.add_argument("--size", type=int, default=64, help="message size in bytes (>= 8)")
    p.add_argument("--duration", type=float, default=5.0,
                   help="measured seconds (idle: longest hold, ended earlier by a line on stdin)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--rate", type=float, default=5000.0, help="latency: total messages per second")
    p.add_argument("--processes", type=int, default=1,
                   help="throughput, connrate: worker processes (summed)")
    p.add_argument("--verify", choices=("seq", "full"), default="seq",
                   help="seq: length + sequence number; full: also every payload byte")
    p.add_argument("--ca", default=None,
                   help="wss: CA file to verify the server with (TLS 1.3 only); plain ws without")
    p.add_argument("--tls-resume", action="store_true",
                   help="connrate over wss: resume each handshake with the last session's ticket")
    a = p.parse_args(argv)
    if a.size < 8:
        p.error("--size must be >= 8")
    if a.connections < 1 or a.inflight < 1 or a.processes < 1 or a.rate <= 0 \
            or a.concurrency < 1:
        p.error("--connections, --inflight, --processes, --concurrency and --rate must be positive")
    if a.mode in ("latency", "idle") and a.processes != 1:
        p.error("--processes applies to throughput and connrate modes only")
    return a


def _loop_runner() -> Any:
    """uvloop.run, or asyncio.run after one warning line where uvloop cannot be imported."""
    return loop_runner(prog="loadgen", option=None)


def main(argv: list[str] | None = None) -> int:
    global TLS_CONTEXT, TLS_RESUME
    a = parse_args(argv)
    if a.ca:
        TLS_CONTEXT = make_tls_context(a.ca)
        TLS_RESUME = a.tls_resume
    if a.mode == "throughput":
        kw = dict(url=a.url, connections=a.connections, inflight=a.inflight, size=a.size,
                  duration=a.duration, warmup=a.warmup, verify=a.verify)
        if a.processes > 1:
            res = run_throughput_processes(a.processes, **kw)
        else:
            res = _loop_runner()(run_throughput(**kw))
            res["processes"] = 1
    elif a.mode == "latency":
        res = _loop_runner()(run_latency(a.url, a.connections, a.size, a.rate, a.duration, a.warmup,
                                          a.verify))
    elif a.mode == "connrate":
        kw = dict(url=a.url, connections=a.connections, size=a.size, duration=a.duration,
                  warmup=a.warmup, verify=a.verify)
        if a.processes > 1:
            res = run_connrate_processes(a.processes, **kw)
        else:
            res = _loop_runner()(run_connrate(**kw))
        print(summary(res), file=sys.stderr, flush=True)
        print(json.dumps(res), flush=True)
        return 1 if res["failures"] or res["lost"] else 0
    else:  # idle: the holding line first, then the result

        def holding(event: dict[str, Any]) -> None:
            print(json.dumps(event), flush=True)

        res = _loop_runner()(run_idle(a.url, a.connections, a.size, a.concurrency, a.duration,
                                       a.verify, on_holding=holding))
        print(summary(res), file=sys.stderr, flush=True)
        print(json.dumps(res), flush=True)
        return 1 if res["failed"] or res["alive"] < res["open"] else 0
    print(summary(res), file=sys.stderr, flush=True)
    print(json.dumps(res), flush=True)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
