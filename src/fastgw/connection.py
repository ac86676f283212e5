"""The record of one client connection, and the timers of a relayed one.

A Connection is made when a client's transport is (the handshake's connection_made)
and is the context the phases of its upgrade fill in (Pingora's per-request CTX):
the API it was routed to, its admission, its relay. Once relayed it sits in the
gateway's live table, and its timers end it: `max-lifetime`, `idle-timeout`, a JWT's
expiry (`close-on-expiry`), the liveness pings of each side, and the removal of its
API by a reload. Every timer and time read goes through the gateway's clock.
"""

from __future__ import annotations


class Connection:
    """What the gateway keeps about one client connection."""

    __slots__ = ("id", "api", "peer", "started", "started_mono", "head_at", "subprotocol", "relay",
                 "admission", "ended", "lifetime_timer", "idle_timer", "expiry_timer",
                 "removal_timer", "dial_us", "ping_timers", "cap_slot", "target", "shared")

    def __init__(self, peer: str):
        self.id = 0                         # given when its relay is made
        self.api = None                     # the API's name, once routed
        self.peer = peer
        self.started = 0.0                  # wall-clock time its relay was made
        self.started_mono = 0.0
        self.head_at = 0.0                  # clock.now() when the request head was complete
        self.subprotocol = None
        self.dial_us = 0.0
        self.relay = None
        self.admission = None               # admission.Admission: identity, leases, rules
        self.ended = False                  # its end of life has run
        self.cap_slot = False               # holds a slot of the shared max-connections count
        self.target = None                  # pool.TargetState dialled (counted in its active)
        self.shared = None                  # cluster.node.Key list: the shared limits it needs
        self.lifetime_timer = None
        self.idle_timer = None
        self.expiry_timer = None
        self.removal_timer = None
        self.ping_timers = None             # liveness of [the client side, the backend side]:
                                            # a list once an API's liveness pings are armed

    def describe(self) -> dict:
        """The admin API's view of the connection."""
        relay = self.relay
        msgs = relay.messages if relay is not None else (0, 0)
        byts = relay.bytes if relay is not None else (0, 0)
        return {"id": self.id, "api": self.api, "client": self.client_key, "remote": self.peer,
                "started": self.started, "subprotocol": self.subprotocol,
                "target": self.target.label if self.target is not None else None,
                "messages_in": msgs[0], "messages_out": msgs[1],
                "bytes_in": byts[0], "bytes_out": byts[1]}

    @property
    def client_key(self) -> str | None:
        """The client's identity (see Admission.client_key), once admitted."""
        return self.admission.client_key if self.admission is not None else None

    # ---- the timers of a relayed connection ----------------------------------------

    def start_timers(self, clock, api) -> None:
        """Arm the timers of the API (a routing.CompiledApi) for the relay just attached."""
        relay, up = self.relay, api.upgrade
        expires = self.admission.expires_at
        if api.close_on_expiry and expires is not None:
            self.expiry_timer = clock.call_later(
                max(0.0, expires - clock.wall()), relay.close, 1008, "token expired")
        if up.max_lifetime:
            self.lifetime_timer = clock.call_later(
                up.max_lifetime, relay.close, 1001, "max lifetime reached")
        if up.idle_timeout:
            self._watch_idle(clock, up.idle_timeout, -1, clock.now())
        for side, (interval, timeout) in enumerate(up.liveness):
            if interval:
                if self.ping_timers is None:
                    self.ping_timers = [None, None]
                self.ping_timers[side] = clock.call_later(
                    interval, self._watch_liveness, clock, side, interval, timeout, -1, False)

    def _watch_liveness(self, clock, side: int, interval: float, timeout: float,
                        seen: int, pinged: bool) -> None:
        """Ping a side (0: client, 1: backend) that has sent nothing for `interval`; if it
        still sends nothing within `timeout`, it is gone (a dead peer sends no FIN)."""
        relay, timers = self.relay, self.ping_timers
        if timers is None:                  # cancel_timers() ran
            return
        timers[side] = None
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
        self.ping_timers[side] = clock.call_later(
            delay, self._watch_liveness, clock, side, interval, timeout, seen, pinged)

    def _watch_idle(self, clock, timeout: float, seen: int, since: float) -> None:
        relay = self.relay
        if relay is None or relay.ended:
            return
        now = clock.now()
        activity = relay.activity
        if activity != seen:
            seen, since = activity, now
        elif now - since >= timeout:
            relay.close(1001, "idle timeout")
            return
        delay = max(0.05, min(timeout / 4, since + timeout - now))
        self.idle_timer = clock.call_later(delay, self._watch_idle, clock, timeout, seen, since)

    def cancel_timers(self) -> None:
        for t in (self.lifetime_timer, self.idle_timer, self.expiry_timer, self.removal_timer):
            if t is not None:
                t.cancel()
        self.lifetime_timer = self.idle_timer = self.expiry_timer = self.removal_timer = None
        if self.ping_timers is not None:
            for t in self.ping_timers:
                if t is not None:
                    t.cancel()
            self.ping_timers = None
