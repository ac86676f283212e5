#!/usr/bin/env python3
"""One command: fastgw side by side with a direct connection, nginx, HAProxy, Caddy and a plain
Python proxy, on the same echo backend, interleaved, with each proxy's own CPU time.

    python bench/run.py            # the whole suite: 3 rounds, about 15 minutes
    python bench/run.py --quick    # 1 round, short runs, 1,000 idle and storm connections

What it does, in one run:

1. raises its own file-descriptor limit to the hard limit (the children inherit it) and installs
   the Debian packages of the peers that are missing (``bench/peers.py``; a peer that cannot be
   installed is skipped and the report says why);
2. starts the echo backend (``python -m fastgw.echo``), three gateways (``fastgw``: metrics off,
   no policy; ``fastgw-2w``: the same with ``workers: 2``, ready once both workers printed
   their "listening on" line; ``fastgw-governed``: a request and a response
   ``message-rate-limit`` that never trigger, metrics, events to a file and the admin API on)
   and the peers, each one a foreground process it started itself;
3. pins every proxy (every process of it) to the first CPU and the backend and the load
   generator to the second;
4. for each round, for each scenario, for each target runs ``bench/loadgen.py`` and reads the
   CPU time of each process of the proxy under test (a supervisor and each of its workers
   separately) and of the backend from ``/proc/PID/stat`` before and after, and the busy time
   of each CPU from ``/proc/stat`` (which core was the bottleneck); the ``lim-*`` scenarios
   (client- against connection-scoped message limits) and ``connrate-pool2`` (upgrades through
   a pool of 2 targets) run on ``fastgw`` and ``fastgw-2w`` only;
5. then, once per proxy, holds ``--idle-connections`` idle connections through it and reads
   its proportional set size (``/proc/PID/smaps_rollup``) before and while they are held;
   and runs the reconnect storm (``bench/storm.py``): ``--storm-connections`` held through
   it, the echo backend killed by pid and a new one started on the same port, the time until
   every client is back, the proxy's peak RSS and the handshake p99 meanwhile;
6. writes the report (``bench/report.py``): Markdown, the raw figures as JSON, PNG plots.

It stops only the processes it started (by pid), also on error, Ctrl-C and SIGTERM.
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
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402  (bench/peers.py)
import report  # noqa: E402  (bench/report.py)
import storm  # noqa: E402  (bench/storm.py)

LISTEN_RE = re.compile(r"listening on ws://(\[[^\]]+\]|[^:\s]+):(\d+)")
# a supervisor's line once every worker is ready: "fastgw: 2 workers (pids 123, 124)..."
WORKERS_RE = re.compile(r"fastgw: (\d+) workers \(pids ([\d, ]+)\)")

SCENARIOS: dict[str, dict[str, Any]] = {
    "tp-64B": {"mode": "throughput", "size": 64},
    "tp-1KiB": {"mode": "throughput", "size": 1024},
    "tp-64KiB": {"mode": "throughput", "size": 65536},
    "lat-5k/s": {"mode": "latency", "size": 64, "rate": 5000},
    "connrate": {"mode": "connrate", "size": 64},
    # The same 64 B load through an API with a request and a response message-rate-limit that
    # never trigger, scoped to the connection (private state) or to the client (all 8
    # connections share one budget in the shared limit region, updated atomically, across
    # workers too): the cost of the shared, atomic budget. Only on the SCOPED targets.
    "lim-conn-64B": {"mode": "throughput", "size": 64, "path": "/scope-connection/"},
    "lim-client-64B": {"mode": "throughput", "size": 64, "path": "/scope-client/"},
    # connrate through an API whose websocket-upgrade has a pool of 2 targets (the same echo
    # backend at two URLs, least-connections): against `connrate` on the same process, the
    # cost of picking a target per upgrade (issue 12: at most 3 % more CPU per upgrade).
    "connrate-pool2": {"mode": "connrate", "size": 64, "path": "/pool2/"},
    "idle": {"mode": "idle"},
    # --storm-connections held through the proxy, the echo backend killed (SIGKILL) and a new
    # one started on the same port 1 s later, every client reconnecting with a jittered
    # 50-100 ms back-off (bench/storm.py): the time until all are back, the proxy's peak RSS,
    # the handshake p99 during the storm. Once per proxy, after its idle scenario.
    "storm": {"mode": "storm"},
    # over wss (TLS 1.3, ECDSA P-256 from trustme; the backend stays plain ws), on the
    # targets that terminate TLS (TLS_TARGETS): full handshakes, resumed ones (the client
    # offers the last connection's ticket), and throughput.
    "tls-hs": {"mode": "connrate", "size": 64, "tls": True},
    "tls-hs-resume": {"mode": "connrate", "size": 64, "tls": True, "tls_resume": True},
    "tls-64B": {"mode": "throughput", "size": 64, "tls": True},
    "tls-64KiB": {"mode": "throughput", "size": 65536, "tls": True},
}

# The message policies of the policed API (and of bench/memory.py's --governed): a request and a
# response message-rate-limit that never trigger.
POLICED_FLOWS = """\
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
GATEWAY_YAML = """\
listeners: [{{host: 127.0.0.1, port: 0}}]
limits: {{max-handshakes-per-ip: 0}}    # the whole load comes from one address
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
""" + POLICED_FLOWS + """  - name: scope-connection
    path: /scope-connection
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend_port}/
        request:
          - policy: message-rate-limit
            messages: 100000000/1s
            scope: connection
            action: reject
        response:
          - policy: message-rate-limit
            messages: 100000000/1s
            scope: connection
            action: reject
  - name: pool2
    path: /pool2
    assembly:
      - policy: websocket-upgrade
        targets:
          - url: ws://127.0.0.1:{backend_port}/
          - url: ws://127.0.0.1:{backend_port}/b/
        balance: least-connections
  - name: scope-client
    path: /scope-client
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend_port}/
        request:
          - policy: message-rate-limit
            messages: 100000000/1s
            scope: client
            action: reject
        response:
          - policy: message-rate-limit
            messages: 100000000/1s
            scope: client
            action: reject
"""
# target -> (top of its configuration, path of its API)
GATEWAYS: dict[str, tuple[str, str]] = {
    "fastgw": ("metrics: false\n", "/"),
    "fastgw-2w": ("metrics: false\nworkers: 2\n", "/"),
    "fastgw-governed": ("events: {{target: {events}}}\nadmin: {{port: 0}}\n", "/policed/"),
}
# target -> worker processes (`workers:` of its configuration; the others run one process)
WORKERS: dict[str, int] = {"fastgw-2w": 2}
# the targets the scenarios with a "path" (the scoped limits, the pool) run on
SCOPED: tuple[str, ...] = ("fastgw", "fastgw-2w")
TARGETS: tuple[str, ...] = ("direct", *GATEWAYS, *peers.PEERS)
# the targets that get a TLS listener (when a tls-* scenario runs), and their wss:// URLs
TLS_TARGETS: tuple[str, ...] = ("fastgw", "fastgw-2w", "fastgw-governed", "nginx", "nginx-64k",
                                "haproxy", "caddy")
TLS_URLS: dict[str, str] = {}
# the targets the reconnect storm runs on: not the plain Python proxy, which never brings
# 9,900 clients back (its upgrades queue past the clients' 10 s attempt time-out)
STORM_TARGETS: tuple[str, ...] = tuple(t for t in TARGETS if t not in ("direct", "pyproxy"))
TLS_FILES: dict[str, str] = {}
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------------------------------
# processes


class Started:
    """A child process we started, its output drained by a thread into a log file."""

    def __init__(self, name: str, argv: list[str], cpu: int | None, logdir: Path,
                 listen_stream: str | None, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.cpu = cpu
        self.log_path = logdir / f"{name}.log"
        self.lines: list[str] = []
        self.port_q: queue.Queue[int] = queue.Queue()
        self.workers_q: queue.Queue[list[int]] = queue.Queue()
        full_env = dict(os.environ)
        if any((SRC / "fastgw").glob("_core*.so")):
            # A checkout with the core built in place (pip install -e): run its sources.
            # Otherwise (pip install .) the installed package is the one with a core.
            full_env["PYTHONPATH"] = os.pathsep.join(
                [str(SRC)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self.proc = popen_pinned(argv, cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, env=full_env, cwd=str(ROOT),
                                 text=True, errors="replace")
        self.pid = self.proc.pid
        self.descendants: dict[int, int] = {}   # pid -> start time (clock ticks after boot)
        self.worker_pids: list[int] = []          # by worker index, as the supervisor said
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
                m = WORKERS_RE.search(line)
                if m:
                    self.workers_q.put([int(x) for x in m.group(2).replace(",", " ").split()])

    def wait_port(self, timeout: float, lines: int = 1) -> int:
        """The port of the first 'listening on' line, once `lines` of them were printed (a
        gateway with N workers: every worker prints its own when it listens)."""
        deadline = time.monotonic() + timeout
        ports: list[int] = []
        while time.monotonic() < deadline:
            try:
                ports.append(self.port_q.get(timeout=0.05))
                if len(ports) >= lines:
                    return ports[0]
            except queue.Empty:
                if self.proc.poll() is not None:
                    time.sleep(0.1)  # let the drain threads catch the last lines
                    raise RuntimeError(
                        f"{self.name} exited with status {self.proc.returncode}: {self.tail()}")
        raise RuntimeError(f"{self.name} printed {len(ports)} of {lines} 'listening on' line(s) "
                           f"within {timeout} s: {self.tail()}")

    def wait_workers(self, n: int, timeout: float) -> list[int]:
        """The pids of the `n` workers, by index, from the supervisor's "N workers (pids ...)"
        line (printed after its "listening on" lines, once every worker is ready), each one
        checked to be a live child of the supervisor."""
        try:
            pids = self.workers_q.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name} printed no 'fastgw: {n} workers (pids ...)' line "
                               f"within {timeout} s: {self.tail()}") from None
        kids = set(children_of(self.pid))
        if len(pids) != n or not kids.issuperset(pids):
            raise RuntimeError(f"{self.name}: workers {pids}, expected {n} children of pid "
                               f"{self.pid} (its children: {sorted(kids)})")
        return pids

    def wait_children(self, n: int, timeout: float) -> list[int]:
        """The pids of the process's `n` direct children (its workers), once all are there."""
        deadline = time.monotonic() + timeout
        while True:
            kids = children_of(self.pid)
            if len(kids) >= n:
                return kids
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name}: {len(kids)} of {n} worker processes after "
                                   f"{timeout} s: {self.tail()}")
            time.sleep(0.05)

    def remember_descendants(self) -> None:
        """Note the descendants (workers) now, so that stop() can end any that outlive the
        supervisor (one killed after the SIGTERM grace leaves its workers orphaned)."""
        for p in tree_pids(self.pid)[1:]:
            st = start_time(p)
            if st is not None:
                self.descendants[p] = st

    def tail(self, n: int = 6) -> str:
        return " | ".join(self.lines[-n:]) or "(no output)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, `grace` s, SIGKILL; then SIGKILL any descendant still alive 1 s later."""
        self.remember_descendants()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
            except ProcessLookupError:
                pass
        # Descendants still alive once the supervisor is gone: the same pid with the same
        # start time is the process we saw (not a reused pid); wait for them, then kill them.
        deadline = time.monotonic() + 1
        left = dict(self.descendants)
        while left and time.monotonic() < deadline:
            left = {p: st for p, st in left.items() if start_time(p) == st}
            if left:
                time.sleep(0.05)
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1
        while left and time.monotonic() < deadline:   # a killed process dies asynchronously
            left = {p: st for p, st in left.items() if start_time(p) == st}
            if left:
                time.sleep(0.02)
        self.close_log()

    def close_log(self) -> None:
        """Join the drain threads and close the log (the process has ended and was waited
        for: stop() does it, or the storm once it killed the backend)."""
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


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Start time of pid (clock ticks after boot, field 22 of /proc/PID/stat); None if gone or a
    zombie."""
    f = _stat_fields(pid)
    if f is None or f[0] == "Z":
        return None
    return int(f[19])


def children_of(pid: int) -> list[int]:
    """The live direct children of pid, oldest first."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and int(f[1]) == pid and f[0] != "Z":
                kids.append((int(f[19]), int(entry)))
    return [p for _, p in sorted(kids)]


def tree_pids(pid: int) -> list[int]:
    """pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of all its live descendants, from /proc/PID/stat."""
    total = 0
    for p in tree_pids(pid):
        f = _stat_fields(p)
        if f is not None:
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def proc_times(pid: int) -> dict[str, Any] | None:
    """One process's CPU: utime + stime (s, /proc/PID/stat, clock ticks: the figure used), the
    run time of its live threads (s, /proc/PID/task/*/schedstat, ns: a finer cross-check), its
    parent and its start time. None if it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return None
    run_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    run_ns += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return {"ppid": int(f[1]), "start": int(f[19]),
            "cpu": (int(f[11]) + int(f[12])) / CLK_TCK, "run": run_ns / 1e9}


def tree_times(pid: int) -> dict[int, dict[str, Any]]:
    """proc_times of pid and of each of its live descendants, by pid."""
    out = {}
    for p in tree_pids(pid):
        t = proc_times(p)
        if t is not None:
            out[p] = t
    return out


def cpu_breakdown(root: int, before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]],
                  wall: float, units: int, indexes: list[int] | None = None) -> dict[str, Any]:
    """The CPU a process tree used between two tree_times snapshots, per process.

    The root is the supervisor, its direct children are the workers, deeper descendants are
    "other". A worker whose pid is `indexes[i]` is named wi; without `indexes`, workers are
    numbered by start time (w0, w1, ...), and a worker not in `indexes` (one started since:
    a restart) is named "w?PID". A process that started during the window counts from 0; one
    that ended during it is listed in "exited" (its last CPU is lost: /proc keeps nothing of a
    reaped process)."""
    procs = []
    for pid, t in after.items():
        b = before.get(pid)
        if b is None or b["start"] != t["start"]:
            b = {"cpu": 0.0, "run": 0.0}
        role = "supervisor" if pid == root else "worker" if t["ppid"] == root else "other"
        procs.append({"pid": pid, "role": role, "start": t["start"],
                      "cpu_s": t["cpu"] - b["cpu"], "run_s": t["run"] - b["run"]})
    procs.sort(key=lambda r: (r["role"] != "supervisor", r["role"] != "worker", r["start"],
                              r["pid"]))
    index = 0
    for r in procs:
        if r["role"] != "worker":
            r["name"] = r["role"]
        elif indexes:
            r["name"] = f"w{indexes.index(r['pid'])}" if r["pid"] in indexes else f"w?{r['pid']}"
        else:
            r["name"] = f"w{index}"
            index += 1
        r["pct_of_wall"] = r["cpu_s"] / wall * 100 if wall else None
        r["us_per_unit"] = r["cpu_s"] / units * 1e6 if units else None
        del r["start"]
    total = sum(r["cpu_s"] for r in procs)
    run = sum(r["run_s"] for r in procs)
    workers = [r for r in procs if r["role"] == "worker"]
    return {
        "processes": procs, "total_s": total, "run_total_s": run,
        "supervisor_s": sum(r["cpu_s"] for r in procs if r["role"] == "supervisor"),
        "workers_s": sum(r["cpu_s"] for r in workers),
        "busiest_worker": max(workers, key=lambda r: r["cpu_s"])["name"] if workers else None,
        "busiest_worker_pct": max((r["pct_of_wall"] or 0.0 for r in workers), default=None),
        "exited": sorted(p for p, b in before.items()
                         if p not in after or after[p]["start"] != b["start"]),
    }


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections whose local port is `port` (a proxy's client side) held by
    each of `pids`: the sockets of /proc/net/tcp{,6} matched by inode with /proc/PID/fd."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # local_address is HEXIP:HEXPORT; st 01 is ESTABLISHED; field 9 the inode
                    if (len(fields) > 9 and fields[3] == "01"
                            and int(fields[1].rsplit(":", 1)[1], 16) == port):
                        inodes.add(fields[9])
        except OSError:
            pass
    out = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        out[pid] = n
    return out


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of pid and its descendants, from /proc/PID/smaps_rollup."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def pin_all_threads(pid: int, cpu: int | None) -> None:
    """The child inherited the affinity at fork; pin every thread again in case it changed."""
    if cpu is None:
        return
    for p in tree_pids(pid):
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    os.sched_setaffinity(int(tid), {cpu})
                except OSError:
                    pass
        except OSError:
            pass


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


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# ---------------------------------------------------------------------------------------------
# one measurement


def loadgen_argv(url: str, scenario: dict[str, Any], args: argparse.Namespace) -> list[str]:
    mode = scenario["mode"]
    argv = [PY, str(LOADGEN), "--url", url, "--mode", mode]
    if mode == "idle":
        return argv + ["--connections", str(args.idle_connections), "--duration", "300"]
    argv += ["--size", str(scenario["size"]), "--duration", str(args.duration)]
    if scenario.get("tls"):
        argv += ["--ca", TLS_FILES["ca"]] + (["--tls-resume"] if scenario.get("tls_resume") else [])
    if mode == "throughput":
        argv += ["--warmup", str(args.warmup), "--connections", str(args.connections),
                 "--inflight", str(args.inflight), "--processes", str(args.processes)]
    elif mode == "latency":
        argv += ["--warmup", str(args.warmup), "--connections", str(args.connections),
                 "--rate", str(scenario["rate"])]
    else:  # connrate: no warm-up, so that the proxy's CPU time covers the counted cycles
        argv += ["--warmup", "0", "--connections", str(args.connections)]
    return argv


def run_loadgen(url: str, scenario: dict[str, Any], args: argparse.Namespace, cpu: int | None,
                running: list[subprocess.Popen[str]]) -> dict[str, Any]:
    argv = loadgen_argv(url, scenario, args)
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
    res.setdefault("ok", proc.returncode == 0)
    res["exit"] = proc.returncode
    res["summary"] = err.strip().splitlines()[-1] if err.strip() else ""
    return res


def units_of(res: dict[str, Any], scenario: dict[str, Any]) -> int:
    """Echoed messages (or upgrades) over the whole run, matching the CPU window."""
    mode = res.get("mode")
    if mode == "throughput":
        return int(res.get("received_total", 0))
    if mode == "latency":
        return int(res.get("completed", 0))
    if mode == "connrate":
        return int(res.get("upgrades", 0))
    return 0


def measure(target: str, sname: str, url: str, proxy: Started | None, backend: Started,
            cpus: tuple[int | None, int | None], args: argparse.Namespace,
            running: list[subprocess.Popen[str]]) -> dict[str, Any]:
    """One load generator run against one target, with CPU accounting."""
    proxy_cpu, load_cpu = cpus
    sc = SCENARIOS[sname]
    b0 = tree_cpu_seconds(backend.pid)
    t0 = tree_times(proxy.pid) if proxy else {}
    l0 = children_cpu_seconds()
    spread: dict[int, int] = {}
    sampler = None
    if proxy is not None and proxy.worker_pids and sc["mode"] in ("throughput", "latency"):
        # halfway through the measured window: how the kernel spread the connections
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        sampler = threading.Timer(args.warmup + args.duration / 2, lambda: spread.update(
            connections_by_pid(proxy.worker_pids, port)))
        sampler.daemon = True
    s0, w0 = cpu_idle_irq_seconds(), time.monotonic()
    if sampler is not None:
        sampler.start()
    res = run_loadgen(url, sc, args, load_cpu, running)
    s1, w1 = cpu_idle_irq_seconds(), time.monotonic()
    if sampler is not None:
        sampler.cancel()
        sampler.join(1)
    l1 = children_cpu_seconds()
    b1 = tree_cpu_seconds(backend.pid)
    t1 = tree_times(proxy.pid) if proxy else {}
    n = units_of(res, sc)
    wall = w1 - w0
    cpu: dict[str, Any] = {"wall_s": wall, "units": n, "backend_s": b1 - b0,
                           "loadgen_s": l1 - l0,
                           "backend_us_per_unit": (b1 - b0) / n * 1e6 if n else None}
    proxy_s = 0.0
    if proxy:
        # every process of the proxy (a supervisor and its workers), each one separately
        brk = cpu_breakdown(proxy.pid, t0, t1, wall, n, proxy.worker_pids)
        proxy_s = brk["total_s"]
        cpu["proxy_s"] = proxy_s
        cpu["proxy_us_per_unit"] = proxy_s / n * 1e6 if n else None
        cpu["proxy_run_us_per_unit"] = brk["run_total_s"] / n * 1e6 if n else None
        if sc["mode"] == "throughput":
            mb = n * sc["size"] / 1e6
            cpu["proxy_us_per_mb"] = proxy_s / mb * 1e6 if mb else None
        if target in WORKERS:
            cpu["breakdown"] = brk
            if spread:
                for r in brk["processes"]:
                    if r["pid"] in spread:
                        r["connections"] = spread[r["pid"]]
    # Busy time of each pinned CPU (wall - idle) and the part of it that is none of ours.
    if proxy_cpu is not None and load_cpu is not None and s0 and s1:
        ours = {proxy_cpu: proxy_s, load_cpu: (b1 - b0) + (l1 - l0)}
        for c, used in ours.items():
            if c in s0 and c in s1:
                busy = wall - (s1[c][0] - s0[c][0])
                irq = s1[c][1] - s0[c][1]
                cpu[f"busy_cpu{c}_pct"] = busy / wall * 100
                cpu[f"other_load_cpu{c}_pct"] = max(0.0, busy - irq - used) / wall * 100
        cpu["bottleneck"] = bottleneck(cpu.get(f"busy_cpu{proxy_cpu}_pct"),
                                       cpu.get(f"busy_cpu{load_cpu}_pct"), proxy is not None)
    if "breakdown" in cpu:
        cpu["bottleneck_detail"] = bottleneck_detail(cpu.get("bottleneck", "?"), cpu["breakdown"])
    return {"scenario": sname, "target": target, "loadgen": res, "cpu": cpu}


def bottleneck_detail(core: str, brk: dict[str, Any]) -> str:
    """For a proxy with workers: which core ran out, and whether one worker used a whole core
    (>= 90 % of the wall time) before the client's core did.

    Every worker of the target is pinned to the proxy's core, so the core can be full while no
    single worker is; a worker at >= 90 % would be the bottleneck on a core of its own."""
    workers = [r for r in brk["processes"] if r["role"] == "worker"]
    shares = ", ".join(f"{r['name']} {r['pct_of_wall']:.0f}%" +
                       (f" ({r['connections']} conn)" if "connections" in r else "")
                       for r in workers if r["pct_of_wall"] is not None)
    sat = [r["name"] for r in workers if (r["pct_of_wall"] or 0.0) >= 90.0]
    if core in ("client", "neither", "?") and sat:
        core = "worker " + ",".join(sat)
    elif core == "both" and sat:
        core = "client and worker " + ",".join(sat)
    elif core == "proxy":
        core = "worker " + ",".join(sat) if sat else "the workers' shared core"
    return f"{core} ({shares} of a core)" if shares else core


def bottleneck(proxy_busy: float | None, load_busy: float | None, has_proxy: bool) -> str:
    """Which core ran out: the proxy's, the client's (load generator + backend), or neither."""
    if proxy_busy is None or load_busy is None:
        return "?"
    p = has_proxy and proxy_busy >= 90.0
    c = load_busy >= 90.0
    return "both" if p and c else "proxy" if p else "client" if c else "neither"


def measure_idle(target: str, url: str, proxy: Started, cpu: int | None, args: argparse.Namespace,
                 running: list[subprocess.Popen[str]]) -> dict[str, Any]:
    """Hold --idle-connections connections through the proxy and read its PSS."""
    time.sleep(0.5)
    pss0 = tree_pss_bytes(proxy.pid)
    argv = loadgen_argv(url, SCENARIOS["idle"], args)
    proc = popen_pinned(argv, cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        stdin=subprocess.PIPE, text=True, cwd=str(ROOT))
    running.append(proc)
    out: dict[str, Any] = {"scenario": "idle", "target": target, "pss_before": pss0}
    next_json = storm.json_lines(proc.stdout)
    errbuf: list[str] = []
    errt = threading.Thread(target=lambda: errbuf.extend(proc.stderr or ()), daemon=True)
    errt.start()
    try:
        holding = next_json(180)
        if holding is None:
            out["loadgen"] = {"ok": False, "errors": ["idle: no 'holding' line"],
                              "stderr": "".join(errbuf)[-2000:]}
            return out
        time.sleep(1.0)  # let the proxy settle (buffers released after the upgrade)
        out["pss_held"] = tree_pss_bytes(proxy.pid)
        out["holding"] = holding
        assert proc.stdin is not None
        proc.stdin.write("release\n")
        proc.stdin.close()
        final = next_json(120) or {"ok": False, "errors": ["idle: no final result"]}
        proc.wait(30)
        final.setdefault("ok", proc.returncode == 0)
        out["loadgen"] = final
        n = int(holding.get("open") or 0)
        if n:
            out["kib_per_connection"] = (out["pss_held"] - pss0) / n / 1024
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        running.remove(proc)


STORM_HEADROOM = 200     # descriptors each process keeps beside the storm's connections


def storm_cap(nofile: int, wanted: int) -> tuple[int, str]:
    """The storm's connections the descriptor limit allows, and the line that says so. The
    proxy holds 2 descriptors per connection (client side, backend side), the client process
    and the backend 1; each keeps STORM_HEADROOM for its listeners, logs and loop."""
    cap = max(10, (nofile - STORM_HEADROOM) // 2)
    n = min(wanted, cap)
    return n, (f"storm: {n} connections ({wanted} asked; the fd limit {nofile} allows "
               f"({nofile} - {STORM_HEADROOM}) // 2 = {cap}: 2 descriptors per connection in "
               "the proxy, 1 in the client)")


def backend_argv(port: int) -> list[str]:
    return [PY, "-m", "fastgw.echo", "--host", "127.0.0.1", "--port", str(port)]


def measure_storm(target: str, url: str, proxy: Started, backends: list[Started],
                  backend_port: int, started: list[Started], logdir: Path,
                  cpus: tuple[int | None, int | None], args: argparse.Namespace,
                  running: list[subprocess.Popen[str]]) -> dict[str, Any]:
    """The reconnect storm through one proxy (bench/storm.py). backends[0] is the echo
    backend now running: it is killed by pid (SIGKILL) and a new one started on the same port
    replaces it there and in `started`, so that the live one is stopped at the end.

    From the kill until the client's result: the proxy's CPU time and each pinned core's busy
    time (which core ran out during the storm)."""
    proxy_cpu, cpu = cpus
    window: dict[str, Any] = {}

    def snapshot(key: str) -> None:
        window[key] = (time.monotonic(), cpu_idle_irq_seconds(), tree_cpu_seconds(proxy.pid))
        if key == "final":
            window["backend_s"] = tree_cpu_seconds(backends[0].pid)

    def kill_backend() -> None:
        snapshot("kill")
        old = backends[0]
        old.proc.kill()         # SIGKILL to its pid (Popen: never to a pid already reaped)
        old.proc.wait(10)
        old.close_log()

    def start_backend() -> None:
        new = Started(f"echo-after-{target}", backend_argv(backend_port), cpu, logdir, "stdout")
        started[started.index(backends[0])] = new
        backends[0] = new
        new.wait_port(15)
        pin_all_threads(new.pid, cpu)

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        return popen_pinned(argv, cpu, cwd=str(ROOT), **kw)

    time.sleep(0.5)
    r = storm.run_storm(target, url, proxy.pid, lambda: tree_pids(proxy.pid), kill_backend,
                        start_backend, popen, PY, args.storm_connections, running,
                        down_s=args.storm_down, on_final=lambda: snapshot("final"))
    if "kill" in window and "final" in window:
        (w0, s0, p0), (w1, s1, p1) = window["kill"], window["final"]
        wall = w1 - w0
        c: dict[str, Any] = {"wall_s": wall, "proxy_s": p1 - p0,
                             # the new backend's CPU since its start (after the kill)
                             "backend_s": window.get("backend_s")}
        for core in (proxy_cpu, cpu):
            if core is not None and core in s0 and core in s1 and wall > 0:
                c[f"busy_cpu{core}_pct"] = (wall - (s1[core][0] - s0[core][0])) / wall * 100
        if proxy_cpu is not None and cpu is not None:
            c["bottleneck"] = bottleneck(c.get(f"busy_cpu{proxy_cpu}_pct"),
                                         c.get(f"busy_cpu{cpu}_pct"), True)
        r["cpu"] = c
    return r


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 round, 1 s runs after 0.3 s warm-up, 1,000 idle connections, "
                        "1,000 in the storm")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--duration", type=float, default=None, help="measured s per run (4; 1 quick)")
    p.add_argument("--warmup", type=float, default=None, help="s per run (1; 0.3 quick)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--processes", type=int, default=1, help="load generator processes")
    p.add_argument("--idle-connections", type=int, default=None,
                   help="connections held in the idle scenario (9900; 1000 quick)")
    p.add_argument("--storm-connections", type=int, default=None,
                   help="connections held through the reconnect storm (9900; 1000 quick; "
                        "capped by the fd limit)")
    p.add_argument("--storm-down", type=float, default=1.0,
                   help="s between killing the backend and starting the new one (storm)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinity")
    p.add_argument("--no-install", action="store_true",
                   help="do not install missing Debian packages (skip those peers)")
    p.add_argument("--gateway-cmd", default=f"{PY} -m fastgw run -c {{config}}",
                   help="command that starts the gateway; {config} is the YAML path")
    p.add_argument("--out", default=str(RESULTS / "latest.json"),
                   help="JSON output; the Markdown (.md) and plots (-*.png) go beside it")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (1.0 if a.quick else 4.0)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0)
    a.idle_connections = a.idle_connections or (1000 if a.quick else 9900)
    a.storm_connections = a.storm_connections or (1000 if a.quick else 9900)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.targets = [t for t in a.targets.split(",") if t]
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    for t in a.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    return a


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None, str]:
    if no_pin or not hasattr(os, "sched_setaffinity"):
        return None, None, "not pinned (--no-pin or unsupported)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"not pinned: only CPU(s) {cpus} available"
    px, rest = cpus[0], cpus[1]
    return px, rest, (f"the proxy under test pinned to CPU {px}; the backend and the load "
                      f"generator pinned to CPU {rest} (of {len(cpus)} available)")


def versions(available: dict[str, str | None]) -> dict[str, str]:
    out = {"python": platform.python_version(), "kernel": platform.release()}
    from importlib.metadata import version
    for pkg in ("picows", "uvloop", "hdrhistogram", "websockets"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "?"
    probes = {"nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"], "caddy": ["caddy", "version"]}
    for name, argv in probes.items():
        if available.get(name, "absent") is None:
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                out[name] = (r.stdout + r.stderr).strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                out[name] = "?"
    return out


def tls_setup(logdir: Path) -> dict[str, str]:
    """An ECDSA P-256 CA and server certificate (127.0.0.1, localhost) from trustme, written
    into logdir: ca, cert, key, pem (cert + key, for HAProxy)."""
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.ECDSA)
    files = {k: str(logdir / f"tls-{k}.pem") for k in ("ca", "cert", "key", "pem")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    Path(files["pem"]).write_bytes(cert.cert_chain_pems[0].bytes() + cert.private_key_pem.bytes())
    return files


def tls_listener_yaml(port: int) -> str:
    f = TLS_FILES
    return (f"listeners: [{{host: 127.0.0.1, port: 0}}, {{host: 127.0.0.1, port: {port}, "
            f"tls: {{cert: {f['cert']}, key: {f['key']}}}}}]\n")


def start_targets(args: argparse.Namespace, backend_port: int, cpu: int | None, logdir: Path,
                  started: list[Started], meta: dict[str, Any], bases: dict[str, str]
                  ) -> tuple[dict[str, str], dict[str, Started]]:
    """Start every proxy target; return target -> URL and target -> its process (and fill
    bases: gateway target -> ws://host:port, for the scenarios with their own path)."""
    urls = {"direct": f"ws://127.0.0.1:{backend_port}/"}
    procs: dict[str, Started] = {}
    skipped: dict[str, str] = meta.setdefault("skipped", {})
    for target in args.targets:
        if target == "direct":
            continue
        proc = None
        try:
            if target in GATEWAYS:
                top, path = GATEWAYS[target]
                cfg = logdir / f"{target}.yaml"
                body = GATEWAY_YAML.format(backend_port=backend_port)
                tls_port = None
                if TLS_FILES and target in TLS_TARGETS:
                    tls_port = peers.free_port()
                    body = body.replace("listeners: [{host: 127.0.0.1, port: 0}]\n",
                                        tls_listener_yaml(tls_port), 1)
                cfg.write_text(top.format(events=logdir / f"{target}.events.jsonl") + body)
                cmd = args.gateway_cmd.format(config=cfg).split()
                proc = Started(target, cmd, cpu, logdir, "stderr")
                started.append(proc)
                n = WORKERS.get(target, 1)
                # a supervisor prints its "listening on" lines once every worker is ready
                port = proc.wait_port(30 if n > 1 else 15)
                if n > 1:
                    proc.worker_pids = proc.wait_workers(n, 5)
                    proc.remember_descendants()
                    meta.setdefault("workers", {})[target] = proc.worker_pids
                urls[target] = f"ws://127.0.0.1:{port}{path}"
                bases[target] = f"ws://127.0.0.1:{port}"
                if tls_port is not None:
                    peers.wait_listening(tls_port, 15, proc.proc)
                    TLS_URLS[target] = f"wss://127.0.0.1:{tls_port}{path}"
            else:
                port = peers.free_port()
                tls = None
                if TLS_FILES and target in TLS_TARGETS:
                    tls = dict(TLS_FILES, port=peers.free_port())
                cmd, env = peers.peer_command(target, port, backend_port, logdir / target, PY,
                                              tls=tls)
                proc = Started(target, cmd, cpu, logdir, None, env)
                started.append(proc)
                peers.wait_listening(port, 15, proc.proc)
                urls[target] = f"ws://127.0.0.1:{port}/"
                if tls is not None:
                    peers.wait_listening(tls["port"], 15, proc.proc)
                    TLS_URLS[target] = f"wss://127.0.0.1:{tls['port']}/"
            pin_all_threads(proc.pid, cpu)
            procs[target] = proc
            meta.setdefault("commands", {})[target] = f"pid {proc.pid}: {' '.join(cmd)}"
            print(f"bench: {target} pid {proc.pid} at {urls[target]}", file=sys.stderr)
        except (RuntimeError, OSError, ValueError) as exc:
            skipped[target] = f"could not start: {exc}"
            print(f"bench: {target} could not start: {exc}", file=sys.stderr)
            if proc is not None:
                proc.stop()
                started.remove(proc)
    return urls, procs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proxy_cpu, load_cpu, pin_note = choose_cpus(args.no_pin)
    nofile = raise_fd_limit()
    if "idle" in args.scenarios and nofile < 2 * args.idle_connections + 100:
        old = args.idle_connections
        args.idle_connections = max(100, (nofile - 100) // 2)
        print(f"bench: fd limit {nofile}: idle connections {old} -> {args.idle_connections}",
              file=sys.stderr)
    storm_note = None
    if "storm" in args.scenarios:
        args.storm_connections, storm_note = storm_cap(nofile, args.storm_connections)
        print(f"bench: {storm_note}", file=sys.stderr)
    logdir = Path(tempfile.mkdtemp(prefix="fastgw-bench-"))
    started: list[Started] = []
    running: list[subprocess.Popen[str]] = []
    raw: list[dict[str, Any]] = []
    wanted_peers = [t for t in args.targets if t in peers.PEERS]
    if args.no_install:
        available = {t: None if peers.PEER_BINARY[t] is None or peers.find_binary(
            peers.PEER_BINARY[t]) else "not installed (--no-install)" for t in wanted_peers}
    else:
        available = peers.ensure_installed(
            wanted_peers, log=lambda m: print(f"bench: {m}", file=sys.stderr))
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "pinning": pin_note, "versions": versions(available), "rounds": args.rounds,
        "duration": args.duration, "warmup": args.warmup, "connections": args.connections,
        "inflight": args.inflight, "processes": args.processes,
        "idle_connections": args.idle_connections, "fd_limit": nofile,
        "storm_connections": args.storm_connections if storm_note else None,
        "storm_cap": storm_note, "storm_down_s": args.storm_down if storm_note else None,
        "scenarios": {s: SCENARIOS[s] for s in args.scenarios}, "logs": str(logdir),
        "skipped": {t: why for t, why in available.items() if why},
    }
    args.targets = [t for t in args.targets if not available.get(t)]

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    print(f"bench: {pin_note}", file=sys.stderr)
    try:
        backend = Started("echo", backend_argv(0), load_cpu, logdir, "stdout")
        started.append(backend)
        backend_port = backend.wait_port(15)
        pin_all_threads(backend.pid, load_cpu)
        print(f"bench: echo backend pid {backend.pid} on port {backend_port}", file=sys.stderr)
        backends = [backend]    # the live one: the storm replaces it
        bases: dict[str, str] = {}
        if any(SCENARIOS[s].get("tls") for s in args.scenarios):
            TLS_FILES.update(tls_setup(logdir))
        urls, procs = start_targets(args, backend_port, proxy_cpu, logdir, started, meta, bases)
        targets = [t for t in args.targets if t in urls]
        meta["targets"] = targets

        timed = [s for s in args.scenarios if s not in ("idle", "storm")]
        for rnd in range(1, args.rounds + 1):
            for sname in timed:
                for target in targets:
                    path = SCENARIOS[sname].get("path")
                    if path is not None and target not in SCOPED:
                        continue
                    url = urls[target] if path is None else bases[target] + path
                    if SCENARIOS[sname].get("tls"):
                        if target not in TLS_URLS:
                            continue
                        url = TLS_URLS[target]
                    r = measure(target, sname, url, procs.get(target), backends[0],
                                (proxy_cpu, load_cpu), args, running)
                    r["round"] = rnd
                    raw.append(r)
                    res, cpu = r["loadgen"], r["cpu"]
                    status = "" if res.get("ok") else "  [NOT OK]"
                    print(f"bench: round {rnd} {sname:9s} {target:15s} "
                          f"{res.get('summary') or res.get('errors')}{status} "
                          f"[busy {cpu.get(f'busy_cpu{proxy_cpu}_pct', 0):.0f}%/"
                          f"{cpu.get(f'busy_cpu{load_cpu}_pct', 0):.0f}%]"
                          + (f" [{cpu['bottleneck_detail']}]" if "bottleneck_detail" in cpu
                             else ""), file=sys.stderr)
                    gone = (cpu.get("breakdown") or {}).get("exited")
                    if gone:
                        print(f"bench: {target}: process(es) {gone} ended during the run (a "
                              "worker restarted?): their last CPU time is not counted",
                              file=sys.stderr)
                    for p in (backends[0], *procs.values()):
                        if p.proc.poll() is not None:
                            raise RuntimeError(f"{p.name} died: {p.tail()}")
                    time.sleep(0.2)
        for target in targets:
            if target == "direct":
                continue
            if "idle" in args.scenarios:
                r = measure_idle(target, urls[target], procs[target], load_cpu, args, running)
                r["round"] = 1
                raw.append(r)
                kib = r.get("kib_per_connection")
                print(f"bench: idle {target:15s} "
                      f"{'%.1f KiB/connection' % kib if kib is not None else r['loadgen']}",
                      file=sys.stderr)
                time.sleep(1.0)
            if "storm" in args.scenarios and target in STORM_TARGETS:
                r = measure_storm(target, urls[target], procs[target], backends, backend_port,
                                  started, logdir, (proxy_cpu, load_cpu), args, running)
                r["round"] = 1
                raw.append(r)
                res = r["loadgen"]
                print(f"bench: storm {target:15s} {res.get('summary') or res.get('errors')}"
                      f"{'' if res.get('ok') else '  [NOT OK]'}", file=sys.stderr)
                for p in (backends[0], procs[target]):
                    if p.proc.poll() is not None:
                        raise RuntimeError(f"{p.name} died: {p.tail()}")
                time.sleep(1.0)
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

    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["all_ok"] = bool(raw) and all(r["loadgen"].get("ok") for r in raw)
    meta["proxy_cpu"], meta["load_cpu"] = proxy_cpu, load_cpu
    result = {"meta": meta, "runs": raw}
    result["summary"] = report.summarize(result)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    text, plots = report.render(result, out_path.with_suffix(""))
    md_path = out_path.with_suffix(".md")
    md_path.write_text(text)
    print(text)
    print(f"(written: {out_path}, {md_path}" + "".join(f", {p}" for p in plots) +
          f"; elapsed {meta['elapsed_s']} s)")
    return 0 if meta["all_ok"] and not meta.get("error") and not meta.get("interrupted") else 1


if __name__ == "__main__":
    raise SystemExit(main())
