# Declarations of the limits: token buckets, the LimitStore interface, and its
# first implementation, LimitZone (a keyed bucket table and a connection-count
# table). Included by _core.pxd; defined in limits.pxi.
#
# LimitStore is the seam between a limit and where its state lives: the
# message policies (scope client / api) and admission (policies.py) reach
# shared limits only through it, with the time passed in, never through a
# concrete table. A Redis-leased store is to be a further implementation of
# the same interface.
#
# A LimitZone is ONE contiguous memory region (anonymous MAP_SHARED mmap,
# created before fork, so every worker process shares it) holding only plain
# data, with offsets and no pointers. Every word more than one process writes
# is 8-byte aligned (the shares: 4-byte) and changed only with GCC/Clang
# __atomic builtins (lock-free, hence address-free: they work across
# processes), so take/acquire/release are exact across processes.
# Layout (ZONE_VERSION 3):
#
#   offset 0                ZoneHeader (192 bytes: layout, counters, insert lock)
#   worker_off (= 192)      WorkerSlot[workers]      (64 bytes each)
#   bucket_off              BucketSlot[bucket_cap]   (16 bytes each)
#   count_off               count slots[count_cap]   (count_slot_size bytes each:
#                           CountSlot, then uint32 own[workers], padded to 8)
#   region_size             = count_off + count_cap * count_slot_size
#
# Process slots: `workers` of them (the supervisor makes 2 * N: a rolling
# restart's new process needs one while the old one still holds its own). A
# process says which one is its own with set_worker(slot) after fork
# (default: slot 0, so single-process use is unchanged; processes that share
# a slot share its shares and journal, and reconcile() of that slot is then
# not exact). Its WorkerSlot holds its pid, its heartbeat (beat(now)), the
# journal of its count operation in progress and the journal of its bucket
# re-key in progress. reconcile(slot), called by the supervisor once the
# process of the slot is dead and reaped, gives back exactly what it held.
#
# Both tables use open addressing with linear probing from the slot
# mix64(key) & (cap - 1), at most probe_limit slots (min(32, cap)): a key's
# window. Key 0 marks a slot never used; a used slot never becomes empty
# again, so probe chains stay intact (a lookup stops at key 0). An idle
# bucket (full again: tat <= now) or a count slot at 0 is equivalent to an
# absent key and may be taken over in place by another key (re-keying; the
# eviction loses nothing):
#
#   - a new bucket key takes the never-used slot that ends its chain; when
#     its window has none, the idle slot of the window that has been full
#     the longest (smallest tat, the first in probe order on a tie); when the
#     window holds only other keys' active buckets, there is no slot: take()
#     returns ZONE_NO_SLOT (-1.0);
#   - a new count key takes the first slot of its window that is never used
#     or at count 0 (and whose tag is not the new key's, see below); when
#     there is none, acquire() returns -1.
#
# A caller never admits without a slot: the gateway answers 503 to an upgrade
# (rate-limit, count-limit, max-connections), and a message rule treats the
# message as over its limit (its action applies). Key 0 given by a caller is
# stored as 2**64 - 1 (the two are one key); key_hash() never returns either.
#
# ---- The concurrency protocol (this comment is the spec)
#
# Lookups of existing keys are lock-free. Changing which key a slot belongs
# to (claiming a never-used slot, re-keying an idle or zero slot) happens only
# under the zone's insert lock (ZoneHeader.insert_lock), and an inserter looks
# for its key again under the lock before it claims a slot: one key never has
# two slots.
#
# Insert lock: a word, 0 when free, else (pid << 32) | (process slot + 1) of
# its owner (slot + 1 = 0xFFFFFFFF: reconcile()), taken by CAS 0 -> owner and
# held for a few dozen instructions. A waiter spins (cpu pause, then
# sched_yield), and from ~100 us on checks kill(owner pid, 0) between naps of
# 20 us (an owner preempted while holding it needs the CPU, not a spinning
# waiter): an owner that no longer exists loses the lock to the first waiter
# that CASes that same word to its own (lock_steals); the thief first repairs
# the dead owner's bucket re-key (below). A waiter gives up when one owner
# kept the lock for ~50 ms (lock_timeouts): take() returns ZONE_NO_SLOT,
# acquire() -1 (the caller refuses; nothing was counted). reconcile(slot) frees a lock its dead process
# held. So a dead process holds the lock no longer than until its first
# waiter's check, or its reconcile() (an unreaped zombie still answers
# kill(pid, 0)).
#
# Buckets: GCRA. A bucket is one 8-byte word, tat (a double, the "theoretical
# arrival time": when the bucket is full again). A take of `cost` at `now`
# (CLOCK_MONOTONIC seconds, clock.now(): the same clock in every process)
# with (rate, burst) is a CAS loop on that word:
#     base = max(tat, now); slack = (burst - min(cost, burst)) / rate
#     admitted iff base - now <= slack, and then tat' = base + cost / rate;
#     else nothing is written and the wait is (base - now) - slack (>= 1e-9)
# With constant parameters and time not going backwards these are the token
# bucket's answers (bucket_take, with tokens = burst - (tat - now) * rate: a
# cost above the burst passes once full and leaves a debt). Two differences:
# a take with a `now` older than the newest one is judged at its own `now`
# (stricter by the skew; the token bucket judged it at its newest stamp), and
# a burst changed by a reload applies to an active bucket at once (tokens =
# new burst - deficit; the token bucket kept its tokens, clamped to the burst).
#   A taker loads tat (acquire), then the slot's key, and uses the slot only
# if tat is not ZONE_RESERVED and the key is its own; its CAS expects that
# tat. Re-keying an idle bucket (under the insert lock): write the journal
# (slot, old tat, new key) into the process's WorkerSlot; CAS tat old ->
# RESERVED; store the new key; store (release) tat = the new key's first take
# from a full bucket, now + cost / rate (>= old tat, as the old tat <= now);
# clear the journal. A slot's tat therefore never decreases, across re-keys
# too (a take never lowers it), and it increases at every re-key whose first
# take costs anything or comes after the old tat: then the CAS of a taker of
# the old key that read the key before the re-key fails (it expects a tat <=
# the old one; the slot holds RESERVED or a value above it), so no taker of
# the old key charges the new key's bucket. (Restoring the old idle value, as
# first sketched, would let exactly that stale CAS succeed on the new key's
# bucket.) The one residue: a first take of cost 0 at now == the old tat
# leaves the slot at the old tat's value, and a taker of the old key stalled
# between its loads and its CAS across that whole re-key would charge its
# take to the new key's bucket, once. Forcing the value up by one ulp instead
# would make the new key's bucket differ from a fresh one (a take of cost >=
# burst at that `now` refused): exactness for every caller was preferred to
# closing that interleaving. No take of the old key is lost: it lands before
# the CAS to RESERVED (which then fails, and the re-keyer looks again), or it
# fails, looks again and finds the key absent (a full bucket: it was idle). Takers that see RESERVED skip
# the slot; a key being inserted there is then not found, and its taker waits
# on the insert lock and looks again. A re-keyer killed at RESERVED is
# repaired by the thief of its lock or by reconcile(): key = the journal's
# new key, tat = nextafter(old tat) (idle; the dead re-keyer admitted
# nothing). Buckets have no per-process shares: what a dead process took
# stays taken, as it should.
#
# Counts: a slot's word is (tag << 32) | count, tag = the high 32 bits of
# mix64(key), never 0 (a never-used slot's word is 0). acquire and release are
# CAS loops on the word expecting the key's tag (a slot whose tag is not the
# key's is not the key's any more, or not yet: look again). Claiming a slot
# for a key (under the insert lock): CAS the word (any other tag, count 0) ->
# (tag, 0), then store the key. A slot whose tag already is the new key's is
# never claimed for it (but when it never had a key), so the CAS of a stale
# acquirer of the old key always fails (and a slot that comes back to a key
# is that key's again). A claimer killed between the two steps leaves a slot
# at count 0 that no lookup matches: harmless, the next claimer may take it
# (a never-used one, whose key is still 0, ends the chain: its own key claims
# it again).
#   Shares: each count slot holds uint32 own[workers]; own[w] is changed only
# by the process of slot w (atomic add) and by reconcile(w). Invariant, at
# any moment when no process is inside an operation on the slot:
#     count == sum(own[w] for every w)                                   (I)
# Journal: WorkerSlot.journal = (seq << 32) | (op << 30) | slot index, seq
# odd while the process is inside an operation. acquire: store the journal
# (seq odd, op 1, index); CAS count -> count + 1 (ACQ_REL: whoever sees the
# new count sees the odd journal); own[w] += 1 (release); store the journal
# (seq + 1, even; release). release: only if own[w] > 0 (a process never
# gives back what it does not hold; an unknown key is ignored); the same with
# op 2, count - 1, own[w] -= 1. A refused acquire writes no count and no share.
#   reconcile(w) of a dead process:
# (1) If its journal is odd, its operation on slot i may have landed in the
# count without its share (killed between the CAS and own[w]). Take a quiet
# snapshot of slot i: read every other slot's journal, then count(i) and
# every own[.](i), then every journal again. It is quiet when no live
# process's journal changed and none is odd on i. Proof that a quiet snapshot
# is a consistent one: a live process changes its journal at the start and
# at the end of every operation, its CAS is ordered after its odd journal
# (release) and its share after its CAS (release); so a snapshot whose count
# or share read saw any part of a live operation on i sees, in its second
# journal read (ordered after by acquire), an odd journal on i or a journal
# different from its first read; and a live process whose journal is the
# same even value (or odd on another slot) in both reads touched neither
# count(i) nor own(i) in between. Retried with sched_yield, bounded at 1 s
# (then the last snapshot is used and `unquiet` counted). In a quiet
# snapshot, by (I), d = count - sum(own) is what the pending operations of
# dead processes landed without their shares: if d has the sign of w's op,
# w's landed (own[w] += op), else it did not. With several dead processes
# pending on one slot this may credit w with another's landing; each later
# reconcile then sees d reduced by exactly what was credited, so the total
# given back over all of them is exact. Clear the journal (seq even).
# (2) For every count slot: CAS count -= own[w], then own[w] = 0; the sum is
# reconcile's result. (3) A lock it holds: take it over, repair its bucket
# re-key, free it. (4) pid = 0, beat = 0. Idempotent: a second call finds an
# even journal, no shares and no lock.

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef struct BucketState:     # the lone token bucket (TokenBucket, bucket_take)
    double tokens           # may be negative: debt left by a cost above the burst
    double stamp            # time of the last refill, seconds (monotonic, passed in)


cdef struct BucketSlot:     # 16 bytes: four per cache line
    uint64_t key            # 0: never used
    uint64_t tat            # the bits of a double: when the bucket is full again
                            # (GCRA); ZONE_RESERVED while being re-keyed


cdef struct CountSlot:      # 16 bytes, then uint32_t own[workers] (count_slot_size)
    uint64_t key            # 0: never used
    uint64_t word           # (tag << 32) | count; count 0: the slot may be reused


cdef struct WorkerSlot:     # 64 bytes: one cache line per process slot
    uint64_t pid            # the process of the slot (set_worker); 0: none
    uint64_t beat           # the bits of a double: its last heartbeat (monotonic s)
    uint64_t journal        # (seq << 32) | (op << 30) | count slot index; seq odd: in an op
    uint64_t ins_slot       # bucket re-key in progress: bucket index + 1; 0: none
    uint64_t ins_old        # its tat before RESERVED
    uint64_t ins_key        # the key it is being given
    uint64_t reserved[2]


cdef struct ZoneHeader:     # 192 bytes at offset 0 of the region
    # Written once, when the region is created.
    uint64_t magic              # ZONE_MAGIC
    uint32_t version            # ZONE_VERSION
    uint32_t header_size        # bytes before the first table (multiple of 64)
    uint64_t region_size        # bytes of the whole region
    uint64_t worker_off         # byte offset of WorkerSlot[workers]
    uint64_t bucket_off         # byte offset of BucketSlot[bucket_cap]
    uint64_t count_off          # byte offset of the count slots
    uint32_t bucket_cap         # slots, a power of two
    uint32_t count_cap          # slots, a power of two
    uint32_t probe_limit        # slots looked at from a key's home slot
    uint32_t workers            # process slots
    uint32_t bucket_slot_size   # sizeof(BucketSlot), to check the layout
    uint32_t count_slot_size    # sizeof(CountSlot) + 4 * workers, rounded up to 8
    uint32_t worker_slot_size   # sizeof(WorkerSlot)
    uint32_t reserved0
    # Counters (atomic adds, from every process).
    uint64_t bucket_overflows   # take() found no slot: ZONE_NO_SLOT (every caller, every call)
    uint64_t count_overflows    # acquire() found no slot: -1
    uint64_t bucket_reuses      # idle bucket slots taken over by another key
    uint64_t count_reuses       # zero-count slots taken over by another key
    uint64_t lease_leaks        # leases released by their deallocation, not by release()
    uint64_t message_overflows  # messages a message-rate-limit limited (reject, delay, drop)
                                # because take() found no slot for its key (the core's Leg;
                                # counted once per limited message, as MsgRule.limited)
    # The insert lock (its own cache line) and its counters.
    uint64_t insert_lock        # 0: free; else (pid << 32) | (process slot + 1)
    uint64_t lock_steals        # locks taken over from a dead owner
    uint64_t lock_timeouts      # waits given up (~50 ms): nothing inserted, the caller refuses
    uint64_t unquiet            # reconcile() calls that found no quiet snapshot in 1 s
    uint64_t pending_ops        # reconcile() calls whose process was killed inside an op
    uint64_t reserved1[3]


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
    # release: count -= 1 if this process holds one of key's count; an
    # unknown key is ignored.
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
        WorkerSlot* wslots          # == region + header.worker_off (cached)
        BucketSlot* buckets         # == region + header.bucket_off (cached)
        char* counts                # == region + header.count_off (cached)
        size_t count_size           # header.count_slot_size (cached)
        uint32_t bucket_mask        # bucket_cap - 1
        uint32_t count_mask         # count_cap - 1
        uint32_t probe              # header.probe_limit (cached)
        uint32_t nworkers           # header.workers (cached)
        uint32_t wslot              # this process's slot (set_worker; default 0)
    # Its take() finds key's bucket (lock-free) or inserts it (under the
    # insert lock), then runs the GCRA CAS loop; no slot within the probe
    # bound counts an overflow (bucket_overflows) and returns ZONE_NO_SLOT.
    # acquire() without a slot counts count_overflows.
    cdef bint _lock(self) noexcept nogil
    cdef void _unlock(self) noexcept nogil
    cdef void _repair(self, uint32_t w) noexcept nogil
    cdef double _take_insert(self, uint64_t key, double rate, double burst, double now,
                             double cost) noexcept nogil
    cdef int _count_insert(self, uint64_t key, uint32_t tag, uint32_t limit) noexcept nogil
    cdef uint32_t _slot(self, Py_ssize_t slot) except? 0xFFFFFFFF
    cdef CountSlot* _count_find(self, uint64_t key, uint32_t tag, uint32_t* index) noexcept nogil
    cdef object _quiet_delta(self, uint32_t index, uint32_t dead)


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
