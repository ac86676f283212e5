# Declarations of the HDR histogram arrays. Included by _core.pxd; defined in
# hdr.pxi.
#
# An HdrArray is the counts array of an hdrh.histogram.HdrHistogram(lowest,
# highest, significant_figures) (the `hdrhistogram` package, word size 8),
# with the same bucket layout, recorded from C in a few ns. Exported by
# copying the counts into a new HdrHistogram of the same parameters (to_hdr,
# copy_and_reset, merge_into), whose encode() is then byte-identical to that
# of a histogram fed the same values with record_value().
#
# The layout (as in HdrHistogram):
#   unit_magnitude          floor(log2(lowest)), computed with floats as the
#                           package does (lowest = 2**k - 1 with k >= 48 gives k)
#   sub_bucket_count        2**ceil(log2(2 * 10**sig_figs)), half of it is
#                           sub_bucket_half_count (= 1 << half_count_magnitude)
#   sub_bucket_mask         (sub_bucket_count - 1) << unit_magnitude
#   bucket_count            buckets until sub_bucket_count << (unit_magnitude +
#                           bucket_count - 1) > highest
#   counts_len              (bucket_count + 1) * sub_bucket_half_count
#   index(v)                b = 64 - clz(v | sub_bucket_mask) - unit_magnitude
#                               - (half_count_magnitude + 1)
#                           ((b + 1) << half_count_magnitude)
#                               + (v >> (b + unit_magnitude)) - sub_bucket_half_count
# Values below 2**unit_magnitude, 0 included, land at index 0. A value is
# recorded when 0 <= v and index(v) < counts_len: the last bucket reaches past
# `highest` (up to the next power-of-two boundary, e.g. 2**32 - 1 for
# highest = 3_600_000_000 at 3 figures), and those values are recorded, as
# HdrHistogram.record_value does. Anything else (negative, or past the last
# index) is not recorded and is counted in `overflows`, by its count n.

cimport cython
from libc.stdint cimport int64_t, uint64_t


@cython.final                   # C calls to record/record_n skip the vtable
cdef class HdrArray:
    cdef:
        int64_t* counts             # counts_len entries (calloc'd when owns_counts)
        readonly Py_ssize_t counts_len
        bint owns_counts            # counts is ours to free
        readonly int64_t lowest     # as given (lowest_trackable_value)
        readonly int64_t highest    # as given (highest_trackable_value)
        readonly int sig_figs       # significant_figures, 1..5
        readonly int unit_magnitude
        readonly int sub_bucket_half_count_magnitude
        readonly int64_t sub_bucket_count
        readonly int64_t sub_bucket_half_count
        uint64_t sub_bucket_mask
        readonly int bucket_count
        # As HdrHistogram's attributes of the same names (raw values, not
        # rounded to their bucket): exported as they are.
        int64_t total               # sum of the counts recorded (total_count)
        readonly int64_t min_value  # INT64_MAX (sys.maxsize) while empty
        readonly int64_t max_value  # 0 while empty
        readonly int64_t overflows  # values not recorded (negative or past the last index)

    # Index of value in counts, or -1 when HdrHistogram would not record it.
    cdef Py_ssize_t index_of(self, int64_t value) noexcept nogil
    # C only: no Python objects, no allocation, no exceptions.
    cdef void record(self, int64_t value) noexcept nogil
    cdef void record_n(self, int64_t value, int64_t n) noexcept nogil
    # Zero counts, total, min and max; overflows too when all is set.
    cdef void _zero(self, bint all) noexcept nogil
    # A new, empty HdrHistogram of our parameters, its counts array checked
    # against our layout, and the address of that array.
    cdef object _new_hdr(self)
    cdef uint64_t* _hdr_counts(self, object hdr) except NULL
