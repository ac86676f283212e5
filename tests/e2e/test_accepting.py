"""Accepting under limits: the descriptor limit, the derived max-connections, EMFILE, and the
per-address cap on handshakes in progress. `fastgw run` processes under a low RLIMIT_NOFILE,
real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import aiohttp
import pytest
import websockets

from conftest import gateway_yaml, samples, value


async def connect(url: str, **kw):
    return await websockets.connect(url, **kw)


async def admin_metrics(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        return samples(await r.text())


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def test_soft_descriptor_limit_raised_to_the_hard_one(gateway_with_admin, echo_backend):
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), soft=64, hard=300)
    assert open_files_limit(gp.proc.pid) == (300, 300)
    err = gp.stderr()
    m = re.search(r"max-connections (\d+) \(auto: \(descriptor limit 300 - (\d+) reserved\) / 2 per "
                  r"connection; the limit was raised from 64\)", err)
    assert m, err
    assert int(m.group(1)) == (300 - int(m.group(2))) // 2
    async with aiohttp.ClientSession() as http:
        metrics = await admin_metrics(http, gp.admin_url)
    assert value(metrics, "fastgw_connections_max") == int(m.group(1))


async def test_low_descriptor_limit_clients_wait_in_the_backlog_and_are_served(
        gateway_with_admin, echo_backend):
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), soft=64, hard=64)
    # 40 clients need about 100 descriptors: more than 64 hold.
    tasks = [asyncio.create_task(connect(gp.url("/"), open_timeout=60)) for _ in range(40)]
    deadline, seen, since = time.monotonic() + 30, -1, time.monotonic()
    while time.monotonic() < deadline:          # until no client gets an answer for 1 s
        n = sum(t.done() for t in tasks)
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since > 1.0:
            break
        await asyncio.sleep(0.05)
    done = [t for t in tasks if t.done()]
    failed = [repr(t.exception()) for t in done if t.exception() is not None]
    assert not failed, failed
    cap = len(done)
    assert 4 <= cap < len(tasks)
    assert re.search(rf"max-connections {cap} \(auto: \(descriptor limit 64 - ", gp.stderr()), gp.stderr()
    held = [t.result() for t in done]
    pending = [t for t in tasks if not t.done()]
    async with aiohttp.ClientSession() as http:
        # The admin API answers while the gateway holds all it may.
        metrics = await admin_metrics(http, gp.admin_url)
        assert value(metrics, "fastgw_connections_active", api="test") == cap
        assert value(metrics, "fastgw_connections_max") == cap
        async with http.get(f"{gp.admin_url}/readyz") as r:
            assert r.status == 200
        while held:
            # Each one that leaves lets one waiting in the backlog in.
            for i, ws in enumerate(held):
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
                await ws.close()
            want = min(len(pending), cap)
            await wait_for(lambda: sum(t.done() for t in pending) >= want, 30, "the waiting clients")
            await asyncio.sleep(0.2)
            now = [t for t in pending if t.done()]
            assert len(now) == want
            assert all(t.exception() is None for t in now), [t.exception() for t in now]
            held = [t.result() for t in now]
            pending = [t for t in pending if not t.done()]
        metrics = await admin_metrics(http, gp.admin_url)
        assert value(metrics, "fastgw_connections_total", api="test") == len(tasks)
        assert value(metrics, "fastgw_upgrades_rejected_total", api="test", reason="upstream_error") == 0
    err = gp.stderr()
    assert err.count(f"at max-connections {cap} ") == 1, err
    assert "Traceback" not in err


async def test_out_of_descriptors_backs_off_counts_and_the_admin_api_answers(
        gateway_with_admin, echo_backend):
    # No cap: the gateway accepts until accept() fails with EMFILE.
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                      extra_top="handshake-timeout: 60s\nlimits: {max-connections: 0}"),
                         soft=64, hard=64)
    raw = [await asyncio.open_connection("127.0.0.1", gp.port) for _ in range(60)]
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:
            metrics = await admin_metrics(http, gp.admin_url)     # answers throughout
            if value(metrics, "fastgw_accept_errors_total", errno="EMFILE") >= 1:
                break
            assert time.monotonic() < deadline, "no EMFILE counted"
            await asyncio.sleep(0.1)
        assert value(metrics, "fastgw_accept_errors_total", errno="ENFILE") == 0
        client = asyncio.create_task(connect(gp.url("/"), open_timeout=60))
        # Nobody was reset or closed: accepted or not, every raw connection is still open.
        reads = await asyncio.gather(*(asyncio.wait_for(r.read(1), 0.5) for r, _ in raw),
                                     return_exceptions=True)
        assert all(isinstance(x, TimeoutError) for x in reads), reads
        assert not client.done()
        async with http.get(f"{gp.admin_url}/healthz") as r:
            assert r.status == 200
        for _, w in raw:
            w.close()
        ws = await asyncio.wait_for(client, 30)
        await ws.send("after the back-off")
        assert await ws.recv() == "after the back-off"
        await ws.close()
    err = gp.stderr()
    assert "holds about" in err                 # the warning at start: 0 means no cap
    assert err.count("accept: Too many open files (EMFILE") == 1, err
    assert "Traceback" not in err


async def test_max_connections_makes_clients_wait_not_503(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_top="limits: {max-connections: 3}"))
    held = [await websockets.connect(gw.url("/")) for _ in range(3)]
    late = asyncio.create_task(connect(gw.url("/"), open_timeout=30))
    await asyncio.sleep(0.5)
    assert not late.done(), late.done() and (late.exception() or "accepted")
    assert gw.gw.status()["accepting"] is False
    await held[0].close()
    ws = await asyncio.wait_for(late, 10)
    await ws.send("late")
    assert await ws.recv() == "late"
    for c in held[1:] + [ws]:
        await c.close()


async def test_with_workers_max_connections_is_one_count_shared_by_every_worker(echo_backend):
    # Two gateways of one machine (as two workers are) share one zone: a numeric
    # max-connections holds for both together, and each accept() takes its slot first.
    from fastgw import config as cfgmod
    from fastgw._core import LimitZone
    from fastgw.gateway import CAP_KEY, Gateway

    config = cfgmod.loads(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                       extra_top="workers: 2\nlimits: {max-connections: 3}"),
                          "yaml", "test.yaml")
    zone = LimitZone(2 * config.limits.max_keys)
    a, b = Gateway(config, zone=zone), Gateway(config, zone=zone)
    try:
        (_, _, port_a), = await a.start()
        (_, _, port_b), = await b.start()
        assert a.shared_cap and b.shared_cap
        held = [await websockets.connect(f"ws://127.0.0.1:{port_a}/") for _ in range(2)]
        held.append(await websockets.connect(f"ws://127.0.0.1:{port_b}/"))
        assert zone.count(CAP_KEY) == 3
        late = [asyncio.create_task(connect(f"ws://127.0.0.1:{port}/", open_timeout=30))
                for port in (port_a, port_b)]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in late), [t.exception() for t in late if t.done()]
        assert a.status()["accepting"] is False and b.status()["accepting"] is False
        await held[0].close()                  # a slot of gateway a's: one of the two waiting gets it
        done, pending = await asyncio.wait(late, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1
        await asyncio.sleep(0.3)
        assert not pending.copy().pop().done()
        assert zone.count(CAP_KEY) == 3
        await held[2].close()                  # one of gateway b's: the other one gets in
        ws = await asyncio.wait_for(pending.pop(), 10)
        await ws.send("late")
        assert await ws.recv() == "late"
        for c in held[1:2] + [ws, done.pop().result()]:
            await c.close()
        await wait_for(lambda: not (a.live or b.live or a.handshakes or b.handshakes), 5, "idle")
        assert zone.count(CAP_KEY) == 0
    finally:
        await a.shutdown(1.0)
        await b.shutdown(1.0)
    assert zone.count(CAP_KEY) == 0 and zone.lease_leaks == 0


async def raw_held(host_from: str, port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host_from, 0))
    return reader, writer


# Far from the cap, uvloop's servers accept (counted at connection_made); near it, the
# gateway's own accept loop (counted at accept()): the cap per address holds in both.
@pytest.mark.parametrize("limits, mode", [("{max-handshakes-per-ip: 4}", "native"),
                                          ("{max-handshakes-per-ip: 4, max-connections: 50}", "own")])
async def test_max_handshakes_per_ip_closes_the_excess_of_one_address_only(
        gateway_factory, echo_backend, limits, mode):
    from fastgw.observe.admin import start_admin
    gw = await gateway_factory(gateway_yaml(
        f"ws://127.0.0.1:{echo_backend}/", extra_top=f"handshake-timeout: 30s\nlimits: {limits}"))
    assert gw.gw._mode == mode
    admin = await start_admin(gw.gw, "127.0.0.1", 0, None)
    try:
        slow = [await raw_held("127.0.0.1", gw.port) for _ in range(4)]   # heads never sent
        await wait_for(lambda: gw.gw.handshakes.by_ip.get("127.0.0.1") == 4, 5, "4 handshakes")
        reader, writer = await raw_held("127.0.0.1", gw.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""            # closed at once
        writer.close()
        # Another address is not affected; the held ones are not either.
        async with websockets.connect(gw.url("/"), local_addr=("127.0.0.2", 0)) as other:
            await other.send("from 127.0.0.2")
            assert await other.recv() == "from 127.0.0.2"
        reads = await asyncio.gather(*(asyncio.wait_for(r.read(1), 0.3) for r, _ in slow),
                                     return_exceptions=True)
        assert all(isinstance(x, TimeoutError) for x in reads), reads
        # Once one of them leaves, that address may start a handshake again.
        slow[0][1].close()
        await wait_for(lambda: gw.gw.handshakes.by_ip.get("127.0.0.1") == 3, 5, "3 handshakes")
        async with websockets.connect(gw.url("/")) as ws:
            await ws.send("again")
            assert await ws.recv() == "again"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{admin.url}/metrics") as r:
                metrics = samples(await r.text())
        assert value(metrics, "fastgw_upgrades_rejected_total", api="", reason="handshake_limit") == 1
        for _, w in slow[1:]:
            w.close()
    finally:
        await admin.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_admin_api_answers_when_the_gateway_holds_every_descriptor(
        gateway_with_admin, echo_backend):
    # No cap: clients that send nothing take the last free descriptor, the spares still held,
    # and no client waits to make accept() fail: the admin API's own accept() finds none.
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                         extra_top="handshake-timeout: 60s\nlimits: {max-connections: 0}"),
                            soft=64, hard=64)
    pid = gp.proc.pid
    raw = []
    while open_fds(pid) < 64:
        before = open_fds(pid)
        raw.append(await asyncio.open_connection("127.0.0.1", gp.port))
        await wait_for(lambda: open_fds(pid) > before, 5, "the gateway to accept")
    assert open_fds(pid) == 64
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gp.admin_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 200
            metrics = samples(await r.text())
        assert value(metrics, "fastgw_accept_errors_total", errno="EMFILE") >= 1
        async with http.get(f"{gp.admin_url}/healthz") as r:
            assert r.status == 200
    for _, w in raw:
        w.close()
    await echoes_later(gp.url("/"))
    assert "Traceback" not in gp.stderr()


async def echoes_later(url: str) -> None:
    ws = await asyncio.wait_for(connect(url, open_timeout=30), 30)
    await ws.send("served")
    assert await ws.recv() == "served"
    await ws.close()


async def test_the_cap_holds_when_uvloop_servers_hand_over_to_the_accept_loop(
        gateway_factory, echo_backend):
    # backlog 16: uvloop's servers accept while more than 2 x 80 places are free, the
    # gateway's accept loop from 80 places before the cap on.
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_top="backlog: 16\nlimits: {max-connections: 200}"))
    assert gw.gw._mode == "native"
    held = [await websockets.connect(gw.url("/")) for _ in range(130)]
    assert gw.gw._mode == "own"
    tasks = [asyncio.create_task(connect(gw.url("/"), open_timeout=30)) for _ in range(80)]
    await wait_for(lambda: sum(t.done() for t in tasks) >= 70, 30, "70 more upgrades")
    await asyncio.sleep(0.5)
    done = [t for t in tasks if t.done()]
    failed = [repr(t.exception()) for t in done if t.exception() is not None]
    assert not failed, failed
    assert len(done) == 70 and len(gw.gw.live) == 200 and gw.gw._mode == "off"
    held += [t.result() for t in done]
    for ws in held[:10]:
        await ws.close()
    await wait_for(lambda: all(t.done() for t in tasks), 30, "the waiting clients")
    held = held[10:] + [t.result() for t in tasks if t not in done]
    for i, ws in enumerate(held):
        await ws.send(f"m{i}")
        assert await ws.recv() == f"m{i}"
    for ws in held:
        await ws.close()
    await gw.wait_idle()
    assert gw.gw._mode == "native"                    # room again: back to uvloop's servers
    await echoes_later(gw.url("/"))


async def test_a_uvloop_server_closed_under_us_is_replaced_by_the_accept_loop(
        gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    assert gw.gw._mode == "native"
    for server in gw.gw.listeners[0].native:
        server.close()                    # as uvloop does after a failed accept()
    await wait_for(lambda: gw.gw._mode == "own", 5, "the accept loop")
    await echoes_later(gw.url("/"))
