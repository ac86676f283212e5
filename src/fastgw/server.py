"""Listeners, the handshake and the upgrade phase, drain.

One accepted connection goes through these steps (see README, "One connection"):

1. `Handshake` (an asyncio.Protocol of ours) reads the HTTP request head, with a
   size cap (431) and a time limit (handshake timeout).
2. The head is checked and routed; a refusal is an HTTP answer (400, 404, 405,
   426, 431), never a 101 followed by a close.
3. The backend is dialled (`upstream.dial`) while client bytes keep being
   buffered (reading pauses past a cap). Failure: 502 or 504.
4. The 101 is written (with the backend's subprotocol), the transport is handed
   to the client leg of the Relay (the Cython core is its protocol from then
   on) and the bytes read after the head are fed to it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import json
import logging
import os
import re
import socket
import ssl
import time
from http import HTTPStatus

import msgspec

from fastgw._core import LimitZone, Relay
from fastgw.accept import (RESERVED_FDS, RESOURCE_ERRNOS, ListenError, Spares, connect_accepted,
                           derived_max_connections, listen, raise_fd_limit)
from fastgw import config as cfgmod
from fastgw.observe import events as ev
from fastgw.identity import AuthError, forwarded_node
from fastgw.observe.logs import Throttle, clean, url_without_query
from fastgw.observe.metrics import Metrics, TableFullWarnings
from fastgw.policies import Refusal, Router, UpgradeRequest, compile_config
from fastgw.upstream import UpstreamError, accept_key, dial
from fastgw.config.web import HTTP_TOKEN, BadTarget, normalize_host, normalize_target

log = logging.getLogger("fastgw")

# Client bytes buffered while the backend is dialled; reading pauses past this.
EARLY_BUFFER = 64 * 1024

# Headers never copied to the backend: hop-by-hop (RFC 9110 7.6.1), the
# WebSocket handshake's own (the gateway makes its own handshake), and those
# the gateway sets itself.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
    "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
})

# Headers that a request may carry once at most (400 otherwise), by lower-case name.
_SINGLE = {"host": "Host", "content-length": "Content-Length",
           "sec-websocket-key": "Sec-WebSocket-Key", "sec-websocket-version": "Sec-WebSocket-Version"}

# Control characters in a target or a field value.
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Request:
    """A parsed HTTP request head."""

    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers          # (lower-case name, value), in order

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every header of that name, lower-cased."""
        out = []
        for value in self.get_all(name):
            out.extend(t.strip().lower() for t in value.split(",") if t.strip())
        return out


def parse_head(head: bytes) -> Request:
    """Parse a request head (without the final CRLF CRLF). Raises Refusal(400)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise Refusal(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise Refusal(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise Refusal(400, "unsupported HTTP version")
    if not HTTP_TOKEN.fullmatch(method):
        raise Refusal(400, "malformed method")
    if not target.startswith("/"):
        raise Refusal(400, "request target must be an absolute path")
    if _BAD_TARGET.search(target):
        raise Refusal(400, "malformed request target")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name:
            raise Refusal(400, "malformed header line")
        if not HTTP_TOKEN.fullmatch(name):
            raise Refusal(400, "malformed header name")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise Refusal(400, "malformed header value")
        headers.append((name.lower(), value))
    return Request(method, target, version, headers)


def check_upgrade(req: Request, router: Router):
    """Validate and route an upgrade request. Returns (api, rest, offered subprotocols)."""
    if req.method != "GET":
        raise Refusal(405, "only GET can be upgraded to a WebSocket", [("Allow", "GET")])
    if req.version != "HTTP/1.1":
        raise Refusal(400, "HTTP/1.1 is required for a WebSocket upgrade")
    hosts = req.get_all("host")
    if len(hosts) != 1 or not hosts[0]:
        raise Refusal(400, "exactly one Host header is required")
    for name in _SINGLE:
        if len(req.get_all(name)) > 1:
            raise Refusal(400, f"duplicate {_SINGLE[name]} header")
    if req.get("transfer-encoding") is not None or req.get("content-length") not in (None, "0"):
        raise Refusal(400, "an upgrade request has no body")
    try:
        target = normalize_target(req.target)
        hostname = normalize_host(hosts[0])
    except BadTarget as exc:
        raise Refusal(400, str(exc)) from None
    found = router.route(target, hostname)
    if found is None:
        raise Refusal(404, "no API at this path")
    api, rest = found
    try:
        if "websocket" not in req.tokens("upgrade") or "upgrade" not in req.tokens("connection"):
            raise Refusal(426, "this endpoint speaks WebSocket only",
                          [("Upgrade", "websocket"), ("Connection", "Upgrade")])
        if req.get_all("sec-websocket-version") != ["13"]:
            raise Refusal(426, "unsupported Sec-WebSocket-Version", [("Sec-WebSocket-Version", "13")])
        keys = req.get_all("sec-websocket-key")
        try:
            if len(keys) != 1 or len(base64.b64decode(keys[0], validate=True)) != 16:
                raise ValueError
        except (ValueError, binascii.Error):
            raise Refusal(400, "missing or malformed Sec-WebSocket-Key") from None
        offered = []
        for value in req.get_all("sec-websocket-protocol"):
            for p in value.split(","):
                p = p.strip(" \t")
                if not p:
                    continue            # empty list elements are ignored (RFC 9110 5.6.1)
                if not HTTP_TOKEN.fullmatch(p):
                    raise Refusal(400, "malformed Sec-WebSocket-Protocol")
                offered.append(p)
        allowed = api.upgrade.subprotocols
        if allowed is not None:
            offered = [p for p in offered if p in allowed]
    except Refusal as refusal:
        refusal.api = api.name
        raise
    return api, rest, offered


def _forwarded_value(value: str) -> str:
    """A Forwarded parameter value: a token as it is, else a quoted-string."""
    if HTTP_TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def backend_headers(req: Request, peer_ip: str, secure: bool, offered: list[str],
                    admission=None) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus the forwarding headers, for the backend handshake.

    `admission` (policies.Admission) says what the client is: its address (X-Real-IP),
    whether the peer is a trusted proxy (whose Forwarded is kept, with the gateway's element
    appended; from any other peer it is replaced), the headers to remove (a hidden
    credential, a client's own identity headers) and those to add (the identity)."""
    dropped = set(_NOT_FORWARDED)
    dropped.update(req.tokens("connection"))
    client_ip, trusted = peer_ip, False
    if admission is not None:
        dropped.update(admission.strip_headers)
        client_ip, trusted = admission.client_ip, admission.peer_trusted
    out = []
    xff = []
    forwarded = []
    for name, value in req.headers:
        if name == "x-forwarded-for":
            xff.append(value)
        elif name == "forwarded":
            forwarded.append(value)
        elif name not in dropped:
            out.append((name, value))
    proto = "https" if secure else "http"
    host = req.get("host") or ""
    xff.append(peer_ip)
    out.append(("X-Forwarded-For", ", ".join(xff)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Real-IP", client_ip))
    element = f"for={forwarded_node(peer_ip)};host={_forwarded_value(host)};proto={proto}"
    out.append(("Forwarded", ", ".join([*forwarded, element] if trusted else [element])))
    if admission is not None:
        out.extend(admission.add_headers)
    if offered:
        out.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
    return out


def http_response(status: int, reason: str, headers: list[tuple[str, str]] = ()) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode()
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class Connection:
    """What the server keeps about one live relayed connection."""

    __slots__ = ("id", "api", "peer", "started", "started_mono", "subprotocol", "relay", "admission",
                 "lifetime_timer", "idle_timer", "expiry_timer", "removal_timer", "dial_us",
                 "ping_timers")

    def __init__(self, id_: int, api: str, peer: str, admission):
        self.id = id_
        self.api = api
        self.peer = peer
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.subprotocol = None
        self.dial_us = 0.0
        self.relay = None
        self.admission = admission          # policies.Admission: identity, leases, rules
        self.lifetime_timer = None
        self.idle_timer = None
        self.expiry_timer = None
        self.removal_timer = None
        self.ping_timers = [None, None]     # liveness of the client side, the backend side

    def describe(self) -> dict:
        """The admin API's view of the connection."""
        relay = self.relay
        msgs = relay.messages if relay is not None else (0, 0)
        byts = relay.bytes if relay is not None else (0, 0)
        return {"id": self.id, "api": self.api, "client": self.client_key, "remote": self.peer,
                "started": self.started, "subprotocol": self.subprotocol,
                "messages_in": msgs[0], "messages_out": msgs[1],
                "bytes_in": byts[0], "bytes_out": byts[1]}

    @property
    def client_key(self) -> str:
        return self.admission.client_key

    def cancel_timers(self) -> None:
        for t in (self.lifetime_timer, self.idle_timer, self.expiry_timer, self.removal_timer):
            if t is not None:
                t.cancel()
        self.lifetime_timer = self.idle_timer = self.expiry_timer = self.removal_timer = None
        for t in self.ping_timers:
            if t is not None:
                t.cancel()
        self.ping_timers = [None, None]


class Handshake(asyncio.Protocol):
    """Reads and decides one upgrade, then hands the transport to the relay."""

    def __init__(self, gw: "Gateway", secure: bool):
        self.gw = gw
        self.secure = secure
        self.transport = None
        self.buf = bytearray()
        self.state = "head"          # head -> upgrading -> done
        self.paused = False
        self.timer = None
        self.task = None
        self.peer_ip = ""
        self.api_name = None         # once routed
        self.client_key = None       # once identified
        self.head_at = 0.0           # monotonic time the request head was complete

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.gw.handshakes.add(self)
        self.timer = self.gw.loop.call_later(self.gw.handshake_timeout, self._timed_out)

    def data_received(self, data):
        self.buf += data
        if self.state == "head":
            end = self.buf.find(b"\r\n\r\n")
            limit = self.gw.max_header_size
            if end < 0:
                if len(self.buf) > limit:
                    self.refuse(Refusal(431, "request header block too large"))
                return
            if end > limit:
                self.refuse(Refusal(431, "request header block too large"))
                return
            self.state = "upgrading"
            self.head_at = time.monotonic()
            self.task = self.gw.loop.create_task(self._upgrade(end))
        elif self.state == "upgrading" and not self.paused and len(self.buf) > EARLY_BUFFER:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._stop_timer()
        self.gw.handshakes.discard(self)
        if self.state != "done":
            self.state = "done"
            if self.task is not None:
                self.task.cancel()

    # -- the upgrade -------------------------------------------------------
    def _stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self):
        self.timer = None
        if self.state == "head":
            self.refuse(Refusal(408, "handshake timeout"), count=True)

    def refuse(self, refusal: Refusal, count: bool = True):
        if self.state == "done":
            return
        self.state = "done"
        self._stop_timer()
        if count:
            self.gw.count_refusal(self, refusal)
        reason = clean(refusal.reason)
        self.gw.log_throttle.info(("refused", refusal.status, reason), "refused %s: %d %s",
                                  clean(self.peer_ip), refusal.status, reason)
        self.transport.write(http_response(refusal.status, refusal.reason, refusal.headers))
        self.transport.close()

    async def _upgrade(self, end: int):
        gw = self.gw
        relay = None
        admission = None
        try:
            req = parse_head(bytes(self.buf[:end]))
            api, rest, offered = check_upgrade(req, gw.router)
            self.api_name = api.name
            scheme = "wss" if self.secure else "ws"
            if scheme not in api.schemes:
                raise Refusal(403, f"this API requires {'ws' if self.secure else 'wss'}",
                              kind="forbidden")
            if gw.draining:
                raise Refusal(503, "gateway is shutting down", kind="capacity")
            _, _, query = req.target.partition("?")
            try:
                admission = api.admit(gw.zone, UpgradeRequest(
                    req.headers, query, self.peer_ip, gw.clock(), time.time()))
            except AuthError as exc:
                raise Refusal(exc.status, exc.reason, list(exc.headers), kind=exc.kind) from None
            self.client_key = admission.client_key
            stats = gw.metrics.api(api.name)
            up = api.upgrade
            conn = Connection(gw.next_id(), api.name, self.peer_ip, admission)
            relay = Relay(gw._relay_ended, conn, max_frame_size=up.max_frame_size)
            counting = gw.metrics.enabled
            relay.client.set_policies(admission.request_rules, gw.zone, admission.request_max_size,
                                      stats=stats.request if counting else None)
            relay.backend.set_policies(admission.response_rules, gw.zone, admission.response_max_size,
                                       stats=stats.response if counting else None)
            conn.relay = relay
            dial_start = time.monotonic()
            url = up.backend_url(rest, admission.strip_query)
            try:
                chosen = await dial(up, url,
                                    backend_headers(req, self.peer_ip, self.secure, offered, admission),
                                    offered, relay.backend)
            except UpstreamError as exc:
                reason = clean(exc.reason)
                gw.log_throttle.warning(("upstream", api.name, exc.status, reason),
                                        "api %s: %s -> %d: %s", api.name, url_without_query(url),
                                        exc.status, reason)
                relay.abort()
                raise Refusal(exc.status, exc.reason,
                              kind="upstream_timeout" if exc.status == 504 else "upstream_error") from None
            if self.state != "upgrading":        # the client left during the dial
                relay.abort()
                return
            conn.subprotocol = chosen
            conn.dial_us = (time.monotonic() - dial_start) * 1e6
            self._hand_over(req, end, relay, chosen, up, api)
            admission = None                     # the relay's end of life releases it now
        except Refusal as refusal:
            self.refuse(refusal)
        except asyncio.CancelledError:
            if relay is not None and not relay.ended:
                relay.abort()
            raise
        except Exception as exc:     # never let a bug take the loop down
            gw.log_throttle.log(logging.ERROR, ("internal", type(exc).__name__),
                                "internal error during upgrade", exc_info=exc)
            if relay is not None and not relay.ended:
                relay.abort()
            if self.state == "done":        # already handed over: no HTTP answer possible
                self.transport.abort()
            self.refuse(Refusal(500, f"internal error: {type(exc).__name__}"))
        finally:
            if admission is not None:
                admission.release()

    def _hand_over(self, req: Request, end: int, relay, chosen, up, api):
        self.state = "done"
        self._stop_timer()
        self.gw.handshakes.discard(self)
        head = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                "Sec-WebSocket-Accept: " + accept_key(req.get("sec-websocket-key"))]
        if chosen:
            head.append("Sec-WebSocket-Protocol: " + chosen)
        early = bytes(self.buf[end + 4:])
        self.buf = bytearray()
        transport = self.transport
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        transport.set_protocol(relay.client)
        relay.client.connection_made(transport)
        self.gw.attach(relay, api, self.head_at)
        relay.client.feed(early)
        if self.paused:
            transport.resume_reading()


# ---- listeners -----------------------------------------------------------------------

# Most accept() calls per readiness wake-up of one listening socket.
ACCEPT_BATCH = 64
# Pause of the listeners after EMFILE/ENFILE: doubled while it repeats, up to the maximum.
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 1.0


def _listener_context(index: int, lc) -> ssl.SSLContext | None:
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


async def _bind(loop, index: int, lc, backlog: int) -> list[socket.socket]:
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
    of its address now). `wake`, when set, is called as a connection stops counting."""

    __slots__ = ("_set", "_ip", "by_ip", "wake", "added")

    def __init__(self):
        self._set: set = set()
        self._ip: dict = {}              # every counted connection's Handshake -> peer address
        self.by_ip: dict[str, int] = {}
        self.wake = None
        self.added = None

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


def _show(value) -> str:
    return json.dumps(msgspec.to_builtins(value), separators=(", ", ": "))


def _unreloadable(old, new) -> str | None:
    """What a reload from `old` to `new` would change that is read once at start."""
    fields = (("admin", old.admin, new.admin), ("events", old.events, new.events),
              ("histogram-log", old.histogram_log, new.histogram_log),
              ("metrics", old.metrics, new.metrics),
              ("limits.max-keys", old.limits.max_keys, new.limits.max_keys))
    changed = [f"{name} ({_show(a)} -> {_show(b)})" for name, a, b in fields if a != b]
    if not changed:
        return None
    return ("cannot change on reload (read once at start; restart the gateway to apply): "
            + "; ".join(changed))


class Gateway:
    """Listeners and live connections of one process."""

    # A full limit table is logged at most this often (s), looked at this often (s).
    TABLE_FULL_LOG_INTERVAL = 10.0
    TABLE_FULL_CHECK = 1.0

    def __init__(self, config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.router: Router = compile_config(config)
        self.metrics = Metrics(intervals=config.histogram_log is not None, enabled=config.metrics)
        self.metrics.max_connections = lambda: self.max_connections
        self.events = None                     # an events.EventSink, set by the CLI
        self.log_throttle = Throttle(log)      # lines a request can cause (logs.Throttle)
        for api in self.router.apis:
            self.metrics.api(api.name)
        # Linear probing with a bounded probe finds no slot for a few keys past
        # about 60% load: twice the slots keeps max-keys active keys well below it.
        self.zone = LimitZone(2 * config.limits.max_keys)
        self.clock = time.monotonic            # the buckets' clock at upgrade (tests move it)
        self.metrics.message_table_full = lambda: self.zone.message_overflows
        self.table_warnings = TableFullWarnings(self.metrics, self.TABLE_FULL_LOG_INTERVAL)
        self._table_timer = None
        self.handshake_timeout = float(config.handshake_timeout)
        self.max_header_size = int(config.max_header_size)
        self.loop = None
        self.listeners: list[Listener] = []
        self.handshakes = HandshakeTable()
        self.live: dict[int, Connection] = {}
        self.draining = False
        self.on_exit = None                    # called once a drain asked to exit is over (the CLI)
        self._ids = 0
        self.accepted = 0
        self.refused: dict[int, int] = {}
        self._idle = None
        self._drain_task = None
        self._exit_asked = False
        # Descriptors and accepting (see README, "Descriptors and accepting").
        self.fd_limit_at_start = self.fd_limit = 0
        self.max_connections = 0               # effective cap (0: none)
        self.derived_max_connections = 0
        self.max_handshakes_per_ip = 0
        self._open = False                     # listeners open (between start and close)
        self._mode = "off"                     # accepting: "off", "own" (readers), "native"
        self._native_ok = False                # uvloop servers allowed (see _desired_mode)
        self._native_broken = False
        self._native_timer = None
        self._slack = 0
        self._recheck = False                  # _update_accepting on each connection's end
        self._backing_off = False
        self._backoff = ACCEPT_BACKOFF_MIN
        self._burst = 1                        # accept() calls per wake-up (see _on_readable)
        self._full = 0
        self.spares = Spares()
        self._connecting: dict = {}            # connect_accepted_socket coroutine -> Handshake

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def count_refusal(self, hs: "Handshake", refusal: Refusal) -> None:
        self.refused[refusal.status] = self.refused.get(refusal.status, 0) + 1
        if refusal.table_full is not None:
            self.metrics.table_full[refusal.table_full] += 1
        api = getattr(refusal, "api", None) or hs.api_name
        self.metrics.count_reject(api, refusal.kind)
        if self.events is not None:
            self.events.emit(ev.RejectEvent(api=api, reason=refusal.kind, status=refusal.status,
                                            client=refusal.client or hs.client_key, remote=hs.peer_ip,
                                            detail=refusal.reason))

    def _watch_table(self) -> None:
        """Log refusals for want of a limit-table slot (upgrades and messages alike)."""
        line = self.table_warnings.check(time.monotonic())
        if line is not None:
            log.warning("%s", line)
        self._table_timer = self.loop.call_later(self.TABLE_FULL_CHECK, self._watch_table)

    @property
    def addresses(self) -> list[tuple[str, str, int]]:
        """(scheme, host, port) of every listening socket, in the order of the configuration."""
        return [a for listener in self.listeners for a in listener.addresses]

    # ---- start, accepting -------------------------------------------------

    async def start(self) -> list[tuple[str, str, int]]:
        """Raise the descriptor limit, open the listeners and start accepting."""
        self.loop = asyncio.get_running_loop()
        # "native" accepting (see _desired_mode) is for uvloop's servers only: asyncio's
        # create_server(sock=...) does not complete at once and would leave a stale reader.
        self._native_broken |= not type(self.loop).__module__.startswith("uvloop")
        if self._table_timer is None:
            self._table_timer = self.loop.call_later(self.TABLE_FULL_CHECK, self._watch_table)
        self.fd_limit_at_start, self.fd_limit = raise_fd_limit()
        self.spares.take()
        listeners = []
        try:
            for i, lc in enumerate(self.config.listeners):
                ctx = _listener_context(i, lc)
                listeners.append(Listener(lc.host, lc.port,
                                          await _bind(self.loop, i, lc, self.config.backlog), ctx))
        except BaseException:
            for listener in listeners:
                listener.close()
            self.spares.release()
            raise
        self.listeners = listeners
        self._apply_limits(self.config)
        self._open = True
        self._update_accepting()
        return self.addresses

    def _apply_limits(self, config) -> None:
        sockets = sum(len(listener.sockets) for listener in self.listeners)
        self.derived_max_connections = derived_max_connections(self.fd_limit, sockets) if self.fd_limit else 0
        value = config.limits.max_connections
        self.max_connections = self.derived_max_connections if value == "auto" else int(value)
        self.max_handshakes_per_ip = int(config.limits.max_handshakes_per_ip)
        self._slack = int(config.backlog) + 64
        self._native_ok = (not self._native_broken and 0 < self.max_connections
                           <= self.derived_max_connections)
        if value != "auto" and self.derived_max_connections and \
                (value == 0 or value > self.derived_max_connections):
            log.warning("limits.max-connections %s: the descriptor limit %d holds about %d "
                        "connections; past them accept() fails with EMFILE (and is retried)",
                        value or "0 (no cap)", self.fd_limit, self.derived_max_connections)

    def capacity_note(self) -> str:
        """One line for the start: the cap and where it comes from."""
        value = self.config.limits.max_connections
        raised = (f"; the limit was raised from {self.fd_limit_at_start}"
                  if self.fd_limit > self.fd_limit_at_start else "")
        if value == "auto":
            sockets = sum(len(listener.sockets) for listener in self.listeners)
            cap = (f"max-connections {self.max_connections} (auto: (descriptor limit {self.fd_limit}"
                   f" - {RESERVED_FDS + sockets} reserved) / 2 per connection{raised})")
        elif value == 0:
            cap = f"max-connections: no cap (descriptor limit {self.fd_limit}{raised})"
        else:
            cap = f"max-connections {self.max_connections} (descriptor limit {self.fd_limit}{raised})"
        per_ip = self.max_handshakes_per_ip or "no cap"
        return f"{cap}; max-handshakes-per-ip {per_ip}"

    @property
    def _watching(self) -> bool:
        return self._mode != "off"

    def _desired_mode(self) -> str:
        """How new clients are accepted now.

        "off": not at all (closed, backing off, or at the cap: clients wait in the backlog).
        "native": plain listeners by uvloop servers (its accept path costs less per
        connection); only while room for more than `_slack` connections is left (twice
        that to go back to it), since one wake-up of a uvloop server accepts every client
        queued (up to the backlog), and only with a cap the descriptors can hold.
        "own": by the gateway's readers, one accept() at a time against the cap."""
        if not self._open or self._backing_off:
            return "off"
        cap = self.max_connections
        if not cap:
            return "own"
        room = cap - len(self.handshakes._ip) - len(self.live)
        if room <= 0:
            return "off"
        if self._native_ok and room > (self._slack if self._mode == "native" else 2 * self._slack):
            return "native"
        return "own"

    def _update_accepting(self) -> None:
        """Accept new clients exactly as `_desired_mode` says."""
        mode = self._desired_mode()
        if mode == self._mode:
            return
        self._apply_mode(mode)
        if mode == "off" and self._open and not self._backing_off:
            self.log_throttle.warning(
                "at-cap", "at max-connections %d (%d relayed, %d in handshake): new clients wait "
                "in the listen backlog until a connection ends", self.max_connections,
                len(self.live), self.handshakes.counted)

    def _apply_mode(self, mode: str) -> None:
        self._mode = mode
        for listener in self.listeners:
            self._set_listener(listener, mode)
        # Who looks again, and when: at each connection's end while off (room returns) or
        # while "own" could go back to "native"; at each connection's start while "native".
        self._recheck = mode == "off" or (mode == "own" and self._native_ok)
        self.handshakes.wake = self._update_accepting if self._recheck else None
        self.handshakes.added = self._native_added if mode == "native" else None
        if mode == "native" and self._native_timer is None:
            self._native_timer = self.loop.call_later(1.0, self._check_native)

    def _set_listener(self, listener: Listener, mode: str) -> None:
        native = mode == "native" and listener.ctx is None
        if native and listener.native is None and not self._start_native(listener):
            native = False
        reading = mode != "off" and not native
        if reading and not listener.reading:
            for s in listener.sockets:
                self.loop.add_reader(s.fileno(), self._on_readable, s, int(s.family), listener)
            listener.reading = True
        elif not reading and listener.reading:
            for s in listener.sockets:
                self.loop.remove_reader(s.fileno())
            listener.reading = False
        if not native and listener.native is not None:
            for server in listener.native:
                server.close()               # closes its duplicate only
            listener.native = None

    def _start_native(self, listener: Listener) -> bool:
        servers = []
        try:
            for s in listener.sockets:
                dup = socket.socket(s.family, s.type, s.proto, os.dup(s.fileno()))
                # create_server(sock=...) does not wait for anything: one step ends it.
                coro = self.loop.create_server(lambda: Handshake(self, False), sock=dup,
                                               backlog=self.config.backlog)
                try:
                    coro.send(None)
                except StopIteration as done:
                    servers.append(done.value)
                    done.value.sockets           # cached now: native_alive() reads them
                else:
                    coro.close()
                    dup.close()
                    raise RuntimeError("loop.create_server(sock=...) did not complete at once")
        except Exception as exc:
            for server in servers:
                server.close()
            log.warning("accepting by ourselves only: cannot serve a listener with uvloop: %r", exc)
            self._native_broken = True
            self._native_ok = False
            return False
        listener.native = servers
        return True

    def _native_added(self, hs: "Handshake", n: int) -> None:
        """A connection accepted by a uvloop server starts (connection_made)."""
        per_ip = self.max_handshakes_per_ip
        if per_ip and n > per_ip:
            hs.transport.abort()                 # its connection_lost ends its count
            self._refused_at_accept(hs.peer_ip)
        if self.max_connections - len(self.handshakes._ip) - len(self.live) <= self._slack:
            self._update_accepting()

    def _check_native(self) -> None:
        """Every second while uvloop servers accept: uvloop closes one for good when its
        accept() fails (after libuv's reserve descriptor reset a client): then accept
        ourselves, from now on."""
        self._native_timer = None
        if self._mode != "native":
            return
        if all(listener.native_alive() for listener in self.listeners):
            self._native_timer = self.loop.call_later(1.0, self._check_native)
            return
        log.warning("uvloop closed a listening socket of its own after a failed accept() (out "
                    "of descriptors?); the gateway accepts by itself from now on")
        self._native_broken = True
        self._native_ok = False
        self._update_accepting()

    def _refused_at_accept(self, ip: str) -> None:
        self.metrics.count_reject(None, "handshake_limit")
        self.log_throttle.warning(
            "per-ip-cap", "closed a new connection from %s at once: %d connections of that "
            "address in their handshake (limits.max-handshakes-per-ip)", ip,
            self.max_handshakes_per_ip)

    def _on_readable(self, sock: socket.socket, family: int, listener: Listener) -> None:
        # Up to `_burst` accept() calls per wake-up: it doubles after 4 wake-ups in a row that
        # found that many clients and halves when one comes up empty. One client per wake-up
        # (the usual case) then costs one accept(), without the EAGAIN of a second; readiness
        # is level-triggered, so a client left in the queue wakes us again.
        cap = self.max_connections
        burst = self._burst
        room = cap - len(self.handshakes._ip) - len(self.live) if cap else burst
        for _ in range(min(room, burst)):
            try:
                fd, addr = sock._accept()        # an int, no socket.socket (accept.AcceptedSocket)
            except (BlockingIOError, InterruptedError):
                self._burst = max(1, burst >> 1)
                self._full = 0
                break
            except OSError as exc:
                if self.accept_error(exc):
                    return
                continue
            self._accept(fd, addr[0], family, listener)
        else:
            if room < burst:                     # the cap, not the burst, ended the loop
                self._update_accepting()
            else:
                self._full += 1
                if self._full >= 4:
                    self._burst = min(2 * burst, ACCEPT_BATCH)
                    self._full = 0
        self._backoff = ACCEPT_BACKOFF_MIN

    def _accept(self, fd: int, ip: str, family: int, listener: Listener) -> None:
        per_ip = self.max_handshakes_per_ip
        if per_ip and self.handshakes.by_ip.get(ip, 0) >= per_ip:
            os.close(fd)
            self._refused_at_accept(ip)
            return
        ctx = listener.ctx
        hs = Handshake(self, ctx is not None)
        table = self.handshakes
        table._ip[hs] = ip                       # it counts from now (see HandshakeTable)
        table.by_ip[ip] = table.by_ip.get(ip, 0) + 1
        try:
            coro = connect_accepted(self.loop, fd, family, lambda: hs, self._connected, hs, ctx,
                                    self.handshake_timeout if ctx is not None else None)
        except Exception as exc:
            log.debug("accepted connection from %s not served: %r", ip, exc)
            coro = None
        if coro is None:
            self._connected(None, hs)
        else:
            self._connecting[coro] = hs

    def _connected(self, coro, hs) -> None:
        """The accepted socket's transport is made (or its TLS handshake failed)."""
        if coro is not None and self._connecting.pop(coro, None) is None:
            return                               # close() ended it
        if hs not in self.handshakes._set:       # no connection_made: it stops counting here
            self.handshakes.discard(hs)

    def accept_error(self, exc: OSError) -> bool:
        """A failed accept() on a listener of the process (the admin API's too), counted.
        Out of descriptors or memory: the spare descriptors are released and the listeners
        pause (back-off). True then (and the caller stops accepting for now)."""
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        self.metrics.accept_errors[name] += 1
        if exc.errno not in RESOURCE_ERRNOS:
            log.debug("accept: %s", exc)         # ECONNABORTED and the like: the client left first
            return False
        self.spares.release()
        if not self._backing_off:
            delay = self._backoff
            self._backoff = min(2 * delay, ACCEPT_BACKOFF_MAX)
            self.log_throttle.warning(
                "accept-error", "accept: %s (%s; descriptor limit %d, %d client connections "
                "held): not accepting for %.1f s", exc.strerror, name, self.fd_limit,
                len(self.live) + self.handshakes.counted, delay)
            self._backing_off = True
            self._update_accepting()
            self.loop.call_later(delay, self._backoff_over)
        return True

    def _backoff_over(self) -> None:
        if not self._open:
            return
        if not self.spares.take():              # still out of descriptors: wait longer
            delay = self._backoff
            self._backoff = min(2 * delay, ACCEPT_BACKOFF_MAX)
            self.loop.call_later(delay, self._backoff_over)
            return
        self._backing_off = False
        self._update_accepting()

    # ---- live connections -------------------------------------------------

    def attach(self, relay, api, head_at: float) -> None:
        """A relay whose client is about to get its 101 joins the live table."""
        conn = relay.info
        up = api.upgrade
        self.live[conn.id] = conn
        self.accepted += 1
        am = self.metrics.api(api.name)
        am.accepted += 1
        handshake_us = (time.monotonic() - head_at) * 1e6
        am.record("handshake_us", handshake_us)
        am.record("upstream_connect_us", conn.dial_us)
        if self.events is not None:
            self.events.emit(ev.UpgradeEvent(
                id=conn.id, api=conn.api, client=conn.client_key, remote=conn.peer,
                subprotocol=conn.subprotocol, handshake_ms=handshake_us / 1e3,
                plan=conn.admission.plan))
        if self.draining:            # dialled before the drain began: it ends with the others
            self.loop.call_soon(relay.close, 1001, "gateway shutting down")
            return
        expires = conn.admission.expires_at
        if api.close_on_expiry and expires is not None:
            conn.expiry_timer = self.loop.call_later(
                max(0.0, expires - time.time()), relay.close, 1008, "token expired")
        if up.max_lifetime:
            conn.lifetime_timer = self.loop.call_later(
                up.max_lifetime, relay.close, 1001, "max lifetime reached")
        if up.idle_timeout:
            self._watch_idle(conn, up.idle_timeout, -1, time.monotonic())
        for side, (interval, timeout) in enumerate(up.liveness):
            if interval:
                conn.ping_timers[side] = self.loop.call_later(
                    interval, self._watch_liveness, conn, side, interval, timeout, -1, False)

    def _watch_liveness(self, conn: Connection, side: int, interval: float, timeout: float,
                        seen: int, pinged: bool) -> None:
        """Ping a side (0: client, 1: backend) that has sent nothing for `interval`; if it
        still sends nothing within `timeout`, it is gone (a dead peer sends no FIN)."""
        relay = conn.relay
        conn.ping_timers[side] = None
        if relay is None or relay.ended:
            return
        leg = relay.client if side == 0 else relay.backend
        reads = leg.reads
        if reads != seen or leg.paused or leg.closing:
            # It spoke; or its reading is paused (backpressure: it cannot be judged); or a
            # close handshake is under way (the close timer bounds it).
            seen, pinged, delay = reads, False, interval
        elif not pinged:
            leg.send_ping(b"fastgw liveness")
            pinged, delay = True, timeout
        else:
            relay.lost(side == 0, "client ping timeout" if side == 0 else "backend ping timeout")
            return
        conn.ping_timers[side] = self.loop.call_later(
            delay, self._watch_liveness, conn, side, interval, timeout, seen, pinged)

    def _watch_idle(self, conn: Connection, timeout: float, seen: int, since: float) -> None:
        relay = conn.relay
        if relay.ended:
            return
        now = time.monotonic()
        activity = relay.activity
        if activity != seen:
            seen, since = activity, now
        elif now - since >= timeout:
            relay.close(1001, "idle timeout")
            return
        delay = max(0.05, min(timeout / 4, since + timeout - now))
        conn.idle_timer = self.loop.call_later(delay, self._watch_idle, conn, timeout, seen, since)

    def _relay_ended(self, relay) -> None:
        conn = relay.info
        conn.cancel_timers()
        conn.admission.release()
        if conn.id in self.live:
            am = self.metrics.api(conn.api)
            code, side = relay.end_code or 1006, relay.end_side or "gateway"
            am.closes[(code, side)] += 1
            duration = time.monotonic() - conn.started_mono
            am.record("duration_ms", duration * 1e3)
            if self.events is not None:
                c, b = relay.client, relay.backend
                self.events.emit(ev.CloseEvent(
                    id=conn.id, api=conn.api, client=conn.client_key, code=code,
                    reason=(relay.end_reason or b"").decode("utf-8", "replace"), side=side,
                    duration_s=duration, messages_in=c.messages, messages_out=b.messages,
                    bytes_in=c.bytes, bytes_out=b.bytes, rejected=c.rejected + b.rejected,
                    delayed=c.delayed + b.delayed, dropped=c.dropped + b.dropped))
        conn.relay = None
        self.live.pop(conn.id, None)
        if not self.live and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if self._recheck:
            self._update_accepting()

    # ---- the admin API's view (admin.AdminBackend) ------------------------

    def ready(self) -> bool:
        return self._open and bool(self.listeners) and not self.draining

    async def metrics_text(self) -> str:
        """Formatted on the loop one API at a time (see metrics.render_async)."""
        return await self.metrics.render()

    def histogram_names(self) -> list[str]:
        return [f"{api}/{kind}" for api, am in sorted(self.metrics.apis.items())
                for kind, arr in am.histograms().items() if arr is not None]

    def histogram(self, name: str):
        """A snapshot of a histogram named API/kind_unit (see README, "Histograms")."""
        api, _, kind = name.rpartition("/")
        am = self.metrics.apis.get(api)
        arr = am.histograms().get(kind) if am is not None else None
        return arr.to_hdr() if arr is not None else None

    def connections(self, api: str | None = None, client: str | None = None) -> list[dict]:
        return [c.describe() for c in self.live.values()
                if (api is None or c.api == api) and (client is None or c.client_key == client)]

    def close_connection(self, conn_id: int) -> bool:
        conn = self.live.get(conn_id)
        if conn is None or conn.relay is None:
            return False
        conn.relay.close(1001, "closed by administrator")
        return True

    def close_client(self, client: str) -> int:
        n = 0
        for conn in list(self.live.values()):
            if conn.client_key == client and conn.relay is not None:
                conn.relay.close(1001, "closed by administrator")
                n += 1
        return n

    async def reload(self) -> str | None:
        """Re-read the configuration file and apply it; None when applied, else why not
        (and nothing was changed)."""
        if self.config_path is None:
            return "no configuration file to reload"
        try:
            config = cfgmod.load(self.config_path)
            router = compile_config(config)
        except cfgmod.ConfigError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"{self.config_path}: {exc}"
        problem = _unreloadable(self.config, config)
        if problem is not None:
            return f"{self.config_path}: {problem}"
        # Listeners: contexts read and new sockets bound before anything changes.
        current = {(listener.host, listener.port): listener for listener in self.listeners}
        plan: list[tuple[Listener, object]] = []
        opened: list[Listener] = []
        try:
            for i, lc in enumerate(config.listeners):
                ctx = _listener_context(i, lc)
                old = current.get((lc.host, lc.port))
                if old is None:
                    old = Listener(lc.host, lc.port, await _bind(self.loop, i, lc, config.backlog), None)
                    opened.append(old)
                plan.append((old, ctx))
        except OSError as exc:
            for listener in opened:
                listener.close()
            return f"{self.config_path}: {exc}"
        kept = {id(listener) for listener, _ in plan}
        removed = [listener for listener in self.listeners if id(listener) not in kept]
        self._update_accepting_off()     # and on again below, for the new set
        for listener, ctx in plan:
            listener.ctx = ctx
            if listener not in opened and config.backlog != self.config.backlog:
                for s in listener.sockets:
                    s.listen(config.backlog)
        for listener in removed:
            listener.close()             # live connections accepted there are not touched
        self.listeners = [listener for listener, _ in plan]
        names = {a.name for a in router.apis}
        self.config, self.router = config, router
        self.handshake_timeout = float(config.handshake_timeout)
        self.max_header_size = int(config.max_header_size)
        self._apply_limits(config)
        for name in names:
            self.metrics.api(name)
        grace = float(config.reload_grace)
        for conn in self.live.values():
            if conn.api not in names and conn.relay is not None and conn.removal_timer is None:
                conn.removal_timer = self.loop.call_later(
                    grace, conn.relay.close, 1001, "API removed by reload")
        self._update_accepting()
        changes = [f"+{listener.describe()}" for listener in opened]
        changes += [f"-{listener.host}:{listener.port}" for listener in removed]
        log.warning("configuration reloaded from %s%s", self.config_path,
                    f" (listeners: {', '.join(changes)})" if changes else "")
        return None

    def _update_accepting_off(self) -> None:
        """Stop accepting on every listener (before the set of listeners changes, or the end)."""
        self._apply_mode("off")

    # ---- drain and shutdown -----------------------------------------------

    async def drain(self, grace: float, exit: bool = False) -> None:
        """Start draining and return: `/readyz` turns false, new upgrades get 503, live
        connections get 1001 and are cut after `grace`. The listeners stay open (answering
        503); with `exit`, once the drain is over the process is asked to exit (`on_exit`),
        or, without one, the listeners are closed."""
        task = self._start_drain(grace)
        if exit and not self._exit_asked:
            self._exit_asked = True
            task.add_done_callback(self._drained_exit)

    def _start_drain(self, grace: float):
        if self._drain_task is None:
            self.draining = True
            self._drain_task = self.loop.create_task(self._drain(grace))
        return self._drain_task

    def _drained_exit(self, _task) -> None:
        if self.on_exit is not None:
            self.on_exit()
        else:
            self.loop.create_task(self.close())

    async def _drain(self, grace: float) -> None:
        log.info("draining: %d connections closed with 1001, %g s to end; new upgrades get 503",
                 len(self.live), grace)
        for hs in list(self.handshakes):
            if hs.state == "head":
                hs.refuse(Refusal(503, "gateway is shutting down"))
        for conn in list(self.live.values()):
            if conn.relay is not None:
                conn.relay.close(1001, "gateway shutting down")
        if not await self._wait_live_gone(grace):
            log.warning("drain time over: cutting %d connections", len(self.live))
            self._cut()
        log.info("drained")

    async def _wait_live_gone(self, timeout: float) -> bool:
        if not self.live:
            return True
        if self._idle is None or self._idle.done():
            self._idle = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            return False
        return True

    def _cut(self) -> None:
        for conn in list(self.live.values()):
            relay = conn.relay
            if relay is not None:
                for leg in (relay.client, relay.backend):
                    if leg.connected:
                        leg.abort_transport()

    def status(self) -> dict:
        return {
            "active": len(self.live),
            "handshakes": self.handshakes.counted,
            "accepted": self.accepted,
            "refused": {str(k): v for k, v in sorted(self.refused.items())},
            "draining": self.draining,
            "accepting": self._watching,
            "max_connections": self.max_connections,
            "fd_limit": self.fd_limit,
            # Slots given back by a lease's deallocator instead of the end of life: a bug.
            "lease_leaks": self.zone.lease_leaks,
        }

    async def shutdown(self, drain_time: float) -> None:
        """Drain (or go on with a drain already begun, cut after `drain_time` at most),
        then close the listeners."""
        if self.loop is None:
            return
        task = self._start_drain(drain_time)
        done, _ = await asyncio.wait({task}, timeout=drain_time)
        if not done:
            log.warning("drain time over: cutting %d connections", len(self.live))
            self._cut()
            await asyncio.wait({task}, timeout=1.0)
        await self.close()

    async def close(self) -> None:
        """Close the listeners; handshakes still open get 503, connections still live are cut
        (after up to 1 s for those closing)."""
        if not self._open:
            return
        self._open = False
        self._update_accepting_off()
        self.handshakes.wake = None
        if self._native_timer is not None:
            self._native_timer.cancel()
            self._native_timer = None
        if self._table_timer is not None:
            self._table_timer.cancel()
            self._table_timer = None
            line = self.table_warnings.check(float("inf"))     # what the last interval held
            if line is not None:
                log.warning("%s", line)
        for listener in self.listeners:
            listener.close()
        for coro, hs in list(self._connecting.items()):
            del self._connecting[coro]
            coro.close()                 # closes its transport (a TLS handshake under way)
            self.handshakes.forget(hs)
        for hs in list(self.handshakes):
            hs.refuse(Refusal(503, "gateway is shutting down"))
        if not await self._wait_live_gone(1.0):
            self._cut()
        self.spares.release()
