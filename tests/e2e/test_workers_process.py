"""`workers: N`: the supervisor's mechanics with real processes. `fastgw run` subprocesses in
front of the bundled echo backend (`python -m fastgw.echo`, a subprocess too), websockets
clients on loopback: both workers serve, a killed worker is replaced within a second without
touching the other's connections, SIGTERM drains, SIGHUP checks once, SIGUSR2 replaces every
worker without refusing an upgrade, a stuck worker is killed for its missing heartbeat."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

FASTGW = (sys.executable, "-m", "fastgw")


def config(backend_port: int, workers: int = 2, extra_top: str = "", policies: str = "",
           admin_host: str = "127.0.0.1") -> str:
    return (f"workers: {workers}\n{extra_top}"
            "listeners:\n  - {host: 127.0.0.1, port: 0}\n"
            f"admin: {{host: {admin_host}, port: 0}}\n"
            "apis:\n  - name: test\n    path: /\n    assembly:\n" + policies +
            f"      - {{policy: websocket-upgrade, target-url: \"ws://127.0.0.1:{backend_port}/\"}}\n")


async def until(predicate, timeout: float, what: str, step: float = 0.02):
    """Wait for predicate() to be truthy (its value), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(step)


@pytest.fixture
def echo_process():
    """`python -m fastgw.echo` on a free port; yields the port."""
    proc = subprocess.Popen([sys.executable, "-m", "fastgw.echo", "--host", "127.0.0.1",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
    assert m, f"echo backend did not start: {line!r}"
    yield int(m.group(1))
    proc.terminate()
    proc.wait(10)


class Supervised:
    """A `fastgw run` process with workers > 1, its admin API and its stderr."""

    def __init__(self, proc, config_path: Path, err: Path):
        self.proc, self.config_path, self.err = proc, config_path, err
        text = err.read_text()
        self.port = int(re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text).group(1))
        self.admin = re.search(r"admin on (http://\S+)", text).group(1)

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        return self.err.read_text()

    async def status(self, timeout: float = 5.0) -> dict:
        """The supervisor's SIGUSR1 line, parsed."""
        before = self.stderr().count("fastgw: status ")
        self.proc.send_signal(signal.SIGUSR1)

        def line():
            lines = [l for l in self.stderr().splitlines() if l.startswith("fastgw: status ")]
            return lines[-1] if len(lines) > before else None

        text = await until(line, timeout, "a status line")
        return json.loads(text[len("fastgw: status "):])

    async def pids(self, n: int = 2, timeout: float = 3.0) -> dict[int, int]:
        """index -> pid of the current worker of each index (once there are n: a worker
        just reaped is replaced within a second)."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status()
            pids = {w["index"]: w["pid"] for w in st["workers"] if w["current"]}
            if len(pids) == n or time.monotonic() > deadline:
                return pids
            await asyncio.sleep(0.05)

    async def connections(self) -> list[dict]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{self.admin}/connections") as r:
                assert r.status == 200
                return await r.json()


@pytest.fixture
def supervised(tmp_path):
    started: list[Supervised] = []

    async def start(yaml_text: str, *args: str) -> Supervised:
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml_text)
        err = tmp_path / "gateway.stderr"
        proc = subprocess.Popen([*FASTGW, "run", "-c", str(cfg), *args],
                                stdout=subprocess.DEVNULL, stderr=err.open("w"))

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"fastgw exited: {err.read_text()}")
            return " workers (pids " in err.read_text()

        try:
            await until(up, 20, "the workers are ready", step=0.05)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        sup = Supervised(proc, cfg, err)
        started.append(sup)
        return sup

    yield start
    problems = []
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGTERM)
            try:
                sup.proc.wait(10)
            except subprocess.TimeoutExpired:
                sup.proc.kill()
                sup.proc.wait()
                problems.append("the supervisor did not stop within 10 s of SIGTERM")
        if "Traceback" in sup.stderr():
            problems.append("a traceback in the log:\n" + sup.stderr()[-3000:])
    assert not problems, "\n".join(problems)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def open_many(url: str, n: int) -> list:
    return list(await asyncio.gather(*(websockets.connect(url, open_timeout=5) for _ in range(n))))


async def echo_all(conns, text: str = "ping") -> None:
    for ws in conns:
        await ws.send(text)
    for ws in conns:
        assert await asyncio.wait_for(ws.recv(), 5) == text


async def close_all(conns) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


async def test_two_workers_serve_upgrades(supervised, echo_process):
    # A host name to resolve: the supervisor does it on its own thread (it forks later).
    sup = await supervised(config(echo_process, admin_host="localhost"))
    assert re.search(r"fastgw: 2 workers \(pids \d+, \d+\)", sup.stderr())
    assert os.listdir(f"/proc/{sup.proc.pid}/task") == [str(sup.proc.pid)]
    pids = await sup.pids()
    assert sorted(pids) == [0, 1]
    for pid in pids.values():           # forked by the supervisor
        assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1] == str(sup.proc.pid)
    conns = await open_many(sup.url(), 40)
    try:
        await echo_all(conns)
        rows = await sup.connections()
        assert len(rows) == 40
        # The kernel's reuseport hash spreads them: all 40 on one worker is a 2**-39 chance.
        assert {r["worker"] for r in rows} == {0, 1}
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == 40
        st = await sup.status()
        incarnation = {w["index"]: w["incarnation"] for w in st["workers"]}
        assert all(r["id"] >> 32 == incarnation[r["worker"]] for r in rows)
        assert st["active"] == 40
        assert all(w["status"]["active"] > 0 for w in st["workers"])
        assert all(w["zone"]["pid"] == w["pid"] for w in st["workers"])
    finally:
        await close_all(conns)


async def test_killed_worker_is_restarted_and_the_other_untouched(supervised, echo_process):
    sup = await supervised(config(echo_process))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 40)
    try:
        rows = await sup.connections()
        st = await sup.status()
        incarnation = {w["index"]: w["incarnation"] for w in st["workers"]}
        on_0 = sum(1 for r in rows if r["worker"] == 0)
        assert 0 < on_0 < 40
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        # Its clients see their connections end (the kernel closes the dead worker's sockets);
        # the others' stay open.
        ended = await asyncio.gather(*(asyncio.wait_for(asyncio.shield(ws.wait_closed()), 1.5)
                                       for ws in conns), return_exceptions=True)
        gone = [ws for ws, e in zip(conns, ended) if not isinstance(e, asyncio.TimeoutError)]
        kept = [ws for ws, e in zip(conns, ended) if isinstance(e, asyncio.TimeoutError)]
        assert len(gone) == on_0
        # A new worker at index 0 within a second, serving new upgrades.
        await until(lambda: "worker 0 (pid %d) was killed by signal SIGKILL" % pids[0] in sup.stderr(),
                    2, "the restart line")
        new = await sup.pids()
        assert new[0] != pids[0] and new[1] == pids[1]
        st = await sup.status()
        started = {w["index"]: w for w in st["workers"]}[0]["started"]
        assert started - (time.time() - (time.monotonic() - killed_at)) < 1.0
        assert st["restarts"]["signal"] == 1
        assert {w["index"]: w["restarts"] for w in st["workers"]} == {0: 1, 1: 0}
        # The other worker's connections are untouched.
        await echo_all(kept, "still here")
        fresh = await open_many(sup.url(), 20)
        await echo_all(fresh)
        rows = await sup.connections()
        assert {r["worker"] for r in rows} == {0, 1}
        assert all(r["id"] >> 32 != incarnation[0] for r in rows)
        await close_all(fresh)
    finally:
        await close_all(conns)


async def test_sigterm_drains_every_worker(supervised, echo_process):
    sup = await supervised(config(echo_process, extra_top="drain-time: 5s\n"))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 20)
    await echo_all(conns)
    sup.proc.send_signal(signal.SIGTERM)
    codes = []
    for ws in conns:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        codes.append(ws.close_code)
    assert set(codes) == {1001}
    await until(lambda: sup.proc.poll() is not None, 10, "the supervisor's exit")
    assert sup.proc.returncode == 0
    assert "fastgw: SIGTERM: draining" in sup.stderr()
    assert sup.stderr().rstrip().endswith("fastgw: stopped")
    assert not any(alive(pid) for pid in pids.values())


async def test_sighup_checks_once_and_refuses_a_broken_file(supervised, echo_process):
    sup = await supervised(config(echo_process))
    pids = await sup.pids()
    good = sup.config_path.read_text()
    sup.config_path.write_text(good + "apis: [\n")
    sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: "fastgw: reload refused: " in sup.stderr(), 5, "the refusal")
    assert sup.stderr().count("reload refused") == 1          # once, by the supervisor
    assert await sup.pids() == pids
    conns = await open_many(sup.url(), 10)
    await echo_all(conns)
    await close_all(conns)
    # Listeners cannot change with workers > 1 (the supervisor holds the sockets).
    sup.config_path.write_text(good.replace("  - {host: 127.0.0.1, port: 0}\n",
                                            "  - {host: 127.0.0.1, port: 0}\n" * 2))
    sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: "listeners cannot change on reload with workers > 1: restart fastgw"
                in sup.stderr(), 5, "the listeners' refusal")
    # A good change reaches every worker.
    sup.config_path.write_text(good.replace("path: /", "path: /v2"))
    sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: "fastgw: reloaded" in sup.stderr(), 5, "the reload")
    assert await sup.pids() == pids
    conns = await open_many(sup.url("/v2"), 10)
    assert {r["api"] for r in await sup.connections()} == {"test"}
    await echo_all(conns)
    await close_all(conns)


async def test_sigusr2_rolling_restart_refuses_no_upgrade(supervised, echo_process):
    sup = await supervised(config(echo_process, extra_top="drain-time: 2s\n"))
    pids = await sup.pids()
    held = await open_many(sup.url(), 10)
    failures: list = []
    opened = 0
    stop = asyncio.Event()

    async def client():
        nonlocal opened
        while not stop.is_set():
            try:
                async with websockets.connect(sup.url(), open_timeout=5) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
                    opened += 1
            except ConnectionClosed as exc:       # retired after its 101: a 1001, not a refusal
                if exc.rcvd is None or exc.rcvd.code != 1001:
                    failures.append(repr(exc))
                else:
                    opened += 1
            except Exception as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0.01)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)
        sup.proc.send_signal(signal.SIGUSR2)
        await until(lambda: "fastgw: rolling restart done" in sup.stderr(), 20, "the rolling restart")
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert not failures, failures[:5]
    assert opened > 50
    new = await sup.pids()
    assert sorted(new) == [0, 1]
    assert not set(new.values()) & set(pids.values())
    assert not any(alive(pid) for pid in pids.values())
    assert "threads alive" not in sup.stderr()
    st = await sup.status()
    assert st["restarts"]["rolling"] == 2
    # The connections of the retired workers were closed with 1001.
    for ws in held:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    assert "killed" not in sup.stderr()


async def test_stuck_worker_is_killed_for_its_heartbeat(supervised, echo_process):
    sup = await supervised(config(echo_process, extra_top="worker-heartbeat-timeout: 1s\n"))
    pids = await sup.pids()
    os.kill(pids[1], signal.SIGSTOP)            # its loop beats no more
    try:
        await until(lambda: f"worker 1 (pid {pids[1]}) sent no heartbeat" in sup.stderr(), 4,
                    "the heartbeat kill")
        await until(lambda: not alive(pids[1]), 2, "the stuck worker's end")
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    new = await sup.pids(2)
    assert new[1] != pids[1] and new[0] == pids[0]
    st = await sup.status()
    assert st["restarts"]["heartbeat"] == 1
    conns = await open_many(sup.url(), 10)
    await echo_all(conns)
    await close_all(conns)


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path, echo_process):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config(echo_process, extra_top=f"events: {{target: {tmp_path}/no/such/dir/ev.log}}\n"))
    proc = await asyncio.create_subprocess_exec(*FASTGW, "run", "-c", str(cfg),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "events:" in text and "before it was ready" in text
    assert "listening on" not in text


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def test_a_worker_dying_at_its_start_is_restarted_with_a_back_off(supervised, echo_process):
    sup = await supervised(config(echo_process))
    pids = await sup.pids()
    killed = {pids[0]}
    os.kill(pids[0], signal.SIGKILL)
    for _ in range(3):                  # each successor killed as soon as it exists
        new = await until(lambda: children(sup.proc.pid) - killed - {pids[1]}, 5, "a successor")
        pid = new.pop()
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)
    await until(lambda: len(re.findall(r"worker 0 \(pid \d+\) was killed by signal SIGKILL",
                                       sup.stderr())) == 4, 5, "four restart lines")
    delays = [float(d) for d in re.findall(r"restarting in ([\d.]+) s \(it died", sup.stderr())]
    # The first death may come more than 2 s after the worker's start (restarted at once).
    assert len(delays) >= 3 and delays == [0.1, 0.2, 0.4, 0.8][:len(delays)], delays
    new = await sup.pids()              # and the index is served again
    assert new[0] not in killed and new[1] == pids[1]
    st = await sup.status()
    assert st["restarts"]["signal"] == 4


async def test_a_killed_workers_count_limit_slots_are_released(supervised, echo_process):
    limit = "      - {policy: count-limit, key: client-ip, max: 8}\n"
    sup = await supervised(config(echo_process, policies=limit))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 8)            # the 8 slots of 127.0.0.1, on both workers
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(sup.url(), open_timeout=5)
        assert refused.value.response.status_code == 429
        # SO_REUSEPORT hashes each connection to a worker: both hold some in all but about 1
        # run in 128; the one holding more is killed (all 8 of one worker are released then).
        workers = [r["worker"] for r in await sup.connections()]      # one snapshot
        on = [workers.count(0), workers.count(1)]
        assert sum(on) == 8, on
        victim = 0 if on[0] >= on[1] else 1
        held = on[victim]
        os.kill(pids[victim], signal.SIGKILL)
        line = await until(lambda: re.search(rf"worker {victim} \(pid {pids[victim]}\) was killed "
                                             r"by signal SIGKILL; (\d+) slots released",
                                             sup.stderr()),
                           2, "the restart line with the slots released")
        assert int(line.group(1)) == held
        await sup.pids()
        more = await open_many(sup.url(), held)      # exactly what it held is free again
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(sup.url(), open_timeout=5)
        assert refused.value.response.status_code == 429
        await close_all(more)
    finally:
        await close_all(conns)


async def test_a_worker_sigtermed_alone_drains_and_is_replaced(supervised, echo_process):
    sup = await supervised(config(echo_process))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 20)
    on_1 = sum(1 for r in await sup.connections() if r["worker"] == 1)
    os.kill(pids[1], signal.SIGTERM)
    ended = await asyncio.gather(*(asyncio.wait_for(asyncio.shield(ws.wait_closed()), 1.5)
                                   for ws in conns), return_exceptions=True)
    gone = [ws for ws, e in zip(conns, ended) if not isinstance(e, asyncio.TimeoutError)]
    assert len(gone) == on_1 and {ws.close_code for ws in gone} == {1001}
    await until(lambda: f"worker 1 (pid {pids[1]}) exited with status 0; restarting" in sup.stderr(),
                2, "the restart line")
    new = await sup.pids()
    assert new[1] != pids[1] and new[0] == pids[0]
    assert (await sup.status())["restarts"]["exit"] == 1
    await close_all(conns)


async def test_admin_drain_with_exit_stops_the_supervisor(supervised, echo_process):
    sup = await supervised(config(echo_process))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 10)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sup.admin}/drain?grace=2&exit=true") as r:
            assert r.status == 202
    for ws in conns:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == 1001
    await until(lambda: sup.proc.poll() is not None, 10, "the supervisor's exit")
    assert sup.proc.returncode == 0
    assert not any(alive(pid) for pid in pids.values())
    assert "restarting" not in sup.stderr()


async def test_workers_outliving_a_killed_supervisor_drain_and_exit(supervised, echo_process):
    sup = await supervised(config(echo_process, extra_top="drain-time: 3s\n"))
    pids = await sup.pids()
    conns = await open_many(sup.url(), 10)
    sup.proc.kill()                         # no drain asked: each worker sees its channel end
    sup.proc.wait()
    for ws in conns:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == 1001
    await until(lambda: not any(alive(pid) for pid in pids.values()), 5, "the workers' exit")


async def test_workers_on_asyncios_own_loop(supervised, echo_process):
    """`--loop asyncio`: the supervisor and its workers (a restarted one forked from the
    supervisor's running loop) on the standard library's loop."""
    sup = await supervised(config(echo_process), "--loop", "asyncio")
    pids = await sup.pids()
    conns = await open_many(sup.url(), 20)
    try:
        await echo_all(conns)
        assert {r["worker"] for r in await sup.connections()} == {0, 1}
        os.kill(pids[0], signal.SIGKILL)
        await until(lambda: f"worker 0 (pid {pids[0]}) was killed" in sup.stderr(), 2, "the restart")
        new = await sup.pids()
        assert new[0] != pids[0]
        fresh = await open_many(sup.url(), 20)
        await echo_all(fresh)
        assert {r["worker"] for r in await sup.connections()} == {0, 1}
        await close_all(fresh)
    finally:
        await close_all(conns)
