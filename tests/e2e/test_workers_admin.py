"""The supervisor's one admin API over real worker processes (`fastgw run` with workers: 2):
/metrics summed over the workers and monotonic when one is SIGKILLed and replaced,
/workers, /connections with the worker field, DELETE routed to the worker holding it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml, samples, stop_process

ADMIN = "admin: {host: 127.0.0.1, port: 0}\n"


async def start_supervisor(tmp_path, yaml_text: str):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml_text + ADMIN)
    err = tmp_path / "gateway.stderr"
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = err.read_text()
        port = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text)
        admin = re.search(r"admin on (http://\S+)", text)
        if port and admin:
            return proc, int(port.group(1)), admin.group(1), err
        if proc.poll() is not None:
            raise RuntimeError(f"fastgw exited: {text}")
        await asyncio.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"fastgw did not start: {err.read_text()}")


async def get(http, url: str):
    async with http.get(url) as r:
        assert r.status == 200, (url, r.status, await r.text())
        if r.content_type == "application/json":
            return await r.json()
        return samples(await r.text())


def v(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def counters(m: dict) -> dict:
    return {k: x for k, x in m.items()
            if not k[0].startswith(("fastgw_connections_active", "fastgw_connections_max",
                                    "fastgw_workers", "fastgw_target_connections_active",
                                    "fastgw_target_up"))}


async def test_one_admin_api_over_two_workers(tmp_path, echo_backend):
    yaml_text = "workers: 2\n" + gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", name="echo")
    proc, port, admin, err = await start_supervisor(tmp_path, yaml_text)
    url = f"ws://127.0.0.1:{port}/"
    clients = []
    try:
        async with aiohttp.ClientSession() as http:
            # 40 connections, 5 messages each, spread by the kernel over both workers.
            for _ in range(40):
                ws = await websockets.connect(url, compression=None)
                for i in range(5):
                    await ws.send(b"m" * 10)
                for i in range(5):
                    assert await ws.recv() == b"m" * 10
                clients.append(ws)
            workers = await get(http, f"{admin}/workers")
            assert [w["index"] for w in workers] == [0, 1]
            assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
            assert all(w["restarts"] == 0 and abs(w["started"] - time.time()) < 60 for w in workers)
            assert sum(w["connections"] for w in workers) == 40
            assert all(w["connections"] > 0 for w in workers), workers      # both got some
            before = await get(http, f"{admin}/metrics")
            assert v(before, "fastgw_connections_active", api="echo") == 40
            assert v(before, "fastgw_connections_total", api="echo") == 40
            assert v(before, "fastgw_messages_total", api="echo", direction="request") == 200
            assert v(before, "fastgw_handshake_seconds_count", api="echo") == 40
            assert v(before, "fastgw_workers") == 2
            for reason in ("exit", "signal", "heartbeat", "rolling"):
                assert (("fastgw_worker_restarts_total", frozenset({("reason", reason)}))) in before
            conns = await get(http, f"{admin}/connections")
            assert len(conns) == 40 and {c["worker"] for c in conns} == {0, 1}
            incarnations = {c["worker"]: c["id"] >> 32 for c in conns}
            assert len(set(incarnations.values())) == 2
            # DELETE reaches the worker holding the connection.
            target = next(c for c in conns if c["worker"] == 1)
            async with http.delete(f"{admin}/connections/{target['id']}") as r:
                assert r.status == 200
            async with http.delete(f"{admin}/connections/{(99 << 32) + 1}") as r:
                assert r.status == 404
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if sum(w["connections"] for w in await get(http, f"{admin}/workers")) == 39:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the connection closed by DELETE is still listed")
            # SIGKILL worker 0: its clients lose their connections, a new process takes
            # index 0, the counters do not go down.
            victim = workers[0]["pid"]
            on_victim = sum(1 for c in conns if c["worker"] == 0)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                now = await get(http, f"{admin}/workers")
                if now[0]["pid"] != victim and now[0]["restarts"] == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"worker 0 not replaced: {now}")
            async with websockets.connect(url, compression=None) as ws:   # served again
                await ws.send(b"after")
                assert await ws.recv() == b"after"
            after = await get(http, f"{admin}/metrics")
            for k, x in counters(before).items():
                assert after.get(k, 0.0) >= x, k
            assert v(after, "fastgw_worker_restarts_total", reason="signal") == 1
            assert v(after, "fastgw_workers") == 2
            assert v(after, "fastgw_connections_active", api="echo") <= 40 - on_victim
            merged = await get(http, f"{admin}/histograms/echo/handshake_us")
            assert merged["total_count"] >= 40
            # POST /workers/restart: 202, 409 while it runs; every worker replaced, the
            # retired ones' counters folded (their final snapshots).
            for ws in clients:
                await ws.close()
            async with http.post(f"{admin}/workers/restart") as r:
                assert r.status == 202 and await r.json() == {"restarting": True}
            async with http.post(f"{admin}/workers/restart") as r:
                assert r.status == 409
            old = {w["pid"] for w in await get(http, f"{admin}/workers")}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                rolled = await get(http, f"{admin}/metrics")
                if v(rolled, "fastgw_worker_restarts_total", reason="rolling") == 2 and \
                        "rolling restart done" in err.read_text():
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the rolling restart did not end")
            assert not old & {w["pid"] for w in await get(http, f"{admin}/workers")}
            for k, x in counters(after).items():
                assert rolled.get(k, 0.0) >= x, k
            assert v(rolled, "fastgw_connections_total", api="echo") == 41
            assert v(rolled, "fastgw_messages_total", api="echo", direction="request") == 201
    finally:
        for ws in clients:
            await ws.close()
        stop_process(proc)
    assert proc.returncode == 0, err.read_text()
