"""Idle memory per proxied connection (issue 15): the gateway's PSS before and while it holds
N idle WebSocket connections (both legs up) to the echo backend.

    python bench/memory.py --conns 2000 5000            # bytes of PSS per connection
    python bench/memory.py --conns 2000 --trace         # + tracemalloc top sites per connection
    python bench/memory.py --conns 5000 --governed      # bench/run.py's fastgw-governed config
    python bench/memory.py --conns 9000 --governed --concurrency 200   # as bench/run.py's idle

Each count runs in a gateway of its own (started fresh, warmed up with 50 connections): a
second count in the same process would reuse what the first one freed and read low.
--governed: the configuration of bench/run.py's fastgw-governed target (a request and a
response message-rate-limit that never trigger, events to a file, the admin API, metrics).

PSS comes from /proc/PID/smaps_rollup (Pss, and Pss_Anon). What it holds per connection:
the Python objects (Connection, Relay, two Legs, transports, timers, dicts), the legs' malloc'd
buffers (none while idle: they are allocated on first use), uvloop's C side (uv_tcp_t, handles)
and glibc's arena slack. Kernel socket memory (skbuffs, socket structs) is not in PSS; it is
printed apart from /proc/net/sockstat ("mem" pages, whole machine).

With --trace the gateway runs with tracemalloc on (a sitecustomize of this bench, in a temp
directory on PYTHONPATH): a thread dumps a snapshot when a trigger file appears; the bench
takes one before and one while holding the connections and prints the top allocation sites
by bytes per connection, and the objects the garbage collector tracks, by type, per
connection (gc.get_objects(): no str, bytes, int). tracemalloc's own overhead inflates PSS:
read PSS from a run without --trace.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the governed target's configuration)

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PY = sys.executable
LISTEN_RE = re.compile(r"listening on ws://(\[[^\]]+\]|[^:\s]+):(\d+)")

CONFIG = """\
{top}listeners:
  - host: 127.0.0.1
    port: 0
apis:
  - name: echo
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend_port}/
{policies}"""
PLAIN_TOP = "metrics: false\n"
GOVERNED_TOP = run.GATEWAYS["fastgw-governed"][0]

SITECUSTOMIZE = '''\
import collections, gc, json, os, threading, time, tracemalloc
_trig = os.environ.get("FASTGW_MEMTRACE")
if _trig:
    tracemalloc.start(int(os.environ.get("FASTGW_MEMTRACE_FRAMES", "1")))
    def _watch():
        n = 0
        while True:
            time.sleep(0.2)
            if os.path.exists(_trig):
                try:
                    types = collections.Counter(
                        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
                except Exception as exc:
                    types = {f"(no gc counts: {exc!r})": 0}
                with open(f"{_trig}.{n}.types", "w") as f:
                    json.dump(types, f)
                snap = tracemalloc.take_snapshot()     # after the counts: it holds many tuples
                snap.dump(f"{_trig}.{n}.snap")
                n += 1
                os.unlink(_trig)
    threading.Thread(target=_watch, daemon=True, name="memtrace").start()
'''


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":") and parts[-1] == "kB":
            out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def sockstat_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return 0


class Child:
    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, text=True,
                                     cwd=str(ROOT), preexec_fn=raise_nofile)

    def wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = LISTEN_RE.search(line) or re.search(r"port[ =:](\d+)", line)
            if m:
                return int(m.groups()[-1])
        raise RuntimeError(f"{self.proc.args} printed no port")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def open_ws(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("gateway closed during the handshake")
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(data.split(b"\r\n", 1)[0].decode())
    return s


def settle(pid: int) -> dict[str, int]:
    time.sleep(1.0)
    return pss(pid)


def snapshot(trigger: Path, n: int):
    """(tracemalloc snapshot, gc-tracked object counts by type) of the gateway."""
    import json
    import tracemalloc
    trigger.touch()
    path = Path(f"{trigger}.{n}.snap")
    deadline = time.monotonic() + 300
    while not path.exists() or trigger.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no tracemalloc snapshot from the gateway")
        time.sleep(0.1)
    time.sleep(0.3)
    types = json.loads(Path(f"{trigger}.{n}.types").read_text())
    return tracemalloc.Snapshot.load(str(path)), types


def measure(n: int, port: int, pid: int, args: argparse.Namespace, trigger: Path) -> None:
    """Hold n idle connections through the gateway; print its PSS (and sites) per connection."""
    base = settle(pid)
    k0 = sockstat_pages()
    if args.trace:
        before, types0 = snapshot(trigger, 0)
    t0 = time.monotonic()
    if args.concurrency > 1:
        # Upgrades in flight at once (bench/run.py's loadgen keeps 200): the handshakes' peak
        # is what the allocator may keep afterwards.
        with ThreadPoolExecutor(args.concurrency) as pool:
            socks = list(pool.map(lambda _: open_ws(port), range(n)))
    else:
        socks = [open_ws(port) for _ in range(n)]
    t1 = time.monotonic()
    held = settle(pid)
    k1 = sockstat_pages()
    d = held["Pss"] - base["Pss"]
    da = held.get("Pss_Anon", 0) - base.get("Pss_Anon", 0)
    print(f"memory: {n} idle connections (opened in {t1 - t0:.1f}s): gateway PSS "
          f"{base['Pss'] / 2**20:.1f} -> {held['Pss'] / 2**20:.1f} MiB, "
          f"{d / n:.0f} B/conn ({d / n / 1024:.2f} KiB; anon {da / n:.0f} B); "
          f"kernel TCP mem (whole machine, not in PSS) {(k1 - k0) * 4096 / n:.0f} B/conn",
          flush=True)
    if args.trace:
        after, types1 = snapshot(trigger, 1)
        key = "traceback" if args.frames > 1 else "lineno"
        stats = after.compare_to(before, key)
        total = sum(st.size_diff for st in stats)
        print(f"memory: tracemalloc (Python allocator): {total / n:.0f} B/conn; top sites:")
        for st in stats[:args.top]:
            where = st.traceback.format()[-2 if args.frames == 1 else 0:]
            print(f"  {st.size_diff / n:8.1f} B/conn {st.count_diff / n:6.2f} blocks/conn  "
                  + " | ".join(x.strip() for x in where))
        grown = sorted(((types1.get(t, 0) - types0.get(t, 0), t) for t in types1), reverse=True)
        print("memory: gc-tracked objects per connection, by type:")
        for k, t in grown:
            if k / n < 0.05:
                break
            print(f"  {k / n:6.2f} {t}")
    for s in socks:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, nargs="+", default=[2000, 5000])
    p.add_argument("--trace", action="store_true", help="tracemalloc top sites per connection")
    p.add_argument("--frames", type=int, default=1, help="traceback depth with --trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--concurrency", type=int, default=1,
                   help="upgrades in flight at once (threads; bench/run.py's loadgen: 200)")
    p.add_argument("--governed", action="store_true",
                   help="bench/run.py's fastgw-governed configuration (rate limits, events, admin)")
    args = p.parse_args()
    raise_nofile()

    tmp = Path(tempfile.mkdtemp(prefix="fastgw-mem-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    echo = Child([PY, "-m", "fastgw.echo", "--host", "127.0.0.1", "--port", "0"], env)
    try:
        backend_port = echo.wait_port(15)
        cfg = tmp / "gw.yaml"
        top = GOVERNED_TOP.format(events=tmp / "events.jsonl") if args.governed else PLAIN_TOP
        cfg.write_text(CONFIG.format(top=top, backend_port=backend_port,
                                     policies=run.POLICED_FLOWS if args.governed else ""))
        gw_env = dict(env)
        trigger = tmp / "trigger"
        if args.trace:
            (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
            gw_env["FASTGW_MEMTRACE"] = str(trigger)
            gw_env["FASTGW_MEMTRACE_FRAMES"] = str(args.frames)
        for n in args.conns:
            for old in tmp.glob("trigger.*"):
                old.unlink()
            gw = Child([PY, "-m", "fastgw", "run", "-c", str(cfg)], gw_env)
            try:
                port = gw.wait_port(20)
                # Warm up: the first connections allocate what every later one reuses
                # (the scratch buffer, code paths, interned strings, free lists).
                warm = [open_ws(port) for _ in range(50)]
                for s in warm:
                    s.close()
                time.sleep(0.5)
                measure(n, port, gw.proc.pid, args, trigger)
            finally:
                gw.stop()
    finally:
        echo.stop()


if __name__ == "__main__":
    main()
