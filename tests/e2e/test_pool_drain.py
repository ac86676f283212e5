"""Draining a target of a pool for a deploy (issue 12): its live connections closed with 1001
"backend draining" spread over the grace, no new connection on it meanwhile, each client's
reconnect on the rest of the pool, and enable bringing it back. Real loopback sockets: a
`fastgw run` process with its admin API, two counting echo backends in their own processes
(tests/countecho.py) that count from outside the gateway what reached each; and gateways in
this process for the drain's schedule itself (replaced, cancelled, a late dial, shutdown)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from conftest import gateway_yaml
from fastgw.observe.events import TargetDrainEvent
from wire import (CLOSE, TEXT, accept_upgrade, close_payload, frame, free_port, open_ws,
                  read_close, read_frame)
from workerlib import CountingBackend, Events

N = 300
GRACE = 3.0


@pytest.fixture(scope="module")
def pair():
    """Two counting echo backends, A and B (one process each) for the module."""
    a, b = CountingBackend(), CountingBackend()
    yield a, b
    a.stop()
    b.stop()


def pool_yaml(a: int, b: int, *, extra: str = "") -> str:
    return ("listeners:\n  - {host: 127.0.0.1, port: 0}\n"
            "limits: {max-handshakes-per-ip: 0}\n" + extra +
            "apis:\n  - name: chat\n    path: /\n    assembly:\n"
            "      - policy: websocket-upgrade\n        targets:\n"
            f"          - url: ws://127.0.0.1:{a}/\n          - url: ws://127.0.0.1:{b}/\n")


async def post(http, url: str) -> tuple[int, dict]:
    async with http.post(url) as r:
        return r.status, await r.json()


async def get_json(http, url: str):
    async with http.get(url) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


def by_target(rows: list[dict]) -> dict[str, dict]:
    return {r["target"]: r for r in rows}


async def open_many(port: int, n: int, at_once: int = 50) -> list:
    gate = asyncio.Semaphore(at_once)

    async def one():
        async with gate:
            return await open_ws(port)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def closed_then_reconnect(reader, writer, port: int, t0: float):
    """Wait for the gateway's CLOSE (its time since t0, code, reason), answer it, reconnect."""
    f, _ = await read_close(reader, timeout=GRACE + 3)
    at = time.monotonic() - t0
    code, reason = f.close
    writer.write(frame(CLOSE, close_payload(code)))
    writer.close()
    again = await open_ws(port)
    return at, code, reason, again


def most_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_drain_300_connections_spread_over_the_grace_reconnect_to_b_enable_brings_a_back(
        gateway_with_admin, pair):
    a, b = pair
    ta, tb = f"ws://127.0.0.1:{a.port}/", f"ws://127.0.0.1:{b.port}/"
    gp = gateway_with_admin(pool_yaml(a.port, b.port))
    base_a, base_b = a.stats()["total"], b.stats()["total"]
    api = gp.admin_url
    clients, again = [], []
    async with aiohttp.ClientSession() as http:
        try:
            # All 300 on A: B drained (grace 0, nothing to close) while they connect.
            status, view = await post(http, f"{api}/targets/drain?api=chat&target={tb}&grace=0")
            assert status == 200 and view["state"] == "draining" and view["target"] == tb
            clients = await open_many(gp.port, N)
            assert (await a.wait_live(N))["live"] == N
            status, view = await post(http, f"{api}/targets/enable?api=chat&target={tb}")
            assert status == 200 and view["state"] == "healthy"
            rows = await get_json(http, f"{api}/connections")
            assert len(rows) == N and {r["target"] for r in rows} == {ta}

            # Drain A over 3 s; each client reconnects once closed.
            t0 = time.monotonic()
            waits = [asyncio.ensure_future(closed_then_reconnect(r, w, gp.port, t0))
                     for r, w in clients]
            status, view = await post(http, f"{api}/targets/drain?api=chat&target={ta}&grace={GRACE}")
            assert status == 200, view
            assert view["state"] == "draining" and view["connections"] > N * 0.9
            seen = []
            for at in (1.0, 2.0):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                seen.append(by_target((await get_json(http, f"{api}/targets"))["targets"]))
            results = await asyncio.gather(*waits)
            again = [r[3] for r in results]
            times = [r[0] for r in results]

            assert {(code, reason) for _, code, reason, _ in results} == {(1001, b"backend draining")}
            assert max(times) <= GRACE + 0.5, max(times)
            widest = most_in_window(times, 0.5)
            assert widest <= N // 2, widest
            assert min(times) < 0.5 and max(times) > GRACE - 0.5    # spread, not at once
            print(f"closes: first {min(times):.3f} s, last {max(times):.3f} s, "
                  f"most in a 0.5 s window {widest} of {N}")
            # /targets during the drain: A draining, its live count going down.
            one, two = seen[0][ta], seen[1][ta]
            assert one["state"] == two["state"] == "draining"
            assert N > one["connections"] > two["connections"], (one, two)
            assert seen[1][tb]["state"] == "healthy" and seen[1][tb]["connections"] > 0

            # No new connection on A during the drain; every reconnect on B.
            sa, sb = a.stats(), b.stats()
            assert sa["total"] - base_a == N and sa["live"] == 0, sa
            assert sb["total"] - base_b == N and sb["live"] == N, sb
            rows = await get_json(http, f"{api}/connections")
            assert len(rows) == N and {r["target"] for r in rows} == {tb}
            after = by_target((await get_json(http, f"{api}/targets"))["targets"])
            assert after[ta]["state"] == "draining" and after[ta]["connections"] == 0
            assert after[tb]["connections"] == N

            # Enable: A is back, and (least-connections) the next ones go to it.
            status, view = await post(http, f"{api}/targets/enable?api=chat&target={ta}")
            assert status == 200 and view["state"] == "healthy" and view["up"] is True
            more = await open_many(gp.port, 20)
            again += more
            assert (await a.wait_live(20))["live"] == 20
            assert b.stats()["live"] == N
        finally:
            for _, w in [*clients, *again]:
                w.close()
    assert (await a.wait_live(0))["live"] == 0 and (await b.wait_live(0))["live"] == 0
    err = gp.stderr()
    assert f"target {ta} draining: {N} connections closed with 1001 over 3s" in err
    assert f"target {ta} enabled" in err
    assert "Traceback" not in err


# ---- the drain's schedule, in this process ----------------------------------------------------


@pytest.fixture
async def echo_pair():
    """Two bundled echo backends on this loop; yields (port A, port B)."""
    from fastgw.echo import close_connections, serve, server_port
    servers = [await serve("127.0.0.1", 0) for _ in range(2)]
    yield tuple(server_port(s) for s in servers)
    for s in servers:
        close_connections(s)
        s.close()


async def on_a(rg, a: int, b: int, n: int) -> list:
    """n live connections, all on A (B drained at once while they connect, then enabled)."""
    gw = rg.gw
    gw.drain_target("chat", f"ws://127.0.0.1:{b}/", 0)
    clients = [await open_ws(rg.port) for _ in range(n)]
    gw.enable_target("chat", f"ws://127.0.0.1:{b}/")
    assert {c.target.label for c in gw.live.values()} == {f"ws://127.0.0.1:{a}/"}
    assert len(gw.live) == n
    return clients


async def closes(clients, timeout: float) -> list:
    """(code, reason) of each client's CLOSE, or None when none came within `timeout`."""
    async def one(reader, writer):
        try:
            code, reason = (await read_close(reader, timeout))[0].close
        except (TimeoutError, asyncio.TimeoutError):
            return None
        writer.write(frame(CLOSE, close_payload(code)))      # the client's answer
        return code, reason
    return list(await asyncio.gather(*(one(r, w) for r, w in clients)))


def close_all(clients) -> None:
    for _, w in clients:
        w.close()


async def test_a_second_drain_replaces_the_first_schedule(gateway_factory, echo_pair):
    a, b = echo_pair
    rg = await gateway_factory(pool_yaml(a, b))
    clients = await on_a(rg, a, b, 10)
    events = rg.gw.events = Events()
    try:
        rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 60)     # one now, the next in 6 s
        got = await closes(clients, 0.3)
        assert got.count((1001, b"backend draining")) == 1 and got.count(None) == 9
        t0 = time.monotonic()
        view = rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 0.5)
        assert view["state"] == "draining"
        rest = [c for c, g in zip(clients, got) if g is None]
        assert await closes(rest, 2.0) == [(1001, b"backend draining")] * 9
        assert time.monotonic() - t0 < 1.0
        drains = events.of(TargetDrainEvent)
        assert [(e.api, e.target, e.grace_s) for e in drains] == [
            ("chat", f"ws://127.0.0.1:{a}/", 60.0), ("chat", f"ws://127.0.0.1:{a}/", 0.5)]
        assert drains[0].connections == 10 and drains[1].connections == 9
    finally:
        close_all(clients)


async def test_enable_cancels_the_closes_still_pending_and_the_rest_stay_live(
        gateway_factory, echo_pair):
    from fastgw.observe.events import TargetUpEvent
    a, b = echo_pair
    rg = await gateway_factory(pool_yaml(a, b))
    clients = await on_a(rg, a, b, 10)
    events = rg.gw.events = Events()
    try:
        rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 20)     # one close every 2 s
        got = await closes(clients, 0.3)
        assert got.count(None) == 9
        view = rg.gw.enable_target("chat", f"ws://127.0.0.1:{a}/")
        assert view["state"] == "healthy" and view["connections"] in (9, 10)
        assert not rg.gw._target_drains
        assert [(e.target, e.reason) for e in events.of(TargetUpEvent)] == [
            (f"ws://127.0.0.1:{a}/", "enable")]
        rest = [c for c, g in zip(clients, got) if g is None]
        assert await closes(rest, 2.5) == [None] * 9         # past the next one's due time
        for reader, writer in rest:                          # and they still relay
            writer.write(frame(TEXT, b"still here"))
            f = await read_frame(reader)
            assert f.payload == b"still here"
    finally:
        close_all(clients)


async def test_grace_0_closes_every_connection_at_once(gateway_factory, echo_pair):
    a, b = echo_pair
    rg = await gateway_factory(pool_yaml(a, b))
    clients = await on_a(rg, a, b, 20)
    try:
        rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 0)
        assert not rg.gw._target_drains                      # nothing left to schedule
        assert await closes(clients, 1.0) == [(1001, b"backend draining")] * 20
    finally:
        close_all(clients)


async def test_a_connection_dialled_before_the_drain_is_closed_as_it_attaches(gateway_factory):
    """A's 101 comes after the drain began: the client gets its 101, then 1001 at once."""
    go = asyncio.Event()
    held = []

    async def slow_backend(reader, writer):
        held.append(writer)
        await go.wait()
        await accept_upgrade(reader, writer)

    server = await asyncio.start_server(slow_backend, "127.0.0.1", 0)
    a = server.sockets[0].getsockname()[1]
    rg = await gateway_factory(pool_yaml(a, free_port()))
    b_url = rg.gw.pools["chat"].targets[1].url
    rg.gw.drain_target("chat", b_url, 0)                     # only A is left
    try:
        opening = asyncio.ensure_future(open_ws(rg.port))
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:     # the dial reached A
            await asyncio.sleep(0.01)
        assert held
        rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 5)
        go.set()
        reader, writer = await asyncio.wait_for(opening, 5)
        try:
            assert await closes([(reader, writer)], 1.0) == [(1001, b"backend draining")]
        finally:
            writer.close()
    finally:
        for w in held:
            w.close()
        server.close()


async def test_the_gateways_drain_cancels_a_targets_drain(gateway_factory, echo_pair):
    a, b = echo_pair
    rg = await gateway_factory(pool_yaml(a, b))
    clients = await on_a(rg, a, b, 5)
    try:
        rg.gw.drain_target("chat", f"ws://127.0.0.1:{a}/", 30)
        assert rg.gw._target_drains
        await rg.gw.drain(2.0)
        got = await closes(clients, 2.0)
        assert not rg.gw._target_drains
        assert got[0] == (1001, b"backend draining")
        assert got[1:] == [(1001, b"gateway shutting down")] * 4
    finally:
        close_all(clients)
