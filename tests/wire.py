"""The tests' own WebSocket wire (RFC 6455), used by every end-to-end test that speaks raw
bytes: the frame codec, the handshake (both sides) and a raw socket client.

It is written from the RFC, not imported from fastgw, so that the gateway is checked against
an independent codec. Readers assert what a conforming peer must send: the mask bit of the
direction (0 from a server, 1 from a client) and minimally encoded lengths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
from dataclasses import dataclass, field

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TIMEOUT = 5.0
KEY = base64.b64encode(b"0123456789abcdef").decode()     # a fixed Sec-WebSocket-Key


# ---- frames ------------------------------------------------------------------------------

def xor_mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
          key: bytes | None = None, length_form: int | None = None, declared: int | None = None) -> bytes:
    """One frame as a client (mask=True, a random key unless `key`) or a server (mask=False)
    sends it.

    length_form 7/16/64 forces that length encoding; `declared` overrides the length written
    (both to build invalid frames)."""
    n = len(payload) if declared is None else declared
    if length_form is None:
        length_form = 7 if n < 126 else 16 if n < 65536 else 64
    mbit = 0x80 if mask else 0
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if length_form == 7:
        head += bytes([mbit | n])
    elif length_form == 16:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    if key is None:
        key = os.urandom(4)
    return head + key + xor_mask(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class Frame:
    """A frame read from the wire (unmasked already)."""
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    raw: bytes = field(default=b"", compare=False, repr=False)   # the frame as it came

    @property
    def close(self) -> tuple[int | None, bytes]:
        """(code, reason) of a CLOSE frame; (None, b"") when it has no code."""
        assert self.opcode == CLOSE
        if len(self.payload) < 2:
            return None, b""
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:]


async def read_frame(reader: asyncio.StreamReader, timeout: float = TIMEOUT, *,
                     masked: bool = False) -> Frame:
    """Read one frame; check the mask bit (0 from the gateway to a client, 1 from the gateway
    to a backend: `masked`) and that the length is minimally encoded."""
    head = await asyncio.wait_for(reader.readexactly(2), timeout)
    b0, b1 = head
    assert bool(b1 & 0x80) == masked, f"mask bit {b1 >> 7} on a frame {b0:#04x} {b1:#04x}"
    n = b1 & 0x7F
    if n == 126:
        ext = await asyncio.wait_for(reader.readexactly(2), timeout)
        n = struct.unpack("!H", ext)[0]
        assert n >= 126, f"non-minimal 16-bit length {n}"
    elif n == 127:
        ext = await asyncio.wait_for(reader.readexactly(8), timeout)
        n = struct.unpack("!Q", ext)[0]
        assert 65536 <= n < 1 << 63, f"invalid 64-bit length {n}"
    else:
        ext = b""
    key = await asyncio.wait_for(reader.readexactly(4), timeout) if masked else b""
    body = await asyncio.wait_for(reader.readexactly(n), timeout) if n else b""
    payload = xor_mask(body, key) if masked else body
    return Frame(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, payload, head + ext + key + body)


def split_frames(buf: bytearray) -> list[Frame]:
    """The whole frames at the start of `buf`, removed from it (for readers that read in bulk);
    masked frames are unmasked."""
    out = []
    while len(buf) >= 2:
        n, pos = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        key = b""
        if buf[1] & 0x80:
            if len(buf) < pos + 4:
                break
            key, pos = bytes(buf[pos:pos + 4]), pos + 4
        if len(buf) < pos + n:
            break
        body = bytes(buf[pos:pos + n])
        out.append(Frame(bool(buf[0] & 0x80), buf[0] & 0x70, buf[0] & 0x0F,
                         xor_mask(body, key) if key else body, bytes(buf[:pos + n])))
        del buf[:pos + n]
    return out


async def read_close(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> tuple[Frame, list[Frame]]:
    """Read frames until a CLOSE: (the close frame, the frames before it)."""
    before: list[Frame] = []
    while True:
        f = await read_frame(reader, timeout)
        if f.opcode == CLOSE:
            assert f.fin and f.rsv == 0
            return f, before
        before.append(f)


async def read_close_code(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> int:
    """Read frames until a CLOSE and return its code."""
    f, _ = await read_close(reader, timeout)
    return f.close[0]


async def expect_eof(reader: asyncio.StreamReader, timeout: float = 2.0) -> None:
    """The peer (the gateway) closes the TCP connection, sending nothing more, within
    `timeout`; the caller has not answered a CLOSE unless it says so."""
    try:
        rest = await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        raise AssertionError(f"the gateway did not close the TCP connection within {timeout}s") from None
    except ConnectionResetError:
        rest = b""
    assert rest == b"", f"bytes after the CLOSE: {rest[:60]!r}"


# ---- the handshake -------------------------------------------------------------------------

def new_key() -> str:
    """A random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept that answers `key`."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(path: str = "/", *, key: str = KEY, method: str = "GET", extra: str = "",
                    host: str = "gw", version: str = "HTTP/1.1", connection: str = "Upgrade",
                    ws_version: str = "13") -> bytes:
    """A client's upgrade request; `extra` is header lines, each ending in CRLF."""
    return (f"{method} {path} {version}\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: {connection}\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {ws_version}\r\n{extra}\r\n").encode()


def head_fields(head: bytes) -> tuple[str, dict[str, str]]:
    """(first line, {lower-case name: value}) of an HTTP head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def status_of(answer: bytes) -> int:
    """The status of an HTTP/1.1 answer."""
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def check_101(head: bytes, key: str) -> None:
    """A complete, extension-free 101 answering `key`."""
    first, headers = head_fields(head)
    assert first.startswith("HTTP/1.1 101 "), head[:200]
    assert headers.get("upgrade", "").lower() == "websocket", head
    assert "upgrade" in headers.get("connection", "").lower(), head
    assert headers.get("sec-websocket-accept") == accept_key(key), head
    assert "sec-websocket-extensions" not in headers, head


async def read_head(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """An HTTP head, up to and with its blank line."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


def answer_101(key: str, extra: bytes = b"") -> bytes:
    """A backend's 101 to a request with `key`; `extra` is header lines, each ending in CRLF."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n" + extra + b"\r\n")


async def accept_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         extra: bytes = b"", early: bytes = b"") -> bytes:
    """A hand-made backend's side of the handshake: read the request, answer 101 (with
    `extra` headers, and `early` in the same write); returns the request head."""
    head = await reader.readuntil(b"\r\n\r\n")
    _, headers = head_fields(head)
    writer.write(answer_101(headers["sec-websocket-key"], extra) + early)
    return head


# ---- a raw client ---------------------------------------------------------------------------

def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def connect(port: int, *, rcvbuf: int = 0, limit: int = 1 << 16,
                  local_addr: tuple[str, int] | None = None):
    """A TCP connection to 127.0.0.1:port as asyncio streams; `rcvbuf` sets SO_RCVBUF before
    the connection is made (so that the window is small from the start)."""
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        if local_addr is not None:
            sock.bind(local_addr)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock, limit=limit)
    return await asyncio.open_connection("127.0.0.1", port, limit=limit, local_addr=local_addr)


async def exchange(port: int, data: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """Send raw bytes and read until the gateway closes the connection."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def open_ws(port: int, first: bytes = b"", path: str = "/", rcvbuf: int = 0, *,
                  extra: str = "", host: str = "gw", limit: int = 1 << 16):
    """A raw WebSocket connection through the gateway, its 101 checked; `first` goes in the
    same write as the upgrade request. Returns (reader, writer)."""
    reader, writer = await connect(port, rcvbuf=rcvbuf, limit=limit)
    key = new_key()
    writer.write(upgrade_request(path, key=key, extra=extra, host=host) + first)
    check_101(await read_head(reader), key)
    return reader, writer


@contextlib.asynccontextmanager
async def ws(port: int, first: bytes = b"", path: str = "/", rcvbuf: int = 0, **kw):
    """open_ws, and the connection closed at the end whatever happens."""
    reader, writer = await open_ws(port, first, path, rcvbuf, **kw)
    try:
        yield reader, writer
    finally:
        writer.close()
