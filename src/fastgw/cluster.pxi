# ClusterStore: the leased shares of cluster-wide limits, spent locally (see cluster_decl.pxi).

from libc.math cimport INFINITY

cdef enum:
    SHARE_MIN_CAP = 64


cdef class ClusterStore(LimitStore):
    """The LimitStore of a gateway process in a cluster: the keys registered with add() are
    spent from this process's shares (set_count, set_bucket, set by fastgw.cluster.node);
    every other key goes to `local` (the zone)."""

    def __cinit__(self, LimitStore local, double idle_wait=0.05):
        if not (idle_wait > 0.0):
            raise ValueError("idle_wait must be > 0")
        self.local = local
        self.idle_wait = idle_wait
        self.cap = SHARE_MIN_CAP
        self.n = 0
        self.table = <Share*>calloc(self.cap, sizeof(Share))
        if self.table == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.table)

    # -- the table

    cdef Share* _find(self, uint64_t key) noexcept:
        cdef uint32_t mask = self.cap - 1
        cdef uint32_t i = <uint32_t>_mix64(key) & mask
        cdef Share* e
        while True:
            e = &self.table[i]
            if e.key == key:
                return e
            if e.key == 0:
                return NULL
            i = (i + 1) & mask

    cdef Share* _slot(self, uint64_t key) except NULL:
        cdef Share* e = self._find(key)
        if e == NULL:
            raise KeyError(f"{key:#x} is not a cluster-wide key here")
        return e

    def _grow(self):
        cdef uint32_t old_cap = self.cap
        cdef Share* old = self.table
        cdef Share* fresh = <Share*>calloc(<size_t>old_cap * 2, sizeof(Share))
        cdef uint32_t i, j, mask
        if fresh == NULL:
            raise MemoryError()
        self.cap = old_cap * 2
        mask = self.cap - 1
        for i in range(old_cap):
            if old[i].key != 0:
                j = <uint32_t>_mix64(old[i].key) & mask
                while fresh[j].key != 0:
                    j = (j + 1) & mask
                fresh[j] = old[i]
        self.table = fresh
        free(old)

    def add(self, uint64_t key, ShareKind kind, double now):
        """Make `key` cluster-wide here (a share of nothing yet); True if it was new."""
        cdef Share* e
        cdef uint32_t mask, i
        if key == 0:
            key = 0xFFFFFFFFFFFFFFFFULL           # as the zone does: 0 marks an empty slot
        if self._find(key) != NULL:
            return False
        if (self.n + 1) * 2 > self.cap:
            self._grow()
        mask = self.cap - 1
        i = <uint32_t>_mix64(key) & mask
        while self.table[i].key != 0:
            i = (i + 1) & mask
        e = &self.table[i]
        memset(e, 0, sizeof(Share))
        e.key = key
        e.kind = kind
        e.mode = SHARE_LEASED
        e.expired_mode = SHARE_LEASED
        e.valid_until = INFINITY
        e.bucket.stamp = now
        self.n += 1
        return True

    def remove(self, uint64_t key):
        """Forget `key` (it goes to `local` again); refused (False) while connections hold it."""
        cdef uint32_t mask = self.cap - 1
        cdef uint32_t i, j, home
        cdef Share* e = self._find(key)
        if e == NULL:
            return True
        if e.used > 0:
            return False
        i = <uint32_t>(e - self.table)
        j = i
        while True:                                 # backward-shift deletion
            j = (j + 1) & mask
            if self.table[j].key == 0:
                break
            home = <uint32_t>_mix64(self.table[j].key) & mask
            # The entry at j may move to i when its home is not in (i, j] (cyclically).
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.table[i] = self.table[j]
                i = j
        memset(&self.table[i], 0, sizeof(Share))
        self.n -= 1
        return True

    def __len__(self):
        return self.n

    def __contains__(self, uint64_t key):
        return self._find(key) != NULL

    # -- the shares (fastgw.cluster.node)

    def set_count(self, uint64_t key, uint32_t slots, ShareMode mode=SHARE_LEASED):
        cdef Share* e = self._slot(key)
        e.slots = slots
        e.mode = mode

    def set_bucket(self, uint64_t key, double rate, double burst, double credit, double now,
                   ShareMode mode=SHARE_LEASED, double valid_until=INFINITY,
                   ShareMode expired_mode=SHARE_LEASED):
        """The bucket's share from now on: its tokens are brought to `now` at the old share,
        then a larger burst adds only `credit` tokens (the unreserved pool's), a smaller one
        clamps them (fastgw.cluster.lease, "Buckets"). Returns the tokens the clamp took away
        (0.0 if none): the node gives them back to the pool with its next renewal."""
        cdef Share* e = self._slot(key)
        cdef BucketState* b = &e.bucket
        cdef double dropped = 0.0
        if not (rate >= 0.0) or not (burst >= 0.0) or not (credit >= 0.0):
            raise ValueError("need rate, burst, credit >= 0")
        if now > b.stamp:
            if e.rate > 0.0:
                b.tokens = min(e.burst, b.tokens + (now - b.stamp) * e.rate)
            b.stamp = now
        if burst > e.burst:
            b.tokens = min(burst, b.tokens + credit)
        elif b.tokens > burst:
            dropped = b.tokens - burst
            b.tokens = burst
        e.rate = rate
        e.burst = burst
        e.mode = mode
        e.valid_until = valid_until
        e.expired_mode = expired_mode
        return dropped

    def report(self, uint64_t key):
        """What happened since the last report (and reset it): counts (used, refused);
        buckets (taken, wanted, first, last)."""
        cdef Share* e = self._slot(key)
        if e.kind == SHARE_COUNT:
            out = (e.used, e.refused)
            e.refused = 0
            return out
        out = (e.taken, e.wanted, e.first, e.last, e.takes, e.gap)
        e.taken = e.wanted = e.first = 0.0
        e.takes = 0
        return out

    def due(self, double now, double idle_after):
        """The keys to renew now, each once per episode: refused for their share since the
        last due() (they want more), or buckets taken from since then and idle for longer
        than `idle_after` or four mean gaps between takes (their share may go back)."""
        cdef uint32_t i
        cdef Share* e
        cdef double idle
        out = []
        for i in range(self.cap):
            e = &self.table[i]
            if e.key == 0 or e.flags == 0:
                continue
            if e.flags & SHARE_WANTS:
                e.flags &= ~SHARE_WANTS
                out.append(e.key)
                continue
            idle = 4.0 * e.gap
            if idle < idle_after:
                idle = idle_after
            if e.kind == SHARE_BUCKET and e.rate > 0.0 and now - e.last > idle:
                e.flags &= ~SHARE_ACTIVE
                out.append(e.key)
        return out

    def info(self, uint64_t key):
        cdef Share* e = self._slot(key)
        if e.kind == SHARE_COUNT:
            return {"kind": "count", "mode": ShareMode(e.mode).name, "slots": e.slots,
                    "used": e.used}
        return {"kind": "bucket", "mode": ShareMode(e.mode).name, "rate": e.rate,
                "burst": e.burst, "tokens": e.bucket.tokens, "valid_until": e.valid_until,
                "expired_mode": ShareMode(e.expired_mode).name}

    def room(self, uint64_t key, uint32_t limit):
        """How many more acquire(key, limit) would count now."""
        cdef Share* e = self._find(key)
        cdef uint32_t cap
        if e == NULL:
            return self.local.room(key, limit)
        if e.mode == SHARE_CLOSED:
            cap = 0
        elif e.mode == SHARE_LOCAL:
            cap = limit
        else:
            cap = e.slots if e.slots < limit else limit
        return cap - e.used if e.used < cap else 0

    def note_refused(self, uint64_t key):
        """An acquisition the caller did not try, for want of room (it wants more)."""
        cdef Share* e = self._slot(key)
        e.refused += 1
        e.flags |= SHARE_WANTS

    def used(self, uint64_t key):
        cdef Share* e = self._find(key)
        return 0 if e == NULL else e.used

    # -- the LimitStore interface

    cdef double take(self, uint64_t key, double rate, double burst, double now,
                     double cost) noexcept:
        cdef Share* e = self._find(key if key != 0 else 0xFFFFFFFFFFFFFFFFULL)
        cdef double wait
        cdef int mode
        if e == NULL or e.kind != SHARE_BUCKET:
            return self.local.take(key, rate, burst, now, cost)
        mode = e.mode if now < e.valid_until else e.expired_mode
        if e.takes == 0:
            e.first = now
        if e.last > 0.0 and now > e.last:
            e.gap += (now - e.last - e.gap) * 0.125
        e.last = now
        e.takes += 1
        if mode == SHARE_LOCAL:
            wait = bucket_take(&e.bucket, rate, burst, now, cost)
        elif mode == SHARE_CLOSED or not (e.rate > 0.0):
            wait = self.idle_wait
        else:
            wait = bucket_take(&e.bucket, e.rate, e.burst, now, cost)
        if wait == 0.0:
            e.taken += cost
            e.flags |= SHARE_ACTIVE
        else:
            e.wanted += cost
            e.flags |= SHARE_WANTS | SHARE_ACTIVE
        return wait

    cdef int acquire(self, uint64_t key, uint32_t limit) noexcept:
        cdef Share* e = self._find(key if key != 0 else 0xFFFFFFFFFFFFFFFFULL)
        cdef uint32_t cap
        if e == NULL or e.kind != SHARE_COUNT:
            return self.local.acquire(key, limit)
        if e.mode == SHARE_CLOSED:
            cap = 0
        elif e.mode == SHARE_LOCAL:
            cap = limit
        else:
            cap = e.slots if e.slots < limit else limit
        if e.used < cap:
            e.used += 1
            return 1
        e.refused += 1
        e.flags |= SHARE_WANTS
        return 0

    cdef void release(self, uint64_t key) noexcept:
        cdef Share* e = self._find(key if key != 0 else 0xFFFFFFFFFFFFFFFFULL)
        if e == NULL or e.kind != SHARE_COUNT:
            self.local.release(key)
        elif e.used > 0:
            e.used -= 1

    cdef void note_message_overflow(self) noexcept:
        self.local.note_message_overflow()

    cdef void note_lease_leak(self) noexcept:
        self.local.note_lease_leak()
