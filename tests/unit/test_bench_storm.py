"""bench/storm.py's pure part (the figures of one storm from the client's result), the
"Reconnect storm" table of bench/report.py on synthetic results, run.py's storm options and fd
cap, the JSON-lines reader shared by the storm and idle clients, and one real storm: run.py's
measure_storm through a real fastgw with 50 clients on loopback (about 3 s)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from argparse import Namespace

import pytest

import report  # noqa: E402  (bench/report.py, on sys.path by conftest)
import run  # noqa: E402  (bench/run.py)
import storm  # noqa: E402  (bench/storm.py)


def _client(**kw):
    base = {"open": 10, "dropped": 10, "back": 10, "gave_up": 0, "open_failed": 0,
            "attempts": 25, "failed_attempts": {"status 502": 15}, "last_back": 13.5,
            "handshake_us": {"p50": 800, "p99": 4000, "max": 9000, "count": 10}}
    base.update(kw)
    return base


def test_all_back_time_from_restart_and_peak_rss_during_storm():
    rss = [(9.0, 50 * 2**20), (10.5, 80 * 2**20), (12.0, 60 * 2**20)]
    r = storm.aggregate(_client(), t_kill=10.0, t_restart=11.0, rss=rss, rss_before=40 * 2**20)
    assert r["ok"] and r["all_back"]
    assert r["all_back_after_restart_s"] == 2.5
    assert r["all_back_after_kill_s"] == 3.5
    assert r["peak_rss_mib"] == 80.0          # the sample before the kill is not counted
    assert r["rss_samples"] == 2
    assert r["handshake_p99_us"] == 4000
    assert r["failures"] == 0 and r["failed_attempts"] == 15


def test_missing_clients_are_failures_and_no_time():
    r = storm.aggregate(_client(back=7, gave_up=2), 10.0, 11.0, [], None)
    assert not r["ok"] and not r["all_back"]
    assert r["all_back_after_restart_s"] is None
    assert r["failures"] == 3                 # 2 gave up, 1 never reported back
    assert r["peak_rss_mib"] is None


def test_no_client_result():
    r = storm.aggregate(None, 1.0, None, [], None)
    assert not r["ok"] and r["connections"] == 0 and r["handshake_p99_us"] is None


# ---------------------------------------------------------------------------------------------
# run.py's storm rows in bench/report.py's "Reconnect storm" table (synthetic results)


def _storm_run(target: str, back_after: float | None, peak_mib: float, p99_us: int,
               n: int = 9900, gave_up: int = 0) -> dict:
    """One entry of run.py's "runs" as run_storm makes it, from a synthetic client result."""
    back = n - gave_up
    client = _client(open=n, dropped=n, back=back, gave_up=gave_up, attempts=3 * n,
                     last_back=None if back_after is None else 11.0 + back_after,
                     handshake_us={"p50": p99_us // 4, "p99": p99_us, "max": 2 * p99_us,
                                   "count": back})
    rss = [(10.5, int(peak_mib * 2**20)), (12.0, int(peak_mib * 2**20) // 2)]
    r = {"scenario": "storm", "target": target, "round": 1, "loadgen": dict(client),
         "cpu": {"wall_s": 2.0, "proxy_s": peak_mib / 100, "busy_cpu0_pct": 60.0,
                 "busy_cpu1_pct": 99.0, "bottleneck": "client", "backend_s": 0.75},
         "client_cpu_s": 1.25}
    r.update(storm.aggregate(client, 10.0, 11.0, rss, 30 * 2**20))
    r["loadgen"]["ok"] = r["ok"]
    return r


def _storm_result(runs: list[dict], targets: list[str]) -> dict:
    note = run.storm_cap(20000, 9900)[1]
    return {"meta": {"targets": targets, "rounds": 1, "proxy_cpu": 0, "load_cpu": 1,
                     "scenarios": {"storm": run.SCENARIOS["storm"]}, "storm_cap": note,
                     "storm_down_s": 1.0}, "runs": runs}


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    i = lines.index("### Reconnect storm")
    head = next(j for j in range(i, len(lines)) if lines[j].startswith("| target"))
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


@pytest.mark.parametrize(("fastgw_s", "ratio"), [(0.9, "0.50"), (3.6, "2.00")])
def test_storm_table_times_and_ratio_to_nginx(fastgw_s, ratio):
    runs = [_storm_run("fastgw", fastgw_s, 120.0, 8000), _storm_run("nginx", 1.8, 40.0, 6000),
            _storm_run("haproxy", 2.7, 50.5, 12500)]
    text = report.markdown(_storm_result(runs, ["fastgw", "nginx", "haproxy"]))
    rows = _rows(text)
    assert list(rows) == ["fastgw", "nginx", "haproxy"]
    # N | all back s | × nginx | peak RSS MiB | RSS before MiB | handshake p99 ms | failures
    assert rows["fastgw"][:7] == ["9,900", report.fmt(fastgw_s), ratio, "120", "30.0", "8.00",
                                  "0"]
    assert rows["nginx"][:7] == ["9,900", "1.80", "–", "40.0", "30.0", "6.00", "0"]
    assert rows["haproxy"][2] == "1.50" and rows["haproxy"][5] == "12.5"
    assert rows["fastgw"][8:] == ["1.20 / 1.25 / 0.75", "client"]
    assert rows["haproxy"][8].startswith("0.51 / ")
    assert "the fd limit 20000 allows (20000 - 200) // 2 = 9900" in text


def test_storm_table_marks_a_proxy_whose_clients_did_not_all_come_back():
    runs = [_storm_run("fastgw", 5.0, 90.0, 4000, n=1000, gave_up=7),
            _storm_run("nginx", 1.0, 20.0, 3000, n=1000)]
    rows = _rows(report.markdown(_storm_result(runs, ["fastgw", "nginx"])))
    fastgw = rows["fastgw (NOT OK)"]
    assert fastgw[1] == "–" and fastgw[2] == "–"      # not all back: no time, no ratio
    assert fastgw[6] == "7"
    assert "nginx" in rows


def test_storm_table_follows_the_proxy_cpu_table():
    import test_bench_report_cpu as cpu_tests          # its synthetic CPU result
    result = cpu_tests._result(cpu_tests.BASE)
    result["meta"]["scenarios"]["storm"] = run.SCENARIOS["storm"]
    result["runs"] += [_storm_run("fastgw", 1.0, 100.0, 5000), _storm_run("nginx", 2.0, 30.0, 4000)]
    text = report.markdown(result)
    assert text.index("### Proxy CPU per unit") < text.index("### Reconnect storm")
    assert _rows(text)["fastgw"][2] == "0.50"
    assert report.summarize(result)["storm"]["fastgw"]["peak RSS MiB"] == 100.0


def test_storm_cap_follows_the_fd_limit():
    assert run.storm_cap(20000, 9900)[0] == 9900
    assert run.storm_cap(20000, 500)[0] == 500
    n, note = run.storm_cap(4096, 9900)
    assert n == (4096 - run.STORM_HEADROOM) // 2 == 1948
    assert note.startswith("storm: 1948 connections (9900 asked")


def test_run_py_options():
    a = run.parse_args(["--scenarios", "storm"])
    assert a.storm_connections == 9900 and a.storm_down == 1.0
    assert run.parse_args(["--quick"]).storm_connections == 1000
    assert run.parse_args(["--storm-connections", "50"]).storm_connections == 50
    assert "storm" in run.parse_args([]).scenarios


def test_json_lines_skips_other_lines_and_stops_at_the_end():
    code = ("import sys, time; print('not json'); print('{\"a\": 1}', flush=True); "
            "time.sleep(0.6); print('[2]', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        next_json = storm.json_lines(proc.stdout)
        assert next_json(10) == {"a": 1}
        t0 = time.monotonic()
        assert next_json(0.2) is None                  # nothing yet: the timeout
        assert time.monotonic() - t0 < 0.5
        assert next_json(10) == [2]
        assert next_json(10) is None and next_json(10) is None    # ended, and stays ended
    finally:
        proc.wait(5)


# ---------------------------------------------------------------------------------------------
# a real storm: run.py's measure_storm through a real fastgw on loopback, 50 clients


def test_a_real_storm_through_fastgw_replaces_the_backend(tmp_path):
    started: list[run.Started] = []
    running: list[subprocess.Popen[str]] = []
    try:
        backend = run.Started("echo", run.backend_argv(0), None, tmp_path, "stdout")
        started.append(backend)
        port = backend.wait_port(15)
        cfg = tmp_path / "gw.yaml"
        cfg.write_text("metrics: false\n" + run.GATEWAY_YAML.format(backend_port=port))
        gw = run.Started("fastgw", [sys.executable, "-m", "fastgw", "run", "-c", str(cfg)],
                         None, tmp_path, "stderr")
        started.append(gw)
        url = f"ws://127.0.0.1:{gw.wait_port(15)}/"
        backends = [backend]
        args = Namespace(storm_connections=50, storm_down=0.3)
        r = run.measure_storm("fastgw", url, gw, backends, port, started, tmp_path,
                              (None, None), args, running)
        assert r["loadgen"].get("ok"), json.dumps(r)[:3000]
        assert r["ok"] and r["connections"] == 50 and r["back"] == 50 and r["dropped"] == 50
        assert r["failures"] == 0
        assert 0 < r["all_back_after_restart_s"] < r["all_back_after_kill_s"] < 30
        assert r["peak_rss_mib"] > 1 and r["rss_samples"] > 0
        assert r["handshake_p99_us"] > 0
        assert r["loadgen"]["handshake_us"]["count"] == 50     # the successful reconnects only
        assert r["attempts"] >= 50
        assert r["cpu"]["proxy_s"] > 0 and 0 < r["cpu"]["wall_s"] < 30
        assert r["client_cpu_s"] > 0 and r["cpu"]["backend_s"] > 0
        # the backend was replaced: the old one is gone, the new one listens on its port and
        # is the one in the list of processes to stop
        new = backends[0]
        assert new is not backend and new.pid != backend.pid
        assert backend.proc.returncode == -9
        assert new.proc.poll() is None and started[0] is new and backend not in started
        assert f"listening on ws://127.0.0.1:{port}" in new.tail()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert not running
    finally:
        for s in reversed(started):
            s.stop()


async def test_an_attempt_closed_after_the_upgrade_fails_at_once():
    """A proxy that upgrades before it reaches the backend (pyproxy) answers the echo with a
    CLOSE 1011: the attempt fails then, not at its timeout."""
    import asyncio

    async def upgrade_then_close(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        reason = b"backend unavailable"
        writer.write(bytes([0x88, 2 + len(reason)]) + (1011).to_bytes(2, "big") + reason)
        await reader.read(1000)           # the CLOSE is never answered: wait for the client
        writer.close()

    server = await asyncio.start_server(upgrade_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        r = await storm._attempt("127.0.0.1", port, "/", 5.0, None)
        assert r == "close 1011"
        assert time.monotonic() - t0 < 2
    finally:
        server.close()
        await server.wait_closed()
