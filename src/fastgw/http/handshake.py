"""The handshake protocol and the phases of the upgrade.

One accepted client connection goes through these phases (see README, "One
connection"), each returning a verdict: None to go on, or the one Refusal the
client gets as its HTTP answer (never a 101 followed by a close):

1. read head   `Handshake.data_received`: the request head, with a size cap (431) and a
               time limit (408, the gateway's clock).
2. route       parse the head and route it, check the upgrade (400, 404, 405, 426), the
               API's schemes (403) and the drain (503). Sans-I/O (http.head).
3. identify    Origin and credentials (401, 403; admission.identify).
4. admit       the client's address, count and rate limits (429, 503; admission.admit),
               then the relay is made with the message rules of the client's plan.
5. dial        the backend (upstream.Dial) while client bytes keep being buffered
               (reading pauses past a cap): 502, 504.
6. answer      the 101 (with the backend's subprotocol and permessage-deflate answer,
               http.extensions); the transport goes to the relay's
               client leg (the Cython core is its protocol from then on) and the bytes read
               after the head are fed to it.
7. relay       the core relays frames until both legs are gone.
8. end of life `Gateway.end_of_life`: slots released, metrics and the event; it runs
               exactly once for every connection, refused or relayed (Pingora's logging
               phase).
"""

from __future__ import annotations

import asyncio
import logging

from fastgw._core import Relay
from fastgw.admission import UpgradeRequest, admit, identify, shared_limits
from fastgw.connection import Connection
from fastgw.http.extensions import client_answer, deflate_offers, format_deflate
from fastgw.http.forwarding import backend_headers
from fastgw.http.head import Request, check_upgrade, http_response, parse_head, switching_protocols
from fastgw.observe.logs import clean, url_without_query
from fastgw.pool import hash_value
from fastgw.upstream import Dial, accept_key
from fastgw.verdicts import Refusal

# Client bytes buffered while the backend is dialled; reading pauses past this.
EARLY_BUFFER = 64 * 1024


class Handshake(asyncio.Protocol):
    """Reads and decides one upgrade, then hands the transport to the relay."""

    def __init__(self, gw, secure: bool):
        self.gw = gw                 # the gateway.Gateway
        self.secure = secure
        self.transport = None
        self.buf = bytearray()
        self.state = "head"          # head -> upgrading -> done
        self.paused = False
        self.timer = None
        self.task = None             # the wait for a cluster's shares, if any
        self.dialing = None          # the upstream.Dial under way, if any
        self.dial_timer = None       # the time-out of all the attempts (gateway.dial_deadline)
        self.cap_slot = False        # holds a slot of the shared max-connections count (workers)
        self.peer_ip = ""
        self.conn: Connection | None = None
        # What the phases find, for the next ones.
        self.api = None              # routing.CompiledApi, once routed
        self.rest = ""               # the target after the API's prefix
        self.offered: list[str] = []
        self.request: UpgradeRequest | None = None
        self.who = None              # identity.Identity, once identified
        self.relay = None            # once admitted (the record's own is dropped by its end of life)
        self.extensions = None       # the 101's Sec-WebSocket-Extensions (permessage-deflate)

    # -- asyncio.Protocol: the read-head phase ---------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.conn = Connection(self.peer_ip)
        self.gw.handshakes.add(self)
        self.timer = self.gw.handshake_deadlines.call_later(self._timed_out)

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
            self.conn.head_at = self.gw.clock.now()
            self._begin(end)
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
                self.task.cancel()          # the cluster's wait ends it
            elif self.dialing is not None:
                self._stop_dial_timer()
                self.dialing.cancel()
                self.dialing = None
                self.target.active -= 1
                if not self.relay.ended:
                    self.relay.abort()      # its end of life
            else:
                self.gw.end_of_life(self.conn)

    def _stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self):
        self.timer = None
        if self.state == "head":
            self.refuse(Refusal(408, "handshake timeout"))

    def refuse(self, refusal: Refusal) -> None:
        """Answer with the refusal and end the connection (its end of life counts it)."""
        if self.state == "done":
            return
        self.state = "done"
        self._stop_timer()
        self.gw.end_of_life(self.conn, refusal)
        reason = clean(refusal.reason)
        self.gw.log_throttle.info(("refused", refusal.status, reason), "refused %s: %d %s",
                                  clean(self.peer_ip), refusal.status, reason)
        self.transport.write(http_response(refusal.status, refusal.reason, refusal.headers))
        self.transport.close()

    # -- the phase driver: callbacks, no Task but for the wait for a cluster's shares ----
    def _begin(self, end: int) -> None:
        """Parse, route and identify; then admit and dial (after the cluster's shares)."""
        self.end = end
        try:
            req = parse_head(bytes(self.buf[:end]))
            if isinstance(req, Refusal):
                return self._settle(req)
            self.req = req
            refusal = self._route(req)
            if refusal is None:
                refusal = self._identify(req)
            if refusal is None and self.gw.cluster is not None:
                self.task = self.gw.loop.create_task(self._shared_then_admit())
                return
        except Exception as exc:     # never let a bug take the loop down
            refusal = self._internal(exc)
        if refusal is None:
            self._admit_and_dial()
        else:
            self._settle(refusal)

    async def _shared_then_admit(self) -> None:
        try:
            refusal = await self._shared()
        except asyncio.CancelledError:
            self.task = None
            self.gw.end_of_life(self.conn)
            raise
        except Exception as exc:
            refusal = self._internal(exc)
        self.task = None
        if refusal is None:
            self._admit_and_dial()
        else:
            self._settle(refusal)

    def _admit_and_dial(self) -> None:
        try:
            refusal = self._admit()
            if refusal is None:
                refusal = self._dial()
        except Exception as exc:
            refusal = self._internal(exc)
        if refusal is not None:
            self._settle(refusal)

    def _internal(self, exc: Exception) -> Refusal:
        """A bug met during the upgrade: logged, and the client's 500."""
        self.gw.log_throttle.log(logging.ERROR, ("internal", type(exc).__name__),
                                 "internal error during upgrade", exc_info=exc)
        if self.state == "done":         # already handed over: no HTTP answer possible
            self.transport.abort()
        return Refusal(500, f"internal error: {type(exc).__name__}")

    def _settle(self, refusal: Refusal) -> None:
        """The upgrade ends refused: the answer, the relay (if made) aborted, the end of life."""
        self._stop_dial_timer()
        self.refuse(refusal)
        if self.relay is None:
            self.gw.end_of_life(self.conn)      # once: a no-op as refuse ran it
        elif not self.relay.ended:
            self.relay.abort()                  # its end of life has run: a no-op then

    def _route(self, req: Request) -> Refusal | None:
        """The route phase: the upgrade checks, the API's schemes, the drain."""
        routed = check_upgrade(req, self.gw.router)
        if isinstance(routed, Refusal):
            return routed
        self.api, self.rest, self.offered = routed
        self.conn.api = self.api.name
        if ("wss" if self.secure else "ws") not in self.api.schemes:
            return Refusal(403, f"this API requires {'ws' if self.secure else 'wss'}", kind="forbidden")
        if self.gw.draining and not self.gw.retired:
            # A retiring worker (rolling restart) refuses nobody: a late upgrade gets its
            # 101, then 1001 with the others (Gateway.attach).
            return Refusal(503, "gateway is shutting down", kind="capacity")
        return None

    def _identify(self, req: Request) -> Refusal | None:
        clock = self.gw.clock
        _, _, query = req.target.partition("?")
        self.request = UpgradeRequest(req.headers, query, self.peer_ip, clock.now(), clock.wall())
        who = identify(self.api, self.request)
        if isinstance(who, Refusal):
            return who
        self.who = who
        return None

    async def _shared(self) -> Refusal | None:
        """With a cluster: this process's shares of the limits the upgrade needs (a key new
        here waits for its first grant, at most the store's timeout; fastgw.cluster.node)."""
        limits = shared_limits(self.api, self.request, self.who)
        if not limits:
            return None
        keys, refusal = await self.gw.cluster.prepare(limits)
        if self.conn.ended or self.gw.cluster is None:    # ended meanwhile (time-out, shutdown)
            if self.gw.cluster is not None:
                self.gw.cluster.release(keys)
            return refusal or Refusal(503, "gateway is shutting down")
        self.conn.shared = keys
        if refusal is not None:
            refusal.client = self.who.client_id or self.peer_ip
        return refusal

    def _admit(self) -> Refusal | None:
        """The admit phase: the limits, then the relay with the message rules of the plan."""
        gw, api, conn = self.gw, self.api, self.conn
        admission = admit(api, gw.store, self.request, self.who)
        if isinstance(admission, Refusal):
            return admission
        conn.admission = admission
        up = api.upgrade
        clock = gw.clock
        conn.id = gw.next_id()
        conn.started, conn.started_mono = clock.wall(), clock.now()
        relay = Relay(gw.relay_gone, conn, clock=clock, max_frame_size=up.max_frame_size)
        stats = gw.metrics.api(api.name)
        counting = gw.metrics.enabled
        relay.client.set_policies(admission.request_rules, gw.store, admission.request_max_size,
                                  stats=stats.request if counting else None)
        relay.backend.set_policies(admission.response_rules, gw.store, admission.response_max_size,
                                   stats=stats.response if counting else None)
        conn.relay = self.relay = relay
        return None

    def _dial(self) -> Refusal | None:
        """The dial phase: the backend's 101 (its leg goes to the relay), or 502/504.
        A pool's target is picked for each attempt (fastgw.pool); a failure that another
        target may not share is tried again on one not tried yet, `retries` times at most,
        within the policy's `timeout` for all the attempts. Returns the refusal if no attempt
        could start; the attempts end in `_dialled`."""
        req, conn, up = self.req, self.conn, self.api.upgrade
        self.dial_start = self.gw.clock.now()
        self.deadline = self.dial_start + up.timeout
        self.offers = offers = []
        if up.extensions == "pass":
            # A drop in the response flow: the backend must not compress with context takeover.
            response = self.api.response
            offers = self.offers = deflate_offers(
                req.get_all("sec-websocket-extensions"),
                server_no_context_takeover=response is not None and response.drops)
        self.backend_headers = backend_headers(req, self.peer_ip, self.secure, self.offered,
                                               conn.admission,
                                               ", ".join(format_deflate(o) for o in offers))
        self.hash_key = None
        pool = self.gw.pools[self.api.name]
        if pool.hash_key is not None:
            self.hash_key = hash_value(pool.hash_key, conn.admission, req.headers,
                                       self.request.query)
        self.tried = []
        self.failed = None
        self.dial_timer = self.gw.dial_deadline(up.timeout, self._dial_timed_out)
        return self._attempt()

    def _dial_timed_out(self) -> None:
        self.dial_timer = None
        if self.dialing is not None:
            self.dialing.expire(self.api.upgrade.timeout)      # _dialled: the 504

    def _stop_dial_timer(self) -> None:
        if self.dial_timer is not None:
            self.dial_timer.cancel()
            self.dial_timer = None

    def _attempt(self) -> Refusal | None:
        """Dial the next target: None once it is under way, or the refusal if none is left."""
        clock, up = self.gw.clock, self.api.upgrade
        target = self.gw.pools[self.api.name].pick(self.hash_key, self.tried, clock.now())
        if target is None:           # every target tried, or draining
            return self.failed or Refusal(503, "every backend target is draining", kind="capacity")
        self.tried.append(target)
        self.target = target
        self.url = up.backend_url(self.rest, self.conn.admission.strip_query, target.endpoint)
        target.active += 1
        try:
            self.dialing = Dial(up, self.url, self.backend_headers, self.offered,
                                self.relay.backend, self._dialled, deflate=self.offers)
            self.dialing.start()     # may end at once, in _dialled
        except BaseException:
            target.active -= 1
            self.dialing = None
            raise
        return None

    def _dialled(self, dialled) -> None:
        """An attempt's end (upstream.Dial's `done`): the answer, another attempt, or the
        refusal."""
        self.dialing = None
        conn, target, gw = self.conn, self.target, self.gw
        try:
            if isinstance(dialled, Refusal):
                target.active -= 1
                gw.dial_failed(target, dialled)
                reason = clean(dialled.reason)
                gw.log_throttle.warning(("upstream", conn.api, dialled.status, reason),
                                        "api %s: %s -> %d: %s", conn.api,
                                        url_without_query(self.url), dialled.status, reason)
                self.failed = dialled
                if (not dialled.retry or len(self.tried) > self.api.upgrade.retries
                        or gw.clock.now() >= self.deadline or self.state != "upgrading"):
                    refusal = dialled
                else:
                    refusal = self._attempt()
                if refusal is not None:
                    self._settle(refusal)
                return
            self._stop_dial_timer()
            gw.dial_ok(target)
            conn.target = target
            conn.subprotocol = dialled.subprotocol
            if dialled.deflate is not None:
                # A drop in the request flow: the client must not compress with context takeover.
                request = self.api.request
                self.extensions = client_answer(dialled.deflate,
                                                request is not None and request.drops)
            conn.dial_us = (gw.clock.now() - self.dial_start) * 1e6
            if self.state == "upgrading":
                self._answer(self.req, self.end)
            else:
                self.relay.abort()           # refused meanwhile (the gateway's close)
        except Exception as exc:
            self._settle(self._internal(exc))

    def _answer(self, req: Request, end: int) -> None:
        """The answer phase: the 101, and the transport handed to the relay."""
        self.state = "done"
        self._stop_timer()
        self.conn.cap_slot, self.cap_slot = self.cap_slot, False   # the relayed connection's now
        self.gw.handshakes.discard(self)
        relay = self.relay
        early = bytes(self.buf[end + 4:])
        self.buf = bytearray()
        transport = self.transport
        transport.write(switching_protocols(accept_key(req.get("sec-websocket-key")),
                                            self.conn.subprotocol, self.extensions))
        if self.extensions is not None:
            relay.client.set_compression(True)
        transport.set_protocol(relay.client)
        relay.client.connection_made(transport)
        self.gw.attach(self.conn, self.api)
        relay.client.feed(early)
        if self.paused:
            transport.resume_reading()
