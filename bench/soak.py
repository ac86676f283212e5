#!/usr/bin/env python3
"""Soak run: thousands of connections through a real ``fastgw run`` for minutes or hours, every
message checked, the gateway's memory, connection count and latency sampled over time.

    python bench/soak.py --duration 2m --connections 2000
    python bench/soak.py --duration 30m                     # 9,900 connections (fd limit)

What one run does:

1. raises its descriptor limit to the hard limit (the children inherit it) and lowers
   ``--connections`` to what the gateway can hold with it (two descriptors per connection);
2. starts the echo backend (``python -m fastgw.echo``) and ``fastgw run`` (one API, metrics and
   the admin API on), the gateway pinned to the first CPU, the backend and the client processes
   to the second (``--no-pin`` to disable), as ``bench/run.py`` does;
3. starts ``--clients`` client processes (picows on uvloop, one event loop each) that open the
   connections, then, for ``--duration``: every connection sends one numbered, checksummed
   message every ``--interval`` (phases spread evenly), and ``--churn`` of the connections (a
   share) per second, spread evenly over the second, close with 1000 and are replaced by new
   ones;
4. every ``--sample-interval`` reads the gateway's RSS (``VmRSS`` of /proc/PID/status), its
   live connections (``fastgw_connections_active`` from the admin API's /metrics) and the
   clients' round-trip histogram of that interval (HDR, µs);
5. at the end the clients stop sending, wait for the last echoes and close every connection
   with 1000; the gateway's table must then be empty (admin API ``GET /connections``, the
   gauge, and the SIGUSR1 status line);
6. writes ``soak.json`` (every sample), ``soak.md`` (the table) and ``soak.png`` (RSS,
   connections and p99 over time) into ``--out`` (default bench/results/), and exits 1 unless
   every check passed.

Message format (``--size`` bytes): 8-byte sequence number, the connection's random 8-byte
token, the connection's random filler, CRC32 of all that (4 bytes). Each echo is checked
against the connection that receives it: length and CRC (else *corrupted*), token (else
*misrouted*: another connection's message), filler (else *corrupted*), then the sequence
number: one already received is *duplicated*, one older than the newest received is
*reordered*; a message not back when the connection closes (after waiting ``--echo-timeout``
for it) is *lost*, unless a damaged message came back on that connection in its place (then it
is counted once, as corrupted). A connection is churned only between messages (nothing in
flight), so churn itself never loses a message.

It stops only the processes it started, by pid, also on an error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
HIST_ARGS = (1, 60_000_000, 3)  # µs, 1 µs .. 60 s, 3 significant digits (as bench/loadgen.py)
HEAD = 8 + 8  # sequence number + connection token
TRAILER = 4  # CRC32
MIN_SIZE = HEAD + TRAILER
CONNECT_TIMEOUT = 5.0  # s: TCP connect + upgrade
CLOSE_TIMEOUT = 5.0  # s: our CLOSE 1000 until the peer hung up
REOPEN_RETRY = 1.0  # s: wait after a failed reopen
FINAL_CLOSES = 1000  # close handshakes in flight at a time at the end
MAX_ERRORS = 8  # distinct error texts kept per client

GATEWAY_YAML = """\
listeners: [{{host: 127.0.0.1, port: 0}}]
admin: {{host: 127.0.0.1, port: 0}}
apis:
  - name: soak
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: {backend_url}
"""
ADMIN_RE = re.compile(r"fastgw: admin on (http://\S+)")
METRIC_RE = re.compile(r"^(fastgw_[a-z_]+)(?:\{([^}]*)\})? (\S+)$", re.M)
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '2m', '1h30m', '1.5h', '500ms'."""
    t = text.strip().lower()
    try:
        return float(t)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", t)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != t.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 2m, 1h30m)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _note(errors: list[str], text: str) -> None:
    if len(errors) < MAX_ERRORS and text not in errors:
        errors.append(text)


# =============================================================================================
# the client process (python bench/soak.py --worker ...)


def _client_classes() -> tuple[type, type]:
    """The picows classes, defined on first use so that the orchestrator needs no picows."""
    from hdrh.histogram import HdrHistogram
    from picows import WSListener, WSMsgType, ws_connect

    CONT, BINARY, CLOSE = int(WSMsgType.CONTINUATION), int(WSMsgType.BINARY), int(WSMsgType.CLOSE)
    TEXT = int(WSMsgType.TEXT)
    BIN = WSMsgType.BINARY
    crc32 = zlib.crc32
    mono = time.monotonic_ns

    class Conn(WSListener):  # type: ignore[misc]
        """One connection: sends numbered messages, checks every echo."""

        __slots__ = ("w", "token", "fixed", "transport", "next_seq", "outstanding", "newest",
                     "damaged", "frag", "ready", "closing", "close_answer", "peer_close",
                     "disconnected", "drained")

        def __init__(self, w: Any):
            super().__init__()
            self.w = w
            self.token = os.urandom(8)
            self.fixed = self.token + os.urandom(w.size - MIN_SIZE)
            self.transport: Any = None
            self.next_seq = 0
            self.outstanding: dict[int, int] = {}  # seq -> send time (ns)
            self.newest = -1  # highest sequence number received
            self.damaged = 0  # corrupted messages received on this connection
            self.frag: bytearray | None = None
            self.ready = False  # connected and sending
            self.closing = False  # we sent CLOSE
            self.close_answer: int | None = None  # the code of the peer's answer to our CLOSE
            self.peer_close: int | None = None  # the peer closed first with this code
            self.disconnected = False
            self.drained: asyncio.Future[None] | None = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def send(self) -> None:
            seq = self.next_seq
            self.next_seq = seq + 1
            body = seq.to_bytes(8, "big") + self.fixed
            self.outstanding[seq] = mono()
            self.transport.send(BIN, body + crc32(body).to_bytes(4, "big"))
            self.w.sent += 1

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            try:
                mt = frame.msg_type
                if mt == CLOSE:
                    code = int(frame.get_close_code()) if frame.payload_size >= 2 else 1005
                    if self.closing:
                        self.close_answer = code
                    else:
                        self.peer_close = code
                        transport.send_close(1000 if code in (1005, 1006, 1015) or code < 1000
                                             else code)
                        transport.disconnect()
                    return
                if mt != CONT and mt != TEXT and mt != BINARY:
                    return  # PING (picows answers it), PONG
                if frame.fin and mt != CONT and self.frag is None:
                    self.check(frame.get_payload_as_bytes())
                    return
                if self.frag is None:  # a fragmented message: legal, though neither leg makes one
                    self.frag = bytearray()
                self.frag += frame.get_payload_as_bytes()
                if frame.fin:
                    msg, self.frag = bytes(self.frag), None
                    self.check(msg)
            except Exception as exc:  # never let picows see an exception
                _note(self.w.errors, f"on_ws_frame: {exc!r}")
                self.w.corrupted += 1

        def check(self, p: bytes) -> None:
            now = mono()
            w = self.w
            if len(p) != w.size or crc32(p[:-TRAILER]) != int.from_bytes(p[-TRAILER:], "big"):
                w.corrupted += 1
                self.damaged += 1
                return
            if p[8:HEAD] != self.token:
                w.misrouted += 1
                return
            if p[8:-TRAILER] != self.fixed:
                w.corrupted += 1
                self.damaged += 1
                return
            seq = int.from_bytes(p[:8], "big")
            sent_ns = self.outstanding.pop(seq, None)
            if sent_ns is None:
                if seq < self.next_seq:
                    w.duplicated += 1
                else:  # a valid message of ours that was never sent: a replay from nowhere
                    w.corrupted += 1
                    self.damaged += 1
                return
            w.received += 1
            us = (now - sent_ns + 500) // 1000
            w.hist.record_value(us if us >= 1 else 1)
            if seq < self.newest:
                w.reordered += 1
            else:
                self.newest = seq
            if self.drained is not None and not self.outstanding and not self.drained.done():
                self.drained.set_result(None)

        def on_ws_disconnected(self, transport: Any) -> None:
            self.disconnected = True
            self.ready = False
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)
            if not self.closing:
                self.w.lost_connection(self)

        def pause_writing(self) -> None:  # a few small messages at a time; nothing to do
            pass

        def resume_writing(self) -> None:
            pass

    class Worker:
        def __init__(self, a: argparse.Namespace):
            self.a = a
            self.url = a.url
            self.size = a.size
            self.n = a.connections
            self.lanes: list[Conn | None] = [None] * self.n
            self.slots = max(1, round(a.interval / a.tick))
            self.slot_lanes = [list(range(s, self.n, self.slots)) for s in range(self.slots)]
            self.hist = HdrHistogram(*HIST_ARGS)  # this sample interval
            self.total_hist = HdrHistogram(*HIST_ARGS)
            self.sent = self.received = 0
            self.corrupted = self.misrouted = self.duplicated = self.reordered = self.lost = 0
            self.churned = 0
            self.connect_failures = 0
            self.unexpected_closes = 0
            self.close_errors = 0
            self.lag_max_ns = 0
            self.errors: list[str] = []
            self.stopping = False
            self.tasks: set[asyncio.Task[None]] = set()
            self.rng = random.Random(a.seed)
            self.end = 0.0  # loop time at which the run ends

        # -- connections -----------------------------------------------------------------
        async def open(self) -> Conn | None:
            conn = Conn(self)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await ws_connect(lambda: conn, self.url, use_aiofastnet=False,
                                     max_frame_size=max(1 << 20, 2 * self.size),
                                     websocket_handshake_timeout=CONNECT_TIMEOUT,
                                     read_buffer_init_size=2048, logger_name="soak")
            except Exception as exc:
                self.connect_failures += 1
                _note(self.errors, "connect: timeout" if isinstance(exc, TimeoutError)
                      else f"connect: {exc!r}")
                return None
            if conn.disconnected:  # upgraded, then closed at once
                self.connect_failures += 1
                _note(self.errors, "connect: closed by the peer right after the upgrade")
                return None
            conn.ready = True
            return conn

        def finish(self, conn: Conn) -> None:
            """Count what a closed connection never got back."""
            missing = len(conn.outstanding)
            self.lost += max(0, missing - conn.damaged)
            conn.outstanding.clear()

        def lost_connection(self, conn: Conn) -> None:
            """The peer closed (or the connection broke) while we did not: count, reopen."""
            self.unexpected_closes += 1
            _note(self.errors, f"connection closed by the peer ({conn.peer_close})"
                  if conn.peer_close is not None else "connection lost")
            self.finish(conn)
            if self.stopping:
                return
            for i, c in enumerate(self.lanes):
                if c is conn:
                    self.lanes[i] = None
                    self._spawn(self._reopen(i))
                    break

        def _spawn(self, coro: Any) -> None:
            t = asyncio.ensure_future(coro)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

        async def _reopen(self, i: int) -> bool:
            """Open a new connection on lane i (retried each REOPEN_RETRY until the end)."""
            while not self.stopping:
                conn = await self.open()
                if conn is not None:
                    self.lanes[i] = conn
                    return True
                await asyncio.sleep(REOPEN_RETRY)
            return False

        async def close(self, conn: Conn, reason: bytes = b"soak") -> None:
            """CLOSE 1000, wait for the peer's answer and hang-up, count the connection."""
            conn.ready = False
            conn.closing = True
            if not conn.disconnected:
                conn.transport.send_close(1000, reason)
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await conn.transport.wait_disconnected()
                except TimeoutError:
                    _note(self.errors, "close: no hang-up after our CLOSE")
                    conn.transport.disconnect(False)
                if conn.close_answer != 1000:
                    self.close_errors += 1
                    _note(self.errors, f"close: answered with {conn.close_answer} instead of 1000")
            self.finish(conn)

        async def churn_one(self, i: int, conn: Conn) -> None:
            if conn.disconnected or self.lanes[i] is not conn:
                return  # lost meanwhile: lost_connection() reopens the lane
            await self.close(conn, b"soak churn")
            self.lanes[i] = None
            if await self._reopen(i):
                self.churned += 1  # closed and replaced

        async def open_all(self) -> dict[str, Any]:
            todo = iter(range(self.n))
            failed = 0

            async def lane() -> None:
                nonlocal failed
                for i in todo:
                    c = await self.open()
                    if c is None:
                        failed += 1
                    else:
                        self.lanes[i] = c

            t0 = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(min(self.a.concurrency, self.n))))
            self.connect_failures = 0  # counted in "failed"; from here on, reopen failures
            return {"event": "ready", "open": self.open_count(), "failed": failed,
                    "open_seconds": round(time.perf_counter() - t0, 3),
                    "errors": list(self.errors)}

        def open_count(self) -> int:
            return sum(1 for c in self.lanes if c is not None and not c.disconnected)

        # -- the run ---------------------------------------------------------------------
        def tick(self, k: int) -> None:
            lanes = self.lanes
            for i in self.slot_lanes[k % self.slots]:
                c = lanes[i]
                if c is not None and c.ready:
                    c.send()

        def churn(self, count: int) -> None:
            """Close and replace ``count`` connections picked at random among those with no
            message in flight (a few tries each: at a low rate nearly all are idle)."""
            lanes, rng = self.lanes, self.rng
            for _ in range(count):
                for _ in range(20):
                    i = rng.randrange(self.n)
                    c = lanes[i]
                    if c is not None and c.ready and not c.outstanding:
                        c.ready = False
                        self._spawn(self.churn_one(i, c))
                        break

        def sample(self, k: int, t: float) -> dict[str, Any]:
            h = self.hist
            self.total_hist.add(h)
            out = {"event": "sample", "k": k, "t": round(t, 3), "open": self.open_count(),
                   "sent": self.sent, "received": self.received, "lost": self.lost,
                   "corrupted": self.corrupted, "misrouted": self.misrouted,
                   "duplicated": self.duplicated, "reordered": self.reordered,
                   "churned": self.churned, "connect_failures": self.connect_failures,
                   "unexpected_closes": self.unexpected_closes,
                   "close_errors": self.close_errors,
                   "lag_max_us": self.lag_max_ns // 1000, "rss_kib": _own_rss_kib(),
                   "hist": h.encode().decode("ascii") if h.get_total_count() else None}
            self.hist = HdrHistogram(*HIST_ARGS)
            self.lag_max_ns = 0
            return out

        async def run(self, t0_wall: float, emit: Any) -> None:
            a = self.a
            loop = asyncio.get_running_loop()
            t0 = loop.time() + (t0_wall - time.time())
            end = self.end = t0 + a.duration
            tick_s = a.interval / self.slots
            n_samples = int(a.duration / a.sample_interval + 1e-9)
            sample_times = [(k, k * a.sample_interval) for k in range(1, n_samples + 1)]
            if not sample_times or sample_times[-1][1] < a.duration - 1e-6:
                sample_times.append((len(sample_times) + 1, a.duration))
            churn_per_tick = a.churn * self.n * tick_s  # spread evenly, not a burst a second
            churn_owed = 0.0
            done_ticks = 0
            await asyncio.sleep(max(0.0, t0 - loop.time()))
            while True:
                now = loop.time()
                el = now - t0
                # every tick whose time came (none is skipped when the loop was late)
                due = min(int(el / tick_s) + 1, int(a.duration / tick_s + 1e-9))
                while done_ticks < due:
                    lag = int((el - done_ticks * tick_s) * 1e9)
                    if lag > self.lag_max_ns:
                        self.lag_max_ns = lag
                    self.tick(done_ticks)
                    done_ticks += 1
                    churn_owed += churn_per_tick
                    if churn_owed >= 1.0:
                        k = int(churn_owed)
                        churn_owed -= k
                        self.churn(k)
                while sample_times and sample_times[0][1] <= el + 1e-9:
                    k, st = sample_times.pop(0)
                    emit(self.sample(k, st))
                if now >= end and not sample_times:
                    break
                wake = min(t0 + done_ticks * tick_s,
                           t0 + (sample_times[0][1] if sample_times else a.duration))
                await asyncio.sleep(max(0.0, wake - loop.time()))

        async def finish_all(self) -> None:
            """Stop, wait for the last echoes (bounded), close every connection with 1000."""
            self.stopping = True
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=CONNECT_TIMEOUT + CLOSE_TIMEOUT + 2)
            live = [c for c in self.lanes if c is not None and not c.disconnected]
            loop = asyncio.get_running_loop()
            waits = []
            for c in live:
                c.ready = False
                if c.outstanding:
                    c.drained = loop.create_future()
                    waits.append(c.drained)
            if waits:
                await asyncio.wait(waits, timeout=self.a.echo_timeout)
            # the orchestrator samples the gateway at the end time: close a little after it
            await asyncio.sleep(max(0.0, self.end + 0.5 - loop.time()))
            gate = asyncio.Semaphore(FINAL_CLOSES)

            async def close(c: Conn) -> None:
                async with gate:
                    await self.close(c)

            await asyncio.gather(*(close(c) for c in live))
            for i in range(self.n):
                self.lanes[i] = None

        def result(self, cpu_s: float, wall_s: float) -> dict[str, Any]:
            h = self.total_hist
            h.add(self.hist)  # the echoes that came after the last sample
            out = {"event": "result", "connections": self.n, "sent": self.sent,
                   "received": self.received, "lost": self.lost, "corrupted": self.corrupted,
                   "misrouted": self.misrouted, "duplicated": self.duplicated,
                   "reordered": self.reordered, "churned": self.churned,
                   "connect_failures": self.connect_failures,
                   "unexpected_closes": self.unexpected_closes,
                   "close_errors": self.close_errors, "errors": self.errors,
                   "hist": h.encode().decode("ascii") if h.get_total_count() else None,
                   "cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2)}
            return out

    return Conn, Worker


def _own_rss_kib() -> int | None:
    return rss_kib(os.getpid())


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines of stdin, from a daemon thread; None at EOF."""
    q: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(0, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    loop.call_soon_threadsafe(q.put_nowait, line.decode().strip())
        except (OSError, RuntimeError):
            pass
        try:
            loop.call_soon_threadsafe(q.put_nowait, None)
        except RuntimeError:
            pass

    threading.Thread(target=read, name="soak-stdin", daemon=True).start()
    return q


async def client_main(a: argparse.Namespace) -> int:
    """A client process: open, report ready, wait for 'go T0', run, close, report."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    _, Worker = _client_classes()
    w = Worker(a)
    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    emit(await w.open_all())
    # No collector pauses in the client's figures: what the run allocates is acyclic (a closed
    # connection is freed by reference counting), and a full collection over 10,000 live
    # connections would stall the loop for many milliseconds.
    gc.collect()
    gc.freeze()
    gc.disable()
    line = await lines.get()
    if line and line.startswith("go "):
        await w.run(float(line.split()[1]), emit)
    await w.finish_all()
    gc.enable()
    emit(w.result(time.process_time() - cpu0, time.perf_counter() - wall0))
    return 0


# =============================================================================================
# the orchestrator


class Client:
    """One client process and the JSON lines it prints."""

    def __init__(self, index: int, argv: list[str], cpu: int | None, logdir: Path, run: Any):
        self.index = index
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.samples: dict[int, dict[str, Any]] = {}
        self.ready: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.err_path = logdir / f"client{index}.log"
        self._err = open(self.err_path, "w")
        self.proc = run.popen_pinned(argv, cpu, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, cwd=str(ROOT))
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == "sample":
                self.samples[obj["k"]] = obj
            elif obj.get("event") == "ready":
                self.ready = obj
            elif obj.get("event") == "result":
                self.result = obj
            self.lines.put(obj)
        self.lines.put(None)

    def tell(self, text: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def wait_for(self, event: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.ready if event == "ready" else self.result
            if got is not None:
                return got
            if self.proc.poll() is not None and self.lines.empty():
                time.sleep(0.2)
                return self.ready if event == "ready" else self.result
            time.sleep(0.05)
        return None

    def stderr_tail(self) -> str:
        try:
            return " | ".join(self.err_path.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._err.close()


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metrics(admin: str) -> dict[str, float]:
    """The gateway's metrics that matter here, summed over labels (by direction for messages)."""
    out: dict[str, float] = {}
    for name, labels, value in METRIC_RE.findall(http_get(admin + "/metrics")):
        if name.endswith(("_bucket", "_sum", "_count")):
            continue
        key = name
        if name == "fastgw_messages_total":
            key += ":" + dict(LABEL_RE.findall(labels or "")).get("direction", "")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def gateway_status(gw: Any, timeout: float = 5.0) -> dict[str, Any] | None:
    """SIGUSR1: the gateway prints 'fastgw: status {json}' on stderr."""
    before = sum(1 for line in gw.lines if "fastgw: status " in line)
    os.kill(gw.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in gw.lines if "fastgw: status " in line]
        if len(found) > before:
            return json.loads(found[-1].split("fastgw: status ", 1)[1])
        time.sleep(0.05)
    return None


def _sum_key(parts: list[dict[str, Any]], key: str) -> int:
    return sum(int(p.get(key) or 0) for p in parts)


COUNTS = ("sent", "received", "lost", "corrupted", "misrouted", "duplicated", "reordered",
          "churned", "connect_failures", "unexpected_closes", "close_errors")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("2m"),
                   help="length of the run: 90s, 2m, 30m, 1h (default 2m)")
    p.add_argument("--warmup", type=parse_duration, default=None,
                   help="start of the run not judged for RSS (default: a fifth of the "
                        "duration, at most 2m)")
    p.add_argument("--connections", type=int, default=9900,
                   help="connections held (default 9900; lowered to fit the fd limit)")
    p.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--interval", type=parse_duration, default=2.0,
                   help="time between two messages of one connection (default 2s)")
    p.add_argument("--size", type=int, default=128, help=f"message size, >= {MIN_SIZE} (128)")
    p.add_argument("--churn", type=float, default=0.01,
                   help="share of the connections closed (1000) and reopened every second "
                        "(default 0.01: 1%%/s)")
    p.add_argument("--sample-interval", type=parse_duration, default=5.0,
                   help="time between two samples (default 5s)")
    p.add_argument("--tick", type=parse_duration, default=0.01,
                   help="the clients' send timer (default 10ms)")
    p.add_argument("--concurrency", type=int, default=100,
                   help="upgrades in flight while opening, over all clients (default 100)")
    p.add_argument("--echo-timeout", type=parse_duration, default=10.0,
                   help="at the end, how long to wait for the last echoes (default 10s)")
    p.add_argument("--rss-tolerance", type=float, default=5.0,
                   help="largest RSS deviation from its value at the end of the warm-up, %% (5)")
    p.add_argument("--out", default=str(RESULTS), help="directory for soak.json/.md/.png")
    p.add_argument("--name", default="soak", help="file name stem (default soak)")
    p.add_argument("--no-plot", action="store_true", help="no PNG (saves matplotlib's start-up)")
    p.add_argument("--backend-url", default=None,
                   help="use this backend instead of starting the bundled echo backend")
    p.add_argument("--gateway-cmd", default=f"{PY} -m fastgw run -c {{config}}",
                   help="command that starts the gateway; {config} is the YAML path")
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinity")
    p.add_argument("--seed", type=int, default=None, help="seed of the churn's choices")
    # the client processes
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.size < MIN_SIZE:
        p.error(f"--size must be >= {MIN_SIZE}")
    if a.connections < 1 or a.clients < 1 or a.concurrency < 1:
        p.error("--connections, --clients and --concurrency must be positive")
    if a.clients > a.connections:
        p.error("--clients must not exceed --connections")
    if not 0 <= a.churn <= 1:
        p.error("--churn is a share: 0 to 1")
    for name in ("duration", "interval", "sample_interval", "tick"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.warmup is None:
        a.warmup = min(120.0, a.duration / 5)
    if not 0 <= a.warmup < a.duration:
        p.error("--warmup must be shorter than --duration")
    if a.tick > a.interval:
        a.tick = a.interval
    return a


def client_argv(a: argparse.Namespace, url: str, connections: int, concurrency: int,
                seed: int) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "--worker", "--url", url,
            "--connections", str(connections), "--concurrency", str(concurrency),
            "--duration", repr(a.duration), "--warmup", repr(a.warmup),
            "--interval", repr(a.interval), "--size", str(a.size), "--churn", repr(a.churn),
            "--sample-interval", repr(a.sample_interval), "--tick", repr(a.tick),
            "--echo-timeout", repr(a.echo_timeout), "--seed", str(seed)]


def merge_samples(clients: list[Client], gw_samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per sample time: the gateway's figures and the clients' figures summed."""
    from hdrh.histogram import HdrHistogram

    rows = []
    for g in gw_samples:
        row = dict(g)
        k = g["k"]
        if k > 0:
            parts = [c.samples[k] for c in clients if k in c.samples]
            row["clients_reporting"] = len(parts)
            row["clients_open"] = _sum_key(parts, "open")
            for key in COUNTS:
                row[key] = _sum_key(parts, key)
            row["client_lag_max_us"] = max((p["lag_max_us"] for p in parts), default=None)
            row["client_rss_kib"] = _sum_key(parts, "rss_kib")
            h = HdrHistogram(*HIST_ARGS)
            for part in parts:
                if part.get("hist"):
                    h.decode_and_add(part["hist"])
            row["echoes"] = h.get_total_count()
            if h.get_total_count():
                for q in (50, 99, 99.9):
                    row[f"p{q:g}_us"] = h.get_value_at_percentile(q)
                row["max_us"] = h.get_max_value()
        rows.append(row)
    return rows


def summarize(a: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]],
              results: list[dict[str, Any] | None], end: dict[str, Any]) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram

    good = [r for r in results if r]
    s: dict[str, Any] = {key: _sum_key(good, key) for key in COUNTS}
    s["clients_reported"] = f"{len(good)} of {len(results)}"
    s["client_cpu_s"] = round(sum(r.get("cpu_s", 0) for r in good), 2)
    s["client_wall_s"] = max((r.get("wall_s", 0) for r in good), default=0)
    h = HdrHistogram(*HIST_ARGS)
    for r in good:
        if r.get("hist"):
            h.decode_and_add(r["hist"])
    s["latency_us"] = ({f"p{q:g}": h.get_value_at_percentile(q) for q in (50, 99, 99.9)}
                       | {"max": h.get_max_value(), "count": h.get_total_count()}
                       if h.get_total_count() else {"count": 0})
    s["opened"] = meta.get("opened", 0)
    s["open_failed"] = meta.get("open_failed", 0)
    judged = [r for r in rows if a.warmup - 1e-6 <= r["t"] <= a.duration + 1e-6
              and r.get("rss_kib")]
    if judged:
        base = judged[0]["rss_kib"]
        s["rss_warmup_end_kib"] = base
        s["rss_max_kib"] = max(r["rss_kib"] for r in judged)
        s["rss_min_kib"] = min(r["rss_kib"] for r in judged)
        s["rss_end_kib"] = judged[-1]["rss_kib"]
        s["rss_deviation_pct"] = round(max(abs(r["rss_kib"] - base) for r in judged)
                                       / base * 100, 2)
    p99s = [r["p99_us"] for r in rows if "p99_us" in r and r["t"] > a.warmup + 1e-6]
    if not p99s:  # a run too short for samples after the warm-up
        p99s = [r["p99_us"] for r in rows if "p99_us" in r]
    s["p99_min_us"], s["p99_max_us"] = (min(p99s), max(p99s)) if p99s else (None, None)
    active = [r["active"] for r in rows if r.get("active") is not None and r["k"] > 0]
    s["active_min"], s["active_max"] = (min(active), max(active)) if active else (None, None)
    s.update(end)

    checks: list[tuple[str, bool, str]] = []
    checks.append(("all connections opened", s["open_failed"] == 0 and s["opened"] == a.connections,
                   f"{s['opened']} of {a.connections} opened, {s['open_failed']} failed"))
    checks.append(("every client reported", len(good) == len(results), s["clients_reported"]))
    for key in ("lost", "reordered", "corrupted", "duplicated", "misrouted"):
        checks.append((f"0 {key}", s[key] == 0, str(s[key])))
    checks.append(("every message answered", s["sent"] == s["received"] and s["sent"] > 0,
                   f"sent {s['sent']}, received {s['received']}"))
    checks.append(("no connection closed by the peer", s["unexpected_closes"] == 0,
                   str(s["unexpected_closes"])))
    checks.append(("every CLOSE 1000 answered with 1000", s["close_errors"] == 0,
                   str(s["close_errors"])))
    checks.append(("every reopen succeeded", s["connect_failures"] == 0,
                   str(s["connect_failures"])))
    dev = s.get("rss_deviation_pct")
    checks.append((f"RSS flat within {a.rss_tolerance:g}% after the warm-up",
                   dev is not None and dev <= a.rss_tolerance,
                   f"{dev}%" if dev is not None else "no sample after the warm-up"))
    checks.append(("gateway table empty at the end", bool(s.get("table_empty")),
                   s.get("table_detail", "")))
    s["checks"] = [{"check": c, "ok": ok, "value": v} for c, ok, v in checks]
    s["failed"] = [c for c, ok, _ in checks if not ok]
    s["verdict"] = "PASS" if not s["failed"] and not meta.get("error") else "FAIL"
    return s


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f} MiB" if kib else "?"


def _pct(part: float | None, whole: float) -> str:
    return f"{part / whole * 100:.0f}%" if part is not None and whole else "?"


def _dur(seconds: float) -> str:
    if seconds >= 60 and abs(seconds / 60 - round(seconds / 60)) < 1e-9:
        return f"{round(seconds / 60)} min"
    return f"{seconds:g} s"


def markdown(result: dict[str, Any]) -> str:
    m, s = result["meta"], result["summary"]
    lat = s["latency_us"]
    rows = [
        ("verdict", f"**{s['verdict']}**" + (f" (failed: {'; '.join(s['failed'])})"
                                             if s["failed"] else "")),
        ("duration", f"{_dur(m['duration'])} (warm-up {_dur(m['warmup'])})"),
        ("connections held", f"{m['connections']:,} target, {s['opened']:,} opened "
                             f"({s['open_failed']} failed); gateway gauge "
                             f"{s['active_min']}–{s['active_max']} over the samples"),
        ("load", f"1 message of {m['size']} B every {m['interval']:g} s per connection "
                 f"({m['connections'] / m['interval']:,.0f} msg/s), {m['clients']} client "
                 f"process(es)"),
        ("messages sent / received", f"{s['sent']:,} / {s['received']:,}"),
        ("lost / reordered / corrupted / duplicated / misrouted",
         f"{s['lost']} / {s['reordered']} / {s['corrupted']} / {s['duplicated']} / "
         f"{s['misrouted']}"),
        ("churned connections", f"{s['churned']:,} ({m['churn'] * 100:g}%/s), "
                                f"reopen failures {s['connect_failures']}, closed by the peer "
                                f"{s['unexpected_closes']}, bad close answers {s['close_errors']}"),
        ("gateway RSS: warm-up end / max / end",
         f"{_mib(s.get('rss_warmup_end_kib'))} / {_mib(s.get('rss_max_kib'))} / "
         f"{_mib(s.get('rss_end_kib'))}"),
        ("RSS deviation after warm-up", f"{s.get('rss_deviation_pct')}% "
                                        f"(limit {m['rss_tolerance']:g}%)"),
        ("gateway RSS: before opening / after closing",
         f"{_mib(m.get('rss_before_kib'))} / {_mib(s.get('rss_after_close_kib'))}"),
        ("round trip p99 per interval: min / max",
         f"{s['p99_min_us']} / {s['p99_max_us']} µs" if s["p99_min_us"] is not None else "?"),
        ("round trip over the run: p50 / p99 / p99.9 / max",
         f"{lat['p50']} / {lat['p99']} / {lat['p99.9']} / {lat['max']} µs"
         if lat.get("count") else "?"),
        ("table empty at the end", f"{'yes' if s.get('table_empty') else 'no'} "
                                   f"({s.get('table_detail', '')})"),
        ("CPU time during the run", f"gateway {m.get('gateway_cpu_s', '?')} s "
                                    f"({_pct(m.get('gateway_cpu_s'), m['duration'])} of a core); "
                                    f"clients "
                                    f"{s['client_cpu_s']} s in {s['client_wall_s']} s "
                                    f"(opening and closing included)"),
    ]
    out = [f"# fastgw soak run, {m['started']}", "",
           f"`{m['command']}`", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", f"{m['pinning']}; fd limit {m['fd_limit']}; samples every "
            f"{m['sample_interval']:g} s; logs in {m['logs']}.", ""]
    out += ["| check | ok | value |", "|---|---|---|"]
    out += [f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | {c['value']} |"
            for c in s["checks"]]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib is not installed: no plot (pip install matplotlib)",
              file=sys.stderr)
        return None
    m, s, rows = result["meta"], result["summary"], result["samples"]
    minutes = m["duration"] >= 300
    scale, unit = (60.0, "min") if minutes else (1.0, "s")
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t = [r["t"] / scale for r in rows if r.get("rss_kib")]
    ax1.plot(t, [r["rss_kib"] / 1024 for r in rows if r.get("rss_kib")], color="#d62728")
    base = s.get("rss_warmup_end_kib")
    if base:
        tol = m["rss_tolerance"] / 100
        ax1.axhspan(base * (1 - tol) / 1024, base * (1 + tol) / 1024, color="#d62728",
                    alpha=0.08, label=f"±{m['rss_tolerance']:g}% of the warm-up end")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_ylabel("gateway RSS (MiB)")
    ax1.set_ylim(bottom=0)
    act = [r for r in rows if r.get("active") is not None]
    ax2.plot([r["t"] / scale for r in act], [r["active"] for r in act],
             label="gateway (fastgw_connections_active)")
    cl = [r for r in rows if r.get("clients_open") is not None]
    ax2.plot([r["t"] / scale for r in cl], [r["clients_open"] for r in cl], "--",
             label="clients (open)")
    ax2.set_ylabel("live connections")
    ax2.set_ylim(0, max([m["connections"]] + [r["active"] for r in act]) * 1.08)
    ax2.legend(loc="lower right", fontsize=8)
    lat = [r for r in rows if "p99_us" in r]
    ax3.plot([r["t"] / scale for r in lat], [r["p99_us"] / 1000 for r in lat], label="p99")
    ax3.plot([r["t"] / scale for r in lat], [r["p50_us"] / 1000 for r in lat], ":",
             label="p50")
    ax3.set_ylabel(f"round trip per {m['sample_interval']:g} s (ms)")
    ax3.set_ylim(bottom=0)
    ax3.legend(loc="upper right", fontsize=8)
    ax3.set_xlabel(f"time ({unit})")
    for ax in (ax1, ax2, ax3):
        ax.axvline(m["warmup"] / scale, color="#7f7f7f", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    fig.suptitle(f"fastgw soak: {m['connections']:,} connections, {_dur(m['duration'])}, "
                 f"churn {m['churn'] * 100:g}%/s: {s['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def wait_admin_url(gw: Any, timeout: float) -> str:
    """The admin API's URL, from the gateway's 'fastgw: admin on URL' line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gw.lines:
            m = ADMIN_RE.search(line)
            if m:
                return m.group(1)
        time.sleep(0.02)
    raise RuntimeError(f"the gateway printed no admin URL: {gw.tail()}")


def end_checks(admin: str, gw: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Once the clients closed: the gateway's table must empty (GET /connections, the gauge,
    the SIGUSR1 status line)."""
    t0 = time.monotonic()
    rows: list[Any] = []
    while True:
        try:
            rows = json.loads(http_get(admin + "/connections"))
        except (OSError, ValueError) as exc:
            return {"table_empty": False, "table_detail": f"admin API: {exc}"}
        if not rows or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.1)
    waited = time.monotonic() - t0
    try:
        gauge = metrics(admin).get("fastgw_connections_active")
    except (OSError, ValueError):
        gauge = None
    status = gateway_status(gw)
    empty = (not rows and gauge == 0 and status is not None and status.get("active") == 0
             and status.get("handshakes") == 0)
    detail = (f"GET /connections: {len(rows)} rows after {waited:.1f} s; "
              f"fastgw_connections_active {gauge if gauge is None else int(gauge)}; "
              f"SIGUSR1 status active {status and status.get('active')}, "
              f"handshakes {status and status.get('handshakes')}")
    return {"table_empty": empty, "table_detail": detail, "table_rows_left": len(rows)}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        import uvloop
        return uvloop.run(client_main(a))
    import platform

    import run  # bench/run.py: the process helpers

    proxy_cpu, load_cpu, pin_note = run.choose_cpus(a.no_pin)
    nofile = run.raise_fd_limit()
    fit = (nofile - 200) // 2
    if a.connections > fit:
        print(f"soak: fd limit {nofile}: connections {a.connections} -> {fit}", file=sys.stderr)
        a.connections = fit
    per_client = [a.connections // a.clients + (1 if i < a.connections % a.clients else 0)
                  for i in range(a.clients)]
    logdir = Path(tempfile.mkdtemp(prefix="fastgw-soak-"))
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "bench/soak.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "host": platform.node(), "cpus": os.cpu_count(), "pinning": pin_note,
        "fd_limit": nofile, "connections": a.connections, "clients": a.clients,
        "duration": a.duration, "warmup": a.warmup, "interval": a.interval, "size": a.size,
        "churn": a.churn, "sample_interval": a.sample_interval,
        "rss_tolerance": a.rss_tolerance, "seed": seed, "logs": str(logdir),
    }
    started: list[Any] = []
    clients: list[Client] = []
    gw_samples: list[dict[str, Any]] = []
    end: dict[str, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(f"soak: {pin_note}; logs in {logdir}", file=sys.stderr)
    try:
        if a.backend_url:
            backend_url = a.backend_url
        else:
            backend = run.Started("echo", [PY, "-m", "fastgw.echo", "--host", "127.0.0.1",
                                           "--port", "0"], load_cpu, logdir, "stdout")
            started.append(backend)
            backend_url = f"ws://127.0.0.1:{backend.wait_port(15)}/"
            run.pin_all_threads(backend.pid, load_cpu)
        cfg = logdir / "gateway.yaml"
        cfg.write_text(GATEWAY_YAML.format(backend_url=backend_url))
        gw = run.Started("gateway", a.gateway_cmd.format(config=cfg).split(), proxy_cpu, logdir,
                         "stderr")
        started.append(gw)
        port = gw.wait_port(15)
        admin = wait_admin_url(gw, 10)
        run.pin_all_threads(gw.pid, proxy_cpu)
        url = f"ws://127.0.0.1:{port}/"
        meta["gateway"] = f"pid {gw.pid}: {' '.join(gw.argv)} (admin {admin})"
        meta["rss_before_kib"] = rss_kib(gw.pid)
        print(f"soak: gateway pid {gw.pid} at {url}, admin {admin}, backend {backend_url}",
              file=sys.stderr)

        conc = max(1, a.concurrency // a.clients)
        for i, n in enumerate(per_client):
            clients.append(Client(i, client_argv(a, url, n, conc, seed + i), load_cpu, logdir,
                                  run))
        for c in clients:
            run.pin_all_threads(c.pid, load_cpu)
        t_open = time.monotonic()
        for c in clients:
            r = c.wait_for("ready", 60 + a.connections * 0.02)
            if r is None:
                raise RuntimeError(f"client {c.index} did not open its connections: "
                                   f"{c.stderr_tail()}")
        meta["opened"] = sum(c.ready["open"] for c in clients if c.ready)
        meta["open_failed"] = sum(c.ready["failed"] for c in clients if c.ready)
        meta["open_seconds"] = round(time.monotonic() - t_open, 2)
        meta["open_errors"] = [e for c in clients if c.ready for e in c.ready["errors"]][:10]
        print(f"soak: {meta['opened']} connections open in {meta['open_seconds']} s "
              f"({meta['open_failed']} failed); running {_dur(a.duration)}", file=sys.stderr)

        t0 = time.time() + 1.0
        for c in clients:
            c.tell(f"go {t0!r}")
        cpu0 = run.tree_cpu_seconds(gw.pid)
        n_samples = int(a.duration / a.sample_interval + 1e-9)
        times = [k * a.sample_interval for k in range(0, n_samples + 1)]
        if times[-1] < a.duration - 1e-6:
            times.append(a.duration)
        for k, st in enumerate(times):
            delay = t0 + st - time.time()
            if delay > 0:
                time.sleep(delay)
            row: dict[str, Any] = {"k": k, "t": round(st, 3), "rss_kib": rss_kib(gw.pid)}
            try:
                mt = metrics(admin)
                row["active"] = int(mt.get("fastgw_connections_active", 0))
            except (OSError, ValueError) as exc:
                row["active"] = None
                row["admin_error"] = repr(exc)
            row["gateway_cpu_s"] = round(run.tree_cpu_seconds(gw.pid) - cpu0, 2)
            gw_samples.append(row)
            if gw.proc.poll() is not None:
                raise RuntimeError(f"the gateway died: {gw.tail()}")
            if k and (k % max(1, int(60 / a.sample_interval)) == 0 or st >= a.duration):
                part = [c.samples.get(k) for c in clients]
                sent = sum(p["sent"] for p in part if p)
                print(f"soak: t={st:.0f}s rss {_mib(row['rss_kib'])} active {row['active']} "
                      f"sent {sent}", file=sys.stderr)
        meta["gateway_cpu_s"] = round(run.tree_cpu_seconds(gw.pid) - cpu0, 2)
        for c in clients:
            if c.wait_for("result", a.echo_timeout + CONNECT_TIMEOUT + 2 * CLOSE_TIMEOUT + 30) \
                    is None:
                meta.setdefault("client_errors", []).append(
                    f"client {c.index}: no result: {c.stderr_tail()}")
        try:
            mt = metrics(admin)
            meta["gateway_messages"] = {k.split(":")[1]: int(v) for k, v in mt.items()
                                        if k.startswith("fastgw_messages_total:")}
            meta["gateway_upgrades"] = int(mt.get("fastgw_connections_total", 0))
        except (OSError, ValueError):
            pass
        end = end_checks(admin, gw)
        time.sleep(0.5)
        end["rss_after_close_kib"] = rss_kib(gw.pid)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        meta["error"] = "interrupted"
    except RuntimeError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        meta["error"] = str(exc)
    finally:
        for c in clients:
            c.stop()
        for s in reversed(started):
            s.stop()

    rows = merge_samples(clients, gw_samples)
    summary = summarize(a, meta, rows, [c.result for c in clients], end)
    if meta.get("error"):
        summary["failed"].insert(0, f"error: {meta['error']}")
    result = {"meta": meta, "summary": summary, "samples": rows,
              "clients": [{k: v for k, v in (c.result or {}).items() if k != "hist"}
                          for c in clients],
              "client_errors": [e for c in clients if c.result for e in c.result["errors"]]
              + meta.get("client_errors", [])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    png = plot(result, out / f"{a.name}.png") if rows and not a.no_plot else None
    if png is not None:
        text += f"\n![soak]({png.name})\n"
    (out / f"{a.name}.md").write_text(text)
    print(text)
    if result["client_errors"]:
        print("client errors: " + "; ".join(result["client_errors"][:10]))
    print(f"(written: {out / (a.name + '.json')}, {out / (a.name + '.md')}"
          + (f", {png}" if png else "") + ")")
    return 0 if summary["verdict"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
