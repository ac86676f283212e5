"""Faults, each with real processes and sockets: the right status or close code,
slots released by the end of life (never by a deallocator), other connections
unharmed (issue 9, "the suite")."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import gateway_yaml
from fastgw.upstream import accept_key


def count_limited(target: str, extra_upgrade: str = "") -> str:
    extra = "".join(f"\n        {line}" for line in extra_upgrade.strip().splitlines()) if extra_upgrade else ""
    return f"""
listeners: [{{host: 127.0.0.1, port: 0}}]
apis:
  - name: one
    path: /
    assembly:
      - {{policy: count-limit, key: client-ip, max: 1}}
      - policy: websocket-upgrade
        target-url: {target}{extra}
"""


async def _closed_by_backend(url: str) -> int:
    async with websockets.connect(url) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    return ws.close_code


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_backend_ending_first_releases_the_slot_at_once(gateway_factory, how):
    """count-limit max 1: after a backend closes (or drops) the connection, the
    next one is admitted at once; the slot was released by the end of life."""
    async def handler(conn):
        if how == "close":
            await conn.close(4000, "backend done")
        else:
            conn.transport.abort()

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(count_limited(f"ws://127.0.0.1:{port}/"))
        for _ in range(3):
            code = await _closed_by_backend(gw.url("/"))
            assert code == (4000 if how == "close" else 1014)
            await gw.wait_idle()
            # No 429: the slot is back although the lease object may still be referenced.
            assert gw.gw.zone.counts_used() == 0
        assert gw.gw.zone.lease_leaks == 0


async def _raw_backend(answer_headers: bytes, seen: asyncio.Future):
    """A backend that answers every upgrade with a 101 carrying `answer_headers`
    and reports the close frame the gateway then sends it."""
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
               if l.lower().startswith(b"sec-websocket-key:")][0]
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n"
                     + answer_headers + b"\r\n")
        try:
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
            n = b1 & 0x7F
            mask = await reader.readexactly(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(n)))
            if not seen.done():
                seen.set_result((b0 & 0x0F, struct.unpack("!H", payload[:2])[0], payload[2:]))
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            if not seen.done():
                seen.set_exception(exc)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("offered", [["chat.v1"], []])
async def test_backend_choosing_an_unoffered_subprotocol_is_502(gateway_factory, offered):
    seen = asyncio.get_running_loop().create_future()
    server = await _raw_backend(b"Sec-WebSocket-Protocol: evil.v9\r\n", seen)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway_factory(count_limited(f"ws://127.0.0.1:{port}/"))
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/"), subprotocols=offered or None):
            pass
    assert info.value.response.status_code == 502
    assert b"evil.v9" in info.value.response.body and b"did not offer" in info.value.response.body
    op, code, _ = await asyncio.wait_for(seen, 5)
    assert (op, code) == (0x8, 1001)
    await gw.wait_idle()
    assert gw.gw.zone.counts_used() == 0 and gw.gw.zone.lease_leaks == 0
    server.close()
