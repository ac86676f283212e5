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
import logging
import re
import ssl
import time
from http import HTTPStatus

from fastgw._core import LimitZone, Relay
from fastgw import config as cfgmod
from fastgw import events as ev
from fastgw.identity import AuthError, forwarded_node
from fastgw.logs import Throttle, clean, url_without_query
from fastgw.metrics import Metrics, TableFullWarnings
from fastgw.policies import Refusal, Router, UpgradeRequest, compile_config
from fastgw.upstream import UpstreamError, accept_key, dial
from fastgw.uri import BadTarget, normalize_host, normalize_target

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

# RFC 9110 token characters; control characters in a target or a field value.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
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
    if not _TOKEN.fullmatch(method):
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
        if not _TOKEN.fullmatch(name):
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
                if not _TOKEN.fullmatch(p):
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
    if _TOKEN.fullmatch(value):
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
            relay = Relay(gw.loop, gw._relay_ended, conn, max_message_size=up.max_message_size,
                          max_frame_size=up.max_frame_size)
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


class Gateway:
    """Listeners and live connections of one process."""

    # A full limit table is logged at most this often (s), looked at this often (s).
    TABLE_FULL_LOG_INTERVAL = 10.0
    TABLE_FULL_CHECK = 1.0

    def __init__(self, config, config_path: str | None = None, histogram_factory=None):
        self.config = config
        self.config_path = config_path
        self.router: Router = compile_config(config)
        self.metrics = Metrics(histogram_factory, intervals=config.histogram_log is not None,
                               enabled=config.metrics)
        self.metrics.active = self._active_by_api
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
        self.servers = []
        self.addresses = []          # (scheme, host, port)
        self.handshakes: set[Handshake] = set()
        self.live: dict[int, Connection] = {}
        self.draining = False
        self._ids = 0
        self.accepted = 0
        self.refused: dict[int, int] = {}
        self._idle = None

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

    def _active_by_api(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for conn in self.live.values():
            out[conn.api] = out.get(conn.api, 0) + 1
        return out

    async def start(self) -> list[tuple[str, str, int]]:
        self.loop = asyncio.get_running_loop()
        if self._table_timer is None:
            self._table_timer = self.loop.call_later(self.TABLE_FULL_CHECK, self._watch_table)
        for lc in self.config.listeners:
            ctx = None
            if lc.tls is not None:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(lc.tls.cert, lc.tls.key)
            secure = ctx is not None
            server = await self.loop.create_server(
                lambda secure=secure: Handshake(self, secure),
                lc.host, lc.port, ssl=ctx, backlog=self.config.backlog,
                reuse_address=True, ssl_handshake_timeout=self.handshake_timeout if ctx else None,
            )
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.addresses.append(("wss" if secure else "ws", host, port))
        return self.addresses

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
        if self.draining and not self.live and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # ---- the admin API's view (admin.AdminBackend) ------------------------

    def ready(self) -> bool:
        return bool(self.servers) and not self.draining

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
        """Re-read the configuration file; None when applied, else why not."""
        if self.config_path is None:
            return "no configuration file to reload"
        try:
            config = cfgmod.load(self.config_path)
            router = compile_config(config)
        except cfgmod.ConfigError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"{self.config_path}: {exc}"
        kept = {a.name for a in router.apis}
        self.config, self.router = config, router
        self.handshake_timeout = float(config.handshake_timeout)
        self.max_header_size = int(config.max_header_size)
        for name in kept:
            self.metrics.api(name)
        grace = float(config.reload_grace)
        for conn in self.live.values():
            if conn.api not in kept and conn.relay is not None and conn.removal_timer is None:
                conn.removal_timer = self.loop.call_later(
                    grace, conn.relay.close, 1001, "API removed by reload")
        log.warning("configuration reloaded from %s", self.config_path)
        return None

    async def drain(self, grace: float) -> None:
        """Stop accepting (readyz turns false) and close live connections over `grace`."""
        if self.draining:
            return
        self.loop.create_task(self.shutdown(grace))

    def status(self) -> dict:
        return {
            "active": len(self.live),
            "handshakes": len(self.handshakes),
            "accepted": self.accepted,
            "refused": {str(k): v for k, v in sorted(self.refused.items())},
            "draining": self.draining,
            # Slots given back by a lease's deallocator instead of the end of life: a bug.
            "lease_leaks": self.zone.lease_leaks,
        }

    async def shutdown(self, drain_time: float) -> None:
        """Stop accepting, close live connections with 1001, wait up to drain_time."""
        self.draining = True
        for server in self.servers:
            server.close()
        if self._table_timer is not None:
            self._table_timer.cancel()
            line = self.table_warnings.check(float("inf"))     # what the last interval held
            if line is not None:
                log.warning("%s", line)
        for hs in list(self.handshakes):
            if hs.state == "head":
                hs.refuse(Refusal(503, "gateway is shutting down"))
        for conn in list(self.live.values()):
            if conn.relay is not None:
                conn.relay.close(1001, "gateway shutting down")
        if self.live:
            self._idle = self.loop.create_future()
            try:
                await asyncio.wait_for(self._idle, drain_time)
            except TimeoutError:
                log.warning("drain time over: cutting %d connections", len(self.live))
        for conn in list(self.live.values()):
            relay = conn.relay
            if relay is not None:
                for leg in (relay.client, relay.backend):
                    if leg.connected:
                        leg.abort_transport()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except (TimeoutError, Exception):
                pass
