"""Bounded memory under a slow consumer, and many concurrent connections."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve

from conftest import gateway_yaml
from wire import read_frame, upgrade_request

CHUNK = 64 * 1024
TOTAL = 200 * 1024 * 1024


async def test_slow_consumer_memory_bounded_and_nothing_lost(gateway_process):
    async def flood(conn):
        block = bytes(range(256)) * (CHUNK // 256)
        for i in range(TOTAL // CHUNK):
            await conn.send(struct.pack("!Q", i) + block[8:])
        await conn.close(1000, "done")

    async with ws_serve(flood, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", gp.port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        import socket as socketmod
        sock.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF, 128 * 1024)
        writer.write(upgrade_request())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        idle = gp.rss_kib()
        # Stop reading for a while: the backend keeps trying to send.
        peak = idle
        for _ in range(30):
            await asyncio.sleep(0.1)
            peak = max(peak, gp.rss_kib())
        # Read everything, in order, watching the gateway's memory.
        expected = 0
        last_check = time.monotonic()
        while True:
            f = await read_frame(reader, 30)
            op, payload = f.opcode, f.payload
            if op == 0x8:
                assert struct.unpack("!H", payload[:2])[0] == 1000
                break
            assert op == 0x2
            assert len(payload) == CHUNK
            assert struct.unpack("!Q", payload[:8])[0] == expected
            expected += 1
            if time.monotonic() - last_check > 0.05:
                peak = max(peak, gp.rss_kib())
                last_check = time.monotonic()
        assert expected * CHUNK == TOTAL
        writer.close()
        print(f"gateway RSS: idle {idle / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")
        assert peak - idle < 64 * 1024, f"gateway RSS grew by {(peak - idle) / 1024:.1f} MiB"
        deadline = time.monotonic() + 5
        while gp.status()["active"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gp.status()["active"] == 0


async def test_thousand_connections_hundred_messages_each(gateway_process, echo_backend):
    # 1,000 clients of one address at once: more than max-handshakes-per-ip lets in.
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                      extra_top="limits: {max-handshakes-per-ip: 0}"))
    listening = gp.socket_count()
    n_conn, n_msg = 1000, 100

    async def one(c: int):
        async with websockets.connect(gp.url("/"), open_timeout=60, compression=None) as ws:
            for m in range(n_msg):
                await ws.send(f"{c}:{m}")
            got = [await ws.recv() for _ in range(n_msg)]
            assert got == [f"{c}:{m}" for m in range(n_msg)]
            return len(got)

    results = await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(n_conn))), 180)
    assert sum(results) == n_conn * n_msg
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (gp.status()["active"] or gp.socket_count() > listening):
        await asyncio.sleep(0.1)
    status = gp.status()
    assert status["accepted"] == n_conn
    assert status["active"] == 0 and status["handshakes"] == 0
    assert gp.socket_count() == listening, "the gateway still holds sockets"


async def test_backend_that_stops_reading_holds_the_client_back(gateway_process):
    """Backpressure in the request flow: a client flooding a backend that reads slowly."""
    received = []
    go = asyncio.Event()

    async def slow_reader(conn):
        await go.wait()                      # read nothing for a while
        async for msg in conn:
            received.append(struct.unpack("!Q", msg[:8])[0])
            if len(received) == TOTAL_REQ // CHUNK:
                await conn.close(1000, "got all")

    async with ws_serve(slow_reader, "127.0.0.1", 0, max_size=None, max_queue=4) as server:
        port = server.sockets[0].getsockname()[1]
        gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gp.url("/"), max_size=None, compression=None,
                                      write_limit=256 * 1024) as ws:
            idle = gp.rss_kib()
            block = bytes(CHUNK - 8)
            sent = 0

            async def sender():
                nonlocal sent
                for i in range(TOTAL_REQ // CHUNK):
                    await ws.send(struct.pack("!Q", i) + block)
                    sent += 1

            task = asyncio.create_task(sender())
            peak = idle
            for _ in range(20):
                await asyncio.sleep(0.1)
                peak = max(peak, gp.rss_kib())
            stalled_at = sent
            assert stalled_at < TOTAL_REQ // CHUNK, "the client was never held back"
            go.set()
            await asyncio.wait_for(task, 60)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
            peak = max(peak, gp.rss_kib())
        assert ws.close_code == 1000
        assert received == list(range(TOTAL_REQ // CHUNK))
        assert peak - idle < 64 * 1024, f"gateway RSS grew by {(peak - idle) / 1024:.1f} MiB"


TOTAL_REQ = 64 * 1024 * 1024
