"""The gateway's listeners: their sockets and TLS contexts, and the handshakes under way.

A Listener is one configured `listeners[]` entry (its listening sockets, one per address
its host resolves to, and the TLS context of new clients, which a reload replaces).
The HandshakeTable counts the client connections between their accept() and their
hand-over to the relay, by address (limits.max-handshakes-per-ip, max-connections).
How the gateway accepts on them is in gateway.py (see README, "Descriptors and accepting").
"""

from __future__ import annotations

import socket
import ssl

from fastgw.accept import ListenError, listen

def listener_context(index: int, lc) -> ssl.SSLContext | None:
    """The server TLS context of a listener (read from its files now), or None."""
    if lc.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(lc.tls.cert, lc.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ListenError(getattr(exc, "errno", None),
                          f"listeners[{index}].tls: cannot load {lc.tls.cert} / {lc.tls.key}: {exc}") from None
    return ctx


class Listener:
    """One configured listener: its listening sockets and the TLS context of new clients.

    Its sockets are accepted either by the gateway's readers (`reading`) or, for a plain
    listener far from the cap, by uvloop servers made on duplicates of them (`native`):
    closing one of those closes only its duplicate, and the clients queued stay queued."""

    __slots__ = ("host", "port", "sockets", "ctx", "reading", "native")

    def __init__(self, host: str, port: int, sockets: list[socket.socket], ctx):
        self.host, self.port = host, port        # as configured (port 0: any)
        self.sockets = sockets
        self.ctx = ctx                           # replaced by a reload; None: plain ws
        self.reading = False
        self.native: list | None = None          # uvloop Servers, one per socket

    @property
    def addresses(self) -> list[tuple[str, str, int]]:
        scheme = "wss" if self.ctx is not None else "ws"
        return [(scheme, *s.getsockname()[:2]) for s in self.sockets if s.fileno() >= 0]

    def describe(self) -> str:
        return ", ".join(f"{scheme}://{f'[{h}]' if ':' in h else h}:{p}" for scheme, h, p in self.addresses)

    def close(self) -> None:
        """Close the sockets (stop accepting first)."""
        for s in self.sockets:
            s.close()

    def native_alive(self) -> bool:
        """False once uvloop has closed a server of ours (it does on a failed accept())."""
        for server in self.native or ():
            for s in server.sockets or (None,):
                if s is None or s.fileno() < 0:
                    return False
        return True


async def bind(loop, index: int, lc, backlog: int) -> list[socket.socket]:
    try:
        return await listen(loop, lc.host, lc.port, backlog)
    except OSError as exc:
        raise ListenError(exc.errno, f"listeners[{index}]: {exc}") from None


class HandshakeTable:
    """The client connections in their handshake (TLS, request head, dial), by peer address.

    A connection counts from its accept() to its hand-over to the relay or its end, whichever
    comes first: counted by Gateway._accept, then `add` / `discard` by the Handshake protocol
    (connection_made; hand-over or connection_lost), or `forget` by the accept path when
    connection_made never came (a failed TLS handshake). Iterating gives the Handshake
    protocols that have their transport. A connection accepted by a uvloop server counts
    from its connection_made (`add`), and `added(hs, n)` is called then (n: the connections
    of its address now). `gone(hs)` and then `wake()`, when set, are called as a connection
    stops counting."""

    __slots__ = ("_set", "_ip", "by_ip", "wake", "added", "gone")

    def __init__(self):
        self._set: set = set()
        self._ip: dict = {}              # every counted connection's Handshake -> peer address
        self.by_ip: dict[str, int] = {}
        self.wake = None
        self.added = None
        self.gone = None                 # called with each connection that stops counting

    @property
    def counted(self) -> int:
        return len(self._ip)

    def add(self, hs) -> None:
        self._set.add(hs)
        if hs not in self._ip:           # accepted by a uvloop server: it counts from now
            ip = hs.peer_ip
            self._ip[hs] = ip
            n = self.by_ip.get(ip, 0) + 1
            self.by_ip[ip] = n
            if self.added is not None:
                self.added(hs, n)

    def discard(self, hs) -> None:
        self._set.discard(hs)
        ip = self._ip.pop(hs, None)
        if ip is not None:
            by_ip = self.by_ip
            n = by_ip[ip] - 1
            if n:
                by_ip[ip] = n
            else:
                del by_ip[ip]
            if self.gone is not None:
                self.gone(hs)
            if self.wake is not None:
                self.wake()

    def forget(self, hs) -> None:
        if hs not in self._set:
            self.discard(hs)

    def __iter__(self):
        return iter(self._set)

    def __len__(self) -> int:
        return len(self._set)

    def __contains__(self, hs) -> bool:
        return hs in self._set
