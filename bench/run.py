#!/usr/bin/env python3
"""One command: echo backend direct vs through fastgw, interleaved, with CPU accounting.

    python bench/run.py            # 3 rounds, 5 s per run (about 3 minutes)
    python bench/run.py --quick    # 1 round, short runs (under a minute)

What it does, in one run:

1. starts the echo backend (``python -m fastgw.echo --port 0``) and reads its port;
2. starts the gateway (``python -m fastgw run -c <generated yaml>``) with one API at ``/`` that
   upgrades to the backend, and reads its port from the ``fastgw: listening on ws://HOST:PORT``
   line on stderr. If the gateway does not start, says why and runs ``direct`` only;
3. pins the gateway to CPU 0, the backend and the load generator to CPU 1
   (``os.sched_setaffinity``), when the machine has two CPUs to give;
4. for each round, for each scenario, for each target (``direct``, ``fastgw``), runs
   ``bench/loadgen.py`` and reads the CPU time of the gateway and of the backend (with their
   child processes) from ``/proc/PID/stat`` before and after, giving CPU µs per echoed message;
5. prints a Markdown table (medians over the rounds, fastgw/direct ratios) and writes every raw
   figure to ``bench/results/latest.json``.

It stops only the processes it started (by pid), also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"
LOADGEN = BENCH / "loadgen.py"
RESULTS = BENCH / "results"
PY = sys.executable

LISTEN_RE = re.compile(r"listening on ws://(\[[^\]]+\]|[^:\s]+):(\d+)")

# name -> loadgen arguments
SCENARIOS: dict[str, dict[str, Any]] = {
    "tp-64B": {"mode": "throughput", "size": 64},
    "tp-1KiB": {"mode": "throughput", "size": 1024},
    "tp-64KiB": {"mode": "throughput", "size": 65536},
    "lat-5k/s": {"mode": "latency", "size": 64, "rate": 5000},
}

# Target "fastgw" is the API at /, "fastgw-policies" the API at /policed: the same
# gateway process, with a request and a response message-rate-limit that never trigger.
GATEWAY_YAML = """\
listeners: [{{host: 127.0.0.1, port: 0}}]
apis:
  - name: bench
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend_port}/
  - name: policed
    path: /policed
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend_port}/
        request:
          - policy: message-rate-limit
            messages: 100000000/1s
            bytes: 100GiB/1s
            action: reject
        response:
          - policy: message-rate-limit
            messages: 100000000/1s
            action: delay
"""
# "fastgw" and "fastgw-policies" run with metrics off; "fastgw-observed" is a second gateway
# process with the same APIs, metrics on, events written to a file and the admin API on.
BARE_TOP = "metrics: false\n"
OBSERVED_TOP = "events: {{target: {events}}}\nadmin: {{port: 0}}\n"
GATEWAY_TARGETS = ("fastgw", "fastgw-policies", "fastgw-observed")
RATIOS = (("fastgw/direct", "fastgw", "direct"), ("policies/fastgw", "fastgw-policies", "fastgw"),
          ("observed/fastgw", "fastgw-observed", "fastgw"))

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------------------------------
# processes


class Started:
    """A child process we started, its output drained by a thread into a log file."""

    def __init__(self, name: str, argv: list[str], cpu: int | None, logdir: Path,
                 listen_stream: str):
        self.name = name
        self.argv = argv
        self.cpu = cpu
        self.log_path = logdir / f"{name}.log"
        self.lines: list[str] = []
        self.port_q: queue.Queue[int] = queue.Queue()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self.proc = popen_pinned(
            argv,
            cpu,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(ROOT),
            text=True,
            errors="replace",
        )
        self.pid = self.proc.pid
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, "stdout",
                                                       listen_stream == "stdout"), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, "stderr",
                                                       listen_stream == "stderr"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: Any, label: str, look_for_port: bool) -> None:
        for line in stream:
            self.lines.append(f"[{label}] {line.rstrip()}")
            del self.lines[:-200]
            try:
                self._log.write(f"[{label}] {line}")
                self._log.flush()
            except ValueError:
                pass
            if look_for_port:
                m = LISTEN_RE.search(line)
                if m:
                    self.port_q.put(int(m.group(2)))

    def wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.port_q.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:
                    time.sleep(0.1)  # let the drain threads catch the last lines
                    raise RuntimeError(
                        f"{self.name} exited with status {self.proc.returncode}: {self.tail()}"
                    )
        raise RuntimeError(f"{self.name} printed no 'listening on' line within {timeout} s: "
                           f"{self.tail()}")

    def tail(self, n: int = 6) -> str:
        return " | ".join(self.lines[-n:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
            except ProcessLookupError:
                pass
        for t in self._threads:
            t.join(1)
        self._log.close()


def popen_pinned(argv: list[str], cpu: int | None, **kw: Any) -> subprocess.Popen[str]:
    """Popen with the child's affinity set to {cpu}.

    The child inherits the affinity of the thread that forks it, so the calling thread pins
    itself for the duration of the fork (no preexec_fn: this process runs drain threads).
    """
    if cpu is None:
        return subprocess.Popen(argv, **kw)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return subprocess.Popen(argv, **kw)
    finally:
        os.sched_setaffinity(0, old)


def pin_all_threads(pid: int, cpu: int | None) -> None:
    """The child inherited the affinity at fork; pin every thread again in case it changed."""
    if cpu is None:
        return
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except OSError:
                pass
    except OSError:
        pass


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of all its live descendants, from /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        f = _stat_fields(p)
        if f is None:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)
        todo.extend(children.get(p, ()))
    return total / CLK_TCK


# ---------------------------------------------------------------------------------------------
# one measurement


def run_loadgen(url: str, scenario: dict[str, Any], args: argparse.Namespace, cpu: int | None,
                running: list[subprocess.Popen[str]]) -> dict[str, Any]:
    argv = [PY, str(LOADGEN), "--url", url, "--mode", scenario["mode"],
            "--size", str(scenario["size"]), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--connections", str(args.connections)]
    if scenario["mode"] == "throughput":
        argv += ["--inflight", str(args.inflight), "--processes", str(args.processes)]
    else:
        argv += ["--rate", str(scenario["rate"])]
    limit = args.duration + args.warmup + 60
    proc = popen_pinned(argv, cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL, text=True, cwd=str(ROOT))
    running.append(proc)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"ok": False, "errors": [f"loadgen timed out after {limit} s"], "stderr": err[-2000:]}
    finally:
        running.remove(proc)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "errors": [f"loadgen exit {proc.returncode}, no JSON"],
                "stderr": err[-2000:]}
    res["summary"] = err.strip().splitlines()[-1] if err.strip() else ""
    return res


def cpu_idle_irq_seconds() -> dict[int, tuple[float, float]]:
    """Per CPU: (idle + iowait, irq + softirq) seconds from /proc/stat.

    Idle time is measured exactly on tickless kernels, while user/system are sampled at each
    tick and lose time under many short sleeps: busy time is therefore taken as wall - idle.
    """
    out: dict[int, tuple[float, float]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals]
                    out[int(name[3:])] = ((v[3] + v[4]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK)
    except OSError:
        pass
    return out


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (the load generator runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def messages_of(res: dict[str, Any]) -> int:
    """Echoed messages over the whole run (warm-up included), matching the CPU window."""
    if res.get("mode") == "throughput":
        return int(res.get("received_total", 0))
    return int(res.get("completed", 0))


# ---------------------------------------------------------------------------------------------
# report


def metric_rows(scenario: str, runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median over rounds of each reported figure, for one (target, scenario)."""
    def med(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else None

    lg = [r["loadgen"] for r in runs]
    out: dict[str, float | None] = {}
    if SCENARIOS[scenario]["mode"] == "throughput":
        out["msg/s"] = med([x.get("msgs_per_s") for x in lg])
        out["MB/s"] = med([x.get("mb_per_s") for x in lg])
        out["client CPU %"] = med([x["client_cpu"] * 100 if "client_cpu" in x else None for x in lg])
    else:
        for p in ("p50", "p90", "p99", "p99.9", "max"):
            out[f"{p} µs"] = med([x.get("latency_us", {}).get(p) for x in lg])
    out["gateway CPU µs/msg"] = med([r["cpu"].get("gateway_us_per_msg") for r in runs])
    out["backend CPU µs/msg"] = med([r["cpu"].get("backend_us_per_msg") for r in runs])
    for key in sorted({k for r in runs for k in r["cpu"] if k.startswith("other_load_cpu")}):
        cpu_n = key[len("other_load_cpu"):-len("_pct")]
        out[f"other load on CPU {cpu_n} %"] = med([r["cpu"].get(key) for r in runs])
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def markdown(summary: dict[str, dict[str, dict[str, float | None]]], targets: list[str]) -> str:
    ratios = [r for r in RATIOS if {r[1], r[2]} <= set(targets)]
    cols = list(targets) + [r[0] for r in ratios]
    lines = ["| scenario | figure | " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for scenario, per_target in summary.items():
        names: list[str] = []
        for t in targets:
            for k in per_target.get(t, {}):
                if k not in names:
                    names.append(k)
        for name in names:
            vals = [per_target.get(t, {}).get(name) for t in targets]
            if all(v is None for v in vals):
                continue
            row = [fmt(v) for v in vals]
            for _, top, bottom in ratios:
                d = per_target.get(bottom, {}).get(name)
                g = per_target.get(top, {}).get(name)
                ratio_ok = d and g is not None and not name.startswith("other load")
                row.append(f"{g / d:.2f}" if ratio_ok else "–")
            lines.append(f"| {scenario} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, 2 s runs, 0.5 s warm-up")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--duration", type=float, default=None, help="measured s per run (5; 2 quick)")
    p.add_argument("--warmup", type=float, default=None, help="s per run (1; 0.5 quick)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--processes", type=int, default=1, help="load generator processes")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--targets", default="direct,fastgw,fastgw-policies,fastgw-observed")
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinity")
    p.add_argument("--gateway-cmd", default=f"{PY} -m fastgw run -c {{config}}",
                   help="command that starts the gateway; {config} is the YAML path")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (2.0 if a.quick else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.targets = [t for t in a.targets.split(",") if t]
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    for t in a.targets:
        if t not in ("direct", *GATEWAY_TARGETS):
            p.error(f"unknown target {t!r}")
    return a


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None, str]:
    if no_pin or not hasattr(os, "sched_setaffinity"):
        return None, None, "not pinned (--no-pin or unsupported)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"not pinned: only CPU(s) {cpus} available"
    gw, rest = cpus[0], cpus[1]
    return gw, rest, (f"gateway pinned to CPU {gw}; backend and load generator pinned to CPU {rest}"
                      f" (of {len(cpus)} available)")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        from importlib.metadata import version
        for pkg in ("picows", "uvloop", "hdrhistogram"):
            try:
                out[pkg] = version(pkg)
            except Exception:
                out[pkg] = "?"
    except ImportError:  # pragma: no cover
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gw_cpu, load_cpu, pin_note = choose_cpus(args.no_pin)
    logdir = Path(tempfile.mkdtemp(prefix="fastgw-bench-"))
    started: list[Started] = []
    running: list[subprocess.Popen[str]] = []
    raw: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "pinning": pin_note,
        "versions": versions(),
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "connections": args.connections,
        "inflight": args.inflight,
        "processes": args.processes,
        "scenarios": {s: SCENARIOS[s] for s in args.scenarios},
        "logs": str(logdir),
    }

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    print(f"bench: {pin_note}", file=sys.stderr)
    try:
        backend = Started("echo", [PY, "-m", "fastgw.echo", "--host", "127.0.0.1", "--port", "0"],
                          load_cpu, logdir, "stdout")
        started.append(backend)
        backend_port = backend.wait_port(15)
        pin_all_threads(backend.pid, load_cpu)
        urls = {"direct": f"ws://127.0.0.1:{backend_port}/"}
        print(f"bench: echo backend pid {backend.pid} on port {backend_port}", file=sys.stderr)

        gateways: dict[str, Started] = {}       # target -> its gateway process
        meta["gateway"] = "not requested"
        wanted = [t for t in args.targets if t in GATEWAY_TARGETS]
        plans = []
        if {"fastgw", "fastgw-policies"} & set(wanted):
            plans.append(("fastgw", BARE_TOP, ("fastgw", "fastgw-policies")))
        if "fastgw-observed" in wanted:
            plans.append(("fastgw-observed", OBSERVED_TOP.format(events=logdir / "events.jsonl"),
                          ("fastgw-observed",)))
        for name, top, serves in plans:
            cfg = logdir / f"{name}.yaml"
            cfg.write_text(top + GATEWAY_YAML.format(backend_port=backend_port))
            cmd = args.gateway_cmd.format(config=cfg).split()
            gateway = None
            try:
                gateway = Started(name, cmd, gw_cpu, logdir, "stderr")
                started.append(gateway)
                gw_port = gateway.wait_port(15)
                pin_all_threads(gateway.pid, gw_cpu)
                for t in serves:
                    gateways[t] = gateway
                    urls[t] = f"ws://127.0.0.1:{gw_port}/" + ("policed/" if t == "fastgw-policies" else "")
                meta[f"gateway {name}"] = f"pid {gateway.pid} on port {gw_port}: {' '.join(cmd)}"
                meta["gateway"] = "started"
                print(f"bench: gateway {name} pid {gateway.pid} on port {gw_port}", file=sys.stderr)
            except (RuntimeError, OSError) as exc:
                meta["gateway"] = f"unavailable: {exc}"
                print(f"bench: gateway {name} could not start: {exc}", file=sys.stderr)
                if gateway is not None:
                    gateway.stop()
                    started.remove(gateway)
        targets = [t for t in args.targets if t in urls]
        meta["targets"] = targets

        for rnd in range(1, args.rounds + 1):
            for sname in args.scenarios:
                for target in targets:
                    sc = SCENARIOS[sname]
                    gateway = gateways.get(target)
                    on_gw = gateway is not None
                    b0 = tree_cpu_seconds(backend.pid)
                    g0 = tree_cpu_seconds(gateway.pid) if on_gw and gateway else 0.0
                    l0 = children_cpu_seconds()
                    s0, w0 = cpu_idle_irq_seconds(), time.monotonic()
                    res = run_loadgen(urls[target], sc, args, load_cpu, running)
                    s1, w1 = cpu_idle_irq_seconds(), time.monotonic()
                    l1 = children_cpu_seconds()
                    b1 = tree_cpu_seconds(backend.pid)
                    g1 = tree_cpu_seconds(gateway.pid) if on_gw and gateway else 0.0
                    n = messages_of(res)
                    cpu: dict[str, Any] = {"wall_s": w1 - w0, "messages": n,
                                           "backend_s": b1 - b0, "loadgen_s": l1 - l0,
                                           "backend_us_per_msg": (b1 - b0) / n * 1e6 if n else None}
                    if on_gw:
                        cpu["gateway_s"] = g1 - g0
                        cpu["gateway_us_per_msg"] = (g1 - g0) / n * 1e6 if n else None
                    # CPU time used on the pinned CPUs by processes other than ours: noise.
                    # busy = wall - idle; other = busy - interrupts - our processes' CPU time.
                    if gw_cpu is not None and load_cpu is not None and s0 and s1:
                        wall = w1 - w0
                        ours = {gw_cpu: g1 - g0, load_cpu: (b1 - b0) + (l1 - l0)}
                        for c_, used in ours.items():
                            if c_ not in s0 or c_ not in s1:
                                continue
                            busy = wall - (s1[c_][0] - s0[c_][0])
                            irq = s1[c_][1] - s0[c_][1]
                            other = max(0.0, busy - irq - used)
                            cpu[f"other_load_cpu{c_}_pct"] = other / wall * 100
                            cpu[f"busy_cpu{c_}_pct"] = busy / wall * 100
                    raw.append({"round": rnd, "scenario": sname, "target": target,
                                "loadgen": res, "cpu": cpu})
                    status = "" if res.get("ok") else "  [NOT OK]"
                    noise = ""
                    if gw_cpu is not None and f"other_load_cpu{gw_cpu}_pct" in cpu:
                        noise = (f"  [other load: CPU{gw_cpu} "
                                 f"{cpu[f'other_load_cpu{gw_cpu}_pct']:.0f}%, CPU{load_cpu} "
                                 f"{cpu[f'other_load_cpu{load_cpu}_pct']:.0f}%]")
                    print(f"bench: round {rnd} {sname:9s} {target:6s} "
                          f"{res.get('summary') or res.get('errors')}{status}{noise}",
                          file=sys.stderr)
                    for proc_ in (backend, *gateways.values()):
                        if proc_ is not None and proc_.proc.poll() is not None:
                            raise RuntimeError(f"{proc_.name} died: {proc_.tail()}")
                    time.sleep(0.2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        meta["interrupted"] = True
    except RuntimeError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        meta["error"] = str(exc)
    finally:
        for p in list(running):
            if p.poll() is None:
                p.kill()
                p.wait(3)
        for s in reversed(started):
            s.stop()

    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    targets_done = [t for t in args.targets if any(r["target"] == t for r in raw)]
    for sname in args.scenarios:
        for t in targets_done:
            runs = [r for r in raw if r["scenario"] == sname and r["target"] == t]
            if runs:
                summary.setdefault(sname, {})[t] = metric_rows(sname, runs)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["all_ok"] = bool(raw) and all(r["loadgen"].get("ok") for r in raw)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": raw}, indent=1))

    print(f"\n## fastgw bench ({args.rounds} round(s), {args.duration:g} s runs after "
          f"{args.warmup:g} s warm-up, {args.connections} connections"
          f"{', %d in flight each' % args.inflight})\n")
    print(f"- {pin_note}")
    for key in sorted(k for k in meta if k.startswith("gateway ")):
        print(f"- {key}: {meta[key]}")
    print("- throughput: pipelined echo; msg/s = echoed messages per second; MB/s = payload bytes "
          "echoed per second, one direction (10^6 B)")
    print("- latency: 64 B request/response at 5000 msg/s total, µs from the intended send time "
          "(coordinated omission corrected)")
    print("- CPU µs/msg: CPU time of that process (from /proc/PID/stat) / echoed messages; each "
          "echoed message crosses the gateway twice")
    print("- other load on CPU n %: time that pinned CPU was busy (wall - idle, /proc/stat) "
          "minus interrupts and this benchmark's processes: noise; a run with more than a few "
          "% tells little")
    print("- all figures are medians over the rounds; raw figures in " + str(out_path) + "\n")
    print(markdown(summary, targets_done))
    if not meta["all_ok"]:
        bad = [f"{r['scenario']}/{r['target']}/round {r['round']}: {r['loadgen'].get('errors')}"
               for r in raw if not r["loadgen"].get("ok")]
        print("\nNOT OK: " + "; ".join(bad) if bad else "\nNOT OK: no run completed")
    print(f"\n(elapsed {meta['elapsed_s']} s)")
    return 0 if meta["all_ok"] and not meta.get("error") and not meta.get("interrupted") else 1


if __name__ == "__main__":
    raise SystemExit(main())
