#!/usr/bin/env python3
"""The reconnect storm of `bench/run.py`: N clients held through a proxy, the echo backend
killed and brought back on the same port, every client reconnecting at once.

Two halves:

- ``python bench/storm.py --url ws://... --connections N`` is the client process (plain
  asyncio streams on uvloop, run on the load core): it opens N connections (at most
  ``--concurrency`` handshakes at a time), checks one 64 B echo on each, prints
  ``{"event": "holding", ...}`` and holds them. A connection that the proxy drops (its
  backend leg died) reconnects after a random ``--backoff-min``..``--backoff-max`` ms pause,
  again and again (at most ``--max-attempts`` times, until ``--max-seconds`` after the drop),
  until one attempt upgrades (101) and echoes. Every successful reconnect's handshake
  (TCP connect to the 101) goes into an HDR histogram. Once every connection it opened was
  dropped and is back or gave up (or on a line ``report`` on stdin, or after ``--duration``
  s) it prints the result JSON and exits.
- ``run_storm`` (called by run.py once per proxy) starts that process, kills the backend
  (SIGKILL, by pid), waits ``down_s``, starts a new one on the same port, samples the proxy's
  RSS (VmRSS of /proc/PID/status summed over its processes) every 50 ms, and
  ``aggregate`` turns it all into the scenario's figures: the time from the backend's restart
  until the last client echoed again, the peak RSS, the handshake p99 during the storm,
  failures.

All times are time.monotonic() (CLOCK_MONOTONIC: the same clock in every process of the host).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B42"


# ---------------------------------------------------------------------------------------------
# the client process


def _frame(payload: bytes) -> bytes:
    """A masked, final BINARY frame (payload < 126 bytes)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + key + masked


async def _attempt(host: str, port: int, path: str, timeout: float,
                   hist: Any | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
    """One connect + upgrade + one echo; the open streams, or why it failed."""
    t0 = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            key = base64.b64encode(os.urandom(16))
            writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " +
                         f"{host}:{port}".encode() + b"\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                         b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                writer.close()
                return "status " + head[9:12].decode("ascii", "replace")
            upgraded = time.monotonic()
            payload = os.urandom(64)
            writer.write(_frame(payload))
            head = await reader.readexactly(2)
            if head[0] & 0x0F == 8:
                # a proxy that upgrades before it reaches the backend (pyproxy) closes then
                body = await reader.readexactly(head[1] & 0x7F)
                writer.close()
                return f"close {int.from_bytes(body[:2], 'big')}" if len(body) >= 2 else "close"
            echo = await reader.readexactly(len(payload))
            if head[0] & 0x0F != 2 or head[1] != len(payload) or echo != payload:
                writer.close()
                return "bad echo"
            if hist is not None:     # a successful attempt only: connect .. 101
                hist.record_value(max(1, int((upgraded - t0) * 1e6)))
            return reader, writer
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        if writer is not None:
            writer.close()
        return type(exc).__name__
    except TimeoutError:
        if writer is not None:
            writer.close()
        return "timeout"


class Client:
    """The N connections and their counters."""

    def __init__(self, url: str, n: int, args: argparse.Namespace):
        from hdrh.histogram import HdrHistogram
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        self.host, _, port = hostport.rpartition(":")
        self.port, self.path = int(port), "/" + path
        self.n, self.args = n, args
        self.hist = HdrHistogram(1, 60_000_000, 3)
        self.open = 0
        self.open_failed = 0
        self.dropped = 0
        self.back = 0
        self.gave_up = 0
        self.attempts = 0
        self.failed_attempts: dict[str, int] = {}
        self.first_drop: float | None = None
        self.last_drop: float | None = None
        self.last_back: float | None = None
        self.reconnect_handshakes = 0
        self.done = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def open_one(self, sem: asyncio.Semaphore) -> None:
        async with sem:
            r = await _attempt(self.host, self.port, self.path, 30.0, None)
        if isinstance(r, str):
            self.open_failed += 1
            self.failed_attempts["open: " + r] = self.failed_attempts.get("open: " + r, 0) + 1
            return
        self.open += 1
        asyncio.get_running_loop().create_task(self.hold(*r))

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wait for the proxy to drop the connection, then reconnect until one succeeds."""
        self.writers.append(writer)
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            if not data:
                break
            if data[0] & 0x0F == 8:   # a CLOSE from the proxy: dropped (no answer needed)
                break
        self.writers.remove(writer)
        writer.close()
        now = time.monotonic()
        self.dropped += 1
        self.first_drop = now if self.first_drop is None else self.first_drop
        self.last_drop = now
        a = self.args
        deadline = now + a.max_seconds
        for _ in range(a.max_attempts):
            await asyncio.sleep(random.uniform(a.backoff_min, a.backoff_max) / 1000)
            if time.monotonic() >= deadline:
                break
            self.attempts += 1
            r = await _attempt(self.host, self.port, self.path, a.attempt_timeout, self.hist)
            if isinstance(r, str):
                self.failed_attempts[r] = self.failed_attempts.get(r, 0) + 1
                continue
            self.reconnect_handshakes += 1
            self.back += 1
            self.last_back = time.monotonic()
            self._check_done()
            self.writers.append(r[1])
            return
        self.gave_up += 1
        self._check_done()

    def _check_done(self) -> None:
        if self.open and self.back + self.gave_up >= self.open:
            self.done.set()

    def result(self) -> dict[str, Any]:
        h = self.hist
        return {
            "mode": "storm", "connections": self.n, "open": self.open,
            "open_failed": self.open_failed, "dropped": self.dropped, "back": self.back,
            "gave_up": self.gave_up, "attempts": self.attempts,
            "failed_attempts": self.failed_attempts, "first_drop": self.first_drop,
            "last_drop": self.last_drop, "last_back": self.last_back,
            "handshake_us": {p: h.get_value_at_percentile(float(p[1:])) for p in
                             ("p50", "p90", "p99", "p99.9")} | {"max": h.get_max_value(),
                                                                "count": h.get_total_count()},
            "histogram": h.encode().decode("ascii") if h.get_total_count() else None,
        }


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    c = Client(args.url, args.connections, args)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    sem = asyncio.Semaphore(args.concurrency)
    await asyncio.gather(*(c.open_one(sem) for _ in range(args.connections)))
    print(json.dumps({"event": "holding", "open": c.open, "failed": c.open_failed,
                      "open_seconds": round(time.monotonic() - t0, 3)}), flush=True)
    stop = asyncio.Event()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "report":
            stop.set()

    try:
        loop.add_reader(sys.stdin.fileno(), on_stdin)
        reading = True
    except (OSError, ValueError):   # stdin not a pipe or a terminal (/dev/null): no "report"
        reading = False
    waiters = [loop.create_task(stop.wait()), loop.create_task(c.done.wait())]
    await asyncio.wait(waiters, timeout=args.duration, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    if reading:
        loop.remove_reader(sys.stdin.fileno())
    res = c.result()
    res["ok"] = bool(c.open == c.n and c.back == c.open and not c.gave_up)
    # printed before the connections close, so that run.py's CPU window ends with the storm
    print(json.dumps(res), flush=True)
    for w in list(c.writers):
        w.close()
    return res


def parse_client_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="reconnect-storm clients")
    p.add_argument("--url", required=True)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=200, help="handshakes at a time (opening)")
    p.add_argument("--backoff-min", type=float, default=50.0, help="ms")
    p.add_argument("--backoff-max", type=float, default=100.0, help="ms")
    p.add_argument("--max-attempts", type=int, default=400)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per connection, from its drop")
    p.add_argument("--attempt-timeout", type=float, default=10.0,
                   help="s per attempt, connect to echo (10: websockets' open_timeout)")
    p.add_argument("--duration", type=float, default=300.0, help="at most, then report")
    return p.parse_args(argv)


def client_entry(argv: list[str] | None = None) -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args = parse_client_args(argv)
    try:
        import uvloop
        res = uvloop.run(client_main(args))
    except ImportError:
        res = asyncio.run(client_main(args))
    return 0 if res["ok"] else 1


# ---------------------------------------------------------------------------------------------
# the pure part: figures of one storm


def aggregate(client: dict[str, Any] | None, t_kill: float, t_restart: float | None,
              rss: list[tuple[float, int]], rss_before: int | None) -> dict[str, Any]:
    """The figures of one storm from the client's result, the kill and restart times and the
    RSS samples (monotonic time, bytes) of the proxy."""
    out: dict[str, Any] = {"t_kill": t_kill, "t_restart": t_restart}
    c = client or {}
    n = int(c.get("open") or 0)
    back = int(c.get("back") or 0)
    out["connections"] = n
    out["dropped"] = int(c.get("dropped") or 0)
    out["back"] = back
    out["failures"] = int(c.get("open_failed") or 0) + int(c.get("gave_up") or 0) + max(
        0, n - back - int(c.get("gave_up") or 0))
    out["attempts"] = int(c.get("attempts") or 0)
    out["failed_attempts"] = sum((c.get("failed_attempts") or {}).values())
    all_back = bool(n) and back == n
    last = c.get("last_back")
    out["all_back"] = all_back
    out["all_back_after_restart_s"] = (last - t_restart if all_back and last is not None
                                       and t_restart is not None else None)
    out["all_back_after_kill_s"] = last - t_kill if all_back and last is not None else None
    hs = c.get("handshake_us") or {}
    out["handshake_p50_us"] = hs.get("p50") if hs.get("count") else None
    out["handshake_p99_us"] = hs.get("p99") if hs.get("count") else None
    out["handshake_max_us"] = hs.get("max") if hs.get("count") else None
    during = [b for t, b in rss if t >= t_kill]
    out["rss_samples"] = len(during)
    out["rss_before_mib"] = rss_before / 2**20 if rss_before else None
    out["peak_rss_mib"] = max(during) / 2**20 if during else None
    out["ok"] = all_back and out["failures"] == 0
    return out


# ---------------------------------------------------------------------------------------------
# the driver, called by run.py


def _status_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (/proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """VmRSS summed over the proxy's processes every `interval` s (the process list refreshed
    every second: a worker started meanwhile is seen)."""

    def __init__(self, pids_of: Callable[[], list[int]], interval: float = 0.05):
        super().__init__(daemon=True)
        self.pids_of, self.interval = pids_of, interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        pids, refreshed = self.pids_of(), time.monotonic()
        while not self._done.is_set():
            now = time.monotonic()
            if now - refreshed >= 1.0:
                pids, refreshed = self.pids_of(), now
            self.samples.append((now, sum(_status_rss(p) or 0 for p in pids)))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(2)


def json_lines(stream: IO[str] | None) -> Callable[[float], dict[str, Any] | None]:
    """Drain a child's text stdout in a daemon thread; return `next_json(timeout)`: the next
    line that parses as JSON (lines that do not are skipped), or None once the stream ended
    or after `timeout` s. Used for the storm clients and run.py's idle load generator."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert stream is not None
        for line in stream:
            lines.put(line)
        lines.put(None)

    def next_json(timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:
                lines.put(None)         # stays ended for the next call
                return None
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    threading.Thread(target=read, daemon=True).start()
    return next_json


def client_argv(py: str, url: str, n: int) -> list[str]:
    return [py, os.path.abspath(__file__), "--url", url, "--connections", str(n)]


def run_storm(target: str, url: str, proxy_pid: int, pids_of: Callable[[], list[int]],
              kill_backend: Callable[[], None], start_backend: Callable[[], None],
              popen: Callable[..., subprocess.Popen[str]], py: str, n: int,
              running: list[subprocess.Popen[str]], down_s: float = 1.0,
              on_final: Callable[[], None] | None = None) -> dict[str, Any]:
    """One storm through one proxy. `kill_backend` kills the echo backend by pid and waits for
    it; `start_backend` starts a new one on the same port and returns once it listens;
    `popen(argv, **kw)` starts the client process pinned to the load core; `on_final` is
    called as soon as the client's result arrived (or did not), before its connections close:
    kill_backend .. on_final is the storm's window."""
    out: dict[str, Any] = {"scenario": "storm", "target": target}
    proc = popen(client_argv(py, url, n), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 stdin=subprocess.PIPE, text=True)
    running.append(proc)
    next_json = json_lines(proc.stdout)
    errbuf: list[str] = []
    threading.Thread(target=lambda: errbuf.extend(proc.stderr or ()), daemon=True).start()
    sampler = RssSampler(pids_of)
    try:
        holding = next_json(180)
        if holding is None:
            out["loadgen"] = {"ok": False, "errors": ["storm: no 'holding' line"],
                              "stderr": "".join(errbuf)[-2000:]}
            out.update(aggregate(None, time.monotonic(), None, [], None))
            return out
        out["holding"] = holding
        time.sleep(0.5)
        rss_before = sum(_status_rss(p) or 0 for p in pids_of())
        sampler.start()
        time.sleep(0.2)
        t_kill = time.monotonic()
        client_cpu0 = _cpu_seconds(proc.pid)
        kill_backend()
        time.sleep(down_s)
        start_backend()
        t_restart = time.monotonic()
        final = next_json(300)
        if final is None and proc.poll() is None:
            # still waiting for some client after 5 minutes: ask for what it has
            assert proc.stdin is not None
            try:
                proc.stdin.write("report\n")
                proc.stdin.flush()
            except OSError:
                pass
            final = next_json(30)
        if on_final is not None:
            on_final()
        client_cpu1 = _cpu_seconds(proc.pid)
        final = final or {"ok": False, "errors": ["storm: no final result"],
                          "stderr": "".join(errbuf)[-2000:]}
        time.sleep(0.2)
        sampler.stop()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        out["loadgen"] = final
        # the client's CPU from the kill until its result (it shares its core with the backend)
        out["client_cpu_s"] = (client_cpu1 - client_cpu0 if client_cpu0 is not None
                               and client_cpu1 is not None else None)
        out.update(aggregate(final, t_kill, t_restart, sampler.samples, rss_before))
        out["loadgen"]["ok"] = out["ok"]
        out["loadgen"]["summary"] = summary_line(out)
        return out
    finally:
        if sampler.is_alive():
            sampler.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        running.remove(proc)


def summary_line(r: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "–" if v is None else format(v, spec)
    return (f"{r.get('back')}/{r.get('connections')} back {f(r.get('all_back_after_restart_s'), '.2f')} s "
            f"after the restart, peak RSS {f(r.get('peak_rss_mib'), '.1f')} MiB, handshake p99 "
            f"{f(r.get('handshake_p99_us'), ',')} µs, {r.get('failures')} failures, "
            f"{r.get('attempts')} attempts")


if __name__ == "__main__":
    raise SystemExit(client_entry())
