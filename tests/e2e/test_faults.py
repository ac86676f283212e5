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
from wire import TEXT, accept_upgrade, frame, read_frame


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
        await accept_upgrade(reader, writer, answer_headers)
        try:
            f = await read_frame(reader, 5, masked=True)
            if not seen.done():
                seen.set_result((f.opcode, struct.unpack("!H", f.payload[:2])[0], f.payload[2:]))
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


# ---- real processes that fail ---------------------------------------------------------------

import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager


@asynccontextmanager
async def echo_process():
    """The bundled echo backend as a process of its own (to kill or stop it); yields
    (process, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastgw.echo", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        port = int(re.search(r":(\d+)$", line.strip()).group(1))
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


async def _echo(ws, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


async def test_backend_killed_mid_stream_1014(gateway_factory, echo_backend):
    async with echo_process() as (proc, port):
        gw = await gateway_factory(f"""
listeners: [{{host: 127.0.0.1, port: 0}}]
apis:
  - {{name: doomed, path: /doomed, assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/"}}]}}
  - {{name: other, path: /, assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{echo_backend}/"}}]}}
""")
        async with websockets.connect(gw.url("/")) as other:
            async with websockets.connect(gw.url("/doomed")) as ws:
                for i in range(50):
                    await _echo(ws, f"before {i}")
                async def stream():
                    while True:
                        await ws.send(b"x" * (1 << 20))
                streaming = asyncio.create_task(stream())
                proc.kill()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                streaming.cancel()
            assert (ws.close_code, ws.close_reason) == (1014, "backend connection lost")
            await _echo(other, "unharmed")
    await gw.wait_idle()
    assert gw.gw.metrics.api("doomed").closes[(1014, "backend")] == 1


async def test_backend_reset_mid_stream_1014(gateway_factory):
    """A backend that resets its connection (SO_LINGER 0) after some messages."""
    async def handle(reader, writer):
        await accept_upgrade(reader, writer)
        for i in range(10):
            writer.write(frame(TEXT, b"msg %d" % i, mask=False))
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    gw = await gateway_factory(count_limited(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"))
    async with websockets.connect(gw.url("/")) as ws:
        got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(10)]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert got == [f"msg {i}" for i in range(10)]
    assert ws.close_code == 1014
    await gw.wait_idle()
    async with websockets.connect(gw.url("/")) as ws:      # the count-limit slot is back
        assert await asyncio.wait_for(ws.recv(), 5) == "msg 0"
    server.close()


async def test_backend_black_holed_ended_by_liveness(gateway_factory, echo_backend):
    """A stopped backend keeps its TCP connection (no FIN, no RST): only pings tell. The
    client gets 1014 "backend ping timeout"; the slot is released."""
    async with echo_process() as (proc, port):
        gw = await gateway_factory(count_limited(
            f"ws://127.0.0.1:{port}/", "ping-interval: {backend: 200ms}\nping-timeout: 300ms"))
        async with websockets.connect(gw.url("/"), ping_interval=None) as ws:
            await _echo(ws, "alive")
            await asyncio.sleep(0.5)                 # idle but answering pings: kept
            await _echo(ws, "still alive")
            proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            elapsed = time.monotonic() - t0
        assert (ws.close_code, ws.close_reason) == (1014, "backend ping timeout")
        assert 0.3 <= elapsed < 3
        await gw.wait_idle()
        assert gw.gw.zone.counts_used() == 0
        assert gw.gw.metrics.api("one").closes[(1014, "gateway")] == 1


CLIENT_SCRIPT = r"""
import asyncio, sys
import websockets
async def main():
    async with websockets.connect(sys.argv[1], ping_interval=None) as ws:
        await ws.send("hello")
        print(await ws.recv(), flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_client_vanishing_without_fin_ended_by_liveness(gateway_factory):
    """A client process that stops (no FIN): the backend gets 1001 "client ping timeout",
    the slot is released and the next client admitted."""
    closes = []

    async def handler(conn):
        try:
            async for msg in conn:
                await conn.send(msg)
        finally:
            closes.append((conn.close_code, conn.close_reason))

    async with ws_serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(count_limited(
            f"ws://127.0.0.1:{port}/", "ping-interval: {client: 200ms}\nping-timeout: {client: 300ms}"))
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, gw.url("/")],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
            assert line.strip() == "hello"
            await asyncio.sleep(0.6)                  # answering pings: kept
            assert len(gw.gw.live) == 1
            proc.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while gw.gw.live and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not gw.gw.live
            deadline = time.monotonic() + 5
            while not closes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert closes == [(1001, "client ping timeout")]
            async with websockets.connect(gw.url("/")) as ws:      # the slot is back
                await _echo(ws, "next")
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


async def test_unresolvable_target_host_502(gateway_factory):
    gw = await gateway_factory(gateway_yaml("ws://no-such-host.invalid:9000/", extra_upgrade="timeout: 5s"))
    t0 = time.monotonic()
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/")):
            pass
    assert info.value.response.status_code == 502
    assert b"backend unreachable" in info.value.response.body
    assert time.monotonic() - t0 < 4


async def test_plain_backend_behind_a_wss_target_502(gateway_factory):
    """A TLS handshake that fails on the backend side: 502, nothing left behind. The backend
    speaks plain HTTP: it answers the gateway's ClientHello with a 400 and closes."""
    async def plain_http(reader, writer):
        await reader.read(4096)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway_factory(gateway_yaml(f"wss://127.0.0.1:{port}/"))
    try:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(gw.url("/")):
                pass
    finally:
        server.close()
    assert info.value.response.status_code == 502
    assert b"TLS" in info.value.response.body


async def test_failed_client_tls_handshakes_leave_nothing(gateway_factory, echo_backend, tmp_path):
    """Clients that fail the TLS handshake (plain HTTP to a wss listener, a client that
    does not trust the certificate, garbage) leave no handshake and no slot; others are served."""
    import ssl
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    yaml_text = count_limited(f"ws://127.0.0.1:{echo_backend}/").replace(
        "port: 0}", f"port: 0, tls: {{cert: {tmp_path}/gw.pem, key: {tmp_path}/gw.key}}}}", 1)
    gw = await gateway_factory(yaml_text)
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(2000), b"\x16\x03\x01\x00\x05hello"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            pass
        writer.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await websockets.connect(f"wss://127.0.0.1:{gw.port}/", ssl=ssl.create_default_context())
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with websockets.connect(f"wss://127.0.0.1:{gw.port}/", ssl=ctx) as ws:
        await _echo(ws, "after the failures")
    await gw.wait_idle()
    assert not gw.gw.handshakes and gw.gw.zone.counts_used() == 0


async def test_ended_connections_are_freed_without_the_garbage_collector(gateway_factory, echo_backend):
    """An ended connection holds no reference cycle (relay, legs, transports): it is freed
    at once by reference counting. Left to the collector, churn made the soak run's RSS
    climb ~11 KiB per closed connection and each full collection stalled the relay."""
    import gc
    from fastgw._core import Leg, Relay
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))

    def cores() -> int:
        return sum(1 for o in gc.get_objects() if type(o) in (Relay, Leg))

    gc.collect()
    gc.disable()
    try:
        before = cores()
        for _ in range(20):
            async with websockets.connect(gw.url("/")) as ws:
                await _echo(ws, "churn")
        async with websockets.connect(gw.url("/")) as ws:      # one of each end: backend first
            await ws.send("x")
            await ws.recv()
        await gw.wait_idle()
        await asyncio.sleep(0.1)
        assert cores() - before == 0, f"{cores() - before} relays/legs kept alive by cycles"
    finally:
        gc.enable()
