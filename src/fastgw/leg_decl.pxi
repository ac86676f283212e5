# Declarations of a Leg: one side of a relayed connection, the asyncio
# (buffered) protocol of its transport once the WebSocket is established.
# Included by _core.pxd (after the frame, stats, policy and hold
# declarations); defined in leg.pxi.
#
# A leg parses the frames it reads and forwards data frames to its peer leg
# as they came, bytes unchanged (a client's frames keep the client's mask:
# they are masked, as the backend expects; a backend's frames are unmasked,
# as the client expects). Only control frames are unmasked and re-encoded.
#
# Reads go into one scratch buffer shared by all legs; only a partial frame
# is kept in a leg's own buffer (InBuf). The frames of one read that are
# forwarded unchanged are one contiguous range of that buffer, written with
# one send() at the end of the read; frames the gateway writes itself (close,
# pong, held frames) go through the leg's output buffer (OutBuf).
#
# Its parts: input and output buffers, the close handshake, flow control
# (pause_flags), the PONG owed (PongState); the message policies of the flow
# it reads (policy.pxi) with the message state, the hold queue (hold.pxi),
# and its counters (stats.pxi).

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "<stdbool.h>":
    # A one-byte bint (C's bool): the flags of a leg (a bint is an int, 4 bytes). With them
    # packed, a Leg is 352 bytes in pymalloc's size classes, not 416 (bench/memory.py).
    ctypedef bint cbool "bool"


cdef enum PauseReason:
    PAUSE_PEER_WRITE = 1      # the peer's write buffer is over its high-water mark
    PAUSE_PEER_NOT_READY = 2  # the peer leg is not attached yet (client before its 101)
    PAUSE_OWN_REPLY = 4       # this leg's own transport holds bytes and a PONG for it waits
    PAUSE_DELAY = 8           # a DELAY verdict holds this leg (its hold queue is in use)


cdef enum:
    # After a flush, an output buffer larger than this is given back.
    OUT_KEEP = 65536
    OUT_INITIAL = 4096
    # A partial frame's buffer grows by at least this much per read.
    IN_STEP = 16384
    # The read buffer shared by all legs (one read at a time on the event loop's thread).
    SCRATCH_SIZE = 262144
    # PINGs folded into one pending PONG (a peer that floods pings and never
    # reads the answers) before the connection is closed with 1008.
    PING_COALESCE_MAX = 1024


cdef struct InBuf:
    # A partial frame waiting for the rest of its bytes.
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    Py_ssize_t want             # bytes the partial frame needs in all (0: header incomplete)


cdef struct OutBuf:
    # A range of the peer's read buffer forwarded unchanged, or encoded/copied
    # frames in data; written with one write per read.
    const char* pass_ptr
    Py_ssize_t pass_size
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    uint32_t rng                # xorshift state for mask keys


cdef struct PongState:
    # A PONG owed to this leg while its transport holds unsent bytes: only the
    # latest PING is answered (RFC 6455 5.5.3), once the transport drains, and
    # reading pauses meanwhile, so replies never pile up in memory.
    char* data                  # 125 bytes, allocated on first use
    uint8_t size
    cbool pending
    uint32_t coalesced          # PINGs folded into the pending PONG (a cap ends the connection)


cdef int buffer_grow(char** data, Py_ssize_t* cap, Py_ssize_t need) except -1


cdef class Relay


cdef class Leg:
    # The fields are ordered so that the one-byte flags share eight bytes (an idle
    # connection holds two legs: their size is most of what it costs in the core).
    cdef:
        Relay relay
        Leg peer
        object transport             # the asyncio transport; None until the leg is connected
        int sock_fd                  # its socket (-1: none)
        int send_fd                  # the socket written directly when nothing is buffered (-1: TLS)
        uint32_t pause_flags         # why this leg's reading is paused (PauseReason bits)
        cbool write_paused           # the transport holds unsent bytes (plain TCP: any at all)
        cbool is_client              # the client's side (fastgw is its server)
        cbool masked                 # frames written to this leg are masked (backend leg)
        cbool deflate                # permessage-deflate negotiated: RSV1 on a message's first frame
        cbool reading_own            # the current read goes into inbuf.data, not the scratch buffer

        # Close handshake state of this leg.
        cbool broken                 # a protocol error or a fatal one: what this leg sends is ignored
        cbool close_sent             # a CLOSE frame has been written to this leg
        cbool close_recv             # a CLOSE frame has been received from this leg
        cbool gone                   # the transport is disconnected

        # Time: read once per read batch (`now`, below).
        cbool now_valid
        cbool sim_clock              # the clock is not the real Clock: now() is a Python call

        uint64_t max_frame_size      # larger data frames end the connection with 1009

        InBuf inbuf
        OutBuf out
        PongState pong

        # The message policies of the flow this leg reads (request flow on the
        # client leg, response flow on the backend leg), and the message it is in.
        MessageState msg
        SizeLimit size_limit         # judged as a frame arrives
        RateLimit rate               # judged in turn; None: no rate limit
        HoldQueue held               # frames a DELAY holds (PAUSE_DELAY while in use)
        object hold_timer            # the release timer (the relay's clock)

        # Time: the relay's clock, read once per read batch (now_valid, sim_clock: above).
        double now

        FlowCounters counts
        FlowStats stats              # the API's counters of this leg's flow, or None

    # output
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _unpass(self) except -1
    cdef int queue_frame(self, uint8_t first_byte, const char* payload, Py_ssize_t size) except -1
    cdef inline int forward(self, const char* frame, Py_ssize_t size, bint borrowed) except -1
    cdef int _forward_copy(self, const char* frame, Py_ssize_t size) except -1
    cdef int flush(self) except -1
    cdef int _write(self, const char* data, Py_ssize_t size) except -1
    # input and frames
    cdef int _received(self, char* data, Py_ssize_t size, bint own) except -1
    cdef Py_ssize_t _parse(self, char* data, Py_ssize_t size) except -1
    cdef inline int _on_frame(self, uint8_t first_byte, char* frame, Py_ssize_t header,
                              Py_ssize_t size, bint masked) except -1
    cdef inline bint _accept_data(self, uint8_t first_byte, Py_ssize_t size) except -1
    cdef int _answer_ping(self, const char* payload, Py_ssize_t size) except -1
    cdef int _end_of_read(self) except -1
    # message policies
    cdef int _clock(self) except -1
    cdef inline int _judge(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1
    cdef int _judge_in_turn(self, uint8_t first_byte, Py_ssize_t size, bint retry) except -1
    cdef int _reject(self, bytes reason) except -1
    # close handshake and end
    cdef int _on_close(self, const char* payload, Py_ssize_t size) except -1
    cdef int send_gateway_close(self, int code, bytes reason) except -1
    cdef int _after_close_sent(self) except -1
    cdef int fail(self, int code, bytes reason, bytes peer_reason) except -1
    cdef int _protocol_error(self, bytes reason) except -1
    cdef bint _socket_alive(self) noexcept
    cdef int _lost(self) except -1
    cdef void _fatal(self, object exc) noexcept
    cdef void _fatal_close(self) noexcept
    # flow control
    cdef int add_pause(self, uint32_t reason) except -1
    cdef int remove_pause(self, uint32_t reason) except -1
    cdef int _drained(self) except -1
