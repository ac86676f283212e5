"""Instructions per relayed message, counted by valgrind's callgrind: a figure that machine
noise does not move, for comparing gateway configurations (bare, policies, observed).

    python bench/instructions.py [--size 64] [--duration 4]

For each configuration it starts `fastgw run` under callgrind (in front of the bundled echo
backend), warms up, zeroes the counters (`callgrind_control -z`), runs the load generator
in throughput mode, dumps the counters (`callgrind_control -d`), and divides the gateway's
instructions by the messages echoed (each crosses the gateway twice). Only the processes it
started are stopped, by pid.

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
PY = sys.executable
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
VARIANTS = {
    "bare": ("metrics: false\n", ""),
    "policies": ("metrics: false\n", POLICIES),
    "shared": ("metrics: false\n", SHARED),
    "private": ("metrics: false\n", PRIVATE),
    "observed": ("events: {{target: {events}}}\nadmin: {{port: 0}}\n", ""),
}


def wait_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text())):
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {path.read_text() if path.exists() else ''}")
        time.sleep(0.1)
    raise RuntimeError(f"no {pattern!r} within {timeout}s")


def loadgen(url: str, size: int, duration: float) -> dict:
    out = subprocess.run([PY, str(HERE / "loadgen.py"), "--url", url, "--mode", "throughput",
                          "--size", str(size), "--duration", str(duration), "--warmup", "0.5",
                          "--connections", "4", "--inflight", "16"],
                         capture_output=True, text=True, env=ENV, timeout=duration + 120)
    return json.loads(out.stdout)


def messages_of(res: dict) -> int:
    return int(res.get("received_total") or res.get("received") or 0)


def measure(name: str, top: str, flows: str, backend_port: int, args, tmp: Path) -> dict:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(top.format(events=tmp / f"{name}.events") +
                   "listeners: [{host: 127.0.0.1, port: 0}]\n" +
                   APIS.format(port=backend_port, flows=flows))
    out = tmp / f"{name}.callgrind"
    err = tmp / f"{name}.stderr"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             PY, "-m", "fastgw", "run", "-c", str(cfg)],
                            stderr=err.open("w"), stdout=subprocess.DEVNULL, env=ENV)
    try:
        port = int(wait_line(err, r"listening on ws://127\.0\.0\.1:(\d+)", proc, 300).group(1))
        url = f"ws://127.0.0.1:{port}/"
        loadgen(url, args.size, 1.0)                           # warm-up: imports, caches
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        res = loadgen(url, args.size, args.duration)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1.0)
        dumps = sorted(tmp.glob(f"{name}.callgrind*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace")
        m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
        instructions = int(m.group(1))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fastgw-instr-"))
    backend = subprocess.Popen([PY, "-m", "fastgw.echo", "--port", "0"], stdout=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        backend_port = int(re.search(r":(\d+)", backend.stdout.readline()).group(1))
        rows = [measure(v, *VARIANTS[v], backend_port, args, tmp) for v in args.variants.split(",")]
    finally:
        backend.terminate()
        backend.wait(10)
    base = rows[0]["instructions_per_message"]
    print(f"| variant | messages | instructions per echoed message ({args.size} B) | vs {rows[0]['variant']} |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ipm = r["instructions_per_message"]
        print(f"| {r['variant']} | {r['messages']:,} | {ipm:,.0f} | {ipm / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
