# Declarations of the statistics the frame path keeps: a leg's own counters
# (FlowCounters, one connection's flow) and an API's (FlowStats, shared by all
# of its connections). Included by _core.pxd (after hdr_decl.pxi); defined in
# stats.pxi.

from libc.stdint cimport uint64_t


cdef struct FlowCounters:
    # What one leg received (one flow of one connection).
    uint64_t reads              # socket reads that brought bytes (liveness: connection.py)
    uint64_t messages           # whole data messages
    uint64_t frames             # data frames
    uint64_t bytes              # payload bytes
    uint64_t rejected           # messages refused by a policy (action reject)
    uint64_t delayed            # messages held by an action delay
    uint64_t dropped            # messages discarded by an action drop


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

    cdef void record_held(self, double seconds) noexcept
