# A Relay: one proxied connection, a client leg and a backend leg, its close
# timer, its end of life and its fatal path. Included by _core.pyx; declared
# in relay_decl.pxi.
#
# The fatal path: an exception that escapes a protocol callback or a timer of
# the core (they are trampolines) ends the connection at once: both legs get
# a best-effort CLOSE 1011 and are cut; it is logged once per relay; the end
# of life (on_end) still runs exactly once, when both legs are gone.

import logging as _logging

from fastgw.clock import Clock as _Clock

_log = _logging.getLogger("fastgw")


cdef void _log_fatal(object info, object exc) noexcept:
    try:
        _log.error("internal error in the relay of connection %s: closed with 1011",
                   getattr(info, "id", "?"), exc_info=(type(exc), exc, exc.__traceback__))
    except Exception:
        pass


@cython.final
cdef class Relay:
    """A proxied connection: a client leg, a backend leg, and its end of life.

    `on_end(relay)` is called exactly once, when both legs are gone (or when an
    aborted relay's backend leg is gone). `info` is any Python object the
    server wants to keep with the connection. `clock` (a fastgw.clock.Clock,
    default the real one) is what the legs read time from and set their
    timers with (delay queue, close timer); the real Clock is read in C.
    """

    def __init__(self, on_end, info=None, *, clock=None,
                 uint64_t max_frame_size=16 * 1024 * 1024,
                 Py_ssize_t max_early_bytes=256 * 1024, double close_timeout=5.0):
        cdef bint sim
        self.client = Leg.__new__(Leg)
        self.backend = Leg.__new__(Leg)
        self.client.relay = self
        self.backend.relay = self
        self.client.peer = self.backend
        self.backend.peer = self.client
        self.client.is_client = True
        self.backend.masked = True
        self.clock = clock if clock is not None else _Clock()
        sim = type(self.clock) is not _Clock
        self.client.sim_clock = sim
        self.backend.sim_clock = sim
        self._on_end = on_end
        self.info = info
        self.client.max_frame_size = max_frame_size
        self.backend.max_frame_size = max_frame_size
        self.max_early_bytes = max_early_bytes
        self._close_timeout = close_timeout
        self._close_timer = None

    cdef int _mark_end(self, uint8_t side, int code, const char* reason, Py_ssize_t size) except -1:
        """Record who ended the connection and with which code: the first to act."""
        if self._end_side != END_NONE:
            return 0
        self._end_side = side
        self.end_code = code
        self.end_reason = reason[:size] if size > 0 else b""
        return 0

    @property
    def end_side(self):
        """Who ended the connection: "client", "backend", "gateway", or None while it lives."""
        return (None, "client", "backend", "gateway")[self._end_side]

    cdef int _arm_close_timer(self) except -1:
        if self._close_timer is None and not self.ended:
            self._close_timer = self.clock.call_later(self._close_timeout, self._on_close_timeout)
        return 0

    def _on_close_timeout(self):
        """Timer: a close handshake did not finish in time: cut both legs."""
        cdef Leg leg
        try:
            self._close_timer = None
            for leg in (self.client, self.backend):
                if leg.transport is not None and not leg.gone:
                    leg.transport.abort()
        except Exception as exc:
            self._fatal(exc)

    cdef void _fatal(self, object exc) noexcept:
        """The fatal path (see the top of relay.pxi)."""
        if self.failed:
            return
        self.failed = True
        _log_fatal(self.info, exc)
        if self._end_side == END_NONE:
            self._end_side = END_GATEWAY
            self.end_code = CLOSE_INTERNAL_ERROR
            self.end_reason = b"internal error"
        self.client._fatal_close()
        self.backend._fatal_close()
        try:
            self._leg_gone()
        except Exception:
            pass

    cdef int _leg_gone(self) except -1:
        cdef bint client_done = self.client.gone or (self.client.transport is None and self.aborted)
        cdef bint backend_done = self.backend.gone or self.backend.transport is None
        if self.ended or not (client_done and backend_done):
            return 0
        self._finish()
        return 0

    cdef int _finish(self) except -1:
        cdef Leg leg
        if self.ended:
            return 0
        self.ended = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        on_end = self._on_end
        self._on_end = None
        try:
            if on_end is not None:
                on_end(self)
        finally:
            # Break the reference cycles (leg <-> relay, leg <-> leg, leg <-> transport):
            # an ended connection is then freed by reference counting at once, not by the
            # garbage collector later (whose full passes over many connections stall the loop).
            for leg in (self.client, self.backend):
                leg.relay = None
                leg.peer = None
                leg.transport = None
        return 0

    def close(self, int client_code=CLOSE_GOING_AWAY, reason="", int backend_code=CLOSE_GOING_AWAY):
        """Gateway-initiated close: `client_code` to the client, 1001 to the backend."""
        cdef bytes r = reason.encode() if isinstance(reason, str) else reason
        if self.ended:
            return
        self._mark_end(END_GATEWAY, client_code, r, len(r))
        self.client.send_gateway_close(client_code, r)
        self.backend.send_gateway_close(backend_code, r)

    def lost(self, bint client_side, reason):
        """A side stopped answering (liveness): end the connection as if its TCP
        connection were lost. The client side gone: the backend gets 1001 with the
        reason; the backend side gone: the client gets 1014 with the reason. The dead
        side's transport is cut without a close handshake."""
        cdef bytes r = reason.encode() if isinstance(reason, str) else reason
        cdef Leg dead = self.client if client_side else self.backend
        cdef Leg other = dead.peer
        if self.ended or other is None:
            return
        if client_side:
            self._mark_end(END_GATEWAY, CLOSE_ABNORMAL, r, len(r))
            other.send_gateway_close(CLOSE_GOING_AWAY, r)
        else:
            self._mark_end(END_GATEWAY, CLOSE_BAD_GATEWAY, r, len(r))
            other.send_gateway_close(CLOSE_BAD_GATEWAY, r)
        if dead.transport is not None and not dead.gone:
            dead.transport.abort()

    def abort(self):
        """The client will never be attached (failed upgrade): close the backend leg."""
        self.aborted = True
        if self.backend.transport is not None and not self.backend.gone:
            self.backend.send_gateway_close(CLOSE_GOING_AWAY, b"client gone")
            self.backend.transport.close()
        else:
            self._leg_gone()

    @property
    def messages(self):
        """Data messages relayed: (request flow, response flow)."""
        return (self.client.counts.messages, self.backend.counts.messages)

    @property
    def activity(self):
        """A number that changes whenever a frame crosses the relay."""
        return self.client.counts.frames + self.backend.counts.frames

    @property
    def bytes(self):
        return (self.client.counts.bytes, self.backend.counts.bytes)
