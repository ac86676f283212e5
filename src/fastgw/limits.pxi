# The limits: token buckets, the LimitStore interface (with its Python
# wrappers), and LimitZone, its implementation as a keyed bucket table and a
# connection-count table, flat C tables in one memory region. Included by
# _core.pyx; the layout and the contract are in limits_decl.pxi.
#
# take/acquire/release/bucket_take run on the frame path or per connection:
# C only, no Python objects, no allocation, no exceptions.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport errno
from posix.mman cimport (
    mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_ANONYMOUS, MAP_FAILED,
)


cdef enum:
    ZONE_VERSION = 2              # 2: take() returns ZONE_NO_SLOT; message_overflows
    ZONE_PROBE_MAX = 32           # slots looked at from a key's home slot
    ZONE_MIN_KEYS = 16
    ZONE_MAX_KEYS = 1 << 30
    LEASE_MAX_KEYS = 4

# b"FGWLIMIT" read as a little-endian uint64.
cdef uint64_t ZONE_MAGIC = 0x54494D494C574746ULL
# Where a caller's key 0 is stored: 0 marks a slot never used.
cdef uint64_t ZONE_KEY_ZERO = 0xFFFFFFFFFFFFFFFFULL
# What take() returns when the bucket table has no slot for the key.
cdef double ZONE_NO_SLOT = -1.0


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


# ---------------------------------------------------------------- table lookups

cdef inline BucketSlot* _bucket_slot(ZoneHeader* h, BucketSlot* table, uint32_t mask,
                                     uint32_t probe, uint64_t key, double burst,
                                     double now) noexcept nogil:
    # The slot of key, inserted (full) if absent; NULL if no slot can be had
    # within the probe bound. An idle slot (full again by now) counts as
    # absent: the key's own is reset to full. A new key goes to the
    # never-used slot that ends its chain, else in place of the least
    # recently used idle slot of the window (smallest full_at).
    cdef uint32_t i = <uint32_t>_mix64(key) & mask
    cdef uint32_t n
    cdef BucketSlot* s
    cdef BucketSlot* lru = NULL
    for n in range(probe):
        s = &table[i]
        if s.key == key:
            if s.full_at <= now:
                bucket_init(&s.state, burst, now)
            return s
        if s.key == 0:              # end of the chain: key is not further on
            s.key = key
            bucket_init(&s.state, burst, now)
            return s
        if s.full_at <= now and (lru == NULL or s.full_at < lru.full_at):
            lru = s
        i = (i + 1) & mask
    if lru == NULL:
        return NULL
    h.bucket_reuses += 1
    lru.key = key
    bucket_init(&lru.state, burst, now)
    return lru


cdef inline BucketSlot* _bucket_find(BucketSlot* table, uint32_t mask, uint32_t probe,
                                     uint64_t key) noexcept nogil:
    cdef uint32_t i = <uint32_t>_mix64(key) & mask
    cdef uint32_t n
    cdef BucketSlot* s
    for n in range(probe):
        s = &table[i]
        if s.key == key:
            return s
        if s.key == 0:
            return NULL
        i = (i + 1) & mask
    return NULL


cdef inline CountSlot* _count_find(CountSlot* table, uint32_t mask, uint32_t probe,
                                   uint64_t key, CountSlot** spare) noexcept nogil:
    # The slot of key or NULL; *spare: the first slot key could be put in
    # (never used, or count 0), NULL if none within the probe bound.
    cdef uint32_t i = <uint32_t>_mix64(key) & mask
    cdef uint32_t n
    cdef CountSlot* s
    spare[0] = NULL
    for n in range(probe):
        s = &table[i]
        if s.key == key:
            return s
        if s.key == 0:
            if spare[0] == NULL:
                spare[0] = s
            return NULL
        if spare[0] == NULL and s.count == 0:
            spare[0] = s
        i = (i + 1) & mask
    return NULL


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
    """The LimitStore of one process (and its forks): limit tables in one
    shared anonymous memory region, a keyed token-bucket table and a
    connection-count table of `max_keys` slots each (rounded up to a power of
    two)."""

    def __cinit__(self, Py_ssize_t max_keys):
        cdef size_t cap = ZONE_MIN_KEYS
        cdef size_t bucket_off = sizeof(ZoneHeader)
        cdef size_t count_off
        cdef size_t size
        cdef void* p
        cdef ZoneHeader* h
        self.region = NULL
        if max_keys < ZONE_MIN_KEYS or max_keys > ZONE_MAX_KEYS:
            raise ValueError(f"max_keys must be in [{ZONE_MIN_KEYS}, {ZONE_MAX_KEYS}], not {max_keys}")
        while cap < <size_t>max_keys:
            cap <<= 1
        count_off = bucket_off + cap * sizeof(BucketSlot)
        size = count_off + cap * sizeof(CountSlot)
        # Zero-filled by the kernel: every key 0 (never used), every count 0.
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise OSError(errno, f"mmap of the limit zone ({size} bytes) failed")
        self.region = <char*>p
        self.region_size = size
        h = <ZoneHeader*>p
        h.magic = ZONE_MAGIC
        h.version = ZONE_VERSION
        h.header_size = <uint32_t>bucket_off
        h.region_size = size
        h.bucket_off = bucket_off
        h.count_off = count_off
        h.bucket_cap = <uint32_t>cap
        h.count_cap = <uint32_t>cap
        h.probe_limit = ZONE_PROBE_MAX if cap > ZONE_PROBE_MAX else <uint32_t>cap
        h.bucket_slot_size = sizeof(BucketSlot)
        h.count_slot_size = sizeof(CountSlot)
        self.header = h
        self.buckets = <BucketSlot*>(self.region + bucket_off)
        self.counts = <CountSlot*>(self.region + count_off)
        self.bucket_mask = <uint32_t>(cap - 1)
        self.count_mask = <uint32_t>(cap - 1)
        self.probe = h.probe_limit

    def __dealloc__(self):
        if self.region != NULL:
            munmap(self.region, self.region_size)
            self.region = NULL

    # -- the C interface

    cdef double take(self, uint64_t key, double rate, double burst, double now,
                     double cost) noexcept:
        cdef BucketSlot* s = _bucket_slot(self.header, self.buckets, self.bucket_mask,
                                          self.probe, _zone_key(key), burst, now)
        cdef double wait
        if s == NULL:
            self.header.bucket_overflows += 1
            return ZONE_NO_SLOT
        wait = bucket_take(&s.state, rate, burst, now, cost)
        s.full_at = s.state.stamp + (burst - s.state.tokens) / rate
        return wait

    cdef int acquire(self, uint64_t key, uint32_t limit) noexcept:
        cdef CountSlot* spare
        cdef CountSlot* s
        key = _zone_key(key)
        s = _count_find(self.counts, self.count_mask, self.probe, key, &spare)
        if s != NULL:
            if s.count < limit:
                s.count += 1
                return 1
            return 0
        if limit == 0:
            return 0
        if spare == NULL:
            self.header.count_overflows += 1
            return -1
        if spare.key != 0:
            self.header.count_reuses += 1
        spare.key = key
        spare.count = 1
        return 1

    cdef void release(self, uint64_t key) noexcept:
        cdef CountSlot* spare
        cdef CountSlot* s = _count_find(self.counts, self.count_mask, self.probe,
                                        _zone_key(key), &spare)
        if s != NULL and s.count > 0:
            s.count -= 1

    cdef void note_message_overflow(self) noexcept:
        self.header.message_overflows += 1

    cdef void note_lease_leak(self) noexcept:
        self.header.lease_leaks += 1

    # -- Python (introspection: metrics, tests)

    def count(self, uint64_t key):
        """Live count of key (0 if unknown)."""
        cdef CountSlot* spare
        cdef CountSlot* s = _count_find(self.counts, self.count_mask, self.probe,
                                        _zone_key(key), &spare)
        return s.count if s != NULL else 0

    def bucket(self, uint64_t key):
        """(tokens, stamp, full_at) of key's slot as last written, or None."""
        cdef BucketSlot* s = _bucket_find(self.buckets, self.bucket_mask, self.probe,
                                          _zone_key(key))
        if s == NULL:
            return None
        return (s.state.tokens, s.state.stamp, s.full_at)

    def buckets_used(self, double now):
        """Bucket slots not idle at `now` (not yet full again)."""
        cdef uint32_t i
        cdef Py_ssize_t n = 0
        for i in range(self.bucket_mask + 1):
            if self.buckets[i].key != 0 and self.buckets[i].full_at > now:
                n += 1
        return n

    def counts_used(self):
        """Keys with a count above 0."""
        cdef uint32_t i
        cdef Py_ssize_t n = 0
        for i in range(self.count_mask + 1):
            if self.counts[i].count > 0:
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
            "region_size": h.region_size, "bucket_off": h.bucket_off,
            "count_off": h.count_off, "bucket_cap": h.bucket_cap,
            "count_cap": h.count_cap, "probe_limit": h.probe_limit,
            "bucket_slot_size": h.bucket_slot_size, "count_slot_size": h.count_slot_size,
        }

    @property
    def capacity(self):
        """Slots of each table (max_keys rounded up to a power of two)."""
        return self.bucket_mask + 1

    @property
    def overflows(self):
        """take() calls that found no slot (-1.0: refused)."""
        return self.header.bucket_overflows

    @property
    def message_overflows(self):
        """Messages a message-rate-limit limited because take() found no slot."""
        return self.header.message_overflows

    @property
    def count_overflows(self):
        """acquire() calls that found no slot (-1)."""
        return self.header.count_overflows

    @property
    def bucket_reuses(self):
        return self.header.bucket_reuses

    @property
    def count_reuses(self):
        return self.header.count_reuses

    @property
    def lease_leaks(self):
        """Leases given back by their deallocation instead of release()."""
        return self.header.lease_leaks


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
