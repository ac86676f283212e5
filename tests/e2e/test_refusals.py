"""Refusals are HTTP answers before any 101; hostile input gets the right
status or close code, and the gateway keeps serving others."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from conftest import gateway_yaml
from wire import exchange, frame, free_port, open_ws, read_close_code, status_of, upgrade_request

# On uvloop and on the standard library's loop (`fastgw run --loop asyncio`).
pytestmark = pytest.mark.both_loops


async def still_serving(gw) -> None:
    async with websockets.connect(gw.url("/")) as ws:
        await ws.send("still here")
        assert await ws.recv() == "still here"


async def test_unknown_path_404(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/quotes"))
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/other")):
            pass
    assert info.value.response.status_code == 404
    # A path that only shares a prefix of characters is not a match either.
    assert status_of(await exchange(gw.port, upgrade_request("/quotesX"))) == 404
    assert gw.gw.refused[404] == 2


async def test_plain_get_426(gateway):
    answer = await exchange(gateway.port, b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status_of(answer) == 426
    assert b"\r\nUpgrade: websocket\r\n" in answer


async def test_not_get_405(gateway):
    answer = await exchange(gateway.port, upgrade_request(method="POST"))
    assert status_of(answer) == 405
    assert b"\r\nAllow: GET\r\n" in answer


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",     # a TLS hello to a plain port
    b"GET\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\nHost: gw\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost gw\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n",
    upgrade_request(key="short"),
    upgrade_request(host="a\r\nHost: b"),
    upgrade_request(extra="Content-Length: 5\r\n"),
])
async def test_malformed_requests_400(gateway, data):
    assert status_of(await exchange(gateway.port, data)) == 400
    await still_serving(gateway)


async def test_wrong_websocket_version_426(gateway):
    answer = await exchange(gateway.port, upgrade_request(ws_version="8"))
    assert status_of(answer) == 426
    assert b"Sec-WebSocket-Version: 13" in answer


async def test_oversized_header_block_431(gateway):
    big = "X-Big: " + "a" * 20000 + "\r\n"
    assert status_of(await exchange(gateway.port, upgrade_request(extra=big))) == 431
    # Also when the end of the head never comes.
    assert status_of(await exchange(gateway.port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000)) == 431
    await still_serving(gateway)


async def test_truncated_request_and_silent_client_cut_by_handshake_timeout(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_top="handshake-timeout: 300ms"))
    t0 = time.monotonic()
    answer = await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: gw\r\n")     # never finished
    assert time.monotonic() - t0 < 3
    assert status_of(answer) == 408
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)     # says nothing
    assert status_of(await asyncio.wait_for(reader.read(), 3)) == 408
    writer.close()
    await still_serving(gw)


async def test_backend_port_closed_502_fast(gateway_factory):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{free_port()}/"))
    t0 = time.monotonic()
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/")):
            pass
    assert info.value.response.status_code == 502
    assert time.monotonic() - t0 < 1.0


async def test_backend_refusing_upgrade_502(gateway_factory):
    async def http_only(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/")):
            pass
    assert info.value.response.status_code == 502
    assert b"403" in info.value.response.body
    server.close()


async def test_silent_backend_504_after_timeout(gateway_factory):
    accepted = []

    async def silent(reader, writer):
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/", extra_upgrade="timeout: 500ms"))
    t0 = time.monotonic()
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/"), open_timeout=5):
            pass
    elapsed = time.monotonic() - t0
    assert info.value.response.status_code == 504
    assert 0.45 <= elapsed < 2.0
    assert accepted, "the backend was dialled"
    for w in accepted:
        w.close()
    server.close()


@pytest.mark.parametrize("frame, code", [
    (frame(0x1, b"not masked", mask=False), 1002),
    (frame(0x3, b"opcode 3"), 1002),
    (frame(0x0, b"continuation first"), 1002),
    (bytes([0x81 | 0x40, 0x80 | 2]) + b"\0\0\0\0hi", 1002),         # RSV1 without extension
    (frame(0x9, b"p" * 10, fin=False), 1002),                   # fragmented ping
    (frame(0x8, struct.pack("!H", 1005)), 1002),                # invalid close code
], ids=["unmasked", "opcode-3", "continuation-first", "rsv1", "fragmented-ping", "close-1005"])
async def test_hostile_frames_get_close_codes(gateway, frame, code):
    reader, writer = await open_ws(gateway.port)
    writer.write(frame)
    assert await read_close_code(reader) == code
    writer.close()
    await still_serving(gateway)


async def test_frame_over_max_frame_size_1009(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_upgrade="max-frame-size: 1KiB"))
    reader, writer = await open_ws(gw.port)
    writer.write(frame(0x2, b"x" * 2000))
    assert await read_close_code(reader) == 1009
    writer.close()


async def test_fragmented_message_over_max_message_size_1009(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_upgrade="max-message-size: 10KiB"))
    async with websockets.connect(gw.url("/")) as ws:
        await ws.send([b"a" * 4000, b"b" * 4000, b"c" * 4000])
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1009
