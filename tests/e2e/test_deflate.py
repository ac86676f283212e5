"""permessage-deflate (RFC 7692) end to end: the client's offer goes to the backend, the
backend's answer to the client, compressed frames (RSV1) are relayed as they came.

Peers: the `websockets` library with compression on both sides, Node's `ws` (tests/node,
`npm install --prefix tests/node`) as a second implementation, and raw frames (tests/wire.py)
for what a conforming peer never sends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

from conftest import gateway_yaml
from wire import (BINARY, CLOSE, CONT, PING, TEXT, TIMEOUT, close_payload, connect, exchange,
                  expect_eof, frame, head_fields, new_key, read_close, read_frame, read_head,
                  status_of, upgrade_request, accept_key, answer_101)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SIZES = (10, 1000, 65536, 1 << 20)
# Drops in a flow: 5 messages at once, then one per 50 ms.
DROP = "- {policy: message-rate-limit, messages: 20/1s, burst: 5, action: drop}"


def text_of(size: int, seed: int = 0) -> str:
    return (f"fastgw deflate {seed} " * (size // 16 + 1))[:size]


def binary_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + (i >> 12) + seed) & 0xFF for i in range(size))


class DeflateBackend:
    """A `websockets` server compressing with `factory` (default: its own defaults): echoes
    each message (in 3 fragments on a path with /frag); `burst:N:TAG` sends N messages
    TAG-i-...; records per connection the offer it got, its answer, the hashes of what it
    received and how the connection ended."""

    def __init__(self, factory=None, compression: bool = True):
        self.factory = factory
        self.compression = compression
        self.seen: list[dict] = []

    async def _handler(self, ws):
        record = {"offer": ws.request.headers.get("Sec-WebSocket-Extensions"),
                  "answer": ws.response.headers.get("Sec-WebSocket-Extensions"),
                  "received": [], "close": None}
        self.seen.append(record)
        frag = "/frag" in ws.request.path
        try:
            async for m in ws:
                data = m.encode() if isinstance(m, str) else m
                record["received"].append(hashlib.sha256(data).hexdigest())
                if isinstance(m, str) and m.startswith("burst:"):
                    _, n, tag = m.split(":")
                    for i in range(int(n)):
                        await ws.send(f"{tag}-{i}-" + text_of(300, i))
                elif frag and len(m) >= 3:
                    k = len(m) // 3
                    await ws.send([m[:k], m[k:2 * k], m[2 * k:]])
                else:
                    await ws.send(m)
        finally:
            record["close"] = ws.close_code

    @contextlib.asynccontextmanager
    async def run(self):
        kw = {"max_size": None}
        if not self.compression:
            kw["compression"] = None
        elif self.factory is not None:
            kw.update(compression=None, extensions=[self.factory])
        async with ws_serve(self._handler, "127.0.0.1", 0, **kw) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self


def deflate_of(ws):
    """The client's negotiated PerMessageDeflate (websockets), or None."""
    exts = ws.protocol.extensions
    assert len(exts) <= 1, exts
    return exts[0] if exts else None


def live_relay(gw):
    (conn,) = gw.gw.live.values()
    return conn.relay


async def round_trip(ws, messages):
    for m in messages:
        await ws.send(m)
        assert await ws.recv() == m


def messages_10b_to_1mib():
    return [text_of(n, i) for i, n in enumerate(SIZES)] + [binary_of(n, i) for i, n in enumerate(SIZES)]


# ---- websockets on both sides ---------------------------------------------------------------

@pytest.mark.both_loops
async def test_websockets_both_sides(gateway_factory):
    """Text and binary of 10 B to 1 MiB both ways, compressed on the wire (the gateway's
    byte counts are wire sizes), with the parameters the backend chose."""
    backend = DeflateBackend(ServerPerMessageDeflateFactory(server_max_window_bits=10))
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with websockets.connect(gw.url("/"), max_size=None) as ws:
            answer = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert answer == backend.seen[0]["answer"] == "permessage-deflate; server_max_window_bits=10"
            assert backend.seen[0]["offer"] == "permessage-deflate; client_max_window_bits"
            pmd = deflate_of(ws)
            assert pmd.remote_max_window_bits == 10 and not pmd.remote_no_context_takeover
            messages = messages_10b_to_1mib()
            await round_trip(ws, messages)
            relay = live_relay(gw)
            total = sum(len(m.encode() if isinstance(m, str) else m) for m in messages)
            assert relay.client.messages == relay.backend.messages == len(messages)
            # Compressed both ways: the wire carries a fraction of the messages' bytes.
            assert relay.client.bytes < total / 10 and relay.backend.bytes < total / 10
            assert relay.client.compression and relay.backend.compression
        await gw.wait_idle()
    assert backend.seen[0]["close"] == 1000


async def test_fragmented_compressed_messages(gateway_factory):
    """Fragmented compressed messages (RSV1 on the first frame only) both ways."""
    backend = DeflateBackend()
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with websockets.connect(gw.url("/frag"), max_size=None) as ws:
            assert deflate_of(ws) is not None
            for m in messages_10b_to_1mib():
                k = len(m) // 3
                await ws.send([m[:k], m[k:2 * k], m[2 * k:]])
                assert await ws.recv() == m
            relay = live_relay(gw)
            # websockets sends each piece, then an empty final frame: 4 frames a message.
            assert relay.client.frames == relay.backend.frames == 4 * 8
        await gw.wait_idle()


async def test_extensions_none(gateway_factory):
    """`extensions: none`: the backend is offered nothing, nothing is negotiated."""
    backend = DeflateBackend()
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade="extensions: none"))
        async with websockets.connect(gw.url("/"), max_size=None) as ws:
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
            assert deflate_of(ws) is None
            await round_trip(ws, [text_of(1000), binary_of(70000)])
            relay = live_relay(gw)
            assert not relay.client.compression and not relay.backend.compression
            assert relay.client.bytes == 1000 + 70000
        await gw.wait_idle()
    assert backend.seen[0]["offer"] is None and backend.seen[0]["answer"] is None


async def test_only_deflate_offers_go_to_the_backend(gateway_factory):
    """Other extensions and invalid permessage-deflate offers are left out; a malformed header
    is not forwarded at all (and then nothing is negotiated)."""
    backend = DeflateBackend()
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        offers = {
            "x-webkit-deflate-frame, permessage-deflate; bogus, "
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits, foo; bar=1":
                "permessage-deflate; server_max_window_bits=12; client_max_window_bits",
            'permessage-deflate; client_max_window_bits="10"':
                "permessage-deflate; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=16": None,
            "permessage-deflate; =1, permessage-deflate": None,      # malformed
        }
        for offer, forwarded in offers.items():
            key = new_key()
            reader, writer = await connect(gw.port)
            writer.write(upgrade_request(key=key, extra=f"Sec-WebSocket-Extensions: {offer}\r\n"))
            first, headers = head_fields(await read_head(reader))
            assert first.startswith("HTTP/1.1 101 ") and headers["sec-websocket-accept"] == accept_key(key)
            assert backend.seen[-1]["offer"] == forwarded, offer
            assert headers.get("sec-websocket-extensions") == backend.seen[-1]["answer"], offer
            assert (forwarded is None) == (backend.seen[-1]["answer"] is None)
            writer.write(frame(CLOSE, close_payload(1000)))
            f, _ = await read_close(reader)
            assert f.close[0] == 1000
            await expect_eof(reader)
            writer.close()
        await gw.wait_idle()


# ---- Node's ws as the second implementation -------------------------------------------------

def node_peer() -> list[str]:
    """Node and the pinned ws (tests/node/package-lock.json), installed on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("these tests need Node.js and npm (Debian: apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        subprocess.run([npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund",
                        "--silent"], check=False, timeout=180)
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail(f"Node's ws could not be installed: npm ci --prefix {NODE_DIR}")
    return [node, str(NODE_DIR / "peer.js")]


@contextlib.asynccontextmanager
async def node_process(*args: str):
    proc = await asyncio.create_subprocess_exec(*node_peer(), *args, stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def json_line(proc) -> dict:
    line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
    assert line, "the node peer ended early"
    return json.loads(line)


@pytest.mark.parametrize("path", ["/", "/frag"])
async def test_node_ws_client_to_websockets_backend(gateway_factory, path):
    """Node's ws client (whole and fragmented messages, 10 B to 1 MiB, text and binary)
    through the gateway to a websockets backend with server_max_window_bits=10."""
    backend = DeflateBackend(ServerPerMessageDeflateFactory(server_max_window_bits=10,
                                                             client_max_window_bits=12))
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with node_process("client", gw.url(path)) as proc:
            result = await asyncio.wait_for(json_line(proc), 30)
        await gw.wait_idle()
    assert result["errors"] == [] and result["ok"] == 16, result
    assert result["close"] == [1000, "done"]
    assert result["answer"] == backend.seen[0]["answer"]
    assert backend.seen[0]["answer"] == ("permessage-deflate; server_max_window_bits=10; "
                                         "client_max_window_bits=12")
    assert result["params"] == {"server_max_window_bits": 10, "client_max_window_bits": 12}
    assert backend.seen[0]["received"] == result["sent"]


@pytest.mark.parametrize("path", ["/", "/frag"])
async def test_websockets_client_to_node_ws_backend(gateway_factory, path):
    """A websockets client through the gateway to Node's ws backend (server_max_window_bits=11,
    every message compressed; fragmented echoes on /frag)."""
    async with node_process("server", "11") as proc:
        port = (await json_line(proc))["port"]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gw.url(path), max_size=None) as ws:
            seen = await json_line(proc)
            assert seen["offer"] == "permessage-deflate; client_max_window_bits"
            assert ws.response.headers["Sec-WebSocket-Extensions"] == seen["answer"]
            assert "server_max_window_bits=11" in seen["answer"]
            assert deflate_of(ws).remote_max_window_bits == 11
            messages = messages_10b_to_1mib()
            await round_trip(ws, messages)
            total = sum(len(m.encode() if isinstance(m, str) else m) for m in messages)
            relay = live_relay(gw)
            assert relay.backend.bytes < total / 10
            if path == "/frag":
                assert relay.backend.frames == 3 * len(messages)
        await gw.wait_idle()


# ---- drop and compression contexts ----------------------------------------------------------

async def collect(ws, round_: int) -> list[str]:
    """The messages received until the echo of a probe of this round, sending a new probe
    every 0.2 s (a drop may eat a probe or its echo) within 5 s; probes left out."""
    got, n = [], 0
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        n += 1
        await ws.send(f"probe {round_} {n}")
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                m = await asyncio.wait_for(ws.recv(), min(0.2, left))
            except TimeoutError:
                break
            if m.startswith(f"probe {round_} "):
                return got
            if not m.startswith("probe "):      # a late echo of an earlier round's probe
                got.append(m)
        assert left > 0, f"no probe came back within 5 s; got {len(got)} messages"


def assert_subsequence(got: list[str], tag: str, n: int) -> None:
    """Each message of `got` is an intact TAG-i-... message, i increasing."""
    want = {f"{tag}-{i}-" + text_of(300, i): i for i in range(n)}
    indexes = [want[m] for m in got]
    assert indexes == sorted(set(indexes))


async def test_drop_in_response_flow_negotiates_server_no_context_takeover(gateway_factory):
    """A drop policy in the response flow: every offer asks the backend for
    server_no_context_takeover; messages after dropped ones still inflate."""
    backend = DeflateBackend()          # websockets' defaults: context takeover unless asked
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade=f"response:\n  {DROP}"))
        async with websockets.connect(gw.url("/"), max_size=None) as ws:
            assert backend.seen[0]["offer"] == ("permessage-deflate; client_max_window_bits; "
                                                "server_no_context_takeover")
            answer = ws.response.headers["Sec-WebSocket-Extensions"]
            assert answer == backend.seen[0]["answer"] and "server_no_context_takeover" in answer
            assert deflate_of(ws).remote_no_context_takeover
            for round_ in range(3):
                await ws.send(f"burst:40:r{round_}")
                got = await collect(ws, round_)
                assert 1 <= len(got) < 40
                assert_subsequence(got, f"r{round_}", 40)
            assert live_relay(gw).backend.dropped > 0
        await gw.wait_idle()
    assert backend.seen[0]["close"] == 1000


async def test_drop_in_request_flow_tells_client_no_context_takeover(gateway_factory):
    """A drop policy in the request flow: the client's 101 adds client_no_context_takeover
    to the backend's answer; the backend inflates every message that reaches it."""
    backend = DeflateBackend()
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade=f"request:\n  {DROP}"))
        async with websockets.connect(gw.url("/"), max_size=None) as ws:
            theirs = backend.seen[0]["answer"]
            assert theirs and "client_no_context_takeover" not in theirs
            assert backend.seen[0]["offer"] == "permessage-deflate; client_max_window_bits"
            assert ws.response.headers["Sec-WebSocket-Extensions"] == theirs + "; client_no_context_takeover"
            assert deflate_of(ws).local_no_context_takeover
            for round_ in range(3):
                tag = f"q{round_}"
                for i in range(40):
                    await ws.send(f"{tag}-{i}-" + text_of(300, i))
                got = await collect(ws, round_)
                assert 1 <= len(got) < 40
                assert_subsequence(got, tag, 40)
            assert live_relay(gw).client.dropped > 0
        await gw.wait_idle()
    assert backend.seen[0]["close"] == 1000


# ---- bad answers from the backend: 502 ------------------------------------------------------

class RawBackend:
    """A backend answering the upgrade by hand with `answer` as its Sec-WebSocket-Extensions
    (if any); then it records frames (masked, from the gateway) up to a CLOSE, or `script`."""

    def __init__(self, answer: str | None, script=None):
        self.answer = answer
        self.script = script
        self.heads: list[dict] = []
        self.frames: asyncio.Queue = asyncio.Queue()

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            _, headers = head_fields(head)
            self.heads.append(headers)
            extra = f"Sec-WebSocket-Extensions: {self.answer}\r\n".encode() if self.answer else b""
            writer.write(answer_101(headers["sec-websocket-key"], extra))
            if self.script is not None:
                await self.script(reader, writer)
            while True:
                f = await read_frame(reader, masked=True)
                await self.frames.put(f)
                if f.opcode == CLOSE:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def run(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]
        try:
            yield self
        finally:
            server.close()


BAD_ANSWERS = {
    "window-bits-16": ("permessage-deflate", "permessage-deflate; server_max_window_bits=16", ""),
    "window-bits-7": ("permessage-deflate", "permessage-deflate; server_max_window_bits=7", ""),
    "two-elements": ("permessage-deflate", "permessage-deflate, permessage-deflate", ""),
    "other-extension": ("permessage-deflate", "x-webkit-deflate-frame", ""),
    "unknown-param": ("permessage-deflate", "permessage-deflate; foo", ""),
    "duplicate-param": ("permessage-deflate",
                        "permessage-deflate; server_no_context_takeover; server_no_context_takeover", ""),
    "client-bits-not-offered": ("permessage-deflate", "permessage-deflate; client_max_window_bits=10", ""),
    "not-offered-at-all": (None, "permessage-deflate", ""),
    "drop-without-server-no-context": ("permessage-deflate", "permessage-deflate",
                                       f"response:\n  {DROP}"),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
async def test_bad_answer_is_502(gateway_factory, name):
    """An answer the client would have to fail: 502 (not retried), the backend gets 1001."""
    offer, answer, extra = BAD_ANSWERS[name]
    backend = RawBackend(answer)
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade=extra))
        header = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        answer_bytes = await exchange(gw.port, upgrade_request(extra=header))
        assert status_of(answer_bytes) == 502, answer_bytes
        f = await asyncio.wait_for(backend.frames.get(), TIMEOUT)
        assert f.close == (1001, b"extension not offered")
        assert len(backend.heads) == 1           # not retried
        await gw.wait_idle()
    (pool,) = gw.gw.pools.values()
    assert pool.targets[0].dial_failures == {"handshake": 1}


# ---- reserved bits: 1002 --------------------------------------------------------------------

def deflated(data: bytes) -> bytes:
    """A message's payload as permessage-deflate sends it (RFC 7692 7.2.1)."""
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


@contextlib.asynccontextmanager
async def raw_client(port: int, offer: str | None = "permessage-deflate"):
    key = new_key()
    reader, writer = await connect(port)
    header = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
    writer.write(upgrade_request(key=key, extra=header))
    first, headers = head_fields(await read_head(reader))
    assert first.startswith("HTTP/1.1 101 "), first
    try:
        yield reader, writer, headers.get("sec-websocket-extensions")
    finally:
        writer.close()


async def test_raw_compressed_frames_pass_unchanged(gateway_factory):
    """A hand-compressed RSV1 frame reaches the websockets backend, whose compressed echo
    (RSV1) reaches the raw client."""
    backend = DeflateBackend(ServerPerMessageDeflateFactory(server_no_context_takeover=True))
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with raw_client(gw.port) as (reader, writer, answer):
            assert answer == "permessage-deflate; server_no_context_takeover"
            msg = text_of(500).encode()
            writer.write(frame(TEXT, deflated(msg), rsv=0x40))
            f = await read_frame(reader)
            assert (f.fin, f.rsv, f.opcode) == (True, 0x40, TEXT)
            assert zlib.decompressobj(wbits=-15).decompress(f.payload + b"\x00\x00\xff\xff") == msg
            writer.write(frame(CLOSE, close_payload(1000)))
            f, _ = await read_close(reader)
            assert f.close[0] == 1000
        await gw.wait_idle()
    assert backend.seen[0]["received"] == [hashlib.sha256(msg).hexdigest()]


CLIENT_RSV = {
    "rsv1-on-continuation": (frame(TEXT, deflated(b"ab")[:1], fin=False, rsv=0x40)
                             + frame(CONT, b"x", rsv=0x40), b"RSV1 set on a continuation frame"),
    "rsv1-on-ping": (frame(PING, b"x", rsv=0x40), b"RSV1 set on a control frame"),
    "rsv1-on-close": (frame(CLOSE, close_payload(1000), rsv=0x40), b"RSV1 set on a control frame"),
    "rsv2": (frame(TEXT, b"x", rsv=0x20), b"reserved bits set without extension"),
    "rsv3-with-rsv1": (frame(BINARY, b"x", rsv=0x50), b"reserved bits set without extension"),
}


@pytest.mark.parametrize("name", list(CLIENT_RSV))
async def test_client_reserved_bits_with_deflate(gateway_factory, name):
    """With permessage-deflate negotiated, RSV1 on a continuation or a control frame, and
    RSV2/RSV3 always: 1002 to the client, 1001 "peer protocol error" to the backend."""
    bad, reason = CLIENT_RSV[name]
    backend = RawBackend("permessage-deflate")
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with raw_client(gw.port) as (reader, writer, answer):
            assert answer == "permessage-deflate"
            writer.write(bad)
            f, _ = await read_close(reader)
            assert f.close == (1002, reason)
            await expect_eof(reader)
        frames = []
        while not frames or frames[-1].opcode != CLOSE:
            frames.append(await asyncio.wait_for(backend.frames.get(), TIMEOUT))
        assert frames[-1].close == (1001, b"peer protocol error")
        await gw.wait_idle()


@pytest.mark.parametrize("offer", [None, "permessage-deflate"], ids=["not-offered", "extensions-none"])
async def test_client_rsv1_without_negotiation(gateway_factory, offer):
    """RSV1 when nothing was negotiated (the client offered nothing, or the API says
    `extensions: none`): 1002."""
    backend = DeflateBackend()
    async with backend.run():
        extra = "extensions: none" if offer else ""
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade=extra))
        async with raw_client(gw.port, offer) as (reader, writer, answer):
            assert answer is None
            writer.write(frame(TEXT, deflated(b"hello"), rsv=0x40))
            f, _ = await read_close(reader)
            assert f.close == (1002, b"reserved bits set without extension")
            await expect_eof(reader)
        await gw.wait_idle()


async def test_backend_rsv1_on_continuation(gateway_factory):
    """The backend's offence with deflate negotiated: it gets 1002, the client 1001."""
    async def script(reader, writer):
        await read_frame(reader, masked=True)          # the client's go
        writer.write(frame(TEXT, deflated(b"ok"), rsv=0x40, mask=False)
                     + frame(TEXT, b"a", fin=False, rsv=0x40, mask=False)
                     + frame(CONT, b"b", rsv=0x40, mask=False))

    backend = RawBackend("permessage-deflate", script)
    async with backend.run():
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with raw_client(gw.port) as (reader, writer, answer):
            assert answer == "permessage-deflate"
            writer.write(frame(TEXT, deflated(b"go"), rsv=0x40))
            f, before = await read_close_any(reader)
            assert [(b.rsv, b.opcode) for b in before] == [(0x40, TEXT), (0x40, TEXT)]
            assert f.close == (1001, b"peer protocol error")
            writer.write(frame(CLOSE, close_payload(1001)))
            await expect_eof(reader)
        f = await asyncio.wait_for(backend.frames.get(), TIMEOUT)
        assert f.close == (1002, b"RSV1 set on a continuation frame")
        await gw.wait_idle()


async def read_close_any(reader):
    """Frames up to a CLOSE (RSV bits allowed before it): (the CLOSE, the frames before)."""
    before = []
    while True:
        f = await read_frame(reader)
        if f.opcode == CLOSE:
            return f, before
        before.append(f)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
