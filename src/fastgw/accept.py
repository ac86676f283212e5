"""Listening sockets accepted by our own code, and the process's descriptors.

uvloop's servers (`loop.create_server`) cannot stop accepting without closing their socket,
and on the first failed accept() (EMFILE) libuv accepts and closes a pending client (a reset)
and uvloop then closes the listening socket for good. So the gateway's listeners and the admin
API's accept themselves: `listen` makes the sockets, a reader on each accepts
(`socket._accept`, no `socket.socket` object) and `connect_accepted` gives each client its
transport. Stopping to accept is removing the reader: clients then wait in the listen backlog.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import logging
import os
import resource
import socket

log = logging.getLogger("fastgw")

# Descriptors kept out of the derived max-connections (besides one per listening socket):
# the process's own, about 20 at idle (standard streams, the event loop, the admin API's
# listener, log and event files), the spare descriptors below, admin clients, DNS look-ups
# and the files a reload reads.
RESERVED_FDS = 32
# Held open on /dev/null and closed when accept() fails for want of descriptors, so that the
# admin API and the dials of clients already accepted still find some.
SPARE_FDS = 8
# accept() failures that mean "no descriptor or memory now": pause, retry later.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def derived_max_connections(fd_limit: int, listening_sockets: int) -> int:
    """`limits.max-connections: auto`, as HAProxy derives maxconn from its descriptor limit:
    two descriptors per connection (the client's and the backend's) once RESERVED_FDS and
    one per listening socket are set aside."""
    return max(1, (fd_limit - RESERVED_FDS - listening_sockets) // 2)


class ListenError(OSError):
    """An OSError whose text is the message alone (its errno kept: EADDRINUSE, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


class Spares:
    """SPARE_FDS descriptors held open on /dev/null, released when descriptors run out."""

    def __init__(self, n: int = SPARE_FDS):
        self.n = n
        self._fds: list[int] = []

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def take(self) -> bool:
        """All of them, or none (what is free then stays free)."""
        while len(self._fds) < self.n:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                self.release()
                return False
        return True

    def release(self) -> bool:
        """Close them; True if any was held."""
        had = bool(self._fds)
        while self._fds:
            os.close(self._fds.pop())
        return had


async def listen(loop, host: str, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets on host:port, one per address the host resolves to,
    as asyncio's create_server makes them (SO_REUSEADDR; IPv6 sockets IPv6-only).
    Raises ListenError: "cannot listen on HOST:PORT: why", with the errno."""
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot resolve {host}: {exc}") from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
    except OSError as exc:
        for s in socks:
            s.close()
        raise ListenError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return socks


class AcceptedSocket(_socket.socket):
    """An accepted descriptor handed to `loop.connect_accepted_socket`.

    The C socket type, not `socket.socket`: its `family` and `type` are plain ints (the Python
    class converts them to enums on each access, which uvloop does twice). The transport owns
    the descriptor: uvloop calls `close()` after libuv has closed it, which must then only
    forget the number (another socket may have it by then)."""

    __slots__ = ()
    close = _socket.socket.detach


def connect_accepted(loop, fd: int, family: int, protocol_factory, done=None, arg=None,
                     ssl=None, ssl_handshake_timeout=None):
    """`loop.connect_accepted_socket` for a descriptor from accept(), driven by hand rather
    than by a Task (half the cost): its first step runs now, up to the wait for
    connection_made (or for the end of the TLS handshake). `done(coro, arg)`, if given, runs
    once the transport is made or has failed. Returns the coroutine while it waits (`close()` it
    to abort the connection), or None if it is over already. Raises what the first step
    raised (the descriptor is then closed)."""
    # uvloop closes the descriptor itself; the standard library's transports (`fastgw run --loop
    # asyncio`) close it through the socket's close().
    if type(loop).__module__.startswith("uvloop"):
        sock = AcceptedSocket(family, socket.SOCK_STREAM, 0, fd)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    if ssl is None:
        coro = loop.connect_accepted_socket(protocol_factory, sock)
    else:
        coro = loop.connect_accepted_socket(protocol_factory, sock, ssl=ssl,
                                            ssl_handshake_timeout=ssl_handshake_timeout)
    try:
        waiter = coro.send(None)
    except StopIteration:                # not expected: connection_made comes later
        return None
    except BaseException:                # raised before the transport took the descriptor
        _socket.socket.close(sock)
        raise
    waiter.add_done_callback(functools.partial(_connected, coro, done, arg))
    return coro


def _connected(coro, done, arg, _waiter) -> None:
    try:
        coro.send(None)
    except StopIteration:
        pass
    except (Exception, asyncio.CancelledError) as exc:   # its transport is closed already
        log.debug("accepted connection ended before its protocol started: %r", exc)
    else:                                # not expected: connect_accepted_socket waits once
        coro.close()
    if done is not None:
        done(coro, arg)


class Acceptor:
    """Accepts clients on listening sockets for a protocol factory (the admin API's).

    On a failed accept() for want of descriptors, `on_short(exc)` (if given) may free some
    (True: try again at once); else accepting pauses for 100 ms. Nobody is reset."""

    PAUSE = 0.1

    def __init__(self, loop, sockets: list[socket.socket], protocol_factory, on_short=None):
        self.loop = loop
        self.sockets = sockets
        self.factory = protocol_factory
        self.on_short = on_short
        self._pending: set = set()
        self._paused = None
        for s in sockets:
            loop.add_reader(s.fileno(), self._on_readable, s, int(s.family))

    def _on_readable(self, sock: socket.socket, family: int) -> None:
        retried = False
        for _ in range(16):
            try:
                fd, _addr = sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    continue
                if not retried and self.on_short is not None and self.on_short(exc):
                    retried = True
                    continue
                self._pause()
                return
            try:
                coro = connect_accepted(self.loop, fd, family, self.factory, self._done)
            except Exception as exc:
                log.debug("admin: accepted connection not served: %r", exc)
                continue
            if coro is not None:
                self._pending.add(coro)

    def _done(self, coro, _arg) -> None:
        self._pending.discard(coro)

    def _pause(self) -> None:
        if self._paused is not None:
            return
        for s in self.sockets:
            self.loop.remove_reader(s.fileno())
        self._paused = self.loop.call_later(self.PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        for s in self.sockets:
            self.loop.add_reader(s.fileno(), self._on_readable, s, int(s.family))

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted connections go on)."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        else:
            for s in self.sockets:
                if s.fileno() >= 0:
                    self.loop.remove_reader(s.fileno())
        for s in self.sockets:
            s.close()
        for coro in list(self._pending):
            coro.close()
        self._pending.clear()
