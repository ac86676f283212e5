# cython: language_level=3
"""The fastgw core: the per-frame relay between a client and its backend.

Everything here runs per frame or per connection. It knows the WebSocket
framing (RFC 6455) and the asyncio protocol interface, and nothing else of
fastgw: no configuration structs, no logging on the frame path. See _core.pxd
for the layout of the objects.
"""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove
from libc.time cimport time as c_time
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t)
    uint64_t be64toh(uint64_t)

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


# While a delay holds a sender, its connection is checked at least this often (s).
cdef double HOLD_WATCH = 1.0
# A message whose shared bucket found no slot in the limit table is over its
# limit; a delay tries again after this long (s).
cdef double TABLE_FULL_WAIT = 0.1

cdef enum:
    # After a flush, an output buffer larger than this is given back.
    OUT_KEEP = 65536
    OUT_INITIAL = 4096
    # A partial frame's buffer grows by at least this much per read.
    IN_STEP = 16384
    # The read buffer shared by all legs (one read at a time on the event loop's thread).
    SCRATCH_SIZE = 262144
    OP_CONT = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    HELD_HEADER = 24
    # PINGs folded into one pending PONG (a peer that floods pings and never
    # reads the answers) before the connection is closed with 1008.
    PING_COALESCE_MAX = 1024

cdef char* SCRATCH = <char*>malloc(SCRATCH_SIZE)
if SCRATCH == NULL:
    raise MemoryError()

include "limits.pxi"
include "hdr.pxi"

# Close codes used by the gateway itself.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_GATEWAY = 1014


cdef inline bint _valid_close_code(uint16_t code) noexcept:
    # RFC 6455 7.4: codes that may appear on the wire.
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


cdef inline void _mask_copy(char* dst, const char* src, Py_ssize_t n, uint32_t mask) noexcept nogil:
    """Copy n bytes from src to dst, XORed with the 4-byte mask key as laid in memory."""
    cdef uint64_t m64 = (<uint64_t>mask << 32) | <uint64_t>mask
    cdef uint64_t v
    cdef Py_ssize_t i = 0
    cdef const uint8_t* key = <const uint8_t*>&mask
    while i + 8 <= n:
        memcpy(&v, src + i, 8)
        v ^= m64
        memcpy(dst + i, &v, 8)
        i += 8
    while i < n:
        dst[i] = <char>(<uint8_t>src[i] ^ key[i & 3])
        i += 1


cdef inline int _grow(char** data, Py_ssize_t* cap, Py_ssize_t need) except -1:
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


@cython.final
cdef class FlowStats:
    """Counters of one flow of one API (see _core.pxd)."""

    def __init__(self, bint histograms=True, bint intervals=False):
        if histograms:
            self.held = HdrArray(1, 3_600_000_000, 3)
            if intervals:
                self.held_interval = HdrArray(1, 3_600_000_000, 3)

    def size_buckets(self):
        """Messages by size: [(upper bound in bytes, cumulative count)], powers of two.

        A message size costs a few instructions per message to count this way
        (an HDR record costs several times more, on every message)."""
        cdef int k
        cdef uint64_t running = 0
        out = []
        for k in range(65):
            running += self.size_log2[k]
            if (4 <= k <= 32 and k % 2 == 0) or k == 64:
                out.append(((<uint64_t>1 << k) - 1 if k < 64 else None, running))
        return out

    def snapshot(self):
        return {"messages": self.messages, "bytes": self.bytes, "rejected": self.rejected,
                "delayed": self.delayed, "dropped": self.dropped}


@cython.final
cdef class Leg:
    """One side of a relayed connection: the asyncio protocol of its transport
    once the WebSocket is established (see _core.pxd)."""

    def __cinit__(self):
        # Buffers are allocated on first use: an idle connection holds none.
        self.out_data = NULL
        self.out_cap = 0
        self.out_size = 0
        self.in_data = NULL
        self.sock_fd = -1
        self.send_fd = -1
        self.max_frame_size = 16 * 1024 * 1024
        self.rng = <uint32_t>(<uint64_t>c_time(NULL) * 2654435761u) | 1u

    def __dealloc__(self):
        if self.out_data != NULL:
            free(self.out_data)
            self.out_data = NULL
        if self.in_data != NULL:
            free(self.in_data)
            self.in_data = NULL
        if self.rules != NULL:
            free(self.rules)
            self.rules = NULL
        if self.held_data != NULL:
            free(self.held_data)
            self.held_data = NULL
        if self.pong_data != NULL:
            free(self.pong_data)
            self.pong_data = NULL

    # ---- output ---------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        return _grow(&self.out_data, &self.out_cap, self.out_size + extra)

    cdef int _unpass(self) except -1:
        """Copy the pending pass-through range into the output buffer (to keep
        the order of frames when something else is queued after it)."""
        cdef Py_ssize_t n = self.pass_size
        if self.pass_ptr == NULL:
            return 0
        self._reserve(n)
        memcpy(self.out_data + self.out_size, self.pass_ptr, n)
        self.out_size += n
        self.pass_ptr = NULL
        self.pass_size = 0
        return 0

    cdef int queue_frame(self, uint8_t first_byte, const char* payload, Py_ssize_t size) except -1:
        """Encode one frame of the gateway's own at the end of the output buffer."""
        cdef char* p
        cdef uint16_t len16
        cdef uint64_t len64
        cdef uint32_t mask
        cdef uint8_t mask_bit = 0x80 if self.masked else 0
        if self.pass_ptr != NULL:
            self._unpass()
        self._reserve(size + 14)
        p = self.out_data + self.out_size
        p[0] = <char>first_byte
        if size < 126:
            p[1] = <char>(mask_bit | <uint8_t>size)
            p += 2
        elif size < 65536:
            p[1] = <char>(mask_bit | 126)
            len16 = htons(<uint16_t>size)
            memcpy(p + 2, &len16, 2)
            p += 4
        else:
            p[1] = <char>(mask_bit | 127)
            len64 = htobe64(<uint64_t>size)
            memcpy(p + 2, &len64, 8)
            p += 10
        if self.masked:
            # xorshift32: mask keys need not be secret here, only varied.
            self.rng ^= self.rng << 13
            self.rng ^= self.rng >> 17
            self.rng ^= self.rng << 5
            mask = self.rng
            memcpy(p, &mask, 4)
            p += 4
            _mask_copy(p, payload, size, mask)
        elif size:
            memcpy(p, payload, size)
        self.out_size = (p - self.out_data) + size
        return 0

    cdef inline int forward(self, const char* frame, Py_ssize_t size, bint borrowed) except -1:
        """Queue a frame from the peer leg, bytes unchanged. `borrowed`: the bytes
        are in the read buffer of the current read, valid until its end, where
        this leg is flushed: consecutive frames then make one range, written
        without a copy."""
        if self.close_sent or self.gone:
            return 0
        if borrowed and self.transport is not None and self.out_size == 0:
            if self.pass_ptr == NULL:
                self.pass_ptr = frame
                self.pass_size = size
                return 0
            if self.pass_ptr + self.pass_size == frame:
                self.pass_size += size
                return 0
        if self.pass_ptr != NULL:
            self._unpass()
        self._reserve(size)
        memcpy(self.out_data + self.out_size, frame, size)
        self.out_size += size
        if self.transport is None and self.out_size >= self.relay.max_early_bytes:
            # Not connected yet (the client before its 101): stop reading the
            # peer once the bound is reached.
            self.peer.add_pause(PAUSE_PEER_NOT_READY)
        return 0

    cdef int flush(self) except -1:
        """Write what is queued for this leg, in one write."""
        cdef char* data
        if self.gone:
            self.out_size = 0
            self.pass_ptr = NULL
            self.pass_size = 0
            return 0
        if self.transport is None:
            return 0
        if self.pass_ptr != NULL:
            data = <char*>self.pass_ptr
            self.pass_ptr = NULL
            self._write(data, self.pass_size)
            self.pass_size = 0
            return 0
        if self.out_size == 0:
            return 0
        self._write(self.out_data, self.out_size)
        self.out_size = 0
        if self.out_cap > OUT_KEEP:
            data = <char*>realloc(self.out_data, OUT_INITIAL)
            if data != NULL:
                self.out_data = data
                self.out_cap = OUT_INITIAL
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

    def set_policies(self, list rules, LimitZone zone=None, max_message_size=None, now=None,
                     FlowStats stats=None):
        """Install the message policies of the flow this leg reads.

        `rules` holds tuples (name, action, scope, msg_rate, msg_burst,
        byte_rate, byte_burst, msg_key, byte_key) with the values of the
        connection's plan; rates are per second, 0 for none. `now` (monotonic
        seconds, default: the clock) is when the connection's buckets start full.
        """
        cdef int i
        cdef MsgRule* r
        cdef double start = self._clock() if now is None else now
        if max_message_size is not None:
            self.max_message_size = max_message_size
        self.stats = stats
        if self.rules != NULL:
            free(self.rules)
            self.rules = NULL
        self.n_rules = 0
        self.rule_names = []
        if not rules:
            return
        self.rules = <MsgRule*>malloc(sizeof(MsgRule) * len(rules))
        if self.rules == NULL:
            raise MemoryError()
        for i, (name, action, scope, msg_rate, msg_burst, byte_rate, byte_burst, msg_key, byte_key) in enumerate(rules):
            r = &self.rules[i]
            r.action = action
            r.scope = scope
            r.msg_rate = msg_rate
            r.msg_burst = msg_burst
            r.byte_rate = byte_rate
            r.byte_burst = byte_burst
            r.msg_key = msg_key
            r.byte_key = byte_key
            r.limited = 0
            bucket_init(&r.msg_bucket, msg_burst, start)
            bucket_init(&r.byte_bucket, byte_burst, start)
            self.rule_names.append(name.encode() if isinstance(name, str) else name)
        if zone is None:
            for i in range(len(rules)):
                if self.rules[i].scope != SCOPE_CONNECTION:
                    raise ValueError("shared scopes need a LimitZone")
        self.zone = zone
        self.n_rules = len(rules)
        self.all_local = True
        for i in range(self.n_rules):
            if self.rules[i].scope != SCOPE_CONNECTION:
                self.all_local = False

    def decide(self, int opcode, bint fin, Py_ssize_t size, double now, bint retry=False):
        """Sans-I/O view of the flow's rate limits: the verdict on one data frame
        (opcode 0 for a continuation) at time `now`, as the relay would reach it.
        Returns (verdict, wait): verdict "pass", "drop", "delay" or "reject".
        After "delay", ask again for the same frame with retry=True, as the relay does.
        """
        self.now = now
        self.now_valid = True
        cdef int verdict
        # The same two paths as on_ws_frame: the fast one, then the full one.
        if not retry and self.all_local and not self.dropping and self._fast_pass(opcode != 0, <double>size):
            verdict = VERDICT_PASS
        else:
            verdict = self._apply_rules(<uint8_t>((fin << 7) | opcode), size, retry)
        self.now_valid = False
        return (("pass", "drop", "delay", "reject")[verdict],
                self.wait if verdict == VERDICT_DELAY else 0.0)

    def rule_limited(self):
        """Messages limited so far by each rule, in order."""
        return [self.rules[i].limited for i in range(self.n_rules)]

    cdef double _clock(self) noexcept:
        cdef timespec ts
        if not self.now_valid:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            self.now = <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
            self.now_valid = True
        return self.now

    cdef inline double _take(self, MsgRule* rule, bint of_bytes, double now, double cost) noexcept:
        if of_bytes:
            if rule.scope == SCOPE_CONNECTION:
                return bucket_take(&rule.byte_bucket, rule.byte_rate, rule.byte_burst, now, cost)
            return self.zone.take(rule.byte_key, rule.byte_rate, rule.byte_burst, now, cost)
        if rule.scope == SCOPE_CONNECTION:
            return bucket_take(&rule.msg_bucket, rule.msg_rate, rule.msg_burst, now, cost)
        return self.zone.take(rule.msg_key, rule.msg_rate, rule.msg_burst, now, cost)

    cdef inline bint _fast_pass(self, bint first, double size) noexcept:
        """The common case, when every rule is the connection's own: take from every
        bucket in place; if one is short, give back what was taken and let
        _apply_rules decide (it finds the buckets as they were)."""
        cdef MsgRule* rule
        cdef int i
        cdef double now = self.now
        for i in range(self.n_rules):
            rule = &self.rules[i]
            if first and rule.msg_rate > 0.0:
                if bucket_take(&rule.msg_bucket, rule.msg_rate, rule.msg_burst, now, 1.0) > 0.0:
                    self._give_back(i, first, size, False)
                    return False
            if rule.byte_rate > 0.0:
                if bucket_take(&rule.byte_bucket, rule.byte_rate, rule.byte_burst, now, size) > 0.0:
                    self._give_back(i, first, size, True)
                    return False
        return True

    cdef inline void _give_back(self, int upto, bint first, double size, bint with_msg) noexcept:
        """Undo the takes of _fast_pass: rules before `upto`, and rule `upto`'s message
        token when its byte bucket was the short one."""
        cdef MsgRule* rule
        cdef int i
        for i in range(upto + 1):
            rule = &self.rules[i]
            if first and rule.msg_rate > 0.0 and (i < upto or with_msg):
                rule.msg_bucket.tokens += 1.0
            if rule.byte_rate > 0.0 and i < upto:
                rule.byte_bucket.tokens += size

    cdef int _apply_rules(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1:
        """The verdict of the flow's rate limits on one data frame.

        A message is counted once, at its first frame; its bytes are counted
        frame by frame. A message dropped at its first frame is dropped whole.
        A shared bucket with no slot in the limit table (take() < 0) is over
        the limit: the rule's action applies (a delay tries again after
        TABLE_FULL_WAIT), and the zone counts the message in message_overflows.
        """
        cdef bint first = (first_byte & 0x0F) != 0
        cdef int i = self.resume_rule
        cdef int end = self.n_rules * 2
        cdef MsgRule* rule
        cdef double wait
        cdef bint no_slot
        if not first and self.dropping:
            return VERDICT_DROP
        if self.close_recv or self.peer.close_sent:
            # Nothing this leg sends can be relayed any more (a rejection or a
            # close is under way): not counted against any limit.
            return VERDICT_DROP
        if first and not retry:
            self.dropping = False
        self.resume_rule = 0
        while i < end:
            rule = &self.rules[i >> 1]
            wait = 0.0
            if i & 1:
                if rule.byte_rate > 0.0:
                    wait = self._take(rule, True, self.now, <double>size)
            elif first and rule.msg_rate > 0.0:
                wait = self._take(rule, False, self.now, 1.0)
            if wait != 0.0:
                no_slot = wait < 0.0        # the limit table is full: never a silent pass
                if no_slot:
                    wait = TABLE_FULL_WAIT
                if rule.action == ACTION_DELAY:
                    self.resume_rule = i
                    # At least a microsecond: a rounding-sized wait must still move
                    # the clock the held frame is judged at (see _release_held).
                    self.wait = wait if wait > 1e-6 else 1e-6
                    if first and not retry:
                        rule.limited += 1
                        self.delayed += 1
                        if self.stats is not None:
                            self.stats.delayed += 1
                        if no_slot:
                            self.zone.header.message_overflows += 1
                    return VERDICT_DELAY
                if rule.action == ACTION_DROP:
                    if first:
                        rule.limited += 1
                        self.dropped += 1
                        if self.stats is not None:
                            self.stats.dropped += 1
                        if no_slot:
                            self.zone.header.message_overflows += 1
                        self.dropping = True
                        return VERDICT_DROP
                    # A later frame of a message already let through: it follows its message.
                else:
                    rule.limited += 1
                    self.rejected += 1
                    if self.stats is not None:
                        self.stats.rejected += 1
                    if no_slot:
                        self.zone.header.message_overflows += 1
                    self._reject(i >> 1)
                    return VERDICT_REJECT
            i += 1
        return VERDICT_PASS

    cdef int _reject(self, int rule_index) except -1:
        cdef bytes reason = b"message rate limit exceeded: " + <bytes>self.rule_names[rule_index]
        cdef Relay relay = self.relay
        relay._mark_end(END_GATEWAY, CLOSE_POLICY_VIOLATION, reason, len(reason))
        relay.client.send_gateway_close(CLOSE_POLICY_VIOLATION, reason)
        relay.backend.send_gateway_close(CLOSE_GOING_AWAY, reason)
        relay.client.flush()
        relay.backend.flush()
        self.held_size = self.held_pos = 0
        return 0

    cdef int _hold(self, uint8_t first_byte, const char* data, Py_ssize_t stored,
                   Py_ssize_t size) except -1:
        """Keep a frame, in order, until the delay ends: a data frame as it came,
        a CLOSE by its unmasked payload."""
        cdef Py_ssize_t need = self.held_size + HELD_HEADER + stored
        cdef char* p
        cdef int64_t n = stored
        cdef int64_t m = size
        _grow(&self.held_data, &self.held_cap, need)
        p = self.held_data + self.held_size
        p[0] = <char>first_byte
        memcpy(p + 8, &n, 8)
        memcpy(p + 16, &m, 8)
        if stored:
            memcpy(p + HELD_HEADER, data, stored)
        self.held_size = need
        return 0

    cdef int _start_hold(self, double wait) except -1:
        self.holding = True
        self.add_pause(PAUSE_DELAY)
        self.hold_started = self.now
        self.hold_due = self.now + wait
        if self.delay_timer is None:
            self.delay_timer = self.relay._loop.call_later(
                wait if wait < HOLD_WATCH else HOLD_WATCH, self._release_held)
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

    cdef int _end_hold(self) except -1:
        self.holding = False
        self.held_size = self.held_pos = 0
        if self.held_cap > OUT_KEEP:
            free(self.held_data)
            self.held_data = NULL
            self.held_cap = 0
        self.remove_pause(PAUSE_DELAY)
        return 0

    def _release_held(self):
        """Timer: let held frames go, in order, as far as the limits allow.

        Held frames are judged at the time their wait ended (hold_due), not at
        the timer's possibly late wake-up, so timer lateness costs no tokens;
        never later than now, so no token is granted early. The timer also
        wakes at least every HOLD_WATCH seconds to see whether the paused
        sender's connection is gone.
        """
        cdef Py_ssize_t pos
        cdef uint8_t first_byte
        cdef int64_t stored, size
        cdef const char* data
        cdef int verdict
        cdef bint retry = True
        cdef double actual
        self.delay_timer = None
        if self.gone or self.relay is None or self.relay.ended or not self.holding:
            return
        if not self._socket_alive():
            # The sender left while paused: what it sent is lost with it.
            self.held_size = self.held_pos = 0
            self.transport.abort()
            return
        self.now_valid = False
        actual = self._clock()
        if actual < self.hold_due:
            self.now_valid = False
            self.delay_timer = self.relay._loop.call_later(
                min(HOLD_WATCH, self.hold_due - actual), self._release_held)
            return
        self.now = self.hold_due
        pos = self.held_pos
        while pos < self.held_size and self.holding:
            first_byte = <uint8_t>self.held_data[pos]
            memcpy(&stored, self.held_data + pos + 8, 8)
            memcpy(&size, self.held_data + pos + 16, 8)
            data = self.held_data + pos + HELD_HEADER
            if (first_byte & 0x0F) == OP_CLOSE:
                pos += HELD_HEADER + stored
                self.held_pos = pos
                self._on_close(data, size)
                continue
            if self.close_sent or self.close_recv:
                pos += HELD_HEADER + stored
                continue
            verdict = self._apply_rules(first_byte, size, retry)
            if verdict == VERDICT_DELAY:
                self.held_pos = pos
                self.hold_due = self.now + self.wait
                self.delay_timer = self.relay._loop.call_later(
                    min(HOLD_WATCH, max(0.0, self.hold_due - actual)), self._release_held)
                self.peer.flush()
                self.now_valid = False
                return
            if verdict == VERDICT_REJECT:
                break
            if verdict == VERDICT_PASS:
                self.peer.forward(data, stored, False)
                if (first_byte & 0x0F) != 0 and self.stats is not None and self.stats.held is not None:
                    self.stats.held.record(<int64_t>((actual - self.hold_started) * 1e6) + 1)
                    if self.stats.held_interval is not None:
                        self.stats.held_interval.record(<int64_t>((actual - self.hold_started) * 1e6) + 1)
            pos += HELD_HEADER + stored
            # A frame let through after waiting: the next first frame is new.
            retry = False
        self.peer.flush()
        self.flush()
        self.now_valid = False
        self._end_hold()

    cdef int send_gateway_close(self, int code, bytes reason) except -1:
        """Write a CLOSE frame of the gateway's own to this leg."""
        cdef char payload[125]
        cdef uint16_t be_code
        cdef Py_ssize_t n = 0
        if self.close_sent or self.gone:
            return 0
        be_code = htons(<uint16_t>code)
        memcpy(payload, &be_code, 2)
        if reason is not None:
            n = PyBytes_GET_SIZE(reason)
            if n > 123:
                # Cut at a character boundary: the reason must stay UTF-8 (RFC 6455 5.5.1).
                n = 123
                while n > 0 and (<uint8_t>PyBytes_AS_STRING(reason)[n] & 0xC0) == 0x80:
                    n -= 1
            memcpy(payload + 2, PyBytes_AS_STRING(reason), n)
        self.queue_frame(0x80 | OP_CLOSE, payload, n + 2)
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

    def pause_writing(self):
        # The transport holds bytes it could not send: stop reading the peer.
        self.write_paused = True
        if self.peer is not None:
            self.peer.add_pause(PAUSE_PEER_WRITE)

    def resume_writing(self):
        self.write_paused = False
        if self.pong_pending:
            self.pong_pending = False
            self.pings_coalesced = 0
            if not self.close_sent and not self.gone:
                self.queue_frame(0x80 | OP_PONG, self.pong_data, self.pong_size)
                self.flush()
            free(self.pong_data)
            self.pong_data = NULL
            self.remove_pause(PAUSE_OWN_REPLY)
            if self.write_paused:       # the PONG filled the transport again
                return
        if self.peer is not None:
            self.peer.remove_pause(PAUSE_PEER_WRITE)

    # ---- the asyncio protocol -------------------------------------------

    def connection_made(self, transport):
        """Attach the leg to its transport once the WebSocket is established
        (the server calls it after the upgrade, then feed() with early bytes)."""
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
        if self.out_size:
            # What the backend sent before the client's 101, its close included.
            self.flush()
        if self.close_sent:
            if self.close_recv:
                transport.close()
            self.relay._arm_close_timer()
        self.peer.remove_pause(PAUSE_PEER_NOT_READY)

    def get_buffer(self, Py_ssize_t sizehint):
        """Where the next read goes: the shared scratch buffer, or after the
        partial frame this leg keeps."""
        cdef Py_ssize_t need
        cdef char* data
        if self.in_size == 0 or self.broken or self.gone:
            self.reading_own = False
            return self
        # Grow with what arrives (at most doubling), never past the frame: a
        # header alone does not reserve its announced length.
        need = self.in_cap * 2
        if need < self.in_size + IN_STEP:
            need = self.in_size + IN_STEP
        if self.in_want > self.in_size and need > self.in_want:
            need = self.in_want
        if self.in_cap - self.in_size < IN_STEP and need > self.in_cap:
            data = <char*>realloc(self.in_data, need)
            if data == NULL:
                # Out of memory: this connection ends; the read goes to the scratch buffer.
                self.fail(CLOSE_INTERNAL_ERROR, b"gateway out of memory", b"gateway out of memory")
                self.broken = True
                self.in_size = 0
                if self.transport is not None:
                    self.transport.close()
                self.reading_own = False
                return self
            self.in_data = data
            self.in_cap = need
        self.reading_own = True
        return self

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.reading_own:
            PyBuffer_FillInfo(view, self, self.in_data + self.in_size,
                              self.in_cap - self.in_size, 0, flags)
        else:
            PyBuffer_FillInfo(view, self, SCRATCH, SCRATCH_SIZE, 0, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __len__(self):
        # uvloop's TLS transport asks the size of the buffer get_buffer() gave.
        return self.in_cap - self.in_size if self.reading_own else SCRATCH_SIZE

    def __bool__(self):
        return True

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.reading_own:
            self.in_size += nbytes
            self._received(self.in_data, self.in_size, True)
        else:
            self._received(SCRATCH, nbytes, False)

    def feed(self, bytes data):
        """Bytes that arrived with the upgrade (read before the leg was attached)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n == 0:
            return
        _grow(&self.in_data, &self.in_cap, self.in_size + n)
        memcpy(self.in_data + self.in_size, PyBytes_AS_STRING(data), n)
        self.in_size += n
        self._received(self.in_data, self.in_size, True)

    def eof_received(self):
        return None     # the transport closes; connection_lost follows

    def data_received(self, bytes data):
        # The standard library's transports (`fastgw run --loop asyncio`) call this: to them a
        # Leg is no asyncio.BufferedProtocol. uvloop's call get_buffer()/buffer_updated().
        self.feed(data)

    cdef int _received(self, char* data, Py_ssize_t size, bint own) except -1:
        """Process the frames of one read; keep a partial frame for the next."""
        cdef Py_ssize_t used, rest
        if self.gone or self.broken:
            self.in_size = 0
            return 0
        self.reads += 1
        used = self._parse(data, size)
        self._end_of_read()
        rest = size - used
        if self.broken or self.gone:
            self.in_size = 0
            return 0
        if own:
            if used and rest:
                memmove(self.in_data, self.in_data + used, rest)
            self.in_size = rest
            if rest == 0 and self.in_cap > OUT_KEEP:
                free(self.in_data)
                self.in_data = NULL
                self.in_cap = 0
        elif rest:
            _grow(&self.in_data, &self.in_cap, rest)
            memcpy(self.in_data, data + used, rest)
            self.in_size = rest
        return 0

    cdef Py_ssize_t _parse(self, char* data, Py_ssize_t size) except -1:
        """Handle the whole frames at the start of data; return the bytes used."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t avail, header
        cdef uint8_t b0, b1, op, len7
        cdef uint16_t len16
        cdef uint64_t length
        cdef bint masked
        self.in_want = 0
        while pos < size:
            if self.broken or self.gone:
                return size
            avail = size - pos
            if avail < 2:
                break
            b0 = <uint8_t>data[pos]
            b1 = <uint8_t>data[pos + 1]
            op = b0 & 0x0F
            masked = b1 >> 7
            len7 = b1 & 0x7F
            if len7 < 126:
                length = len7
                header = 2
            elif len7 == 126:
                if avail < 4:
                    break
                memcpy(&len16, data + pos + 2, 2)
                length = ntohs(len16)
                header = 4
                if length < 126:
                    self._protocol_error(b"non-minimal frame length")
                    return size
            else:
                if avail < 10:
                    break
                memcpy(&length, data + pos + 2, 8)
                length = be64toh(length)
                header = 10
                if length >> 63 or length < 65536:
                    self._protocol_error(b"invalid 64-bit frame length")
                    return size
            if b0 & 0x70:
                self._protocol_error(b"reserved bits set without extension")
                return size
            if op > OP_BINARY and (op < OP_CLOSE or op > OP_PONG):
                self._protocol_error(b"invalid opcode")
                return size
            if op >= OP_CLOSE and (not (b0 & 0x80) or length > 125):
                self._protocol_error(b"fragmented or oversized control frame")
                return size
            if masked != self.is_client:
                self._protocol_error(b"unmasked frame from a client" if self.is_client
                                     else b"masked frame from a server")
                return size
            if length > self.max_frame_size:
                self.fail(CLOSE_TOO_BIG, b"frame too big",
                          b"client message too big" if self.is_client else b"backend message too big")
                self.broken = True
                if self.transport is not None:
                    self.transport.close()
                return size
            if masked:
                header += 4
            if <uint64_t>avail < <uint64_t>header + length:
                self.in_want = header + <Py_ssize_t>length
                break
            self._on_frame(b0, data + pos, header, <Py_ssize_t>length, masked)
            pos += header + <Py_ssize_t>length
        return pos

    cdef inline int _on_frame(self, uint8_t first_byte, char* frame, Py_ssize_t header,
                       Py_ssize_t size, bint masked) except -1:
        cdef uint8_t op = first_byte & 0x0F
        cdef char* payload = frame + header
        cdef uint32_t mask
        cdef int verdict
        if op <= OP_BINARY:
            if self._accept_data(first_byte, size):
                if self.holding:
                    self._hold(first_byte, frame, header + size, size)
                elif self.n_rules == 0:
                    self.peer.forward(frame, header + size, True)
                else:
                    if not self.now_valid:
                        self._clock()
                    if self.all_local and not self.dropping and self._fast_pass(
                            op != OP_CONT, <double>size):
                        verdict = VERDICT_PASS
                    else:
                        verdict = self._apply_rules(first_byte, size, False)
                    if verdict == VERDICT_PASS:
                        self.peer.forward(frame, header + size, True)
                    elif verdict == VERDICT_DELAY:
                        self._start_hold(self.wait)
                        self._hold(first_byte, frame, header + size, size)
            return 0
        # Control frames are unmasked and answered or re-encoded per hop.
        if masked and size:
            memcpy(&mask, payload - 4, 4)
            _mask_copy(payload, payload, size, mask)
        if op == OP_PING:
            if not self.close_sent:
                self._answer_ping(payload, size)
        elif op == OP_CLOSE:
            if self.holding:
                self._hold(first_byte, payload, size, size)
            else:
                self._on_close(payload, size)
        # PONG: answers to our own pings only; never relayed.
        return 0

    cdef int _answer_ping(self, const char* payload, Py_ssize_t size) except -1:
        """Queue the PONG for a PING of this leg; while this leg's transport holds
        unsent bytes, keep only the latest one for later and stop reading the leg."""
        if not self.write_paused:
            self.queue_frame(0x80 | OP_PONG, payload, size)
            return 0
        if self.pong_data == NULL:
            self.pong_data = <char*>malloc(125)
            if self.pong_data == NULL:
                raise MemoryError()
        memcpy(self.pong_data, payload, size)
        self.pong_size = <uint8_t>size
        if self.pong_pending:
            self.pings_coalesced += 1
            if self.pings_coalesced > PING_COALESCE_MAX:
                # Closing with unread input would reset the connection and lose the
                # CLOSE: read on instead; what the leg sends is ignored until its
                # CLOSE (close_sent), and the close timer cuts it if that never comes.
                self.pong_pending = False
                self.pings_coalesced = 0
                self.fail(CLOSE_POLICY_VIOLATION, b"control frame flood",
                          b"client control frame flood" if self.is_client else b"backend control frame flood")
                self.remove_pause(PAUSE_OWN_REPLY)
                return 0
        self.pong_pending = True
        self.add_pause(PAUSE_OWN_REPLY)
        return 0

    cdef inline bint _accept_data(self, uint8_t first_byte, Py_ssize_t size) except -1:
        """Check a data frame and count it. False: it is not to be relayed."""
        if self.close_recv:
            return False        # nothing may follow this leg's own CLOSE
        # After a CLOSE was sent to this leg, what it sent before seeing it still
        # goes to the peer leg, unless that one is closing too (forward() checks).
        if (first_byte & 0x0F) == OP_CONT:
            if not self.in_message:
                self._protocol_error(b"continuation frame without a message")
                return False
            self.msg_bytes += <uint64_t>size
        else:
            if self.in_message:
                self._protocol_error(b"new message inside a fragmented message")
                return False
            self.msg_bytes = <uint64_t>size
            self.in_message = True
        if self.msg_bytes > self.max_message_size:
            self.fail(CLOSE_TOO_BIG, b"message too big",
                      b"client message too big" if self.is_client else b"backend message too big")
            return False
        self.frames += 1
        self.bytes += <uint64_t>size
        # self.stats is read in place: a local reference would cost a refcount pair per frame.
        if self.stats is not None:
            self.stats.bytes += <uint64_t>size
        if first_byte & 0x80:
            self.in_message = False
            self.messages += 1
            if self.stats is not None:
                self.stats.messages += 1
                self.stats.size_log2[64 - fastgw_clz64(self.msg_bytes) if self.msg_bytes else 0] += 1
        return True

    cdef int _end_of_read(self) except -1:
        if self.peer is not None:
            self.peer.flush()
        self.flush()
        self.now_valid = False
        return 0

    cdef int _on_close(self, const char* payload, Py_ssize_t size) except -1:
        cdef Leg peer = self.peer
        cdef uint16_t code = 0
        if size >= 2:
            memcpy(&code, payload, 2)
            code = ntohs(code)
            if not _valid_close_code(code):
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
            self.relay._mark_end(END_CLIENT if self.is_client else END_BACKEND, 1005, NULL, 0)
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

    def connection_lost(self, exc):
        cdef Leg peer = self.peer
        self.gone = True
        self.out_size = 0
        self.pass_ptr = NULL
        self.pass_size = 0
        self.in_size = 0
        self.held_size = self.held_pos = 0
        if self.in_data != NULL:
            free(self.in_data)
            self.in_data = NULL
            self.in_cap = 0
        if self.out_data != NULL:
            free(self.out_data)
            self.out_data = NULL
            self.out_cap = 0
        if self.held_data != NULL:
            free(self.held_data)
            self.held_data = NULL
            self.held_cap = 0
        self.pong_pending = False
        if self.pong_data != NULL:
            free(self.pong_data)
            self.pong_data = NULL
        if self.delay_timer is not None:
            self.delay_timer.cancel()
            self.delay_timer = None
        if self.relay is not None and not self.close_recv:
            if self.is_client:
                self.relay._mark_end(END_CLIENT, 1006, NULL, 0)
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


    def send_ping(self, bytes payload):
        """A PING of the gateway's own (liveness), unless this leg is closing or gone."""
        if self.close_sent or self.gone or self.transport is None:
            return False
        self.queue_frame(0x80 | OP_PING, PyBytes_AS_STRING(payload),
                         min(PyBytes_GET_SIZE(payload), 125))
        self.flush()
        return True

    # ---- introspection (Python) -----------------------------------------

    def abort_transport(self):
        """Cut this leg's connection without a close handshake."""
        if self.transport is not None and not self.gone:
            self.transport.abort()

    @property
    def attached(self):
        """The leg's WebSocket has been established (it may have ended since)."""
        return self.transport is not None

    @property
    def connected(self):
        return self.transport is not None and not self.gone

    @property
    def closing(self):
        return self.close_sent or self.close_recv

    @property
    def hold_state(self):
        """(holding, seconds until the held message's wait ends, held bytes) for introspection."""
        cdef timespec ts
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return (self.holding, self.hold_due - (<double>ts.tv_sec + <double>ts.tv_nsec * 1e-9),
                self.held_size - self.held_pos, self.delay_timer is not None)

    @property
    def paused(self):
        return self.pause_flags != 0

    @property
    def pending_bytes(self):
        return self.out_size + self.pass_size

    @property
    def input_buffer(self):
        """(bytes of a partial frame kept, capacity of the leg's own input buffer)."""
        return (self.in_size, self.in_cap)


cdef class Relay:
    """A proxied connection: a client leg, a backend leg, and its end of life.

    `on_end(relay)` is called exactly once, when both legs are gone (or when an
    aborted relay's backend leg is gone). `info` is any Python object the
    server wants to keep with the connection.
    """

    def __init__(self, loop, on_end, info=None, *, uint64_t max_message_size=16 * 1024 * 1024,
                 uint64_t max_frame_size=16 * 1024 * 1024,
                 Py_ssize_t max_early_bytes=256 * 1024, double close_timeout=5.0):
        self.client = Leg.__new__(Leg)
        self.backend = Leg.__new__(Leg)
        self.client.relay = self
        self.backend.relay = self
        self.client.peer = self.backend
        self.backend.peer = self.client
        self.client.is_client = True
        self.backend.masked = True
        self._loop = loop
        self._on_end = on_end
        self.info = info
        self.client.max_message_size = max_message_size
        self.backend.max_message_size = max_message_size
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
            self._close_timer = self._loop.call_later(self._close_timeout, self._on_close_timeout)
        return 0

    def _on_close_timeout(self):
        # A close handshake did not finish in time: cut both legs.
        self._close_timer = None
        for leg in (self.client, self.backend):
            if leg.transport is not None and not leg.gone:
                (<Leg>leg).transport.abort()

    cdef int _leg_gone(self) except -1:
        cdef bint client_done = self.client.gone or (self.client.transport is None and self.aborted)
        cdef bint backend_done = self.backend.gone or self.backend.transport is None
        if self.ended or not (client_done and backend_done):
            return 0
        self._finish()
        return 0

    def _finish(self):
        if self.ended:
            return
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
                (<Leg>leg).relay = None
                (<Leg>leg).peer = None
                (<Leg>leg).transport = None

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
            self._mark_end(END_GATEWAY, 1006, r, len(r))
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
        return (self.client.messages, self.backend.messages)

    @property
    def activity(self):
        """A number that changes whenever a frame crosses the relay."""
        return self.client.frames + self.backend.frames

    @property
    def bytes(self):
        return (self.client.bytes, self.backend.bytes)
