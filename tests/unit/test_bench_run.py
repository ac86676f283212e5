"""bench/run.py's plumbing for a target with worker processes, and bench/report.py's tables.

A stand-in supervisor (a real process that forks two real workers, then prints its
"fastgw: listening on" line and "fastgw: 2 workers (pids ...)", as fastgw.workers does once
every worker is ready) checks the readiness wait, the per-process CPU accounting from /proc,
and that stop() ends workers that outlive a supervisor killed after its SIGTERM grace.
The report's issue-11 tables are checked on a synthetic result. A few seconds in all.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

import report  # noqa: E402  (bench/report.py, on sys.path by conftest)
import run  # noqa: E402  (bench/run.py)

# argv[1]: seconds of CPU the first worker forked burns; argv[2]: "ignore" makes the supervisor
# ignore SIGTERM (so stop() must kill it and then its orphaned workers).
SUPERVISOR = r"""
import os, signal, sys, time
burn, mode = float(sys.argv[1]), sys.argv[2]
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pids = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a worker that outlives its supervisor
        while i == 0 and time.process_time() < burn:   # CPU time, however busy the machine
            pass
        print(f"forked {i} done", file=sys.stderr, flush=True)
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
    time.sleep(0.2)
pids.reverse()          # index order is not start order: the names must follow the indexes
print("fastgw: listening on ws://127.0.0.1:45001", file=sys.stderr, flush=True)
print(f"fastgw: 2 workers (pids {', '.join(map(str, pids))})", file=sys.stderr, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    return run.start_time(pid) is not None


def _start(tmp_path: Path, burn: float, mode: str) -> run.Started:
    return run.Started("sup", [sys.executable, "-c", SUPERVISOR, str(burn), mode], None,
                       tmp_path, "stderr")


def test_waits_for_every_worker_and_accounts_each_process(tmp_path):
    sup = _start(tmp_path, 0.6, "term")
    try:
        t0 = run.tree_times(sup.pid)
        assert sup.wait_port(10) == 45001
        workers = sup.wait_workers(2, 5)                    # by index: w0 started last
        assert workers == list(reversed(sup.wait_children(2, 1)))
        sup.remember_descendants()
        deadline = time.monotonic() + 20                    # the first forked burns 0.6 s of CPU
        while not any("forked 0 done" in line for line in sup.lines):
            assert time.monotonic() < deadline, sup.tail()
            time.sleep(0.02)
        t1 = run.tree_times(sup.pid)
        brk = run.cpu_breakdown(sup.pid, t0, t1, wall=1.5, units=1000, indexes=workers)
        names = {r["name"]: r for r in brk["processes"]}
        assert set(names) == {"supervisor", "w0", "w1"}
        assert names["w0"]["pid"] == workers[0]
        # worker index 0 is the second process forked: the one that did not burn
        assert names["w1"]["cpu_s"] >= 0.5 and names["w0"]["cpu_s"] < 0.2
        assert brk["busiest_worker"] == "w1"
        by_start = run.cpu_breakdown(sup.pid, t0, t1, wall=1.5, units=1000)   # no indexes:
        assert [r["pid"] for r in by_start["processes"] if r["name"] in ("w0", "w1")] == [
            workers[1], workers[0]]                                           # start order
        assert brk["total_s"] == pytest.approx(sum(r["cpu_s"] for r in brk["processes"]))
        assert brk["run_total_s"] >= 0.5                    # the schedstat cross-check agrees
        assert names["w0"]["us_per_unit"] == pytest.approx(names["w0"]["cpu_s"] / 1000 * 1e6)
        assert brk["exited"] == []
    finally:
        sup.stop()
    assert sup.proc.returncode is not None
    assert not any(_alive(p) for p in workers)              # SIGTERM-proof workers: killed


def test_stop_kills_a_stuck_supervisor_and_its_orphans(tmp_path):
    sup = _start(tmp_path, 0, "ignore")
    try:
        sup.wait_port(10)
        workers = sup.wait_workers(2, 5)
    finally:
        t = time.monotonic()
        sup.stop(grace=1.0)                                 # SIGTERM ignored: 1 s, then kill
    assert time.monotonic() - t < 5
    assert sup.proc.returncode == -9
    assert not any(_alive(p) for p in workers)


def test_readiness_fails_when_too_few_workers_listen(tmp_path):
    sup = run.Started("one", [sys.executable, "-c",
                              "import sys, time; print('fastgw: listening on ws://127.0.0.1:1',"
                              " file=sys.stderr, flush=True); time.sleep(30)"],
                      None, tmp_path, "stderr")
    try:
        with pytest.raises(RuntimeError, match="1 of 2 'listening on'"):
            sup.wait_port(1.0, lines=2)
        with pytest.raises(RuntimeError, match="0 of 2 worker processes"):
            sup.wait_children(2, 0.3)
        with pytest.raises(RuntimeError, match="no 'fastgw: 2 workers"):
            sup.wait_workers(2, 0.3)
    finally:
        sup.stop()


def test_connections_by_pid_counts_the_accepted_side_of_one_port():
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_server(
            ("127.0.0.1", 0)) as other:
        port = srv.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        clients.append(socket.create_connection(other.getsockname()))
        accepted = [srv.accept()[0] for _ in range(3)] + [other.accept()[0]]
        try:
            # the accepted sockets of `port` only: not the clients' ends, not the other port
            assert run.connections_by_pid([os.getpid(), 1 << 22], port) == {
                os.getpid(): 3, 1 << 22: 0}
            accepted[0].close()
            clients[0].close()
            assert run.connections_by_pid([os.getpid()], port) == {os.getpid(): 2}
        finally:
            for c in clients + accepted:
                c.close()


def test_cpu_breakdown_counts_a_replaced_worker_from_zero():
    before = {10: {"ppid": 1, "start": 5, "cpu": 1.0, "run": 1.0},
              11: {"ppid": 10, "start": 6, "cpu": 2.0, "run": 2.0},
              12: {"ppid": 10, "start": 7, "cpu": 3.0, "run": 3.0}}
    after = {10: {"ppid": 1, "start": 5, "cpu": 1.1, "run": 1.1},
             11: {"ppid": 10, "start": 6, "cpu": 2.5, "run": 2.5},
             13: {"ppid": 10, "start": 9, "cpu": 0.2, "run": 0.2}}     # 12 died, 13 replaced it
    brk = run.cpu_breakdown(10, before, after, wall=1.0, units=100)
    got = {r["name"]: (r["pid"], round(r["cpu_s"], 6)) for r in brk["processes"]}
    assert got == {"supervisor": (10, 0.1), "w0": (11, 0.5), "w1": (13, 0.2)}
    assert brk["exited"] == [12]
    assert brk["supervisor_s"] == pytest.approx(0.1) and brk["workers_s"] == pytest.approx(0.7)


@pytest.mark.parametrize("core,pcts,expected", [
    ("client", (40, 38), "client (w0 40%, w1 38% of a core)"),
    ("neither", (95, 3), "worker w0 (w0 95%, w1 3% of a core)"),
    ("proxy", (50, 48), "the workers' shared core (w0 50%, w1 48% of a core)"),
    ("both", (92, 5), "client and worker w0 (w0 92%, w1 5% of a core)"),
])
def test_bottleneck_detail_names_the_core_or_the_worker(core, pcts, expected):
    brk = {"processes": [{"role": "supervisor", "name": "supervisor", "pct_of_wall": 1.0}] +
           [{"role": "worker", "name": f"w{i}", "pct_of_wall": p} for i, p in enumerate(pcts)]}
    assert run.bottleneck_detail(core, brk) == expected


def _run(scenario: str, target: str, rnd: int, us: float, workers: tuple[float, ...] = ()):
    cpu = {"proxy_us_per_unit": us, "proxy_run_us_per_unit": us, "busy_cpu0_pct": 50.0,
           "other_load_cpu0_pct": 4.0,
           "busy_cpu1_pct": 99.0, "bottleneck": "client"}
    if workers:
        procs = [{"pid": 1, "role": "supervisor", "name": "supervisor", "cpu_s": 0.0,
                  "run_s": 0.0, "pct_of_wall": 0.5, "us_per_unit": 0.01}]
        procs += [{"pid": 2 + i, "role": "worker", "name": f"w{i}", "cpu_s": 0.1, "run_s": 0.1,
                   "pct_of_wall": 30.0 + i, "us_per_unit": w, "connections": 5 - 2 * i}
                  for i, w in enumerate(workers)]
        cpu["breakdown"] = {"processes": procs, "busiest_worker_pct": 31.0, "exited": []}
        cpu["bottleneck_detail"] = "client (w0 30%, w1 31% of a core)"
    return {"scenario": scenario, "target": target, "round": rnd, "cpu": cpu,
            "loadgen": {"ok": True, "mode": "throughput", "msgs_per_s": 1000.0}}


def test_report_judges_the_issue_11_goals_per_round_and_over_rounds():
    runs = []
    for rnd in (1, 2, 3):
        runs += [_run("tp-64B", "fastgw", rnd, 0.50), _run("tp-64B", "fastgw-2w", rnd,
                                                            0.51 + rnd * 0.01, (0.26, 0.25)),
                 _run("lim-conn-64B", "fastgw-2w", rnd, 0.60, (0.3, 0.3)),
                 _run("lim-client-64B", "fastgw-2w", rnd, 0.66, (0.33, 0.33))]
    scen = {s: {"mode": "throughput", "size": 64}
            for s in ("tp-64B", "lim-conn-64B", "lim-client-64B")}
    result = {"meta": {"targets": ["fastgw", "fastgw-2w"], "proxy_cpu": 0, "load_cpu": 1,
                       "scenarios": scen}, "runs": runs}
    result["summary"] = report.summarize(result)
    f = result["summary"]["tp-64B"]["fastgw-2w"]
    assert f["w0 µs/unit"] == pytest.approx(0.26) and f["w1 % of a core"] == pytest.approx(31.0)
    text = report.markdown(result)
    assert "### Workers: CPU of each process" in text
    assert ("| tp-64B | fastgw-2w | 0.53 | 0.01 | 0.26 | 0.25 | 30.0 | 31.0 | 5.00 | 3.00 | "
            "50.0 | 4.00 | 99.0 | client |") in text
    goal = next(line for line in text.splitlines() if line.startswith("| tp-64B: 2 workers"))
    assert "| 1.060 | 1.040, 1.060, 1.080 | 1.060 | <= 1.05 | no |" in goal
    lim = next(line for line in text.splitlines() if line.startswith("| 64 B, 2 workers"))
    assert "| 1.100 |" in lim and lim.endswith("| no |")
    assert not any(line.startswith("| tp-1KiB: 2 workers") for line in text.splitlines())
