# Declarations of the limits: token buckets, the LimitStore interface, and its
# first implementation, LimitZone (a keyed bucket table and a connection-count
# table). Included by _core.pxd; defined in limits.pxi.
#
# LimitStore is the seam between a limit and where its state lives: the
# message policies (scope client / api) and admission (policies.py) reach
# shared limits only through it, with the time passed in, never through a
# concrete table. A worker-shared atomic store and a Redis-leased one are to
# be further implementations of the same interface.
#
# A LimitZone is ONE contiguous memory region (anonymous shared mmap, so a
# fork already shares it) holding only plain data, with offsets and no
# pointers, so that a later change can map it into several worker processes:
#
#   offset 0                ZoneHeader (128 bytes: 64 of layout, 64 of counters)
#   bucket_off (= 128)      BucketSlot[bucket_cap]   (32 bytes each)
#   count_off               CountSlot[count_cap]     (16 bytes each)
#   region_size             = count_off + count_cap * 16
#
# Both tables use open addressing with linear probing from the slot
# mix64(key) & (cap - 1), at most probe_limit slots (min(32, cap)): a key's
# window. Key 0 marks a slot never used; a used slot never becomes empty
# again, so probe chains stay intact. An idle bucket slot (full_at <= now)
# or a count slot whose count is 0 is equivalent to an absent key and may be
# taken over in place by another key (eviction loses nothing):
#
#   - a new bucket key takes the never-used slot that ends its chain; when
#     its window has none, the idle slot of the window that has been full
#     the longest (the least recently used: smallest full_at, the first in
#     probe order on a tie); when the window holds only other keys' active
#     buckets, there is no slot: take() returns ZONE_NO_SLOT (-1.0);
#   - a new count key takes the first slot of its window that is never used
#     or at count 0 (all such slots are alike); when there is none,
#     acquire() returns -1.
#
# A caller never admits without a slot: the gateway answers 503 to an upgrade
# (rate-limit, count-limit, max-connections), and a message rule treats the
# message as over its limit (its action applies). Key 0 given by a caller is
# stored as 2**64 - 1 (the two are one key); key_hash() never returns either.

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef struct BucketState:
    double tokens           # may be negative: debt left by a cost above the burst
    double stamp            # time of the last refill, seconds (monotonic, passed in)


cdef struct BucketSlot:     # 32 bytes: two per cache line
    uint64_t key            # 0: never used
    double full_at          # when the bucket is full again: stamp + (burst - tokens) / rate
    BucketState state


cdef struct CountSlot:      # 16 bytes
    uint64_t key            # 0: never used
    uint32_t count          # live connections of the key; 0: the slot may be reused
    uint32_t reserved


cdef struct ZoneHeader:     # 128 bytes at offset 0 of the region
    # Written once, when the region is created.
    uint64_t magic              # ZONE_MAGIC
    uint32_t version            # ZONE_VERSION
    uint32_t header_size        # bytes before the first table (multiple of 64)
    uint64_t region_size        # bytes of the whole region
    uint64_t bucket_off         # byte offset of BucketSlot[bucket_cap]
    uint64_t count_off          # byte offset of CountSlot[count_cap]
    uint32_t bucket_cap         # slots, a power of two
    uint32_t count_cap          # slots, a power of two
    uint32_t probe_limit        # slots looked at from a key's home slot
    uint32_t bucket_slot_size   # sizeof(BucketSlot), to check the layout
    uint32_t count_slot_size    # sizeof(CountSlot)
    uint32_t reserved0
    # Counters (their own cache line).
    uint64_t bucket_overflows   # take() found no slot: ZONE_NO_SLOT (every caller, every call)
    uint64_t count_overflows    # acquire() found no slot: -1
    uint64_t bucket_reuses      # idle bucket slots taken over by another key
    uint64_t count_reuses       # zero-count slots taken over by another key
    uint64_t lease_leaks        # leases released by their deallocation, not by release()
    uint64_t message_overflows  # messages a message-rate-limit limited (reject, delay, drop)
                                # because take() found no slot for its key (the core's Leg;
                                # counted once per limited message, as MsgRule.limited)
    uint64_t reserved2
    uint64_t reserved3


cdef class LimitStore:
    # The interface (C calls, on the frame path for message policies): no
    # Python objects, no allocation, no exceptions.
    #
    # take: from key's bucket (rate per second, burst), at `now` (monotonic
    # seconds), `cost` tokens. 0.0: admitted; > 0: seconds until `cost` (at
    # most `burst`) would be available, nothing taken; ZONE_NO_SLOT (-1.0):
    # the store has no room for the key, nothing admitted (the caller must
    # refuse, or treat the message as over its limit).
    cdef double take(self, uint64_t key, double rate, double burst, double now, double cost) noexcept
    # acquire: count one more of key. 1: counted; 0: key at `limit`; -1: no
    # room for the key.
    cdef int acquire(self, uint64_t key, uint32_t limit) noexcept
    # release: count -= 1 if > 0; an unknown key is ignored.
    cdef void release(self, uint64_t key) noexcept
    # A message a message policy limited because take() found no room
    # (message_overflows), and a Lease released by its deallocation (lease_leaks).
    cdef void note_message_overflow(self) noexcept
    cdef void note_lease_leak(self) noexcept


@cython.final                   # C calls to take/acquire/release skip the vtable
cdef class LimitZone(LimitStore):
    cdef:
        char* region                # the one block (mmap), header at offset 0
        size_t region_size
        ZoneHeader* header          # == <ZoneHeader*>region
        BucketSlot* buckets         # == region + header.bucket_off (cached)
        CountSlot* counts           # == region + header.count_off (cached)
        uint32_t bucket_mask        # bucket_cap - 1
        uint32_t count_mask         # count_cap - 1
        uint32_t probe              # header.probe_limit (cached)
    # Its take() finds or inserts key's bucket, then bucket_take(); no slot
    # within the probe bound counts an overflow (bucket_overflows) and returns
    # ZONE_NO_SLOT. acquire() without a slot counts count_overflows.


@cython.final
cdef class Lease:
    # Up to 4 keys acquired together (LimitStore.try_acquire); release() gives
    # each back once, however often it is called.
    cdef:
        LimitStore store
        uint64_t keys[4]
        int n
        readonly bint released
    cpdef release(self)


cdef class TokenBucket:
    # A lone BucketState with its parameters, for Python (tests, tools).
    cdef:
        BucketState state
        readonly double rate
        readonly double burst


cdef double bucket_take(BucketState* b, double rate, double burst, double now, double cost) noexcept nogil
cdef void bucket_init(BucketState* b, double burst, double now) noexcept nogil
cpdef uint64_t key_hash(object key) except 0
