"""Ends of life: lost legs, early frames, idle and lifetime limits, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import struct
import time

import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml
from wire import frame, read_close_code, read_frame, read_head, upgrade_request


async def test_backend_lost_without_close_gives_1014(gateway_factory):
    async def vanish(conn):
        await conn.recv()
        conn.transport.abort()          # no close frame

    async with ws_serve(vanish, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gw.url("/")) as ws:
            await ws.send("bye")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1014


async def test_client_lost_without_close_gives_backend_1001(gateway_factory):
    seen = asyncio.get_running_loop().create_future()

    async def handler(conn):
        try:
            async for _ in conn:
                pass
        finally:
            seen.set_result((conn.close_code, conn.close_reason))

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(upgrade_request())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.transport.abort()
        code, reason = await asyncio.wait_for(seen, 5)
        assert code == 1001
        assert "client" in reason


async def test_frames_in_the_same_packet_as_the_request(gateway):
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    frames = b"".join(frame(0x1, f"early {i}".encode()) for i in range(20))
    writer.write(upgrade_request() + frames)
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 101")
    for i in range(20):
        f = await read_frame(reader)
        assert (f.fin, f.rsv, f.opcode, f.payload) == (True, 0, 0x1, f"early {i}".encode())
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    assert await read_close_code(reader) == 1000
    writer.close()


async def test_idle_timeout_closes_1001(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_upgrade="idle-timeout: 400ms"))
    async with websockets.connect(gw.url("/")) as ws:
        t0 = time.monotonic()
        for _ in range(3):                      # activity keeps it open (10 ticks in simulated
            await asyncio.sleep(0.2)            # time: test_simulated_time.py)
            await ws.send("tick")
            assert await ws.recv() == "tick"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        elapsed = time.monotonic() - t0
    assert ws.close_code == 1001
    assert ws.close_reason == "idle timeout"
    assert elapsed >= 0.6 + 0.4


async def test_max_lifetime_closes_1001(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_upgrade="max-lifetime: 300ms"))
    async with websockets.connect(gw.url("/")) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.send("x")
                await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1001
    assert ws.close_reason == "max lifetime reached"


async def test_sigterm_drains_with_1001_and_exits_cleanly(gateway_process, echo_backend):
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_top="drain-time: 3s"))
    conns = [await websockets.connect(gp.url("/")) for _ in range(5)]
    for ws in conns:
        await ws.send("before")
        assert await ws.recv() == "before"
    t0 = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)
    for ws in conns:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
        assert ws.close_reason == "gateway shutting down"
    rc = await asyncio.get_running_loop().run_in_executor(None, gp.proc.wait, 10)
    assert rc == 0
    assert time.monotonic() - t0 < 3.5
    err = gp.stderr()
    assert "Traceback" not in err
    assert "fastgw: stopped" in err
    with pytest.raises(OSError):
        await websockets.connect(gp.url("/"), open_timeout=2)


async def test_drain_time_cuts_connections_that_do_not_close(gateway_process, echo_backend):
    # A raw client that never answers the gateway's close: the drain time bounds the exit.
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_top="drain-time: 1s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gp.port)
    writer.write(upgrade_request())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    t0 = time.monotonic()
    gp.proc.send_signal(signal.SIGINT)
    assert await read_close_code(reader) == 1001
    rc = await asyncio.get_running_loop().run_in_executor(None, gp.proc.wait, 10)
    assert rc == 0
    assert 0.9 < time.monotonic() - t0 < 2.5
    assert "Traceback" not in gp.stderr()
    assert await asyncio.wait_for(reader.read(), 2) == b""     # the gateway cut the connection
    writer.close()


async def test_backend_that_speaks_and_closes_at_once(gateway_factory):
    async def quick(conn):
        await conn.send("first and last")
        await conn.close(4000, "quick")

    async with ws_serve(quick, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        for _ in range(20):
            async with websockets.connect(gw.url("/")) as ws:
                assert await asyncio.wait_for(ws.recv(), 5) == "first and last"
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
            assert (ws.close_code, ws.close_reason) == (4000, "quick")
