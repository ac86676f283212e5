"""Frames the gateway writes itself (PONGs) are bounded like relayed data: a peer
that floods pings and never reads stops being read, only its latest PING is owed
an answer, and a flood past the cap ends with 1008 "control frame flood". The
gateway's memory stays bounded and comes back after the burst (issue 9, defect 1)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest
import websockets

from conftest import gateway_yaml
from wire import CLOSE, PING, PONG, accept_upgrade, frame, read_frame, split_frames, upgrade_request


async def flood_pings(writer, total: int, frame: bytes, stall: float = 1.5) -> int:
    """Write ping frames until `total` bytes or until the gateway stops reading
    (a drain that does not finish within `stall` seconds). Returns bytes written."""
    batch = frame * (65536 // len(frame))
    sent = 0
    while sent < total:
        writer.write(batch)
        try:
            await asyncio.wait_for(writer.drain(), stall)
        except (TimeoutError, ConnectionError):
            break
        sent += len(batch)
    return sent


async def read_until_close(reader, timeout: float = 10.0):
    """Read fast (in bulk) until a CLOSE: (pongs read, close code, close reason),
    or (pongs, None, None) on EOF, reset or timeout."""
    pongs = 0
    buf = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(1 << 20), deadline - time.monotonic())
            if not chunk:
                break
            buf += chunk
            for f in split_frames(buf):
                if f.opcode == PONG:
                    pongs += 1
                elif f.opcode == CLOSE:
                    code, reason = f.close
                    return pongs, code, reason.decode()
    except (ConnectionError, TimeoutError):
        pass
    return pongs, None, None


async def _flooding_client(gp, rcvbuf: int = 64 * 1024):
    """An upgraded raw connection with a small receive buffer (and a small reader limit)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gp.port, limit=16 * 1024)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    writer.write(upgrade_request())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def _flood_watching_memory(gp, writer, frame):
    idle = gp.rss_kib()
    peak = idle

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, gp.rss_kib())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    # Before the fix, 131 MB of pings grew the gateway by 112 MB.
    sent = await flood_pings(writer, 64 * 1024 * 1024, frame)
    watcher.cancel()
    assert peak - idle < 24 * 1024, f"gateway grew by {(peak - idle) // 1024} MiB ({sent >> 20} MiB of pings sent)"
    return idle, sent


async def _other_clients_unharmed(gp):
    async with websockets.connect(gp.url("/")) as ws:
        await ws.send("unharmed")
        assert await ws.recv() == "unharmed"


async def _memory_comes_back(gp, idle):
    deadline = time.monotonic() + 10
    while (gp.rss_kib() - idle > 10 * 1024 or gp.status()["active"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert gp.rss_kib() - idle <= 10 * 1024
    assert gp.status()["active"] == 0


@pytest.mark.parametrize("payload", [b"", b"p" * 125])
async def test_ping_flood_from_a_client_that_never_reads(gateway_process, echo_backend, payload):
    """The gateway stops reading a client whose PONGs cannot be written (its writes
    stall), or closes it with 1008 when a read brought a flood of pings; either
    way its memory stays bounded, comes back, and other clients are served."""
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    reader, writer = await _flooding_client(gp)
    idle, sent = await _flood_watching_memory(gp, writer, frame(PING, payload))
    await _other_clients_unharmed(gp)
    pongs, code, reason = await read_until_close(reader, timeout=3)
    assert pongs > 0
    assert sent < 64 * 1024 * 1024 or (code, reason) == (1008, "control frame flood")
    writer.close()
    await _memory_comes_back(gp, idle)


async def _fill_the_way_back(gw, writer, n_mib: int = 8) -> None:
    """Have the echo of n MiB pile up toward a client that does not read, until
    the gateway stops reading the backend (the client's transport is full)."""
    big = os.urandom(1 << 20)
    for _ in range(n_mib):
        writer.write(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", len(big)) + b"\0\0\0\0" + big)
    await writer.drain()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conns = list(gw.gw.live.values())
        if conns and conns[0].relay.backend.paused:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the client's transport never filled up")


async def test_ping_burst_while_the_transport_is_full_closes_1008(gateway_factory, echo_backend):
    """Thousands of pings in one read while the client's PONGs cannot be written:
    1008 "control frame flood", which the client gets once it reads."""
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    reader, writer = await _flooding_client(gw, rcvbuf=32 * 1024)
    await _fill_the_way_back(gw, writer)
    writer.write(frame(PING, b"") * 4000)          # 24 KB: one read
    await writer.drain()
    deadline = time.monotonic() + 5
    conn = next(iter(gw.gw.live.values()))
    while not conn.relay.client.closing and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert conn.relay.end_code == 1008 and conn.relay.end_side == "gateway"
    pongs, code, reason = await read_until_close(reader)
    assert (code, reason) == (1008, "control frame flood")
    writer.write(frame(CLOSE, struct.pack("!H", 1008)))
    writer.close()


async def test_a_slow_reader_gets_the_latest_pong(gateway_factory, echo_backend):
    """A client whose transport is full gets one PONG, for its latest PING, once
    it reads again, and its connection stays usable."""
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    reader, writer = await _flooding_client(gw, rcvbuf=32 * 1024)
    await _fill_the_way_back(gw, writer)
    conns = list(gw.gw.live.values())
    leg = conns[0].relay.client
    assert conns[0].relay.backend.paused
    for i in range(5):
        writer.write(frame(PING, b"ping %d" % i))
    await writer.drain()
    deadline = time.monotonic() + 5
    while not leg.paused and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert leg.paused                  # owed a PONG it cannot take: the client is not read
    echoed = 0
    pongs = []
    while echoed < 8 << 20:
        f = await read_frame(reader, 10)
        if f.opcode == PONG:
            pongs.append(f.payload)
        else:
            echoed += len(f.payload)
    writer.write(frame(PING, b"after"))
    while not pongs or pongs[-1] != b"after":
        f = await read_frame(reader, 10)
        if f.opcode == PONG:
            pongs.append(f.payload)
    # Only the latest of the pings read while the transport was full was answered.
    assert pongs[-2:] == [b"ping 4", b"after"]
    assert len(pongs) < 6
    writer.write(frame(CLOSE, struct.pack("!H", 1000)))
    f = await read_frame(reader, 10)
    assert (f.opcode, f.payload[:2]) == (CLOSE, struct.pack("!H", 1000))
    writer.close()


async def test_ping_flood_from_a_backend_that_never_reads(gateway_process):
    """The same bound toward a hostile backend: it gets 1008, the client 1001."""
    async def hostile(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await accept_upgrade(reader, writer)
        frame = bytes([0x80 | PING, 0])                          # unmasked: from a server
        await flood_pings(writer, 64 * 1024 * 1024, frame)
        result.set_result(await read_until_close(reader))
        writer.close()

    result = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{port}/"))
    idle = gp.rss_kib()
    async with websockets.connect(gp.url("/")) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 30)
        except websockets.ConnectionClosed:
            pass
    assert (ws.close_code, ws.close_reason) == (1001, "backend control frame flood")
    pongs, code, reason = await asyncio.wait_for(result, 15)
    assert (code, reason) == (1008, "control frame flood")
    assert gp.rss_kib() - idle < 24 * 1024
    server.close()
