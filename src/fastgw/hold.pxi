# The hold queue of a leg: frames kept back by a DELAY verdict, in arrival
# order, and their release when the wait ends. Included by _core.pyx; the
# layout is in hold_decl.pxi.
#
# A leg that holds is paused (PAUSE_DELAY): what it still sends within the
# current read is queued behind the held message, never judged before it.
# The release timer (Leg._release_held, through the relay's clock) judges the
# held frames again, in order, at the time their wait ended.

from libc.stdint cimport int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy

# While a delay holds a sender, its connection is checked at least this often (s).
cdef double HOLD_WATCH = 1.0

cdef enum:
    HELD_HEADER = 24


cdef int hold_push(HoldQueue* q, uint8_t first_byte, const char* data, Py_ssize_t stored,
                   Py_ssize_t size) except -1:
    """Keep a frame at the end of the queue: `stored` bytes of data (a data
    frame as it came, or a CLOSE's payload), `size` its payload size."""
    cdef Py_ssize_t need = q.size + HELD_HEADER + stored
    cdef char* p
    cdef int64_t n = stored
    cdef int64_t m = size
    buffer_grow(&q.data, &q.cap, need)
    p = q.data + q.size
    p[0] = <char>first_byte
    memcpy(p + 8, &n, 8)
    memcpy(p + 16, &m, 8)
    if stored:
        memcpy(p + HELD_HEADER, data, stored)
    q.size = need
    return 0


cdef inline void hold_forget(HoldQueue* q) noexcept:
    """Drop what is held (the connection is ending)."""
    q.size = q.pos = 0


cdef void hold_reset(HoldQueue* q) noexcept:
    """Empty the queue; a large buffer is given back."""
    q.size = q.pos = 0
    if q.cap > OUT_KEEP:
        free(q.data)
        q.data = NULL
        q.cap = 0


cdef void hold_free(HoldQueue* q) noexcept:
    q.size = q.pos = 0
    if q.data != NULL:
        free(q.data)
        q.data = NULL
        q.cap = 0


cdef int hold_start(Leg leg, double wait) except -1:
    """A DELAY verdict at leg.now: pause the leg and set the release timer."""
    leg.add_pause(PAUSE_DELAY)
    leg.held.started = leg.now
    leg.held.due = leg.now + wait
    if leg.hold_timer is None:
        leg.hold_timer = leg.relay.clock.call_later(
            wait if wait < HOLD_WATCH else HOLD_WATCH, leg._release_held)
    return 0


cdef int hold_end(Leg leg) except -1:
    hold_reset(&leg.held)
    leg.remove_pause(PAUSE_DELAY)
    return 0


cdef int hold_release(Leg leg) except -1:
    """The release timer: let held frames go, in order, as far as the policies allow.

    Held frames are judged at the time their wait ended (due), not at the
    timer's possibly late wake-up, so timer lateness costs no tokens; never
    later than now, so no token is granted early. The timer also wakes at
    least every HOLD_WATCH seconds to see whether the paused sender's
    connection is gone.
    """
    cdef HoldQueue* q = &leg.held
    cdef Py_ssize_t pos
    cdef uint8_t first_byte
    cdef int64_t stored, size
    cdef const char* data
    cdef int verdict
    cdef bint retry = True
    cdef double actual
    leg.hold_timer = None
    if leg.gone or leg.relay is None or leg.relay.ended or not (leg.pause_flags & PAUSE_DELAY):
        return 0
    if not leg._socket_alive():
        # The sender left while paused: what it sent is lost with it.
        hold_forget(q)
        leg.transport.abort()
        return 0
    leg.now_valid = False
    leg._clock()
    actual = leg.now
    if actual < q.due:
        leg.now_valid = False
        leg.hold_timer = leg.relay.clock.call_later(
            min(HOLD_WATCH, q.due - actual), leg._release_held)
        return 0
    leg.now = q.due
    pos = q.pos
    while pos < q.size and (leg.pause_flags & PAUSE_DELAY):
        first_byte = <uint8_t>q.data[pos]
        memcpy(&stored, q.data + pos + 8, 8)
        memcpy(&size, q.data + pos + 16, 8)
        data = q.data + pos + HELD_HEADER
        if (first_byte & 0x0F) == OP_CLOSE:
            pos += HELD_HEADER + stored
            q.pos = pos
            leg._on_close(data, size)
            continue
        if leg.close_sent or leg.close_recv:
            pos += HELD_HEADER + stored
            continue
        verdict = leg._judge(first_byte, size, retry) if leg.rate is not None else PASS
        if verdict == DELAY:
            q.pos = pos
            q.due = leg.now + leg.rate.wait
            leg.hold_timer = leg.relay.clock.call_later(
                min(HOLD_WATCH, max(0.0, q.due - actual)), leg._release_held)
            leg.peer.flush()
            leg.now_valid = False
            return 0
        if verdict == REJECT:
            break
        if verdict == PASS:
            leg.peer.forward(data, stored, False)
            if (first_byte & 0x0F) != 0 and leg.stats is not None:
                leg.stats.record_held(actual - q.started)
        pos += HELD_HEADER + stored
        # A frame let through after waiting: the next first frame is new.
        retry = False
    leg.peer.flush()
    leg.flush()
    leg.now_valid = False
    hold_end(leg)
    return 0
