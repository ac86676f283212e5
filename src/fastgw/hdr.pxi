# HDR histogram arrays: the counts of an HdrHistogram recorded from C.
# Included by _core.pyx; the layout and the contract are in hdr_decl.pxi.
#
# record/record_n run on the frame path: C only, no Python objects, no
# allocation, no exceptions. The rest (export, Python access) is for metrics
# and tests; the `hdrhistogram` package and ctypes are imported only there.

import math as _math

from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_FORMAT, PyBUF_ND,
)
from libc.stdint cimport uintptr_t, INT64_MAX
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    static inline int fastgw_clz64(unsigned long long v) { return __builtin_clzll(v); }
    """
    int fastgw_clz64(unsigned long long v) noexcept nogil   # v != 0


cdef class HdrArray:
    """Counts of an HdrHistogram(lowest, highest, significant_figures), kept
    in a C array and recorded from C; to_hdr() exports them to the
    `hdrhistogram` package."""

    def __cinit__(self, int64_t lowest=1, int64_t highest=3_600_000_000,
                  int significant_figures=3):
        cdef int sbc_magnitude
        cdef int buckets
        if significant_figures < 1 or significant_figures > 5:
            raise ValueError("significant_figures must be 1..5")
        if lowest < 1:
            raise ValueError("lowest must be >= 1")
        if highest < 2 * lowest:
            raise ValueError("highest must be >= 2 * lowest")
        # The layout of HdrHistogram.__init__, with its float arithmetic, so
        # that the rounding is the same.
        self.unit_magnitude = <int>_math.floor(_math.log(lowest) / _math.log(2))
        sbc_magnitude = <int>_math.ceil(
            _math.log(2 * _math.pow(10, significant_figures)) / _math.log(2))
        self.sub_bucket_half_count_magnitude = sbc_magnitude - 1 if sbc_magnitude > 1 else 0
        if self.unit_magnitude + self.sub_bucket_half_count_magnitude > 61:
            raise ValueError("lowest too large for significant_figures")
        self.sub_bucket_count = (<int64_t>1) << (self.sub_bucket_half_count_magnitude + 1)
        self.sub_bucket_half_count = self.sub_bucket_count // 2
        self.sub_bucket_mask = (<uint64_t>(self.sub_bucket_count - 1)) << self.unit_magnitude
        # Buckets needed until the first value the last one cannot hold is
        # above highest (capped as the package caps it near 2**62).
        smallest_untrackable = int(self.sub_bucket_count) << self.unit_magnitude
        buckets = 1
        while smallest_untrackable <= highest:
            if smallest_untrackable > INT64_MAX // 2:
                buckets += 1
                break
            smallest_untrackable <<= 1
            buckets += 1
        self.bucket_count = buckets
        self.counts_len = (self.bucket_count + 1) * self.sub_bucket_half_count
        self.lowest = lowest
        self.highest = highest
        self.sig_figs = significant_figures
        self.counts = <int64_t*>calloc(self.counts_len, sizeof(int64_t))
        if self.counts == NULL:
            raise MemoryError()
        self.owns_counts = True
        self.total = 0
        self.min_value = INT64_MAX
        self.max_value = 0
        self.overflows = 0

    def __dealloc__(self):
        if self.owns_counts and self.counts != NULL:
            free(self.counts)
        self.counts = NULL

    # ------------------------------------------------------------ C interface

    cdef Py_ssize_t index_of(self, int64_t value) noexcept nogil:
        cdef uint64_t v = <uint64_t>value
        cdef int bucket
        cdef uint64_t index
        if value < 0:
            return -1
        # sub_bucket_mask is never 0, so clz is defined; bucket >= 0 and the
        # shift is < 64 for every v.
        bucket = (64 - fastgw_clz64(v | self.sub_bucket_mask) - self.unit_magnitude
                  - (self.sub_bucket_half_count_magnitude + 1))
        index = (((<uint64_t>(bucket + 1)) << self.sub_bucket_half_count_magnitude)
                 + (v >> (bucket + self.unit_magnitude))
                 - <uint64_t>self.sub_bucket_half_count)
        if index >= <uint64_t>self.counts_len:
            return -1
        return <Py_ssize_t>index

    cdef void record(self, int64_t value) noexcept nogil:
        self.record_n(value, 1)

    cdef void record_n(self, int64_t value, int64_t n) noexcept nogil:
        cdef Py_ssize_t i = self.index_of(value)
        if i < 0:
            self.overflows += n
            return
        self.counts[i] += n
        self.total += n
        if value < self.min_value:
            self.min_value = value
        if value > self.max_value:
            self.max_value = value

    cdef void _zero(self, bint all) noexcept nogil:
        memset(self.counts, 0, <size_t>self.counts_len * sizeof(int64_t))
        self.total = 0
        self.min_value = INT64_MAX
        self.max_value = 0
        if all:
            self.overflows = 0

    cdef object _new_hdr(self):
        from hdrh.histogram import HdrHistogram
        return HdrHistogram(self.lowest, self.highest, self.sig_figs)

    cdef uint64_t* _hdr_counts(self, object hdr) except NULL:
        import ctypes
        if (hdr.counts_len != self.counts_len
                or hdr.bucket_count != self.bucket_count
                or hdr.sub_bucket_count != self.sub_bucket_count
                or hdr.unit_magnitude != self.unit_magnitude
                or hdr.word_size != 8):
            raise ValueError(
                "HdrHistogram layout differs from this HdrArray's "
                f"(lowest={self.lowest}, highest={self.highest}, "
                f"significant_figures={self.sig_figs}, word_size=8)")
        counts = hdr.counts
        if (not isinstance(counts, ctypes.Array)
                or ctypes.sizeof(counts) != self.counts_len * 8
                or ctypes.sizeof(counts._type_) != 8):
            raise ValueError("HdrHistogram counts are not a ctypes array of "
                             f"{self.counts_len} 64-bit counters")
        return <uint64_t*><uintptr_t>ctypes.addressof(counts)

    # ------------------------------------------------------------ Python

    @property
    def total_count(self):
        """Sum of the counts recorded (HdrHistogram.total_count)."""
        return self.total

    def counts_index(self, int64_t value):
        """Index of value in the counts array; -1 when it is not recordable."""
        return self.index_of(value)

    def count_at_index(self, Py_ssize_t index):
        if index < 0 or index >= self.counts_len:
            raise IndexError(index)
        return self.counts[index]

    def record_py(self, int64_t value, int64_t n=1):
        """Record value n times. False (and counted in overflows) when
        HdrHistogram.record_value would refuse it."""
        cdef bint ok = self.index_of(value) >= 0
        self.record_n(value, n)
        return ok

    def record_many(self, values):
        """Record every value of a C-contiguous buffer of int64 (array('q'),
        a numpy int64 array) once, in one C loop. Returns how many were
        recorded."""
        cdef Py_buffer view
        cdef const int64_t* data
        cdef Py_ssize_t i, n
        cdef int64_t before
        PyObject_GetBuffer(values, &view, PyBUF_FORMAT | PyBUF_ND)
        try:
            fmt = (<bytes>view.format).lstrip(b"@=") if view.format != NULL else b"B"
            if view.itemsize != 8 or fmt not in (b"q", b"l"):
                raise TypeError("record_many needs a buffer of int64 ('q')")
            data = <const int64_t*>view.buf
            n = view.len // 8
            before = self.overflows
            for i in range(n):
                self.record(data[i])
            return n - (self.overflows - before)
        finally:
            PyBuffer_Release(&view)

    def reset(self):
        """Zero everything: counts, total, min, max and overflows."""
        self._zero(True)

    def to_hdr(self):
        """A new HdrHistogram with our parameters and our counts, total, min
        and max."""
        hdr = self._new_hdr()
        memcpy(self._hdr_counts(hdr), self.counts,
               <size_t>self.counts_len * sizeof(int64_t))
        hdr.total_count = self.total
        hdr.min_value = self.min_value
        hdr.max_value = self.max_value
        return hdr

    def copy_and_reset(self):
        """to_hdr(), then zero counts, total, min and max, with no Python code
        between the copy and the zeroing (nothing can record in between).
        overflows is not zeroed: it keeps counting across intervals."""
        cdef int64_t total, min_value, max_value
        cdef uint64_t* dst
        hdr = self._new_hdr()
        dst = self._hdr_counts(hdr)
        memcpy(dst, self.counts, <size_t>self.counts_len * sizeof(int64_t))
        total = self.total
        min_value = self.min_value
        max_value = self.max_value
        self._zero(False)
        hdr.total_count = total
        hdr.min_value = min_value
        hdr.max_value = max_value
        return hdr

    def merge_into(self, hdr):
        """Add our counts to hdr, an HdrHistogram with our parameters, as if
        it had recorded our values itself (its min and max stay raw values)."""
        cdef uint64_t* dst = self._hdr_counts(hdr)
        cdef Py_ssize_t i
        if self.total == 0 and self.max_value == 0 and self.min_value == INT64_MAX:
            return
        for i in range(self.counts_len):
            dst[i] += <uint64_t>self.counts[i]
        hdr.total_count = hdr.total_count + self.total
        hdr.min_value = min(hdr.min_value, self.min_value)
        hdr.max_value = max(hdr.max_value, self.max_value)

    def cumulative(self, bounds):
        """For metrics without an HdrHistogram copy: ([count of values <= b for b in
        bounds], sum of the values), both read from the buckets (a value counts as its
        bucket's lowest equivalent value; the sum uses each bucket's middle). O(counts)."""
        cdef Py_ssize_t i, j = 0, nb = len(bounds)
        cdef int bucket_index
        cdef int64_t sub_index, low, size
        cdef int64_t c
        cdef double total = 0.0
        cdef list limits = [int(b) for b in bounds]
        cdef list out = [0] * nb
        cdef int64_t running = 0
        cdef int64_t limit = limits[0] if nb else 0
        for i in range(self.counts_len):
            c = self.counts[i]
            if c == 0:
                continue
            bucket_index = <int>(i >> self.sub_bucket_half_count_magnitude) - 1
            sub_index = (i & (self.sub_bucket_half_count - 1)) + self.sub_bucket_half_count
            if bucket_index < 0:
                sub_index -= self.sub_bucket_half_count
                bucket_index = 0
            low = sub_index << (bucket_index + self.unit_magnitude)
            size = (<int64_t>1) << (bucket_index + self.unit_magnitude)
            total += <double>c * (<double>low + <double>(size - 1) / 2.0)
            while j < nb and low > limit:
                out[j] = running
                j += 1
                if j < nb:
                    limit = limits[j]
            running += c
        while j < nb:
            out[j] = running
            j += 1
        return out, total

    def __repr__(self):
        return (f"HdrArray(lowest={self.lowest}, highest={self.highest}, "
                f"significant_figures={self.sig_figs}, total_count={self.total}, "
                f"overflows={self.overflows})")
