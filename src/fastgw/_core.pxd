# The C-level contract of the fastgw core. Other Cython code may cimport it.
#
# One proxied WebSocket connection is a Relay with two Legs: the client leg
# (fastgw is the server of the client's connection) and the backend leg
# (fastgw is the client of the backend's connection). After the upgrade, each
# Leg is the asyncio (buffered) protocol of its transport: it parses frame
# headers itself and forwards data frames to its peer leg as they came, bytes
# unchanged (a client's frames keep the client's mask: they are masked, as the
# backend expects; a backend's frames are unmasked, as the client expects).
# Only control frames are unmasked and re-encoded.
#
# Reads go into one scratch buffer shared by all legs; only a partial frame is
# kept in a leg's own buffer. The frames of one read that are forwarded
# unchanged are one contiguous range of that buffer, written with one send()
# at the end of the read; frames the gateway writes itself (close, pong, held
# frames) go through the leg's output buffer.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

include "limits_decl.pxi"
include "hdr_decl.pxi"


cdef enum PauseReason:
    PAUSE_PEER_WRITE = 1      # the peer's write buffer is over its high-water mark
    PAUSE_PEER_NOT_READY = 2  # the peer leg is not attached yet (client before its 101)
    PAUSE_OWN_REPLY = 4       # this leg's own transport holds bytes and a PONG for it waits
    PAUSE_DELAY = 8           # a message-rate-limit with action delay holds this leg


cdef enum LimitAction:
    ACTION_REJECT = 0
    ACTION_DELAY = 1
    ACTION_DROP = 2


cdef enum LimitScope:
    SCOPE_CONNECTION = 0
    SCOPE_CLIENT = 1
    SCOPE_API = 2


cdef enum Verdict:
    VERDICT_PASS = 0
    VERDICT_DROP = 1
    VERDICT_DELAY = 2
    VERDICT_REJECT = 3


cdef struct MsgRule:
    # One message-rate-limit of a flow, with the values of the connection's plan.
    uint8_t action               # LimitAction
    uint8_t scope                # LimitScope
    double msg_rate              # messages per second; 0: no message limit
    double msg_burst
    double byte_rate             # bytes per second; 0: no byte limit
    double byte_burst
    uint64_t msg_key             # LimitZone keys for scope client / api
    uint64_t byte_key
    BucketState msg_bucket       # buckets for scope connection
    BucketState byte_bucket
    uint64_t limited             # messages this rule rejected, delayed or dropped


cdef enum EndSide:
    END_NONE = 0
    END_CLIENT = 1
    END_BACKEND = 2
    END_GATEWAY = 3


cdef class FlowStats:
    # Counters of one flow (request or response) of one API, shared by all of
    # the API's connections and updated on the frame path: metrics read
    # O(APIs) numbers, never the live connections.
    cdef:
        readonly uint64_t messages
        readonly uint64_t bytes
        readonly uint64_t rejected
        readonly uint64_t delayed
        readonly uint64_t dropped
        uint64_t size_log2[65]        # messages by size: [k] counts sizes in [2^(k-1), 2^k - 1]
        readonly HdrArray held        # time a delayed message was held, µs
        readonly HdrArray held_interval    # the same since the last interval log (or None)


cdef class Leg:
    cdef:
        Relay relay
        Leg peer
        object transport             # the asyncio transport; None until the leg is connected
        int sock_fd                  # its socket (-1: none)
        int send_fd                  # the socket written directly when nothing is buffered (-1: TLS)
        bint write_paused            # the transport holds unsent bytes (plain TCP: any at all)
        bint is_client               # the client's side (fastgw is its server)
        bint masked                  # frames written to this leg are masked (backend leg)
        uint64_t max_frame_size      # larger data frames end the connection with 1009

        # Input: a partial frame waiting for the rest of its bytes.
        char* in_data
        Py_ssize_t in_size
        Py_ssize_t in_cap
        Py_ssize_t in_want           # bytes the partial frame needs in all (0: header incomplete)
        bint reading_own             # the current read goes into in_data, not the scratch buffer
        bint broken                  # a protocol error: what this leg sends is ignored

        # Output: a range of the peer's read buffer forwarded unchanged, or
        # encoded/copied frames in out_data; written with one write per read.
        const char* pass_ptr
        Py_ssize_t pass_size
        char* out_data
        Py_ssize_t out_size
        Py_ssize_t out_cap

        # Close handshake state of this leg.
        bint close_sent              # a CLOSE frame has been written to this leg
        bint close_recv              # a CLOSE frame has been received from this leg
        bint gone                    # the transport is disconnected

        # Message state of what this leg receives.
        bint in_message              # inside a fragmented message
        uint64_t msg_bytes           # bytes of the current message so far

        uint32_t pause_flags         # why this leg's reading is paused (PauseReason bits)

        # A PONG owed to this leg while its transport holds unsent bytes: only the
        # latest PING is answered (RFC 6455 5.5.3), once the transport drains, and
        # reading pauses meanwhile, so replies never pile up in memory.
        char* pong_data              # 125 bytes, allocated on first use
        uint8_t pong_size
        bint pong_pending
        uint32_t pings_coalesced     # PINGs folded into the pending PONG (a cap ends the connection)
        uint32_t rng                 # xorshift state for mask keys

        # The message policies of the flow this leg reads (request flow on the
        # client leg, response flow on the backend leg).
        readonly uint64_t max_message_size
        MsgRule* rules
        int n_rules
        int resume_rule              # where a delayed message resumes its checks
        bint dropping                # the message being received is dropped
        bint all_local               # every rule is scope connection (the fast path applies)
        LimitZone zone               # shared buckets (scope client / api), or None
        list rule_names              # for close reasons (reject path only)
        double now                   # monotonic time, read once per read batch
        bint now_valid
        double wait                  # set by _apply_rules on VERDICT_DELAY

        # Frames held by a delay, in arrival order: [first byte][pad][stored size]
        # [payload size][bytes]; data frames are stored as they came, a CLOSE by
        # its unmasked payload.
        char* held_data
        Py_ssize_t held_size
        Py_ssize_t held_cap
        Py_ssize_t held_pos
        bint holding
        double hold_due              # when the held message's wait ends (monotonic s)
        double hold_started          # when the current hold began (monotonic s)
        object delay_timer

        readonly uint64_t reads      # socket reads that brought bytes (liveness: server.py)
        readonly uint64_t messages   # whole data messages received from this leg
        readonly uint64_t frames     # data frames received from this leg
        readonly uint64_t bytes      # payload bytes received from this leg
        readonly uint64_t rejected   # messages refused by an action reject
        readonly uint64_t delayed    # messages held by an action delay
        readonly uint64_t dropped    # messages discarded by an action drop
        FlowStats stats              # the API's counters of this leg's flow, or None

    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _unpass(self) except -1
    cdef int queue_frame(self, uint8_t first_byte, const char* payload, Py_ssize_t size) except -1
    cdef int flush(self) except -1
    cdef int _write(self, const char* data, Py_ssize_t size) except -1
    cdef inline int forward(self, const char* frame, Py_ssize_t size, bint borrowed) except -1
    cdef Py_ssize_t _parse(self, char* data, Py_ssize_t size) except -1
    cdef int _protocol_error(self, bytes reason) except -1
    cdef inline int _on_frame(self, uint8_t first_byte, char* frame, Py_ssize_t header,
                       Py_ssize_t size, bint masked) except -1
    cdef int _received(self, char* data, Py_ssize_t size, bint own) except -1
    cdef double _clock(self) noexcept
    cdef inline double _take(self, MsgRule* rule, bint of_bytes, double now, double cost) noexcept
    cdef inline bint _fast_pass(self, bint first, double size) noexcept
    cdef void _give_back(self, int upto, bint first, double size, bint with_msg) noexcept
    cdef int _apply_rules(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1
    cdef int _reject(self, int rule_index) except -1
    cdef int _hold(self, uint8_t first_byte, const char* data, Py_ssize_t stored,
                   Py_ssize_t size) except -1
    cdef int _start_hold(self, double wait) except -1
    cdef int _end_hold(self) except -1
    cdef bint _socket_alive(self) noexcept
    cdef int _on_close(self, const char* payload, Py_ssize_t size) except -1
    cdef int _answer_ping(self, const char* payload, Py_ssize_t size) except -1
    cdef inline bint _accept_data(self, uint8_t first_byte, Py_ssize_t size) except -1
    cdef int send_gateway_close(self, int code, bytes reason) except -1
    cdef int _after_close_sent(self) except -1
    cdef int add_pause(self, uint32_t reason) except -1
    cdef int remove_pause(self, uint32_t reason) except -1
    cdef int fail(self, int code, bytes reason, bytes peer_reason) except -1
    cdef int _end_of_read(self) except -1


cdef class Relay:
    cdef:
        readonly Leg client
        readonly Leg backend
        readonly bint ended
        readonly bint aborted
        readonly object info           # Python-side data of the connection (server.py)
        object _on_end                 # called once, with the relay, when both legs are gone
        object _loop
        object _close_timer
        double _close_timeout
        Py_ssize_t max_early_bytes     # bound for backend frames held before the client leg is ready
        uint8_t _end_side              # EndSide: who ended the connection (first to act)
        readonly int end_code          # the close code the client got or sent (1006: none)
        readonly bytes end_reason

    cdef int _leg_gone(self) except -1
    cdef int _arm_close_timer(self) except -1
    cdef int _mark_end(self, uint8_t side, int code, const char* reason, Py_ssize_t size) except -1
