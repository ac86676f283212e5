# Statistics of the frame path: FlowStats (an API's flow, shared by its
# connections). Included by _core.pyx; declared in stats_decl.pxi. The legs
# update the counters in place (a few instructions per message); metrics.py
# reads them per scrape.

cimport cython


@cython.final
cdef class FlowStats:
    """Counters of one flow of one API (see stats_decl.pxi)."""

    def __init__(self, bint histograms=True, bint intervals=False):
        if histograms:
            self.held = HdrArray(1, 3_600_000_000, 3)
            if intervals:
                self.held_interval = HdrArray(1, 3_600_000_000, 3)

    cdef void record_held(self, double seconds) noexcept:
        """A delayed message let through after `seconds` held."""
        cdef int64_t us = <int64_t>(seconds * 1e6) + 1
        if self.held is not None:
            self.held.record(us)
            if self.held_interval is not None:
                self.held_interval.record(us)

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
