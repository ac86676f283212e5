# The limits: token buckets, the LimitStore interface (with its Python
# wrappers), and LimitZone, its implementation as a keyed bucket table and a
# connection-count table, flat C tables in one shared memory region, changed
# with atomic operations so that forked worker processes share them exactly.
# Included by _core.pyx; the layout, the contract and the concurrency
# protocol are in limits_decl.pxi.
#
# take/acquire/release/bucket_take run on the frame path or per connection:
# C only, no Python objects, no allocation, no exceptions.

import os as _os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport errno, ESRCH
from libc.math cimport nextafter, INFINITY
from libc.stdlib cimport malloc, free
from posix.mman cimport (
    mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_ANONYMOUS, MAP_FAILED,
)
from libc.signal cimport SIGKILL
from posix.signal cimport kill
from posix.time cimport clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC
from posix.unistd cimport getpid


# The atomics: GCC/Clang builtins (zig cc is Clang), on 8-byte-aligned words of
# the shared region (the shares: 4-byte). Lock-free, so address-free: they work
# between processes mapping the same pages.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <sched.h>
    _Static_assert(__atomic_always_lock_free(8, 0), "fastgw: 8-byte atomics must be lock-free");
    static inline uint64_t fgw_ld(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint64_t fgw_ld_acq(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fgw_st(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void fgw_st_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int fgw_cas(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void fgw_inc(uint64_t *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    static inline uint32_t fgw_ld32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fgw_add32(uint32_t *p, uint32_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }
    static inline void fgw_st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void fgw_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint64_t fgw_bits(double d) { uint64_t u; memcpy(&u, &d, sizeof u); return u; }
    static inline double fgw_double(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }
    static inline void fgw_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    uint64_t fgw_ld(uint64_t* p) nogil
    uint64_t fgw_ld_acq(uint64_t* p) nogil
    void fgw_st(uint64_t* p, uint64_t v) nogil
    void fgw_st_rel(uint64_t* p, uint64_t v) nogil
    bint fgw_cas(uint64_t* p, uint64_t expected, uint64_t desired) nogil
    void fgw_inc(uint64_t* p) nogil
    uint32_t fgw_ld32(uint32_t* p) nogil
    void fgw_add32(uint32_t* p, uint32_t v) nogil
    void fgw_st32(uint32_t* p, uint32_t v) nogil
    void fgw_fence() nogil
    uint64_t fgw_bits(double d) nogil
    double fgw_double(uint64_t u) nogil
    void fgw_pause() nogil
    int sched_yield() nogil
    const int SIGSTOP


cdef enum:
    ZONE_VERSION = 3              # 3: atomics, process slots and shares, GCRA buckets
                                  # (2: take() returns ZONE_NO_SLOT; message_overflows)
    ZONE_PROBE_MAX = 32           # slots looked at from a key's home slot
    ZONE_MIN_KEYS = 16
    ZONE_MAX_KEYS = 1 << 30
    ZONE_MAX_WORKERS = 4096       # process slots
    ZONE_OP_ACQUIRE = 1           # journal ops
    ZONE_OP_RELEASE = 2
    LEASE_MAX_KEYS = 4

# b"FGWLIMIT" read as a little-endian uint64.
cdef uint64_t ZONE_MAGIC = 0x54494D494C574746ULL
# Where a caller's key 0 is stored: 0 marks a slot never used.
cdef uint64_t ZONE_KEY_ZERO = 0xFFFFFFFFFFFFFFFFULL
# What take() returns when the bucket table has no slot for the key.
cdef double ZONE_NO_SLOT = -1.0
# A bucket's tat while it is being re-keyed: a NaN that arithmetic never makes.
cdef uint64_t ZONE_RESERVED = 0x7FF4F6A7E5E55E7DULL
# The journal's slot index (its low 30 bits).
cdef uint64_t ZONE_INDEX_MASK = 0x3FFFFFFFULL
# The insert lock's owner slot field when reconcile() holds it.
cdef uint64_t ZONE_LOCK_RECONCILE = 0xFFFFFFFFULL
# Lock waits: check the owner from this on, give up after that (seconds).
cdef double ZONE_LOCK_CHECK = 100e-6
cdef double ZONE_LOCK_GIVE_UP = 50e-3
# reconcile(): how long it looks for a quiet snapshot of a slot (seconds).
cdef double ZONE_QUIET_BOUND = 1.0


# Tests only (_zone_crash_at): the process SIGKILLs itself at this step of its
# next operation, to prove the recovery of each step with a real death (or,
# at step + CRASH_STOP, SIGSTOPs itself once: a live process stalled there).
cdef enum:
    CRASH_STOP = 10
    CRASH_NONE = 0
    CRASH_BEFORE_CAS = 1            # count op: journal odd, count unchanged
    CRASH_AFTER_CAS = 2             # count op: count changed, share not yet
    CRASH_AFTER_SHARE = 3           # count op: share changed, journal still odd
    CRASH_LOCKED = 4                # holding the insert lock
    CRASH_RESERVED = 5              # bucket re-key: tat RESERVED
    CRASH_CLAIMED = 6               # count slot claimed (tag set), key not stored

cdef int _crash_at = CRASH_NONE


def _zone_crash_at(int step):
    """Tests only: SIGKILL this process at `step` of its next zone operation."""
    global _crash_at
    _crash_at = step


cdef inline void _crash(int step) noexcept nogil:
    global _crash_at
    if _crash_at == step:
        kill(getpid(), SIGKILL)
    elif _crash_at == step + CRASH_STOP:
        _crash_at = CRASH_NONE
        kill(getpid(), SIGSTOP)


cdef inline double _mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

# ---------------------------------------------------------------- buckets

cdef void bucket_init(BucketState* b, double burst, double now) noexcept nogil:
    b.tokens = burst
    b.stamp = now


cdef double bucket_take(BucketState* b, double rate, double burst, double now,
                        double cost) noexcept nogil:
    cdef double t
    cdef double needed
    cdef double wait
    if now > b.stamp:               # time going backwards refills nothing
        t = b.tokens + (now - b.stamp) * rate
        b.tokens = t if t < burst else burst
        b.stamp = now
    elif b.tokens > burst:          # the burst was lowered since the last take
        b.tokens = burst
    # A cost above the burst passes once the bucket is full, leaving a debt.
    needed = cost if cost < burst else burst
    if b.tokens >= needed:
        b.tokens -= cost
        return 0.0
    wait = (needed - b.tokens) / rate
    return wait if wait > 0.0 else 1e-9


# ---------------------------------------------------------------- hashing

cdef inline uint64_t _mix64(uint64_t k) noexcept nogil:
    # The 64-bit finalizer of MurmurHash3: every input bit reaches every output bit.
    k ^= k >> 33
    k *= 0xFF51AFD7ED558CCDULL
    k ^= k >> 33
    k *= 0xC4CEB9FE1A85EC53ULL
    k ^= k >> 33
    return k


cdef inline uint64_t _zone_key(uint64_t key) noexcept nogil:
    return key if key != 0 else ZONE_KEY_ZERO


cdef inline uint64_t _hash_bytes(const char* data, Py_ssize_t size) noexcept nogil:
    # FNV-1a 64 over the bytes, then _mix64; never 0 nor 2**64 - 1.
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(size):
        h ^= <uint8_t>data[i]
        h *= 0x00000100000001B3ULL
    h = _mix64(h)
    if h == 0 or h == ZONE_KEY_ZERO:
        h = 0x9E3779B97F4A7C15ULL
    return h


cpdef uint64_t key_hash(object key) except 0:
    """Stable 64-bit hash of a str (its UTF-8 bytes) or bytes key: the same
    in every process and run (FNV-1a 64, then the MurmurHash3 finalizer).
    Never 0 nor 2**64 - 1."""
    cdef const char* data
    cdef Py_ssize_t size
    if isinstance(key, str):
        data = PyUnicode_AsUTF8AndSize(key, &size)
    elif isinstance(key, bytes):
        data = PyBytes_AS_STRING(key)
        size = PyBytes_GET_SIZE(key)
    else:
        raise TypeError(f"key_hash() takes str or bytes, not {type(key).__name__}")
    return _hash_bytes(data, size)


# ---------------------------------------------------------------- table helpers

cdef inline uint32_t _count_tag(uint64_t key) noexcept nogil:
    # The high 32 bits of mix64(key) (the home slot uses the low ones), never 0.
    cdef uint32_t tag = <uint32_t>(_mix64(key) >> 32)
    return tag if tag != 0 else 1


cdef inline CountSlot* _count_at(char* counts, size_t size, uint32_t i) noexcept nogil:
    return <CountSlot*>(counts + <size_t>i * size)


cdef inline uint32_t* _own(CountSlot* s) noexcept nogil:
    # The shares of the processes, after the slot's two words.
    return <uint32_t*>(<char*>s + sizeof(CountSlot))


cdef inline bint _gcra(BucketSlot* s, uint64_t key, double rate, double burst, double now,
                       double cost, double* wait) noexcept nogil:
    # One take from the bucket of slot s, if s is key's (see limits_decl.pxi):
    # True with *wait (0.0: admitted); False if the slot is not key's (any
    # more, or not yet: being re-keyed).
    cdef uint64_t v
    cdef double tat
    cdef double base
    cdef double w
    cdef double needed = cost if cost < burst else burst
    cdef double slack = (burst - needed) / rate
    while True:
        v = fgw_ld_acq(&s.tat)
        if v == ZONE_RESERVED or fgw_ld(&s.key) != key:
            return False
        tat = fgw_double(v)
        base = tat if tat > now else now
        if base - now > slack:
            w = (base - now) - slack
            wait[0] = w if w > 0.0 else 1e-9
            return True
        if fgw_cas(&s.tat, v, fgw_bits(base + cost / rate)):
            wait[0] = 0.0
            return True


cdef inline int _count_acquire(WorkerSlot* ws, CountSlot* s, uint32_t* own, uint32_t index,
                               uint32_t tag, uint32_t limit) noexcept nogil:
    # count + 1 on slot s if its tag is tag and its count below limit, with
    # this process's share and journal: 1 counted, 0 at the limit, -2 the slot
    # is not the key's (any more).
    cdef uint64_t w
    cdef uint64_t seq = ((fgw_ld(&ws.journal) >> 32) + 1) | 1     # odd: in an op
    cdef bint started = False
    cdef int r
    while True:
        w = fgw_ld_acq(&s.word)
        if <uint32_t>(w >> 32) != tag:
            r = -2
            break
        if <uint32_t>w >= limit:
            r = 0
            break
        if not started:
            fgw_st(&ws.journal, (seq << 32) | (<uint64_t>ZONE_OP_ACQUIRE << 30) | index)
            started = True
            _crash(CRASH_BEFORE_CAS)
        if fgw_cas(&s.word, w, w + 1):      # ACQ_REL: after the odd journal
            _crash(CRASH_AFTER_CAS)
            fgw_add32(own, 1)               # release: after the count
            _crash(CRASH_AFTER_SHARE)
            r = 1
            break
    if started:
        fgw_st_rel(&ws.journal, (seq + 1) << 32)
    return r


cdef inline void _count_release(WorkerSlot* ws, CountSlot* s, uint32_t* own, uint32_t index,
                                uint32_t tag) noexcept nogil:
    # count - 1 on slot s, if this process holds a share of it.
    cdef uint64_t w
    cdef uint64_t seq
    if fgw_ld32(own) == 0:
        return
    seq = ((fgw_ld(&ws.journal) >> 32) + 1) | 1
    fgw_st(&ws.journal, (seq << 32) | (<uint64_t>ZONE_OP_RELEASE << 30) | index)
    _crash(CRASH_BEFORE_CAS)
    while True:
        w = fgw_ld_acq(&s.word)
        if <uint32_t>(w >> 32) != tag or <uint32_t>w == 0:
            break                           # not with a share held (I): never
        if fgw_cas(&s.word, w, w - 1):
            _crash(CRASH_AFTER_CAS)
            fgw_add32(own, 0xFFFFFFFFU)     # - 1
            _crash(CRASH_AFTER_SHARE)
            break
    fgw_st_rel(&ws.journal, (seq + 1) << 32)


def _process_gone(pid):
    """True if no process `pid` runs any more (absent, or a zombie)."""
    if pid <= 0:
        return True
    try:
        _os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


# ---------------------------------------------------------------- the interface

cdef class LimitStore:
    """Where limits keep their state: token buckets and connection counts by
    key, with the time passed in (see limits_decl.pxi). This base stores
    nothing: every take() and acquire() finds no room."""

    # -- the C interface (overridden by each store)

    cdef double take(self, uint64_t key, double rate, double burst, double now,
                     double cost) noexcept:
        return ZONE_NO_SLOT

    cdef int acquire(self, uint64_t key, uint32_t limit) noexcept:
        return -1

    cdef void release(self, uint64_t key) noexcept:
        pass

    cdef void note_message_overflow(self) noexcept:
        pass

    cdef void note_lease_leak(self) noexcept:
        pass

    # -- Python (admission, tests)

    def take_py(self, uint64_t key, double rate, double burst, double now, double cost=1.0):
        """take() from Python: 0.0 if admitted, > 0 the seconds to wait, -1.0 if
        the store has no room for the key (nothing admitted: refuse)."""
        if not (rate > 0.0) or not (burst >= 1.0) or not (cost >= 0.0):
            raise ValueError("need rate > 0, burst >= 1, cost >= 0")
        return self.take(key, rate, burst, now, cost)

    def acquire_py(self, uint64_t key, uint32_t limit):
        """acquire() from Python: 1 counted, 0 at the limit, -1 no room."""
        return self.acquire(key, limit)

    def release_py(self, uint64_t key):
        self.release(key)

    def try_acquire(self, list keys):
        """Acquire up to 4 (key, limit) pairs, all or nothing, in order.

        Returns a Lease; or, having released what it took, the index of the
        first key at its limit, or -1 if the store had no room for a key."""
        cdef uint64_t ks[LEASE_MAX_KEYS]
        cdef uint32_t limits[LEASE_MAX_KEYS]
        cdef Py_ssize_t n = len(keys)
        cdef Py_ssize_t i, j
        cdef int r
        cdef Lease lease
        if n > LEASE_MAX_KEYS:
            raise ValueError(f"a lease holds at most {LEASE_MAX_KEYS} keys, not {n}")
        for i in range(n):                  # convert all first: nothing taken on a bad pair
            ks[i], limits[i] = keys[i]
        for i in range(n):
            r = self.acquire(ks[i], limits[i])
            if r != 1:
                for j in range(i - 1, -1, -1):
                    self.release(ks[j])
                return i if r == 0 else -1
        lease = Lease.__new__(Lease)
        lease.store = self
        for i in range(n):
            lease.keys[i] = ks[i]
        lease.n = <int>n
        lease.released = False
        return lease


# ---------------------------------------------------------------- the zone

cdef class LimitZone(LimitStore):
    """The LimitStore of a process and its forked workers: limit tables in one
    shared anonymous memory region, a keyed token-bucket (GCRA) table and a
    connection-count table of `max_keys` slots each (rounded up to a power of
    two), with `workers` process slots; exact across processes (atomic
    operations, see limits_decl.pxi)."""

    def __cinit__(self, Py_ssize_t max_keys, Py_ssize_t workers=1):
        cdef size_t cap = ZONE_MIN_KEYS
        cdef size_t worker_off = sizeof(ZoneHeader)
        cdef size_t bucket_off
        cdef size_t count_off
        cdef size_t count_size
        cdef size_t size
        cdef void* p
        cdef ZoneHeader* h
        self.region = NULL
        if max_keys < ZONE_MIN_KEYS or max_keys > ZONE_MAX_KEYS:
            raise ValueError(f"max_keys must be in [{ZONE_MIN_KEYS}, {ZONE_MAX_KEYS}], not {max_keys}")
        if workers < 1 or workers > ZONE_MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {ZONE_MAX_WORKERS}], not {workers}")
        while cap < <size_t>max_keys:
            cap <<= 1
        bucket_off = worker_off + <size_t>workers * sizeof(WorkerSlot)
        count_off = bucket_off + cap * sizeof(BucketSlot)
        count_size = (sizeof(CountSlot) + 4 * <size_t>workers + 7) & ~(<size_t>7)
        size = count_off + cap * count_size
        # Zero-filled by the kernel: every key 0 (never used), every count and share 0.
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise OSError(errno, f"mmap of the limit zone ({size} bytes) failed")
        self.region = <char*>p
        self.region_size = size
        h = <ZoneHeader*>p
        h.magic = ZONE_MAGIC
        h.version = ZONE_VERSION
        h.header_size = <uint32_t>worker_off
        h.region_size = size
        h.worker_off = worker_off
        h.bucket_off = bucket_off
        h.count_off = count_off
        h.bucket_cap = <uint32_t>cap
        h.count_cap = <uint32_t>cap
        h.probe_limit = ZONE_PROBE_MAX if cap > ZONE_PROBE_MAX else <uint32_t>cap
        h.workers = <uint32_t>workers
        h.bucket_slot_size = sizeof(BucketSlot)
        h.count_slot_size = <uint32_t>count_size
        h.worker_slot_size = sizeof(WorkerSlot)
        self.header = h
        self.wslots = <WorkerSlot*>(self.region + worker_off)
        self.buckets = <BucketSlot*>(self.region + bucket_off)
        self.counts = self.region + count_off
        self.count_size = count_size
        self.bucket_mask = <uint32_t>(cap - 1)
        self.count_mask = <uint32_t>(cap - 1)
        self.probe = h.probe_limit
        self.nworkers = <uint32_t>workers
        self.wslot = 0

    def __dealloc__(self):
        if self.region != NULL:
            munmap(self.region, self.region_size)
            self.region = NULL

    # -- the insert lock

    cdef bint _lock(self) noexcept nogil:
        # Take the insert lock; False if one live owner kept it for
        # ZONE_LOCK_GIVE_UP (counted in lock_timeouts).
        cdef uint64_t* lock = &self.header.insert_lock
        cdef uint64_t me = (<uint64_t>getpid() << 32) | (<uint64_t>self.wslot + 1)
        cdef uint64_t cur
        cdef uint64_t seen = 0
        cdef uint32_t spins = 0
        cdef uint32_t owner
        cdef double start = 0.0
        cdef double t
        cdef timespec nap
        nap.tv_sec = 0
        nap.tv_nsec = 20000                 # 20 us
        while True:
            cur = fgw_ld(lock)
            if cur == 0:
                if fgw_cas(lock, 0, me):
                    _crash(CRASH_LOCKED)
                    return True
                continue
            spins += 1
            if spins < 256:
                fgw_pause()
                continue
            t = _mono()
            if start == 0.0 or cur != seen:     # a new owner: the lock moves, wait on
                start = t
                seen = cur
            elif t - start > ZONE_LOCK_GIVE_UP:
                fgw_inc(&self.header.lock_timeouts)
                return False
            elif t - start > ZONE_LOCK_CHECK:
                if kill(<int>(cur >> 32), 0) != 0 and errno == ESRCH:
                    if fgw_cas(lock, cur, me):      # the owner is gone: its lock is ours
                        fgw_inc(&self.header.lock_steals)
                        owner = <uint32_t>(cur & 0xFFFFFFFFULL) - 1
                        if owner < self.nworkers:
                            self._repair(owner)
                        return True
                    continue
                # A live owner that was preempted holding it: give it the CPU.
                nanosleep(&nap, NULL)
                continue
            sched_yield()

    cdef void _unlock(self) noexcept nogil:
        fgw_st_rel(&self.header.insert_lock, 0)

    cdef void _repair(self, uint32_t w) noexcept nogil:
        # Finish the bucket re-key the process of slot w was killed in, if any
        # (the caller holds the insert lock): the slot goes to the new key, idle.
        cdef WorkerSlot* ws = &self.wslots[w]
        cdef uint64_t index = fgw_ld_acq(&ws.ins_slot)
        cdef BucketSlot* s
        if index == 0 or index > <uint64_t>self.bucket_mask + 1:
            return
        s = &self.buckets[index - 1]
        if fgw_ld_acq(&s.tat) == ZONE_RESERVED:
            fgw_st(&s.key, fgw_ld(&ws.ins_key))
            fgw_st_rel(&s.tat, fgw_bits(nextafter(fgw_double(fgw_ld(&ws.ins_old)), INFINITY)))
        fgw_st_rel(&ws.ins_slot, 0)

    # -- the C interface

    cdef double take(self, uint64_t key, double rate, double burst, double now,
                     double cost) noexcept:
        cdef uint64_t k = _zone_key(key)
        cdef uint32_t i = <uint32_t>_mix64(k) & self.bucket_mask
        cdef uint32_t n
        cdef uint64_t found
        cdef BucketSlot* s
        cdef double wait
        for n in range(self.probe):         # lock-free: an existing key
            s = &self.buckets[i]
            found = fgw_ld(&s.key)
            if found == k:
                if _gcra(s, k, rate, burst, now, cost, &wait):
                    return wait
            elif found == 0:                # end of the chain
                break
            i = (i + 1) & self.bucket_mask
        return self._take_insert(k, rate, burst, now, cost)

    cdef double _take_insert(self, uint64_t k, double rate, double burst, double now,
                             double cost) noexcept nogil:
        # Under the insert lock: find k again, else claim the never-used slot
        # that ends its chain, else re-key the least recently used idle slot
        # of its window; then take.
        cdef uint32_t home = <uint32_t>_mix64(k) & self.bucket_mask
        cdef uint32_t i
        cdef uint32_t n
        cdef uint32_t attempt
        cdef uint32_t lru_i = 0
        cdef uint64_t found
        cdef uint64_t v
        cdef uint64_t lru_v = 0
        cdef double t
        cdef double lru_t = 0.0
        cdef double first
        cdef double wait = ZONE_NO_SLOT
        cdef BucketSlot* s
        cdef BucketSlot* lru
        cdef WorkerSlot* ws = &self.wslots[self.wslot]
        if not self._lock():
            fgw_inc(&self.header.bucket_overflows)
            return ZONE_NO_SLOT
        for attempt in range(4):
            i = home
            lru = NULL
            for n in range(self.probe):
                s = &self.buckets[i]
                found = fgw_ld(&s.key)
                v = fgw_ld_acq(&s.tat)
                if found == 0:              # never used: key's now
                    fgw_st_rel(&s.key, k)
                    _gcra(s, k, rate, burst, now, cost, &wait)
                    self._unlock()
                    return wait
                if v != ZONE_RESERVED:
                    if found == k:          # inserted meanwhile
                        _gcra(s, k, rate, burst, now, cost, &wait)
                        self._unlock()
                        return wait
                    t = fgw_double(v)
                    if t <= now and (lru == NULL or t < lru_t):
                        lru = s
                        lru_t = t
                        lru_v = v
                        lru_i = i
                i = (i + 1) & self.bucket_mask
            if lru == NULL:
                break
            # Re-key lru (limits_decl.pxi): journal, RESERVED, key, first take.
            fgw_st(&ws.ins_old, lru_v)
            fgw_st(&ws.ins_key, k)
            fgw_st_rel(&ws.ins_slot, <uint64_t>lru_i + 1)
            if not fgw_cas(&lru.tat, lru_v, ZONE_RESERVED):
                fgw_st_rel(&ws.ins_slot, 0)     # taken meanwhile: look again
                continue
            _crash(CRASH_RESERVED)
            fgw_st(&lru.key, k)
            # From a full bucket: admitted. >= lru_t (idle: lru_t <= now), and
            # > lru_t but for a first take costing nothing at now == lru_t.
            first = now + cost / rate
            fgw_st_rel(&lru.tat, fgw_bits(first))
            fgw_st_rel(&ws.ins_slot, 0)
            fgw_inc(&self.header.bucket_reuses)
            self._unlock()
            return 0.0
        self._unlock()
        fgw_inc(&self.header.bucket_overflows)
        return ZONE_NO_SLOT

    cdef CountSlot* _count_find(self, uint64_t k, uint32_t tag, uint32_t* index) noexcept nogil:
        # The slot of k (lock-free), or NULL.
        cdef uint32_t i = <uint32_t>_mix64(k) & self.count_mask
        cdef uint32_t n
        cdef uint64_t found
        cdef CountSlot* s
        for n in range(self.probe):
            s = _count_at(self.counts, self.count_size, i)
            found = fgw_ld_acq(&s.key)
            if found == k:
                if <uint32_t>(fgw_ld_acq(&s.word) >> 32) == tag:
                    index[0] = i
                    return s
            elif found == 0:
                return NULL
            i = (i + 1) & self.count_mask
        return NULL

    cdef int _count_insert(self, uint64_t k, uint32_t tag, uint32_t limit) noexcept nogil:
        # Under the insert lock: find k again, else claim the first slot of its
        # window at count 0 whose tag is not k's; then acquire. -1: no slot.
        cdef uint32_t i
        cdef uint32_t n
        cdef uint32_t attempt
        cdef uint32_t spare_i = 0
        cdef uint64_t found
        cdef uint64_t w
        cdef uint64_t spare_w = 0
        cdef uint64_t spare_k = 0
        cdef CountSlot* s
        cdef CountSlot* spare
        cdef WorkerSlot* ws = &self.wslots[self.wslot]
        cdef int r = -1
        if not self._lock():
            return -1
        for attempt in range(4):
            i = <uint32_t>_mix64(k) & self.count_mask
            spare = NULL
            for n in range(self.probe):
                s = _count_at(self.counts, self.count_size, i)
                found = fgw_ld_acq(&s.key)
                w = fgw_ld_acq(&s.word)
                if found == k and <uint32_t>(w >> 32) == tag:     # inserted meanwhile
                    r = _count_acquire(ws, s, _own(s) + self.wslot, i, tag, limit)
                    self._unlock()
                    return r if r >= 0 else -1
                # A slot at 0 whose tag is k's is taken only if it never had a
                # key (a claimer killed before storing it): nobody matched it.
                if spare == NULL and <uint32_t>w == 0 and (<uint32_t>(w >> 32) != tag
                                                            or found == 0):
                    spare = s
                    spare_i = i
                    spare_w = w
                    spare_k = found
                if found == 0:                  # end of the chain
                    break
                i = (i + 1) & self.count_mask
            if spare == NULL:
                break
            if not fgw_cas(&spare.word, spare_w, <uint64_t>tag << 32):
                continue                        # counted meanwhile: look again
            _crash(CRASH_CLAIMED)
            if spare_k != 0:
                fgw_inc(&self.header.count_reuses)
            fgw_st_rel(&spare.key, k)
            r = _count_acquire(ws, spare, _own(spare) + self.wslot, spare_i, tag, limit)
            self._unlock()
            return r if r >= 0 else -1
        self._unlock()
        return -1

    cdef int acquire(self, uint64_t key, uint32_t limit) noexcept:
        cdef uint64_t k = _zone_key(key)
        cdef uint32_t tag = _count_tag(k)
        cdef uint32_t index
        cdef uint32_t attempt
        cdef CountSlot* s
        cdef int r
        for attempt in range(4):
            s = self._count_find(k, tag, &index)
            if s == NULL:
                break
            r = _count_acquire(&self.wslots[self.wslot], s, _own(s) + self.wslot, index,
                               tag, limit)
            if r != -2:
                return r
        if limit == 0:
            return 0
        r = self._count_insert(k, tag, limit)
        if r < 0:
            fgw_inc(&self.header.count_overflows)
        return r

    cdef void release(self, uint64_t key) noexcept:
        cdef uint64_t k = _zone_key(key)
        cdef uint32_t tag = _count_tag(k)
        cdef uint32_t index
        cdef CountSlot* s = self._count_find(k, tag, &index)
        if s != NULL:
            _count_release(&self.wslots[self.wslot], s, _own(s) + self.wslot, index, tag)

    cdef void note_message_overflow(self) noexcept:
        fgw_inc(&self.header.message_overflows)

    cdef void note_lease_leak(self) noexcept:
        fgw_inc(&self.header.lease_leaks)

    # -- process slots (Python: the supervisor and its workers)

    cdef uint32_t _slot(self, Py_ssize_t slot) except? 0xFFFFFFFF:
        if slot < 0 or slot >= self.nworkers:
            raise ValueError(f"no process slot {slot} (the zone has {self.nworkers})")
        return <uint32_t>slot

    @property
    def workers(self):
        """Process slots of the zone."""
        return self.nworkers

    @property
    def worker(self):
        """This process's slot (set_worker; 0 by default)."""
        return self.wslot

    def set_worker(self, Py_ssize_t slot):
        """In a worker process after fork: its process slot. Records
        os.getpid() in it; every acquire/release from now on is recorded as
        this slot's share of the key's count."""
        self.wslot = self._slot(slot)
        fgw_st_rel(&self.wslots[self.wslot].pid, <uint64_t>_os.getpid())

    def beat(self, double now):
        """This process's heartbeat (monotonic seconds, clock.now())."""
        fgw_st_rel(&self.wslots[self.wslot].beat, fgw_bits(now))

    def worker_info(self, Py_ssize_t slot):
        """{"pid", "beat", "held"} of a process slot (held: the sum of its
        shares of every count; walks the table)."""
        cdef uint32_t w = self._slot(slot)
        cdef uint32_t i
        cdef uint64_t held = 0
        for i in range(self.count_mask + 1):
            held += fgw_ld32(_own(_count_at(self.counts, self.count_size, i)) + w)
        return {"pid": <int64_t>fgw_ld_acq(&self.wslots[w].pid),
                "beat": fgw_double(fgw_ld_acq(&self.wslots[w].beat)), "held": held}

    cdef object _quiet_delta(self, uint32_t index, uint32_t dead):
        # count - sum(own) of count slot `index` from a quiet snapshot
        # (limits_decl.pxi: reconcile (1)), or the last one after ZONE_QUIET_BOUND.
        cdef CountSlot* s = _count_at(self.counts, self.count_size, index)
        cdef uint32_t* own = _own(s)
        cdef uint32_t n = self.nworkers
        cdef uint32_t v
        cdef uint64_t j
        cdef int64_t d = 0
        cdef int64_t total
        cdef bint quiet = False
        cdef double deadline = _mono() + ZONE_QUIET_BOUND
        cdef uint64_t* first = <uint64_t*>malloc(n * sizeof(uint64_t))
        if first == NULL:
            raise MemoryError()
        try:
            while True:
                for v in range(n):
                    first[v] = fgw_ld_acq(&self.wslots[v].journal)
                fgw_fence()
                total = 0
                d = <int64_t><uint32_t>fgw_ld_acq(&s.word)
                for v in range(n):
                    total += fgw_ld32(own + v)
                fgw_fence()
                quiet = True
                for v in range(n):
                    j = fgw_ld_acq(&self.wslots[v].journal)
                    if v == dead:
                        continue
                    if j != first[v]:
                        quiet = False
                        break
                    if (j >> 32) & 1 and (j & ZONE_INDEX_MASK) == index:
                        # Odd on this slot both times: a live process inside its
                        # op (wait), or a dead one not reconciled yet (its pending
                        # op is part of d).
                        if not _process_gone(<int64_t>fgw_ld_acq(&self.wslots[v].pid)):
                            quiet = False
                            break
                d -= total
                if quiet or _mono() > deadline:
                    break
                sched_yield()
        finally:
            free(first)
        if not quiet:
            fgw_inc(&self.header.unquiet)
        return d

    def reconcile(self, Py_ssize_t slot):
        """Supervisor only, once the process of `slot` is dead and reaped:
        subtract exactly what it held from every count (including an
        acquire/release it was killed in), zero its shares, free the insert
        lock if it held it, clear its pid and beat. Returns the number of
        counts released. Idempotent."""
        cdef uint32_t w = self._slot(slot)
        cdef WorkerSlot* ws = &self.wslots[w]
        cdef uint64_t j = fgw_ld_acq(&ws.journal)
        cdef uint64_t word
        cdef uint64_t cur
        cdef uint32_t held
        cdef uint32_t sub
        cdef uint32_t index
        cdef uint32_t i
        cdef uint32_t* own
        cdef CountSlot* s
        cdef uint64_t released = 0
        if (j >> 32) & 1:                   # (1) killed inside an operation
            fgw_inc(&self.header.pending_ops)
            index = <uint32_t>(j & ZONE_INDEX_MASK)
            if index <= self.count_mask:
                d = self._quiet_delta(index, w)
                own = _own(_count_at(self.counts, self.count_size, index)) + w
                if (j >> 30) & 3 == ZONE_OP_ACQUIRE and d > 0:
                    fgw_add32(own, 1)       # its +1 landed: it is its share
                elif (j >> 30) & 3 == ZONE_OP_RELEASE and d < 0 and fgw_ld32(own) > 0:
                    fgw_add32(own, 0xFFFFFFFFU)     # its -1 landed
            fgw_st_rel(&ws.journal, (((j >> 32) + 1) & 0xFFFFFFFFULL) << 32)
        for i in range(self.count_mask + 1):     # (2) its shares
            s = _count_at(self.counts, self.count_size, i)
            own = _own(s) + w
            held = fgw_ld32(own)
            if held == 0:
                continue
            while True:
                word = fgw_ld_acq(&s.word)
                sub = held if held < <uint32_t>word else <uint32_t>word
                if fgw_cas(&s.word, word, word - sub):
                    break
            fgw_st32(own, 0)
            released += held
        cur = fgw_ld_acq(&self.header.insert_lock)     # (3) its lock
        if cur != 0 and (cur & 0xFFFFFFFFULL) == <uint64_t>w + 1:
            if fgw_cas(&self.header.insert_lock, cur,
                       (<uint64_t>getpid() << 32) | ZONE_LOCK_RECONCILE):
                self._repair(w)
                self._unlock()
        fgw_st(&ws.pid, 0)                  # (4)
        fgw_st_rel(&ws.beat, 0)
        return released

    # -- Python (introspection: metrics, tests)

    def count(self, uint64_t key):
        """Live count of key (0 if unknown)."""
        cdef uint32_t index
        cdef uint64_t k = _zone_key(key)
        cdef CountSlot* s = self._count_find(k, _count_tag(k), &index)
        return <uint32_t>fgw_ld_acq(&s.word) if s != NULL else 0

    def room(self, uint64_t key, uint32_t limit):
        """How many more acquire(key, limit) would count now (ClusterStore.room's twin)."""
        return max(0, <Py_ssize_t>limit - <Py_ssize_t>self.count(key))

    def share(self, uint64_t key, Py_ssize_t slot):
        """The share of key's count held by a process slot (0 if unknown)."""
        cdef uint32_t w = self._slot(slot)
        cdef uint32_t index
        cdef uint64_t k = _zone_key(key)
        cdef CountSlot* s = self._count_find(k, _count_tag(k), &index)
        return fgw_ld32(_own(s) + w) if s != NULL else 0

    def bucket(self, uint64_t key):
        """When key's bucket is full again (its tat: seconds, monotonic), or
        None if key has no slot."""
        cdef uint64_t k = _zone_key(key)
        cdef uint32_t i = <uint32_t>_mix64(k) & self.bucket_mask
        cdef uint32_t n
        cdef uint64_t found
        cdef uint64_t v
        for n in range(self.probe):
            found = fgw_ld(&self.buckets[i].key)
            v = fgw_ld_acq(&self.buckets[i].tat)
            if found == k and v != ZONE_RESERVED:
                return fgw_double(v)
            if found == 0:
                return None
            i = (i + 1) & self.bucket_mask
        return None

    def buckets_used(self, double now):
        """Bucket slots not idle at `now` (not yet full again)."""
        cdef uint32_t i
        cdef uint64_t v
        cdef Py_ssize_t n = 0
        for i in range(self.bucket_mask + 1):
            v = fgw_ld_acq(&self.buckets[i].tat)
            if fgw_ld(&self.buckets[i].key) != 0 and v != ZONE_RESERVED and fgw_double(v) > now:
                n += 1
        return n

    def counts_used(self):
        """Keys with a count above 0."""
        cdef uint32_t i
        cdef Py_ssize_t n = 0
        for i in range(self.count_mask + 1):
            if <uint32_t>fgw_ld_acq(&_count_at(self.counts, self.count_size, i).word) > 0:
                n += 1
        return n

    def home_slot(self, uint64_t key):
        """Index of key's first probe slot (both tables): for tests."""
        return <uint32_t>_mix64(_zone_key(key)) & self.bucket_mask

    def layout(self):
        """The region header, as a dict."""
        cdef ZoneHeader* h = self.header
        return {
            "magic": h.magic, "version": h.version, "header_size": h.header_size,
            "region_size": h.region_size, "worker_off": h.worker_off,
            "bucket_off": h.bucket_off, "count_off": h.count_off,
            "bucket_cap": h.bucket_cap, "count_cap": h.count_cap,
            "probe_limit": h.probe_limit, "workers": h.workers,
            "bucket_slot_size": h.bucket_slot_size, "count_slot_size": h.count_slot_size,
            "worker_slot_size": h.worker_slot_size,
        }

    @property
    def capacity(self):
        """Slots of each table (max_keys rounded up to a power of two)."""
        return self.bucket_mask + 1

    @property
    def overflows(self):
        """take() calls that found no slot (-1.0: refused)."""
        return fgw_ld(&self.header.bucket_overflows)

    @property
    def message_overflows(self):
        """Messages a message-rate-limit limited because take() found no slot."""
        return fgw_ld(&self.header.message_overflows)

    @property
    def count_overflows(self):
        """acquire() calls that found no slot (-1)."""
        return fgw_ld(&self.header.count_overflows)

    @property
    def bucket_reuses(self):
        return fgw_ld(&self.header.bucket_reuses)

    @property
    def count_reuses(self):
        return fgw_ld(&self.header.count_reuses)

    @property
    def lease_leaks(self):
        """Leases given back by their deallocation instead of release()."""
        return fgw_ld(&self.header.lease_leaks)

    @property
    def lock_steals(self):
        """Insert locks taken over from a dead owner."""
        return fgw_ld(&self.header.lock_steals)

    @property
    def lock_timeouts(self):
        """Waits for the insert lock given up (the caller refused)."""
        return fgw_ld(&self.header.lock_timeouts)

    @property
    def pending_ops(self):
        """reconcile() calls that found their process killed inside a count operation."""
        return fgw_ld(&self.header.pending_ops)

    @property
    def unquiet(self):
        """reconcile() calls that found no quiet snapshot within their bound."""
        return fgw_ld(&self.header.unquiet)


cdef class Lease:
    """The connection counts one connection holds (LimitStore.try_acquire)."""

    def __init__(self):
        raise TypeError("leases come from LimitStore.try_acquire()")

    cpdef release(self):
        """Release every key once; later calls do nothing."""
        cdef int i
        if self.released:
            return
        self.released = True
        for i in range(self.n):
            self.store.release(self.keys[i])

    def __len__(self):
        return self.n

    def __dealloc__(self):
        # A lease dropped without release() still gives its slots back.
        cdef int i
        if not self.released and self.store is not None:
            self.released = True
            self.store.note_lease_leak()
            for i in range(self.n):
                self.store.release(self.keys[i])


cdef class TokenBucket:
    """A lone token bucket over BucketState, with time passed in."""

    def __init__(self, double rate, double burst, double now):
        if not (rate > 0.0) or not (burst >= 1.0):
            raise ValueError("need rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        bucket_init(&self.state, burst, now)

    def take(self, double now, double cost=1.0):
        """0.0 if admitted (cost taken), else the seconds until it would be."""
        if not (cost >= 0.0):
            raise ValueError("need cost >= 0")
        return bucket_take(&self.state, self.rate, self.burst, now, cost)

    @property
    def tokens(self):
        return self.state.tokens

    @property
    def stamp(self):
        return self.state.stamp
