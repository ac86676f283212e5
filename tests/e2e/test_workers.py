"""Worker processes (`workers: 2` and `workers: 4`): the limits are exact across them, and a
worker killed with SIGKILL costs its own connections and nothing else.

Real `fastgw run -c FILE` supervisors and their forked workers, the bundled echo backend in
its own process counting its live connections (tests/countecho.py), raw upgrade attempts
written all at once (tests/workerlib.py) and the `websockets` library as client; the admin
API over HTTP on loopback (`/workers`, `/connections` with `worker`, `/metrics`).

Which worker holds a connection: each connection comes from its own loopback address
(127.0.x.y), the `remote` of its /connections row, whose `worker` is the index.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import value
from workerlib import (KEYS, attempts_at_once, backend, gateway_config, start_gateway,  # noqa: F401
                       statuses, worker_of)


def counted(workers: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for w in workers:
        out[w] = out.get(w, 0) + 1
    return dict(sorted(out.items()))


async def open_from(gw, ip: str, client: str = "alice"):
    """A websockets client of `client` from the loopback address ip."""
    return await websockets.connect(gw.url("/"), additional_headers={"X-API-Key": KEYS[client]},
                                    local_addr=(ip, 0), open_timeout=5)


async def echoes(ws, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


async def wait_no_connections(gw, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while rows := await gw.aget("/connections"):
        assert time.monotonic() < deadline, f"connections left: {rows}"
        await asyncio.sleep(0.02)


# ---- limits exact across workers -----------------------------------------------------------


async def test_count_limit_admits_exactly_max_of_100_simultaneous_upgrades_over_4_workers(
        start_gateway, backend):
    gw = start_gateway(gateway_config(backend.port, 4, pre=[
        {"policy": "count-limit", "key": "client-id", "max": 10}]), 4)
    # Every round is exact. Which worker gets there first is the scheduler's choice: a round
    # may see one worker take all 10 (about one in eight here), so rounds go on (5 at most)
    # until one has admitted on more than one worker, the case this test is about.
    splits = []
    while len(splits) < 2 or (all(len(s) == 1 for s in splits) and len(splits) < 5):
        attempts = await attempts_at_once(gw.port, 100, KEYS["alice"])
        try:
            assert statuses(attempts) == {101: 10, 429: 90}, f"round {len(splits) + 1}"
            rows = await gw.aget("/connections?client=alice")
            assert len(rows) == 10
            splits.append(counted([r["worker"] for r in rows]))
            assert (await backend.wait_live(10))["live"] == 10
        finally:
            for a in attempts:
                a.close()
        # All closed: the count is back to 0 (the next round admits 10 again).
        assert (await backend.wait_live(0))["live"] == 0
        await wait_no_connections(gw)
    print(f"the 10 admitted by worker, round by round: {splits}")
    assert any(len(s) > 1 for s in splits), f"all admitted on one worker in every round: {splits}"
    m = gw.metrics()
    assert value(m, "fastgw_upgrades_rejected_total", api="chat", reason="count_limit") == 90 * len(splits)
    assert value(m, "fastgw_connections_total", api="chat") == 10 * len(splits)


async def test_rate_limit_burst_5_admits_exactly_5_of_100_simultaneous_upgrades_over_4_workers(
        start_gateway, backend):
    gw = start_gateway(gateway_config(backend.port, 4, pre=[
        {"policy": "rate-limit", "key": "client-id", "rate": "1/1h", "burst": 5}]), 4)
    # One client per round (its bucket stays empty for the hour), rounds until one has
    # admitted on more than one worker (see the count-limit test), 5 at most.
    splits = []
    for client in KEYS:
        attempts = await attempts_at_once(gw.port, 100, KEYS[client])
        try:
            assert statuses(attempts) == {101: 5, 429: 95}, client
            rows = await gw.aget(f"/connections?client={client}")
            assert len(rows) == 5
            splits.append(counted([r["worker"] for r in rows]))
        finally:
            for a in attempts:
                a.close()
        assert (await backend.wait_live(0))["live"] == 0
        if len(splits[-1]) > 1:
            break
    print(f"the 5 admitted by worker, client by client: {splits}")
    assert len(splits[-1]) > 1, f"all admitted on one worker in every round: {splits}"
    # The bucket stays empty once they are closed: the next attempt is refused too.
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gw.url("/"), additional_headers={"X-API-Key": KEYS["alice"]},
                                 open_timeout=5)
    assert info.value.response.status_code == 429
    assert "Retry-After" in info.value.response.headers


async def test_client_scoped_message_rate_limit_is_shared_by_connections_on_different_workers(
        start_gateway, backend):
    burst = 8
    gw = start_gateway(gateway_config(backend.port, 4, request=[
        {"policy": "message-rate-limit", "name": "shared", "messages": "1/1h", "burst": burst,
         "scope": "client", "action": "reject"}]), 4)
    # Connections of alice until they are on three workers (12 at most).
    clients: dict[str, object] = {}
    workers: dict[str, int] = {}
    for i in range(1, 13):
        ip = f"127.0.2.{i}"
        clients[ip] = await open_from(gw, ip)
        workers = worker_of(await gw.aget("/connections?client=alice"))
        if len(set(workers.values())) >= 3:
            break
    try:
        assert len(set(workers.values())) >= 2, f"all on one worker: {workers}"
        print(f"alice's connections by worker: {counted(list(workers.values()))}")
        # One connection per worker, taken in turn: consecutive messages on different workers.
        by_worker: dict[int, str] = {}
        for ip, w in workers.items():
            by_worker.setdefault(w, ip)
        order = [clients[ip] for ip in by_worker.values()]
        for n in range(burst):
            await echoes(order[n % len(order)], f"m{n}")
        # The next message, on the next worker in turn, finds the shared budget empty.
        over = order[burst % len(order)]
        await over.send("one too many")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(over.recv(), 5)
        assert (over.close_code, over.close_reason) == (1008, "message rate limit exceeded: shared")
        # And so does one more on yet another worker.
        other = order[(burst + 1) % len(order)]
        await other.send("and another")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(other.recv(), 5)
        assert other.close_code == 1008
    finally:
        for ws in clients.values():
            await ws.close()
    m = gw.metrics()
    assert value(m, "fastgw_messages_limited_total", api="chat", direction="request", action="reject") == 2
    assert value(m, "fastgw_messages_total", api="chat", direction="response") == burst


# ---- a worker killed -----------------------------------------------------------------------


COUNTERS = ("fastgw_connections_total", "fastgw_messages_total")


async def test_sigkill_of_a_worker_ends_its_connections_only_and_releases_its_slots_at_once(
        start_gateway, backend):
    mx = 6
    gw = start_gateway(gateway_config(backend.port, 2, pre=[
        {"policy": "count-limit", "key": "client-id", "max": mx}]), 2)
    clients: dict[str, object] = {}
    n_ip = 0

    def next_ip() -> str:
        nonlocal n_ip
        n_ip += 1
        return f"127.0.3.{n_ip}"

    async def where() -> dict[str, int]:
        return {ip: w for ip, w in worker_of(await gw.aget("/connections?client=alice")).items()
                if ip in clients}

    # alice at her max, at least two connections on each worker.
    for _ in range(60):
        if len(clients) < mx:
            ip = next_ip()
            try:
                clients[ip] = await open_from(gw, ip)
            except InvalidStatus:             # a slot given back a moment ago: not yet free
                await asyncio.sleep(0.02)
            continue
        split = counted(list((held := await where()).values()))
        if len(split) == 2 and min(split.values()) >= 2:
            break
        busiest = max(split, key=split.get)
        ip = next(ip for ip, w in held.items() if w == busiest)
        await clients.pop(ip).close()
    held = await where()
    assert len(held) == mx and min(counted(list(held.values())).values()) >= 2, held
    for ip, ws in clients.items():
        await echoes(ws, f"before {ip}")

    pids = gw.pids()
    victim = held[next(iter(held))]
    doomed = [clients[ip] for ip, w in held.items() if w == victim]
    spared = [clients[ip] for ip, w in held.items() if w != victim]
    before = gw.metrics()
    t0 = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)

    # Its clients see their connections end (no close frame: the process is gone).
    for ws in doomed:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 2)
    t_ended = time.monotonic() - t0

    # Its slots come back: alice is admitted up to her max again, and not one more.
    readmitted = []
    while len(readmitted) < len(doomed):
        assert time.monotonic() - t0 < 3, f"{len(readmitted)} of {len(doomed)} slots back after 3 s"
        ip = next_ip()
        try:
            clients[ip] = await open_from(gw, ip)
            readmitted.append(ip)
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            await asyncio.sleep(0.01)
    t_released = time.monotonic() - t0
    with pytest.raises(InvalidStatus) as info:
        await open_from(gw, next_ip())
    assert info.value.response.status_code == 429

    # A new worker at the victim's index serves new upgrades (bob's: alice is at her max).
    new_pids = gw.wait_workers(2, timeout=3, changed_from={victim: pids[victim]})
    t_replaced = time.monotonic() - t0
    t_served = None
    for _ in range(40):
        if victim in (await where()).values():
            t_served = time.monotonic() - t0
            break
        ip = next_ip()
        clients[ip] = await open_from(gw, ip, "bob")
        if worker_of(await gw.aget("/connections?client=bob")).get(ip) == victim:
            t_served = time.monotonic() - t0
            break
    print(f"SIGKILL of worker {victim} (pid {pids[victim]} -> {new_pids[victim]}): its "
          f"{len(doomed)} connections ended after {t_ended * 1e3:.0f} ms, slots back after "
          f"{t_released * 1e3:.0f} ms, new pid listed after {t_replaced * 1e3:.0f} ms, "
          f"an upgrade served by it after {t_served and t_served * 1e3:.0f} ms")
    assert t_released < 1.0, f"the slots came back after {t_released:.2f} s"
    assert t_served is not None and t_served < 1.0, f"the new worker served after {t_served} s"

    # The other worker's connections are untouched.
    for ws in spared:
        await echoes(ws, "still here")

    # The counters did not go down.
    after = gw.metrics()
    for (name, labels), v in before.items():
        if name in COUNTERS:
            assert after.get((name, labels), 0.0) >= v, f"{name}{dict(labels)}: {v} -> {after.get((name, labels))}"
    assert value(after, "fastgw_connections_total", api="chat") >= value(before, "fastgw_connections_total", api="chat") + len(readmitted)
    assert value(after, "fastgw_worker_restarts_total", reason="signal") == 1
    assert value(after, "fastgw_workers") == 2
    for ws in clients.values():
        await ws.close()
