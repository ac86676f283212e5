# Declarations of ClusterStore: the LimitStore of a gateway whose limits are shared between
# nodes through leased shares (fastgw.cluster). Included by _core.pxd (after limits_decl.pxi);
# defined in cluster.pxi.
#
# A ClusterStore is one process's: every worker process is a member of the cluster on its own
# (fastgw.cluster.node), so nothing here is shared between processes. It holds a table of the
# cluster-wide keys the process spends from (registered from Python at admission, never on the
# frame path), each with this process's share: slots for a count, a rate and a burst for a
# bucket. A key not in the table is not cluster-wide (a `cluster: false` policy, a
# connection-scoped one): it goes to `local`, the zone, as without a cluster.
#
# The table is open addressing with linear probing over a power-of-two array (key 0: empty),
# grown (rehashed) from Python only, at most half full; removal is backward-shift deletion, so
# no tombstones. Every operation here runs on the process's event loop thread: no atomics.

cpdef enum ShareMode:
    SHARE_LEASED = 0        # spend the leased share (counts: slots; buckets: rate and burst)
    SHARE_LOCAL = 1         # on-unreachable open: the whole configured limit, on this node alone
    SHARE_CLOSED = 2        # on-unreachable closed: nothing is admitted

cdef enum:
    SHARE_WANTS = 1
    SHARE_ACTIVE = 2

cpdef enum ShareKind:
    SHARE_COUNT = 1
    SHARE_BUCKET = 2


cdef struct Share:
    uint64_t key            # 0: empty
    uint8_t kind            # ShareKind
    uint8_t mode            # ShareMode in force while valid
    uint8_t expired_mode    # the mode once valid_until has passed (buckets, judged in take)
    uint8_t flags           # SHARE_WANTS: refused for the share since due(); SHARE_ACTIVE:
                            # taken from since due() (buckets)
    uint32_t slots          # counts: this process's share
    uint32_t used           # counts: connections held here
    uint32_t refused        # counts: acquisitions refused for the share since the last report
    double rate             # buckets: the share, per second (0: nothing to spend yet)
    double burst
    double valid_until      # monotonic seconds (the relay's clock)
    BucketState bucket      # buckets: this process's tokens
    double taken            # buckets: cost admitted since the last report
    double wanted           # buckets: cost refused for the share since the last report
    double first            # buckets: the time of the first take since the last report (0: none)
    double last             # buckets: the time of the latest take
    double gap              # buckets: the mean time between takes (moving average)
    uint32_t takes          # buckets: takes since the last report


@cython.final
cdef class ClusterStore(LimitStore):
    cdef:
        readonly LimitStore local   # keys that are not cluster-wide (the zone)
        Share* table
        uint32_t cap                # slots, a power of two
        uint32_t n                  # keys held
        readonly double idle_wait   # the wait a bucket with no share answers (s, > 0)
    cdef Share* _find(self, uint64_t key) noexcept
    cdef Share* _slot(self, uint64_t key) except NULL
