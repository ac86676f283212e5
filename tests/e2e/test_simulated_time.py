"""Time limits of a relayed connection in simulated time: the gateway is given a SimClock,
the test moves it, and the connection ends at the simulated instant its limit falls due
(no sleeping; real sockets on 127.0.0.1, the `websockets` library as client).

One real-time end-to-end test of each limit stays (test_lifecycle.py, test_policies.py).
"""

from __future__ import annotations

import asyncio
import gc

import jwt
import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

import wire
from conftest import RunningGateway, gateway_yaml
from fastgw import config as cfgmod
from fastgw.clock import SimClock
from fastgw.gateway import Gateway

pytestmark = pytest.mark.both_loops

SECRET = "fastgw-test-secret-of-at-least-32-bytes!"


@pytest.fixture
async def sim_gateway():
    """Start gateways on a SimClock from YAML text; each must end with an empty table."""
    started: list[tuple[RunningGateway, SimClock]] = []

    async def start(yaml_text: str) -> tuple[RunningGateway, SimClock]:
        clock = SimClock()
        gw = Gateway(cfgmod.loads(yaml_text, "yaml", "test.yaml"), clock=clock)
        await gw.start()
        started.append((RunningGateway(gw), clock))
        return started[-1]

    yield start
    for rg, clock in started:
        await rg.wait_idle()
        live = [c.describe() for c in rg.gw.live.values()]
        slots = rg.gw.zone.counts_used()
        task = asyncio.ensure_future(rg.gw.shutdown(1.0))
        while not task.done():           # the drain's grace is the clock's too
            await asyncio.sleep(0.01)
            clock.advance(0.1)
        await task
        gc.collect()
        assert not live, f"connections left in the table: {live}"
        assert slots == 0, f"{slots} connection-limit slots still held"


def only_relay(gw: RunningGateway):
    (conn,) = gw.gw.live.values()
    return conn.relay


async def closed(ws, timeout: float = 5.0) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


async def test_idle_timeout_in_simulated_time(sim_gateway, echo_backend):
    gw, clock = await sim_gateway(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                               extra_upgrade="idle-timeout: 400ms"))
    async with websockets.connect(gw.url("/")) as ws:
        relay = only_relay(gw)
        for _ in range(10):                     # activity keeps it open: 2 s in all
            clock.advance(0.2)
            await ws.send("tick")
            assert await ws.recv() == "tick"
            assert relay.end_side is None
        clock.advance(0.2)                      # its last activity is seen
        last = clock.now()
        clock.advance(0.3)
        assert relay.end_side is None           # 0.3 s idle: not yet
        clock.advance(0.2)
        assert (relay.end_code, relay.end_reason) == (1001, b"idle timeout")
        assert 0.4 <= clock.now() - last <= 0.5
        assert await closed(ws) == (1001, "idle timeout")


async def test_max_lifetime_in_simulated_time(sim_gateway, echo_backend):
    gw, clock = await sim_gateway(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                               extra_upgrade="max-lifetime: 1h"))
    async with websockets.connect(gw.url("/")) as ws:
        relay = only_relay(gw)
        clock.advance(3599.0)
        await ws.send("still here")             # activity does not extend a lifetime
        assert await ws.recv() == "still here"
        clock.advance(0.9)
        assert relay.end_side is None
        clock.advance(0.2)
        assert (relay.end_code, relay.end_reason) == (1001, b"max lifetime reached")
        assert await closed(ws) == (1001, "max lifetime reached")


async def test_jwt_close_on_expiry_in_simulated_time(sim_gateway, monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_SECRET", SECRET)
    backend_close = asyncio.get_running_loop().create_future()

    async def handler(conn):
        async for message in conn:
            await conn.send(message)
        backend_close.set_result(conn.close_code)

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw, clock = await sim_gateway(gateway_yaml(f"ws://127.0.0.1:{port}/", extra_top="", name="test")
                                      .replace("    assembly:\n", "    assembly:\n"
                                               "      - policy: jwt\n        algorithms: [HS256]\n"
                                               "        secret-env: FASTGW_TEST_SECRET\n"
                                               "        close-on-expiry: true\n", 1))
        # A token valid for 90 s of the gateway's (simulated) wall clock.
        token = jwt.encode({"sub": "jwt-user", "exp": clock.wall() + 90}, SECRET, algorithm="HS256")
        async with websockets.connect(gw.url("/"), additional_headers={
                "Authorization": f"Bearer {token}"}) as ws:
            relay = only_relay(gw)
            await ws.send("before")
            assert await ws.recv() == "before"
            clock.advance(89.5)
            assert relay.end_side is None
            clock.advance(1.0)
            assert (relay.end_code, relay.end_reason) == (1008, b"token expired")
            assert await closed(ws) == (1008, "token expired")
        assert await asyncio.wait_for(backend_close, 5) == 1001
        await gw.wait_idle()
        # Expired by the gateway's clock: refused (401) at the upgrade.
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(gw.url("/"), additional_headers={
                    "Authorization": f"Bearer {token}"}):
                pass
        assert info.value.response.status_code == 401


async def test_handshake_timeout_in_simulated_time(sim_gateway, echo_backend):
    gw, clock = await sim_gateway(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                               extra_top="handshake-timeout: 5s"))
    reader, writer = await wire.connect(gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")          # a head that never ends
    await asyncio.sleep(0.05)
    clock.advance(4.9)
    assert len(gw.gw.handshakes) == 1
    clock.advance(0.2)
    assert wire.status_of(await asyncio.wait_for(reader.read(), 5)) == 408
    assert gw.gw.refused == {408: 1}
    assert gw.gw.metrics.rejected_unrouted["timeout"] == 1
    writer.close()


async def test_client_liveness_in_simulated_time(sim_gateway):
    """A client that answers nothing: pinged after the interval, gone after the timeout;
    the backend gets 1001 "client ping timeout"."""
    backend_close = asyncio.get_running_loop().create_future()

    async def handler(conn):
        async for _ in conn:
            pass
        backend_close.set_result((conn.close_code, conn.close_reason))

    async with ws_serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        gw, clock = await sim_gateway(gateway_yaml(
            f"ws://127.0.0.1:{port}/",
            extra_upgrade="ping-interval: {client: 30s}\nping-timeout: {client: 10s}"))
        reader, writer = await wire.open_ws(gw.port)     # a raw client: it never answers a PING
        relay = only_relay(gw)
        clock.advance(30.0)                  # the first look: what it has read so far
        clock.advance(29.9)
        assert relay.end_side is None
        clock.advance(0.2)                   # 30 s of silence since: a PING
        ping = await wire.read_frame(reader)
        assert (ping.opcode, ping.payload) == (wire.PING, b"fastgw liveness")
        clock.advance(9.8)
        assert relay.end_side is None
        clock.advance(0.3)                   # no answer within 10 s: gone
        assert relay.end_side == "gateway"
        assert await asyncio.wait_for(backend_close, 5) == (1001, "client ping timeout")
        await wire.expect_eof(reader)                  # cut, no close frame
        writer.close()


async def test_drain_grace_in_simulated_time(sim_gateway, echo_backend):
    """A drain closes live connections with 1001 and cuts, when its grace is over, those
    whose client does not answer the close."""
    gw, clock = await sim_gateway(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    reader, writer = await wire.open_ws(gw.port)         # a raw client: it never answers the CLOSE
    await gw.gw.drain(3.0)                   # shorter than the close timeout (5 s)
    assert (await wire.read_frame(reader)).close[0] == 1001
    await asyncio.sleep(0.05)
    clock.advance(2.9)
    await asyncio.sleep(0.05)
    assert len(gw.gw.live) == 1              # the grace is not over
    clock.advance(0.2)
    await wire.expect_eof(reader)                      # cut
    await gw.wait_idle()
    assert not gw.gw.live
    writer.close()
