# A Leg: one side of a relayed connection (see leg_decl.pxi). Included by
# _core.pyx: buffers, forwarding, the frame path, flow control, the close
# handshake; the message policies it calls are in policy.pxi, its hold queue
# in hold.pxi, its relay (the other leg, end of life, fatal path) in relay.pxi.
#
# Every method the event loop calls (the protocol callbacks, the release
# timer) is a trampoline: an exception inside ends the connection through the
# relay's fatal path (Relay._fatal), never leaving a leg stuck.

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove
from libc.time cimport time as c_time
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<netinet/in.h>" nogil:
    enum: IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    struct tcp_info:
        uint8_t tcpi_state
    enum: TCP_INFO
    enum: TCP_ESTABLISHED

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void* value, socklen_t* size)
    Py_ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum: MSG_NOSIGNAL


cdef char* SCRATCH = <char*>malloc(SCRATCH_SIZE)
if SCRATCH == NULL:
    raise MemoryError()

# Until set_policies(): the default of the websocket-upgrade policy (one SizeLimit, shared).
cdef SizeLimit DEFAULT_SIZE_LIMIT = SizeLimit(16 * 1024 * 1024)


cdef int buffer_grow(char** data, Py_ssize_t* cap, Py_ssize_t need) except -1:
    """Make a malloc'd buffer hold at least `need` bytes (doubling, at least OUT_INITIAL)."""
    cdef Py_ssize_t size
    cdef char* p
    if need <= cap[0]:
        return 0
    size = cap[0] * 2
    if size < need:
        size = need
    if size < OUT_INITIAL:
        size = OUT_INITIAL
    p = <char*>realloc(data[0], size)
    if p == NULL:
        raise MemoryError()
    data[0] = p
    cap[0] = size
    return 0


def _data_received_unattached(data):
    """Leg.data_received before connection_made(): never called (see there)."""
    raise RuntimeError("data_received on a leg not attached to its transport")


@cython.final
cdef class Leg:
    """One side of a relayed connection: the asyncio protocol of its transport
    once the WebSocket is established (see leg_decl.pxi)."""

    def __cinit__(self):
        # Buffers are allocated on first use: an idle connection holds none.
        self.sock_fd = -1
        self.send_fd = -1
        self.max_frame_size = 16 * 1024 * 1024
        self.out.rng = <uint32_t>(<uint64_t>c_time(NULL) * 2654435761u) | 1u
        self.size_limit = DEFAULT_SIZE_LIMIT

    def __dealloc__(self):
        if self.out.data != NULL:
            free(self.out.data)
            self.out.data = NULL
        if self.inbuf.data != NULL:
            free(self.inbuf.data)
            self.inbuf.data = NULL
        hold_free(&self.held)
        if self.pong.data != NULL:
            free(self.pong.data)
            self.pong.data = NULL

    # ---- output ---------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        return buffer_grow(&self.out.data, &self.out.cap, self.out.size + extra)

    cdef int _unpass(self) except -1:
        """Copy the pending pass-through range into the output buffer (to keep
        the order of frames when something else is queued after it)."""
        cdef Py_ssize_t n = self.out.pass_size
        if self.out.pass_ptr == NULL:
            return 0
        self._reserve(n)
        memcpy(self.out.data + self.out.size, self.out.pass_ptr, n)
        self.out.size += n
        self.out.pass_ptr = NULL
        self.out.pass_size = 0
        return 0

    cdef int queue_frame(self, uint8_t first_byte, const char* payload, Py_ssize_t size) except -1:
        """Encode one frame of the gateway's own at the end of the output buffer."""
        if self.out.pass_ptr != NULL:
            self._unpass()
        self._reserve(size + FRAME_HEADER_MAX)
        self.out.size += frame_encode(self.out.data + self.out.size, first_byte, payload, size,
                                      self.masked, &self.out.rng)
        return 0

    cdef inline int forward(self, const char* frame, Py_ssize_t size, bint borrowed) except -1:
        """Queue a frame from the peer leg, bytes unchanged. `borrowed`: the bytes
        are in the read buffer of the current read, valid until its end, where
        this leg is flushed: consecutive frames then make one range, written
        without a copy (kept small, to be inlined in the frame path)."""
        if (borrowed and self.out.size == 0 and self.transport is not None
                and not self.close_sent and not self.gone):
            if self.out.pass_ptr == NULL:
                self.out.pass_ptr = frame
                self.out.pass_size = size
                return 0
            if self.out.pass_ptr + self.out.pass_size == frame:
                self.out.pass_size += size
                return 0
        return self._forward_copy(frame, size)

    cdef int _forward_copy(self, const char* frame, Py_ssize_t size) except -1:
        """forward() when the frame cannot join the pass-through range: copied."""
        if self.close_sent or self.gone:
            return 0
        if self.out.pass_ptr != NULL:
            self._unpass()
        self._reserve(size)
        memcpy(self.out.data + self.out.size, frame, size)
        self.out.size += size
        if self.transport is None and self.out.size >= self.relay.max_early_bytes:
            # Not connected yet (the client before its 101): stop reading the
            # peer once the bound is reached.
            self.peer.add_pause(PAUSE_PEER_NOT_READY)
        return 0

    cdef int flush(self) except -1:
        """Write what is queued for this leg, in one write."""
        cdef char* data
        if self.gone:
            self.out.size = 0
            self.out.pass_ptr = NULL
            self.out.pass_size = 0
            return 0
        if self.transport is None:
            return 0
        if self.out.pass_ptr != NULL:
            data = <char*>self.out.pass_ptr
            self.out.pass_ptr = NULL
            self._write(data, self.out.pass_size)
            self.out.pass_size = 0
            return 0
        if self.out.size == 0:
            return 0
        self._write(self.out.data, self.out.size)
        self.out.size = 0
        if self.out.cap > OUT_KEEP:
            data = <char*>realloc(self.out.data, OUT_INITIAL)
            if data != NULL:
                self.out.data = data
                self.out.cap = OUT_INITIAL
        return 0

    cdef int _write(self, const char* data, Py_ssize_t size) except -1:
        """One send() when the transport holds nothing; the rest (or everything,
        on TLS) goes to the transport, which copies it."""
        cdef Py_ssize_t sent = 0
        if self.send_fd >= 0 and not self.write_paused:
            sent = send(self.send_fd, data, <size_t>size, MSG_NOSIGNAL)
            if sent == size:
                return 0
            if sent < 0:
                # EAGAIN and the like: the transport queues it; a real error
                # reaches the transport when it writes, and ends the leg.
                sent = 0
        self.transport.write(PyBytes_FromStringAndSize(data + sent, size - sent))
        return 0

    # ---- message policies -----------------------------------------------

    def set_policies(self, list rules, LimitStore store=None, max_message_size=None, now=None,
                     FlowStats stats=None):
        """Install the message policies of the flow this leg reads.

        `rules`: RateRule, in order, or None (the flow's message-rate-limits with the
        values of the connection's plan); `store`: where scope client / api
        buckets are; `max_message_size`: the SizeLimit (default: unchanged);
        `now` (monotonic seconds, default: the relay's clock): when the
        connection's buckets start full; `stats`: the API's counters of the flow.
        """
        cdef double start
        if now is None:
            self._clock()
            start = self.now
        else:
            start = now
        if max_message_size is not None and max_message_size != self.size_limit.max:
            self.size_limit = (DEFAULT_SIZE_LIMIT if max_message_size == DEFAULT_SIZE_LIMIT.max
                               else SizeLimit(max_message_size))
        self.stats = stats
        self.rate = RateLimit(rules, store, start) if rules else None

    def set_compression(self, bint on):
        """permessage-deflate (RFC 7692) negotiated or not: with it, the first frame of
        a data message read from this leg may carry RSV1 (relayed as it is: the gateway
        does not inflate); RSV1 elsewhere, RSV2 and RSV3 stay protocol errors (1002)."""
        self.deflate = on

    @property
    def compression(self):
        return self.deflate

    def decide(self, int opcode, bint fin, Py_ssize_t size, double now, bint retry=False):
        """Sans-I/O view of the flow's rate limits: the verdict on one data frame
        (opcode 0 for a continuation) at time `now`, reached by the code the
        relay runs (Leg._judge). Returns (Verdict, wait in seconds, 0.0 unless
        DELAY). After DELAY, ask again for the same frame with retry=True, as
        the relay does."""
        cdef int verdict = PASS
        self.now = now
        self.now_valid = True
        try:
            if self.rate is not None:
                verdict = self._judge(<uint8_t>((fin << 7) | opcode), size, retry)
        finally:
            self.now_valid = False
        return <Verdict>verdict, (self.rate.wait if verdict == DELAY else 0.0)

    def rule_limited(self):
        """Messages limited so far by each rate limit of the flow, in order."""
        return self.rate.limited() if self.rate is not None else []

    cdef int _clock(self) except -1:
        """Read the relay's clock into self.now, once per read batch (the real
        Clock: CLOCK_MONOTONIC in C; another clock: its now(), a Python call)."""
        cdef timespec ts
        if not self.now_valid:
            if self.sim_clock:
                self.now = self.relay.clock.now()
            else:
                clock_gettime(CLOCK_MONOTONIC, &ts)
                self.now = <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
            self.now_valid = True
        return 0

    cdef inline int _judge(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1:
        """The verdict of the flow's policies judged in turn on one data frame, at
        self.now: the one path for frames as they arrive, held frames as they
        are released (hold_release), and decide(). The common case first: every
        rate limit the connection's own, and all have room."""
        if not retry and self.rate.all_local and not self.msg.dropping and self.rate.fast_pass(
                (first_byte & 0x0F) != 0, <double>size, self.now):
            return PASS
        return self._judge_in_turn(first_byte, size, retry)

    cdef int _judge_in_turn(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1:
        cdef int verdict
        if (first_byte & 0x0F) == 0 and self.msg.dropping:
            return DROP
        if self.close_recv or self.peer.close_sent:
            # Nothing this leg sends can be relayed any more (a rejection or a
            # close is under way): not counted against any limit.
            return DROP
        verdict = self.rate.judge(&self.msg, first_byte, size, self.now, retry)
        # A policy that must see the whole message (see policy_decl.pxi) is judged here,
        # after the rate limits, on what they let pass.
        if self.rate.counted:
            if verdict == DELAY:
                self.counts.delayed += 1
                if self.stats is not None:
                    self.stats.delayed += 1
            elif verdict == DROP:
                self.counts.dropped += 1
                if self.stats is not None:
                    self.stats.dropped += 1
            elif verdict == REJECT:
                self.counts.rejected += 1
                if self.stats is not None:
                    self.stats.rejected += 1
        if verdict == REJECT:
            self._reject(self.rate.close_reason())
        return verdict

    cdef int _reject(self, bytes reason) except -1:
        """A policy rejected a message: the client gets 1008, the backend 1001."""
        cdef Relay relay = self.relay
        relay._mark_end(END_GATEWAY, CLOSE_POLICY_VIOLATION, reason, len(reason))
        relay.client.send_gateway_close(CLOSE_POLICY_VIOLATION, reason)
        relay.backend.send_gateway_close(CLOSE_GOING_AWAY, reason)
        relay.client.flush()
        relay.backend.flush()
        hold_forget(&self.held)
        return 0

    def _release_held(self):
        """Timer (the relay's clock): the hold queue's release (hold_release)."""
        try:
            hold_release(self)
        except Exception as exc:
            self._fatal(exc)

    # ---- input and frames -----------------------------------------------

    cdef int _received(self, char* data, Py_ssize_t size, bint own) except -1:
        """Process the frames of one read; keep a partial frame for the next."""
        cdef Py_ssize_t used, rest
        if self.gone or self.broken:
            self.inbuf.size = 0
            return 0
        self.counts.reads += 1
        used = self._parse(data, size)
        self._end_of_read()
        rest = size - used
        if self.broken or self.gone:
            self.inbuf.size = 0
            return 0
        if own:
            if used and rest:
                memmove(self.inbuf.data, self.inbuf.data + used, rest)
            self.inbuf.size = rest
            if rest == 0 and self.inbuf.cap > OUT_KEEP:
                free(self.inbuf.data)
                self.inbuf.data = NULL
                self.inbuf.cap = 0
        elif rest:
            buffer_grow(&self.inbuf.data, &self.inbuf.cap, rest)
            memcpy(self.inbuf.data, data + used, rest)
            self.inbuf.size = rest
        return 0

    cdef Py_ssize_t _parse(self, char* data, Py_ssize_t size) except -1:
        """Handle the whole frames at the start of data; return the bytes used."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t avail
        cdef int status
        cdef FrameHeader h
        self.inbuf.want = 0
        while pos < size:
            if self.broken or self.gone:
                return size
            avail = size - pos
            status = frame_header(data + pos, avail, &h, self.deflate)
            if status != FRAME_OK:
                if status == FRAME_INCOMPLETE:
                    break
                self._protocol_error(frame_error_reason(status))
                return size
            if h.masked != self.is_client:
                self._protocol_error(b"unmasked frame from a client" if self.is_client
                                     else b"masked frame from a server")
                return size
            if h.length > self.max_frame_size:
                self.fail(CLOSE_TOO_BIG, b"frame too big",
                          b"client message too big" if self.is_client else b"backend message too big")
                self.broken = True
                if self.transport is not None:
                    self.transport.close()
                return size
            if <uint64_t>avail < <uint64_t>h.header + h.length:
                self.inbuf.want = h.header + <Py_ssize_t>h.length
                break
            self._on_frame(h.first_byte, data + pos, h.header, <Py_ssize_t>h.length, h.masked)
            pos += h.header + <Py_ssize_t>h.length
        return pos

    cdef inline int _on_frame(self, uint8_t first_byte, char* frame, Py_ssize_t header,
                              Py_ssize_t size, bint masked) except -1:
        cdef uint8_t op = first_byte & 0x0F
        cdef char* payload = frame + header
        cdef uint32_t mask
        cdef int verdict
        if op <= OP_BINARY:
            if self._accept_data(first_byte, size):
                if self.pause_flags & PAUSE_DELAY:
                    hold_push(&self.held, first_byte, frame, header + size, size)
                elif self.rate is None:
                    self.peer.forward(frame, header + size, True)
                else:
                    if not self.now_valid:
                        self._clock()
                    verdict = self._judge(first_byte, size, False)
                    if verdict == PASS:
                        self.peer.forward(frame, header + size, True)
                    elif verdict == DELAY:
                        hold_start(self, self.rate.wait)
                        hold_push(&self.held, first_byte, frame, header + size, size)
            return 0
        # Control frames are unmasked and answered or re-encoded per hop.
        if masked and size:
            memcpy(&mask, payload - 4, 4)
            mask_copy(payload, payload, size, mask)
        if op == OP_PING:
            if not self.close_sent:
                self._answer_ping(payload, size)
        elif op == OP_CLOSE:
            if self.pause_flags & PAUSE_DELAY:
                hold_push(&self.held, first_byte, payload, size, size)
            else:
                self._on_close(payload, size)
        # PONG: answers to our own pings only; never relayed.
        return 0

    cdef inline bint _accept_data(self, uint8_t first_byte, Py_ssize_t size) except -1:
        """Check a data frame (framing, then the SizeLimit) and count it. False: it
        is not to be relayed."""
        cdef uint64_t* sizes
        if self.close_recv:
            return False        # nothing may follow this leg's own CLOSE
        # After a CLOSE was sent to this leg, what it sent before seeing it still
        # goes to the peer leg, unless that one is closing too (forward() checks).
        if (first_byte & 0x0F) == OP_CONT:
            if not self.msg.in_message:
                self._protocol_error(b"continuation frame without a message")
                return False
            self.msg.size += <uint64_t>size
        else:
            if self.msg.in_message:
                self._protocol_error(b"new message inside a fragmented message")
                return False
            self.msg.size = <uint64_t>size
            self.msg.in_message = True
        if self.size_limit.judge(&self.msg, first_byte, size, 0.0, False) == REJECT:
            self.fail(CLOSE_TOO_BIG, self.size_limit.close_reason(),
                      b"client message too big" if self.is_client else b"backend message too big")
            return False
        self.counts.frames += 1
        self.counts.bytes += <uint64_t>size
        # self.stats is read in place: a local reference would cost a refcount pair per frame.
        if self.stats is not None:
            self.stats.bytes += <uint64_t>size
        if first_byte & 0x80:
            self.msg.in_message = False
            self.counts.messages += 1
            if self.stats is not None:
                self.stats.messages += 1
                sizes = self.stats.size_log2       # a pointer: no refcount pair on stats
                sizes[64 - fastgw_clz64(self.msg.size) if self.msg.size else 0] += 1
        return True

    cdef int _answer_ping(self, const char* payload, Py_ssize_t size) except -1:
        """Queue the PONG for a PING of this leg; while this leg's transport holds
        unsent bytes, keep only the latest one for later and stop reading the leg."""
        if not self.write_paused:
            self.queue_frame(0x80 | OP_PONG, payload, size)
            return 0
        if self.pong.data == NULL:
            self.pong.data = <char*>malloc(125)
            if self.pong.data == NULL:
                raise MemoryError()
        memcpy(self.pong.data, payload, size)
        self.pong.size = <uint8_t>size
        if self.pong.pending:
            self.pong.coalesced += 1
            if self.pong.coalesced > PING_COALESCE_MAX:
                # Closing with unread input would reset the connection and lose the
                # CLOSE: read on instead; what the leg sends is ignored until its
                # CLOSE (close_sent), and the close timer cuts it if that never comes.
                self.pong.pending = False
                self.pong.coalesced = 0
                self.fail(CLOSE_POLICY_VIOLATION, b"control frame flood",
                          b"client control frame flood" if self.is_client else b"backend control frame flood")
                self.remove_pause(PAUSE_OWN_REPLY)
                return 0
        self.pong.pending = True
        self.add_pause(PAUSE_OWN_REPLY)
        return 0

    cdef int _end_of_read(self) except -1:
        if self.peer is not None:
            self.peer.flush()
        self.flush()
        self.now_valid = False
        return 0

    # ---- close handshake ------------------------------------------------

    cdef int _on_close(self, const char* payload, Py_ssize_t size) except -1:
        cdef Leg peer = self.peer
        cdef uint16_t code = 0
        if size >= 2:
            memcpy(&code, payload, 2)
            code = ntohs(code)
            if not close_code_valid(code):
                self.close_recv = True
                self.fail(CLOSE_PROTOCOL_ERROR, b"invalid close code", b"peer protocol error")
                return 0
        elif size == 1:
            self.close_recv = True
            self.fail(CLOSE_PROTOCOL_ERROR, b"invalid close frame", b"peer protocol error")
            return 0
        self.close_recv = True
        if size >= 2:
            self.relay._mark_end(END_CLIENT if self.is_client else END_BACKEND, code, payload + 2, size - 2)
        else:
            self.relay._mark_end(END_CLIENT if self.is_client else END_BACKEND, CLOSE_NO_STATUS, NULL, 0)
        if not peer.close_sent and not peer.gone:
            # Relay the close frame as it came: code and reason pass through.
            peer.queue_frame(0x80 | OP_CLOSE, payload, size)
            peer._after_close_sent()
        if self.close_sent:
            if self.transport is not None:
                self.flush()
                self.transport.close()
        self.relay._arm_close_timer()
        return 0

    cdef int send_gateway_close(self, int code, bytes reason) except -1:
        """Write a CLOSE frame of the gateway's own to this leg."""
        cdef char payload[125]
        cdef Py_ssize_t n
        if self.close_sent or self.gone:
            return 0
        if reason is None:
            n = close_payload(payload, code, NULL, 0)
        else:
            n = close_payload(payload, code, PyBytes_AS_STRING(reason), PyBytes_GET_SIZE(reason))
        self.queue_frame(0x80 | OP_CLOSE, payload, n)
        self._after_close_sent()
        return 0

    cdef int _after_close_sent(self) except -1:
        self.close_sent = True
        if self.transport is None:
            return 0
        self.flush()
        if self.close_recv:
            # Both CLOSE frames have crossed on this leg: the handshake is done.
            self.transport.close()
        self.relay._arm_close_timer()
        return 0

    cdef int fail(self, int code, bytes reason, bytes peer_reason) except -1:
        """End the connection because of what this leg sent."""
        self.relay._mark_end(END_GATEWAY, code, reason, len(reason))
        self.send_gateway_close(code, reason)
        self.peer.send_gateway_close(CLOSE_GOING_AWAY, peer_reason)
        self.peer.flush()
        return 0

    cdef int _protocol_error(self, bytes reason) except -1:
        """The leg broke RFC 6455: answer 1002 and cut it (its peer gets 1001)."""
        self.fail(CLOSE_PROTOCOL_ERROR, reason, b"peer protocol error")
        self.broken = True
        if self.transport is not None and not self.gone:
            self.flush()
            self.transport.close()
        return 0

    cdef bint _socket_alive(self) noexcept:
        """Whether this leg's TCP connection is still established (checked while
        reading is paused, when the event loop cannot see the peer leave)."""
        cdef tcp_info info
        cdef socklen_t size = sizeof(info)
        if self.sock_fd < 0:
            return True
        if getsockopt(self.sock_fd, IPPROTO_TCP, TCP_INFO, &info, &size) != 0:
            return False
        return info.tcpi_state == TCP_ESTABLISHED

    cdef int _lost(self) except -1:
        cdef Leg peer = self.peer
        self.gone = True
        self.out.size = 0
        self.out.pass_ptr = NULL
        self.out.pass_size = 0
        self.inbuf.size = 0
        if self.inbuf.data != NULL:
            free(self.inbuf.data)
            self.inbuf.data = NULL
            self.inbuf.cap = 0
        if self.out.data != NULL:
            free(self.out.data)
            self.out.data = NULL
            self.out.cap = 0
        hold_free(&self.held)
        self.pong.pending = False
        if self.pong.data != NULL:
            free(self.pong.data)
            self.pong.data = NULL
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        if self.relay is not None and not self.close_recv:
            if self.is_client:
                self.relay._mark_end(END_CLIENT, CLOSE_ABNORMAL, NULL, 0)
            else:
                self.relay._mark_end(END_BACKEND, CLOSE_BAD_GATEWAY, b"backend connection lost", 23)
        if peer is not None and not peer.gone:
            if not peer.close_sent:
                if self.is_client:
                    peer.send_gateway_close(CLOSE_GOING_AWAY, b"client connection lost")
                else:
                    peer.send_gateway_close(CLOSE_BAD_GATEWAY, b"backend connection lost")
            if peer.pause_flags & PAUSE_PEER_WRITE:
                peer.remove_pause(PAUSE_PEER_WRITE)
        if self.relay is not None:
            self.relay._leg_gone()
        return 0

    cdef void _fatal(self, object exc) noexcept:
        """An exception escaped a callback or timer of this leg: the relay's fatal path."""
        if self.relay is not None:
            self.relay._fatal(exc)
        else:
            _log_fatal(None, exc)
            self._fatal_close()

    cdef void _fatal_close(self) noexcept:
        """The fatal path on this leg: a best-effort CLOSE 1011, then the
        connection is cut. Nothing here may raise."""
        cdef char payload[125]
        cdef Py_ssize_t n
        cdef object timer = self.hold_timer
        self.broken = True
        self.hold_timer = None
        hold_forget(&self.held)
        try:
            if timer is not None:
                timer.cancel()
        except Exception:
            pass
        if self.transport is None or self.gone:
            return
        try:
            # What was queued is dropped: the CLOSE goes alone.
            self.out.size = 0
            self.out.pass_ptr = NULL
            self.out.pass_size = 0
            if not self.close_sent:
                self.close_sent = True
                n = close_payload(payload, CLOSE_INTERNAL_ERROR, b"internal error", 14)
                self.queue_frame(0x80 | OP_CLOSE, payload, n)
                self.flush()
        except Exception:
            pass
        try:
            self.transport.abort()
        except Exception:
            pass

    # ---- flow control ---------------------------------------------------

    cdef int add_pause(self, uint32_t reason) except -1:
        cdef uint32_t before = self.pause_flags
        self.pause_flags |= reason
        if before == 0 and self.transport is not None and not self.gone:
            self.transport.pause_reading()
        return 0

    cdef int remove_pause(self, uint32_t reason) except -1:
        if self.pause_flags == 0:
            return 0
        self.pause_flags &= ~reason
        if self.pause_flags == 0 and self.transport is not None and not self.gone:
            self.transport.resume_reading()
        return 0

    cdef int _drained(self) except -1:
        self.write_paused = False
        if self.pong.pending:
            self.pong.pending = False
            self.pong.coalesced = 0
            if not self.close_sent and not self.gone:
                self.queue_frame(0x80 | OP_PONG, self.pong.data, self.pong.size)
                self.flush()
            free(self.pong.data)
            self.pong.data = NULL
            self.remove_pause(PAUSE_OWN_REPLY)
            if self.write_paused:       # the PONG filled the transport again
                return 0
        if self.peer is not None:
            self.peer.remove_pause(PAUSE_PEER_WRITE)
        return 0

    # ---- the asyncio protocol (trampolines) -----------------------------

    def pause_writing(self):
        # The transport holds bytes it could not send: stop reading the peer.
        try:
            self.write_paused = True
            if self.peer is not None:
                self.peer.add_pause(PAUSE_PEER_WRITE)
        except Exception as exc:
            self._fatal(exc)

    def resume_writing(self):
        try:
            self._drained()
        except Exception as exc:
            self._fatal(exc)

    def connection_made(self, transport):
        """Attach the leg to its transport once the WebSocket is established
        (the server calls it after the upgrade, then feed() with early bytes)."""
        try:
            sock = transport.get_extra_info("socket")
            self.transport = transport
            self.sock_fd = sock.fileno() if sock is not None else -1
            self.send_fd = -1 if transport.get_extra_info("sslcontext") is not None else self.sock_fd
            if self.send_fd >= 0:
                # pause_writing() as soon as the transport holds anything: until
                # resume_writing(), nothing may be sent around it.
                transport.set_write_buffer_limits(0, 0)
            if self.relay is None or self.relay.aborted or self.peer is None:
                # A dial that finished after its client had left.
                self.send_gateway_close(CLOSE_GOING_AWAY, b"client gone")
                transport.close()
                return
            if self.relay.failed:
                # The fatal path ran before this leg was attached (its peer's dial).
                self.send_gateway_close(CLOSE_INTERNAL_ERROR, b"internal error")
                transport.close()
                return
            if self.out.size:
                # What the backend sent before the client's 101, its close included.
                self.flush()
            if self.close_sent:
                if self.close_recv:
                    transport.close()
                self.relay._arm_close_timer()
            self.peer.remove_pause(PAUSE_PEER_NOT_READY)
        except Exception as exc:
            self._fatal(exc)

    def get_buffer(self, Py_ssize_t sizehint):
        """Where the next read goes: the shared scratch buffer, or after the
        partial frame this leg keeps."""
        cdef Py_ssize_t need
        cdef char* data
        if self.inbuf.size == 0 or self.broken or self.gone:
            self.reading_own = False
            return self
        # Grow with what arrives (at most doubling), never past the frame: a
        # header alone does not reserve its announced length.
        need = self.inbuf.cap * 2
        if need < self.inbuf.size + IN_STEP:
            need = self.inbuf.size + IN_STEP
        if self.inbuf.want > self.inbuf.size and need > self.inbuf.want:
            need = self.inbuf.want
        if self.inbuf.cap - self.inbuf.size < IN_STEP and need > self.inbuf.cap:
            data = <char*>realloc(self.inbuf.data, need)
            if data == NULL:
                # Out of memory: this connection ends; the read goes to the scratch buffer.
                try:
                    self.fail(CLOSE_INTERNAL_ERROR, b"gateway out of memory", b"gateway out of memory")
                    self.broken = True
                    self.inbuf.size = 0
                    if self.transport is not None:
                        self.transport.close()
                except Exception as exc:
                    self._fatal(exc)
                self.reading_own = False
                return self
            self.inbuf.data = data
            self.inbuf.cap = need
        self.reading_own = True
        return self

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.reading_own:
            PyBuffer_FillInfo(view, self, self.inbuf.data + self.inbuf.size,
                              self.inbuf.cap - self.inbuf.size, 0, flags)
        else:
            PyBuffer_FillInfo(view, self, SCRATCH, SCRATCH_SIZE, 0, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __len__(self):
        # uvloop's TLS transport asks the size of the buffer get_buffer() gave.
        return self.inbuf.cap - self.inbuf.size if self.reading_own else SCRATCH_SIZE

    def __bool__(self):
        return True

    def buffer_updated(self, Py_ssize_t nbytes):
        try:
            if self.reading_own:
                self.inbuf.size += nbytes
                self._received(self.inbuf.data, self.inbuf.size, True)
            else:
                self._received(SCRATCH, nbytes, False)
        except Exception as exc:
            self._fatal(exc)

    def feed(self, bytes data):
        """Bytes that arrived with the upgrade (read before the leg was attached)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n == 0:
            return
        try:
            buffer_grow(&self.inbuf.data, &self.inbuf.cap, self.inbuf.size + n)
            memcpy(self.inbuf.data + self.inbuf.size, PyBytes_AS_STRING(data), n)
            self.inbuf.size += n
            self._received(self.inbuf.data, self.inbuf.size, True)
        except Exception as exc:
            self._fatal(exc)

    def eof_received(self):
        return None     # the transport closes; connection_lost follows

    @property
    def data_received(self):
        """The standard library's transports (`fastgw run --loop asyncio`) call this: to them a
        Leg is no asyncio.BufferedProtocol; it is feed(). uvloop's call get_buffer() and
        buffer_updated(), but their set_protocol() keeps a bound data_received too (64 B per
        transport, for nothing): until connection_made() it is one shared function. (Not a
        missing attribute: uvloop would then keep the previous protocol's, the Handshake and
        all it holds.) The standard library looks it up at each read, once the leg is attached."""
        if self.transport is None:
            return _data_received_unattached
        return self.feed

    def connection_lost(self, exc):
        try:
            self._lost()
        except Exception as error:
            self._fatal(error)

    def send_ping(self, bytes payload):
        """A PING of the gateway's own (liveness), unless this leg is closing or gone."""
        if self.close_sent or self.gone or self.transport is None:
            return False
        self.queue_frame(0x80 | OP_PING, PyBytes_AS_STRING(payload),
                         min(PyBytes_GET_SIZE(payload), 125))
        self.flush()
        return True

    # ---- Python view ----------------------------------------------------

    def abort_transport(self):
        """Cut this leg's connection without a close handshake."""
        if self.transport is not None and not self.gone:
            self.transport.abort()

    @property
    def connected(self):
        return self.transport is not None and not self.gone

    @property
    def closing(self):
        return self.close_sent or self.close_recv

    @property
    def paused(self):
        return self.pause_flags != 0

    @property
    def input_buffer(self):
        """(bytes of a partial frame kept, capacity of the leg's own input buffer)."""
        return (self.inbuf.size, self.inbuf.cap)

    @property
    def reads(self):
        """Socket reads that brought bytes (liveness: connection.py)."""
        return self.counts.reads

    @property
    def messages(self):
        """Whole data messages received from this leg."""
        return self.counts.messages

    @property
    def frames(self):
        return self.counts.frames

    @property
    def bytes(self):
        """Payload bytes received from this leg."""
        return self.counts.bytes

    @property
    def rejected(self):
        return self.counts.rejected

    @property
    def delayed(self):
        return self.counts.delayed

    @property
    def dropped(self):
        return self.counts.dropped
