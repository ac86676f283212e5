"""Dialling backends: TLS profiles, timeouts, and refusals blamed on the backend.

The dial happens before the client gets its 101: the backend must accept the
WebSocket upgrade first, and its chosen subprotocol is what the client gets.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from binascii import b2a_base64
from hashlib import sha1
from typing import NamedTuple
from urllib.parse import urlsplit

from fastgw import _core
from fastgw.http.extensions import check_answer
from fastgw.verdicts import Refusal

MAX_RESPONSE_HEAD = 64 * 1024


class Dialled(NamedTuple):
    """A backend that answered 101; its leg is handed to the relay."""

    subprotocol: str | None        # the one it chose, if any
    deflate: dict | None = None    # its permessage-deflate parameters (http.extensions), if any


def make_ssl_context(profile) -> ssl.SSLContext:
    """An SSLContext for dialling wss:// backends from a TlsProfile (None: system trust)."""
    if profile is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=profile.ca)
    if not profile.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if profile.cert:
        ctx.load_cert_chain(profile.cert, profile.key)
    return ctx


def _failure(exc: BaseException, secure: bool = False) -> tuple[str, str]:
    """(the reason a dial failed, for the 502's body and the log; its cause, one of
    pool.DIAL_FAILURE_REASONS). On a wss:// dial, a connection reset or closed without an
    errno of connect() failed the TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"backend certificate rejected: {exc.verify_message or exc}", "tls"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error with backend: {exc.reason or exc}", "tls"
    if isinstance(exc, HandshakeError):
        return str(exc), "reset" if "closed the connection" in str(exc) else "handshake"
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            if secure:
                return f"TLS handshake with backend failed: {what}", "tls"
            return f"backend unreachable: {what}", "reset"
        if isinstance(exc, ConnectionRefusedError):
            return f"backend unreachable: {what}", "refused"
        if isinstance(exc, socket.gaierror):
            return f"backend unreachable: {what}", "dns"
        return f"backend unreachable: {what}", "unreachable"
    return f"backend error: {exc!r}", "handshake"


def _failed(reason: str, cause: str, retry: bool = True, status: int = 502) -> Refusal:
    refusal = Refusal(status, reason)
    refusal.cause = cause
    refusal.retry = retry
    return refusal


class HandshakeError(Exception):
    """The backend answered the upgrade request with something else than a valid 101."""


class _Upgrade(asyncio.Protocol):
    """The client side of a health check's upgrade (fastgw.health): writes the request, and
    `done` gets the response head (or a HandshakeError). Dial is the gateway's own."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request = request
        self.done = done
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes):
        self.buf += data
        if self.done.done():        # frames after the 101, before the hand-over
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_RESPONSE_HEAD:
                self.done.set_exception(HandshakeError("backend response head too large"))
                self.transport.abort()
            return
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        self.transport.pause_reading()
        self.done.set_result(head)

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(HandshakeError("backend closed the connection during the upgrade"))


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    """The backend's status and headers (lower-case names, repeated ones joined by ", ")."""
    parsed = _core.parse_response_head(head)
    if parsed == "status line":
        first = head.split(b"\r\n", 1)[0].decode("latin-1")
        raise HandshakeError(f"backend answered with a malformed status line: {first[:80]!r}")
    if parsed == "header line":
        raise HandshakeError("backend answered with a malformed header line")
    return parsed


def _close_frame(code: int, reason: bytes) -> bytes:
    """A masked CLOSE frame, for a backend the gateway turns down after its 101."""
    payload = code.to_bytes(2, "big") + reason[:123]
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + mask + masked


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return b2a_base64(sha1(key.encode("latin-1") + _GUID).digest(), newline=False).decode("ascii")


def new_key() -> str:
    """A Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 4.1)."""
    return b2a_base64(os.urandom(16), newline=False).decode("ascii")


@functools.lru_cache(maxsize=256)
def _endpoint(origin: str) -> tuple[str, int, bool, str]:
    """(host, port, secure, the fixed header lines of the upgrade request) of a backend URL's
    ``scheme://host:port``. Cached on that alone: the path and query, which come from the
    client, are added per request (keyed on them, the cache would grow with every query)."""
    parts = urlsplit(origin)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    default_port = parts.port is None or parts.port == (443 if secure else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    fixed = "\r\n".join([f"Host: {host_header}", "Upgrade: websocket",
                          "Connection: Upgrade", "Sec-WebSocket-Version: 13"])
    return host, port, secure, fixed


def _target(url: str) -> tuple[str, int, bool, str]:
    """(host, port, secure, the fixed lines of the upgrade request) of a backend URL.
    The URL is split by hand: urlsplit caches what it is given, client paths included."""
    start = url.find("://") + 3
    end = len(url)
    for sep in "/?#":
        i = url.find(sep, start)
        if 0 <= i < end:
            end = i
    path, _, query = url[end:].partition("#")[0].partition("?")
    path = (path or "/") + ("?" + query if query else "")
    host, port, secure, fixed = _endpoint(url[:end])
    return host, port, secure, f"GET {path} HTTP/1.1\r\n{fixed}"


class Dial(asyncio.Protocol):
    """One dial of a backend, driven by callbacks rather than a Task: connect (the loop's
    `create_connection`, stepped by hand), write the upgrade request, read the answer's head,
    check it, and hand the transport to `listener` (the relay's backend leg).

    `upgrade` is the compiled websocket-upgrade policy (ssl context, server name). `start()`
    begins; `done(result)` then runs once, with a Dialled (what the backend chose) or the Refusal
    the client gets (502, 504: the backend's fault) with its `cause` and whether to `retry`
    elsewhere. The time-out is the caller's (one shared deadline for all the attempts of an
    upgrade, fastgw.clock.Deadlines): `expire(timeout)` ends the dial with its 504. `cancel()`
    ends a dial under way without calling `done`. `deflate`: the
    permessage-deflate offers in `headers` (http.extensions); an answer that accepts none of
    them is a 502, one that does makes both legs allow RSV1.
    """

    __slots__ = ("upgrade", "offered", "listener", "done", "deflate", "host", "port", "secure",
                 "key", "request", "coro", "transport", "buf", "head")

    def __init__(self, upgrade, url: str, headers: list[tuple[str, str]], offered: list[str],
                 listener, done, deflate: list[dict] = ()):
        self.upgrade = upgrade
        self.offered = offered
        self.listener = listener
        self.done = done
        self.deflate = deflate
        self.host, self.port, self.secure, fixed = _target(url)
        self.key = new_key()
        self.request = _core.upgrade_request(fixed, self.key, headers)
        self.coro = None             # create_connection, until it returns
        self.transport = None        # from connection_made until the hand-over
        self.buf = bytearray()
        self.head = None             # the answer's head, read before create_connection returned

    def start(self) -> None:
        kwargs = {}
        if self.secure:
            kwargs["ssl"] = self.upgrade.ssl_context      # compiled for every wss:// target
            if self.upgrade.server_name:
                kwargs["server_hostname"] = self.upgrade.server_name
        loop = asyncio.get_running_loop()
        self.coro = loop.create_connection(self._protocol, self.host, self.port, **kwargs)
        self._step()

    def cancel(self) -> None:
        """End the dial (the client went away): its connection is closed, `done` never runs."""
        if self.done is not None:
            self.done = None
            self._close()

    def _protocol(self):
        return self

    def _step(self, _waiter=None) -> None:
        coro = self.coro
        if coro is None:             # ended meanwhile (cancel, time-out): the transport closed
            if _waiter is not None and not _waiter.cancelled():
                _waiter.exception()  # retrieved: its error is expected
            return
        try:
            waiter = coro.send(None)
        except StopIteration:
            self.coro = None         # connected: connection_made has written the request
            if self.head is not None:
                self._answered(paused=True)
            return
        except (Exception, asyncio.CancelledError) as exc:  # every failure of the dial is the backend's
            self.coro = None
            self._finish(_failed(*_failure(exc, self.secure)))
            return
        if waiter is None:           # a bare yield: the next turn of the loop
            asyncio.get_running_loop().call_soon(self._step)
        else:
            waiter.add_done_callback(self._step)

    def expire(self, timeout: float) -> None:
        """The upgrade's time-out (`timeout` seconds) came before the backend's answer."""
        self._finish(_failed(f"backend did not answer within {timeout:g}s", "timeout",
                             retry=False, status=504))

    def _close(self) -> None:
        coro, self.coro = self.coro, None
        if coro is not None:
            coro.close()             # closes the transport it is making
        elif self.transport is not None:
            self.transport.close()
        self.transport = None

    def _finish(self, result) -> None:
        done = self.done
        if done is None:
            return
        self.done = None
        self._close()                # after a hand-over: nothing left
        done(result)

    # -- asyncio.Protocol, until the hand-over -----------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes):
        if self.head is not None or self.done is None:     # after the answer's head
            self.buf += data
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_RESPONSE_HEAD:
                self._finish(_failed(*_failure(HandshakeError("backend response head too large"))))
            return
        self.head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        if self.coro is None:
            self._answered(paused=False)
        else:                        # create_connection has yet to return: _step answers then
            self.transport.pause_reading()

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        self.transport = None
        self._finish(_failed(*_failure(HandshakeError(
            "backend closed the connection during the upgrade"))))

    def _answered(self, paused: bool) -> None:
        """The answer's head is read: check it, and hand the transport over (or refuse).
        `paused`: its reading was paused until create_connection returned."""
        try:
            status, response = _parse_response(self.head)
        except HandshakeError as exc:
            return self._finish(_failed(str(exc), "handshake"))
        if status != 101:
            # A 5xx is the instance's trouble (another may do); a 4xx is its answer.
            return self._finish(_failed(f"backend refused the upgrade with HTTP {status}",
                                        "status", retry=status >= 500))
        if ("websocket" not in response.get("upgrade", "").lower()
                or "upgrade" not in response.get("connection", "").lower()):
            return self._finish(_failed("backend handshake failed: 101 without Upgrade: websocket",
                                        "handshake"))
        if response.get("sec-websocket-accept") != accept_key(self.key):
            return self._finish(_failed("backend handshake failed: wrong Sec-WebSocket-Accept",
                                        "handshake"))
        chosen = response.get("sec-websocket-protocol")
        if chosen is not None and chosen not in self.offered:
            self.transport.write(_close_frame(1001, b"subprotocol not offered"))
            return self._finish(_failed(
                f"backend chose subprotocol {chosen!r}, which the client did not offer",
                "handshake", retry=False))
        answer = None
        extensions = response.get("sec-websocket-extensions")
        if extensions:
            answer = check_answer(extensions, list(self.deflate))
            if isinstance(answer, str):
                self.transport.write(_close_frame(1001, b"extension not offered"))
                return self._finish(_failed(answer, "handshake", retry=False))
        transport, self.transport = self.transport, None
        early = bytes(self.buf)
        self.buf = bytearray()
        listener = self.listener
        transport.set_protocol(listener)
        if answer is not None:
            listener.set_compression(True)
        listener.connection_made(transport)
        listener.feed(early)
        if paused:
            transport.resume_reading()
        self._finish(Dialled(chosen, answer))
