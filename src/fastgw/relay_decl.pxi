# Declarations of a Relay: one proxied connection, its two legs and its end of
# life. Included by _core.pxd (after leg_decl.pxi); defined in relay.pxi.


cdef enum EndSide:
    END_NONE = 0
    END_CLIENT = 1
    END_BACKEND = 2
    END_GATEWAY = 3


cdef class Relay:
    # The one-byte fields share eight bytes with end_code: a Relay is 128 B in pymalloc.
    cdef:
        readonly Leg client
        readonly Leg backend
        readonly cbool ended
        readonly cbool aborted
        readonly cbool failed          # the fatal path ran (an internal error)
        uint8_t _end_side              # EndSide: who ended the connection (first to act)
        readonly int end_code          # the close code the client got or sent (1006: none)
        readonly bytes end_reason
        readonly object info           # Python-side data of the connection (connection.Connection)
        readonly object clock          # fastgw.clock.Clock: now() and call_later()
        object _on_end                 # called once, with the relay, when both legs are gone
        object _close_timer
        double _close_timeout
        Py_ssize_t max_early_bytes     # bound for backend frames held before the client leg is ready

    cdef int _leg_gone(self) except -1
    cdef int _finish(self) except -1
    cdef int _arm_close_timer(self) except -1
    cdef int _mark_end(self, uint8_t side, int code, const char* reason, Py_ssize_t size) except -1
    cdef void _fatal(self, object exc) noexcept
