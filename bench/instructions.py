"""Instructions per relayed message, counted by valgrind's callgrind: a figure that machine
noise does not move, for comparing gateway configurations (bare, policies, observed).

    python bench/instructions.py [--size 64] [--duration 4]
    python bench/instructions.py --mode connrate      # instructions per upgrade: one, pool2
    python bench/instructions.py --variants shared,cluster                 # a cluster's cost
    python bench/instructions.py --mode connrate --variants counted,cluster
    python bench/instructions.py --mode connrate --variants one --peers nginx,haproxy

For each configuration it starts `fastgw run` under callgrind (in front of the bundled echo
backend), warms up, zeroes the counters (`callgrind_control -z`), runs the load generator
in throughput mode, dumps the counters (`callgrind_control -d`), and divides the gateway's
instructions by the messages echoed (each crosses the gateway twice). Only the processes it
started are stopped, by pid.

With ``--mode connrate`` the load is whole connection cycles (connect, upgrade, one echoed
message, close) and the figure is instructions per upgrade, for the upgrade path: ``one``
(a target-url) against ``pool2`` (a pool of two targets, the same echo backend at two URLs,
least-connections) and ``hash2`` (the same pool, consistent-hash by client-id): the cost of
picking a target; ``counted`` (a count-limit) against ``cluster`` (the same, cluster-wide).

``--peers nginx,nginx-64k,haproxy`` counts those proxies the same way, one process each with
bench/peers.py's configuration, in front of the same echo backend (installed from Debian's
packages if missing, as bench/run.py does): the user-space part of a CPU-time ratio.

``cluster`` (both modes) shares the limits through a redis-server the bench starts on a free
loopback port (one node: what a node spends with its leased shares, against ``shared`` or
``counted``, the same limits in the local zone).

Callgrind counts user-space instructions only (system calls are not in the figure), and the
pipelined load puts a varying number of frames in each socket read: per-read costs are shared
by more or fewer messages from one run to the next, so compare runs whose message counts are
close, or repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402  (bench/peers.py)

PY = sys.executable
# Peers counted the same way (--peers): one process each, C proxies valgrind can run.
PEERS = ("nginx", "nginx-64k", "haproxy")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep))

APIS = """\
apis:
  - name: bench
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{port}/
{flows}"""
POLICIES = """\
        request:
          - {policy: message-rate-limit, messages: 100000000/1s, bytes: 100GiB/1s}
        response:
          - {policy: message-rate-limit, messages: 100000000/1s, action: delay}
"""
# One request limit with scope client: its buckets are in the shared limit zone
# (LimitStore.take on every message); "private" is the same limit kept in the
# connection (scope connection), to compare with.
SHARED = """\
        request:
          - {policy: message-rate-limit, messages: 100000000/1s, bytes: 100GiB/1s, scope: client}
"""
PRIVATE = SHARED.replace(", scope: client", "")
POOL2 = """\
apis:
  - name: bench
    path: /
    assembly:
      - policy: websocket-upgrade
        targets:
          - url: ws://127.0.0.1:{port}/
          - url: ws://127.0.0.1:{port}/b/
        balance: least-connections
{flows}"""
# The same limits shared by the gateway nodes through a redis-server the bench starts (one
# node here: the figure is what a node spends per message or upgrade with its shares).
# Under callgrind the gateway runs ~50 times slower: times that a round trip there can keep.
CLUSTER = ("metrics: false\ncluster: {{redis: {{url: 'redis://127.0.0.1:{redis}/0', "
           "timeout: 500ms}}, lease: 4s, refresh: 1s}}\n")
COUNTED = APIS.replace("      - policy: websocket-upgrade",
                       "      - {{policy: count-limit, key: client-ip, max: 1000000}}\n"
                       "      - policy: websocket-upgrade")
# --mode connrate: name -> (top, the APIs)
UPGRADE_VARIANTS = {
    "one": ("metrics: false\n", APIS),
    "pool2": ("metrics: false\n", POOL2),
    "hash2": ("metrics: false\n", POOL2.replace("least-connections", "consistent-hash")),
    "counted": ("metrics: false\n", COUNTED),
    "cluster": (CLUSTER, COUNTED),
}
VARIANTS = {
    "bare": ("metrics: false\n", ""),
    "policies": ("metrics: false\n", POLICIES),
    "shared": ("metrics: false\n", SHARED),
    "private": ("metrics: false\n", PRIVATE),
    "cluster": (CLUSTER, SHARED),
    "observed": ("events: {{target: {events}}}\nadmin: {{port: 0}}\n", ""),
}
LEARNING = 5.5      # a fresh redis-server grants nothing new for one lease (4 s), rounded up


def wait_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text())):
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {path.read_text() if path.exists() else ''}")
        time.sleep(0.1)
    raise RuntimeError(f"no {pattern!r} within {timeout}s")


def loadgen(url: str, size: int, duration: float, mode: str = "throughput") -> dict:
    load = (["--warmup", "0.5", "--connections", "4", "--inflight", "16"] if mode == "throughput"
            else ["--warmup", "0", "--connections", "4"])
    out = subprocess.run([PY, str(HERE / "loadgen.py"), "--url", url, "--mode", mode,
                          "--size", str(size), "--duration", str(duration), *load],
                         capture_output=True, text=True, env=ENV, timeout=duration + 120)
    return json.loads(out.stdout)


def messages_of(res: dict) -> int:
    return int(res.get("received_total") or res.get("received") or 0)


def measure(name: str, top: str, flows: str, backend_port: int, args, tmp: Path,
            apis: str = APIS) -> dict:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(top.format(events=tmp / f"{name}.events", redis=args.redis_port) +
                   "listeners: [{host: 127.0.0.1, port: 0}]\n" +
                   apis.format(port=backend_port, flows=flows))

    def listening(proc, err: Path) -> int:
        return int(wait_line(err, r"listening on ws://127\.0\.0\.1:(\d+)", proc, 300).group(1))

    return count(name, [PY, "-m", "fastgw", "run", "-c", str(cfg)], ENV, listening, args, tmp)


def measure_peer(name: str, backend_port: int, args, tmp: Path) -> dict:
    """The same count for a peer of bench/peers.py (nginx, nginx-64k, haproxy), one process."""
    port = peers.free_port()
    argv, extra = peers.peer_command(name, port, backend_port, tmp / name)

    def listening(proc, _err: Path) -> int:
        peers.wait_listening(port, 300, proc)
        return port

    return count(name, argv, dict(ENV, **extra), listening, args, tmp)


def count(name: str, argv: list[str], env: dict, listening, args, tmp: Path) -> dict:
    """Runs `argv` under callgrind and returns its instructions per message (per upgrade with
    --mode connrate) over a load generator's run; `listening(proc, stderr_path)` waits for it
    and returns its port."""
    mode = args.mode
    out = tmp / f"{name}.callgrind"
    err = tmp / f"{name}.stderr"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                            stderr=err.open("w"), stdout=subprocess.DEVNULL, env=env)
    try:
        url = f"ws://127.0.0.1:{listening(proc, err)}/"
        loadgen(url, args.size, 1.0, mode)                     # warm-up: imports, caches
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        res = loadgen(url, args.size, args.duration, mode)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1.0)
        dumps = sorted(tmp.glob(f"{name}.callgrind*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace")
        m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
        instructions = int(m.group(1))
        if mode == "connrate":
            # No warm-up: every cycle the gateway served in the window is counted.
            if res.get("failures"):
                raise RuntimeError(f"{name}: {res['failures']} failed cycles: {res.get('errors')}")
            n = int(res.get("upgrades") or 0)
            return {"variant": name, "messages": n, "instructions": instructions,
                    "instructions_per_message": instructions / n if n else None}
        # The load generator counts its measured window only; the gateway also relayed the
        # warm-up and drain of this run: count every message the run sent.
        n = int(res.get("sent_total") or messages_of(res))
        return {"variant": name, "messages": n, "instructions": instructions,
                "instructions_per_message": instructions / n if n else None}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free loopback port, without persistence, past its learning."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
    time.sleep(LEARNING)
    return proc, port


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--mode", choices=("throughput", "connrate"), default="throughput",
                   help="connrate: instructions per upgrade (variants one, pool2)")
    p.add_argument("--variants", default=None,
                   help=f"throughput: {','.join(VARIANTS)} (default: all); "
                        f"connrate: {','.join(UPGRADE_VARIANTS)}")
    p.add_argument("--peers", default="",
                   help=f"also count these proxies in front of the same echo backend, "
                        f"installed if missing: {','.join(PEERS)}")
    args = p.parse_args(argv)
    peer_names = [n for n in args.peers.split(",") if n]
    for n in peer_names:
        if n not in PEERS:
            p.error(f"unknown peer {n!r}: one of {','.join(PEERS)}")
    reasons = peers.ensure_installed(peer_names, log=lambda m: print(m, file=sys.stderr))
    for n, why in reasons.items():
        if why is not None:
            p.error(f"{n}: {why}")
    table = VARIANTS if args.mode == "throughput" else UPGRADE_VARIANTS
    variants = (args.variants or ",".join(table)).split(",")
    for v in variants:
        if v not in table:
            p.error(f"unknown variant {v!r} for --mode {args.mode}")
    tmp = Path(tempfile.mkdtemp(prefix="fastgw-instr-"))
    print(f"callgrind files (callgrind_annotate): {tmp}", file=sys.stderr)
    redis = None
    args.redis_port = 0
    if any("{redis}" in table[v][0] for v in variants):
        redis, args.redis_port = start_redis(tmp)
    backend = subprocess.Popen([PY, "-m", "fastgw.echo", "--port", "0"], stdout=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        backend_port = int(re.search(r":(\d+)", backend.stdout.readline()).group(1))
        if args.mode == "throughput":
            rows = [measure(v, *VARIANTS[v], backend_port, args, tmp) for v in variants]
        else:
            rows = [measure(v, UPGRADE_VARIANTS[v][0], "", backend_port, args, tmp,
                            apis=UPGRADE_VARIANTS[v][1]) for v in variants]
        rows += [measure_peer(n, backend_port, args, tmp) for n in peer_names]
    finally:
        backend.terminate()
        backend.wait(10)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    base = rows[0]["instructions_per_message"]
    what = ("upgrades | instructions per upgrade (connect, upgrade, one "
            f"{args.size} B echo, close)" if args.mode == "connrate" else
            f"messages | instructions per echoed message ({args.size} B)")
    print(f"| variant | {what} | vs {rows[0]['variant']} |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ipm = r["instructions_per_message"]
        print(f"| {r['variant']} | {r['messages']:,} | {ipm:,.0f} | {ipm / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
