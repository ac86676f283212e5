"""HdrArray: HDR histogram counts recorded from C, exported through the
`hdrhistogram` package. Every check compares against an HdrHistogram of the
same parameters fed the same values with record_value()."""

from __future__ import annotations

import html
import random
import re
import shutil
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from fastgw._core import HdrArray

INT64_MAX = (1 << 63) - 1
PERCENTILES = (0, 1, 25, 50, 90, 99, 99.9, 99.99, 100)

# (lowest, highest, significant_figures): kept small enough that the
# HdrHistogram reference stays quick to build and to query.
PARAMS = [
    (1, 3_600_000_000, 3),
    (1, 60_000_000, 3),
    (1, 1 << 40, 2),
    (1, 1000, 1),
    (1000, 10**9, 2),          # lowest > 1: unit magnitude 9
    (1024, 1 << 34, 3),        # lowest a power of two
    (7, 1 << 20, 4),
    (1, INT64_MAX, 1),         # the package's bucket-count cap near 2**62
]


def _last_recordable(h: HdrHistogram) -> int:
    return h.get_highest_equivalent_value(h.get_value_from_index(h.counts_len - 1))


def _edge_values(h: HdrHistogram) -> list[int]:
    """Values on and around every bucket and sub-bucket boundary, the
    lowest, the highest and the end of the last bucket."""
    vals = {-(1 << 40), -1, 0, 1, 2, 3}
    top = _last_recordable(h)
    for k in range(64):
        p = 1 << k
        if p > top * 4:
            break
        vals.update((p - 1, p, p + 1))
    for bucket in range(h.bucket_count + 1):
        step = 1 << (bucket + h.unit_magnitude)
        for sub in (0, 1, h.sub_bucket_half_count - 1, h.sub_bucket_half_count,
                    h.sub_bucket_half_count + 1, h.sub_bucket_count - 1, h.sub_bucket_count):
            base = sub * step
            vals.update((base - 1, base, base + 1, base + step - 1))
    lo, hi = h.lowest_trackable_value, h.highest_trackable_value
    vals.update((lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, top - 1, top, top + 1, INT64_MAX))
    return sorted(v for v in vals if -INT64_MAX - 1 <= v <= INT64_MAX)


def _random_values(h: HdrHistogram, rng: random.Random, n: int) -> list[int]:
    """Log-uniform over [0, 4 * last recordable], so that every bucket and
    the overflow side get values, plus a few negatives."""
    top = min(_last_recordable(h) * 4, INT64_MAX)
    out = []
    for _ in range(n):
        bits = rng.randrange(0, top.bit_length() + 1)
        out.append(min(rng.randrange(0, 1 << bits) if bits else 0, INT64_MAX))
    out += [-rng.randrange(1, 1 << 20) for _ in range(n // 100)]
    rng.shuffle(out)
    return out


def _fill(params, values, counts=None):
    """(HdrArray, HdrHistogram, number refused) after recording values."""
    arr = HdrArray(*params)
    ref = HdrHistogram(*params)
    refused = 0
    for i, v in enumerate(values):
        n = counts[i] if counts else 1
        ok_ref = ref.record_value(v, n)
        ok_arr = arr.record_py(v, n)
        assert ok_arr == ok_ref, v
        refused += 0 if ok_ref else n
    return arr, ref, refused


def _assert_same(got: HdrHistogram, ref: HdrHistogram) -> None:
    assert got.encode() == ref.encode()
    assert got.get_total_count() == ref.get_total_count()
    assert got.get_min_value() == ref.get_min_value()
    assert got.get_max_value() == ref.get_max_value()
    assert got.min_value == ref.min_value and got.max_value == ref.max_value
    assert got.get_percentile_to_value_dict(PERCENTILES) == \
        ref.get_percentile_to_value_dict(PERCENTILES)
    for p in (50, 90, 99, 99.9, 100):
        assert got.get_value_at_percentile(p) == ref.get_value_at_percentile(p)
    assert got.get_mean_value() == ref.get_mean_value()
    assert got.equals(ref)


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize("params", PARAMS + [
    (2, 4, 1), (3, 1 << 62, 2), (1, 1 << 62, 3), ((1 << 20) - 1, 1 << 50, 3),
    ((1 << 48) - 1, 1 << 60, 1),    # float log2 rounds up: unit magnitude 48, not 47
    (1, 100_000, 5),
])
def test_layout_is_hdrhistograms(params):
    arr = HdrArray(*params)
    ref = HdrHistogram(*params)
    assert arr.counts_len == ref.counts_len
    assert arr.bucket_count == ref.bucket_count
    assert arr.sub_bucket_count == ref.sub_bucket_count
    assert arr.sub_bucket_half_count == ref.sub_bucket_half_count
    assert arr.sub_bucket_half_count_magnitude == ref.sub_bucket_half_count_magnitude
    assert arr.unit_magnitude == ref.unit_magnitude
    assert (arr.lowest, arr.highest, arr.sig_figs) == params


def test_defaults():
    arr = HdrArray()
    assert (arr.lowest, arr.highest, arr.sig_figs) == (1, 3_600_000_000, 3)
    assert arr.counts_len == HdrHistogram(1, 3_600_000_000, 3).counts_len
    assert (arr.total_count, arr.overflows, arr.min_value, arr.max_value) == (0, 0, INT64_MAX, 0)


@pytest.mark.parametrize("params", PARAMS)
def test_counts_index_is_hdrhistograms(params):
    ref = HdrHistogram(*params)
    arr = HdrArray(*params)
    values = _edge_values(ref) + _random_values(ref, random.Random(7), 2000)
    for v in values:
        if v < 0:
            assert arr.counts_index(v) == -1
            continue
        i = ref.get_counts_array_index(v)
        assert arr.counts_index(v) == (i if 0 <= i < ref.counts_len else -1), v


@pytest.mark.parametrize("bad", [
    (0, 100, 3), (-1, 100, 3), (10, 19, 3), (1, 100, 0), (1, 100, 6),
    (1 << 50, 1 << 60, 5),          # unit magnitude + sub-bucket bits past 61
])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        HdrArray(*bad)


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("params", PARAMS)
def test_edges_export_identically(params):
    ref0 = HdrHistogram(*params)
    arr, ref, refused = _fill(params, _edge_values(ref0))
    assert refused > 0                      # negatives and past-the-end values
    assert arr.overflows == refused
    assert arr.total_count == ref.total_count
    _assert_same(arr.to_hdr(), ref)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("params", PARAMS)
def test_random_values_export_identically(params, seed):
    rng = random.Random(seed * 1000 + PARAMS.index(params))
    values = _random_values(HdrHistogram(*params), rng, 3000)
    counts = [rng.choice((1, 1, 1, 2, 7, 1000)) for _ in values]
    arr, ref, refused = _fill(params, values, counts)
    assert arr.overflows == refused
    assert arr.total_count == ref.total_count > 0
    _assert_same(arr.to_hdr(), ref)
    # And the encoding decodes to the same distribution.
    dec = HdrHistogram.decode(arr.to_hdr().encode())
    assert dec.get_percentile_to_value_dict(PERCENTILES) == \
        ref.get_percentile_to_value_dict(PERCENTILES)


def test_latencies_in_microseconds():
    """The use case: a latency distribution with a long tail, 3 figures."""
    rng = random.Random(42)
    params = (1, 3_600_000_000, 3)
    values = [int(rng.lognormvariate(6, 1.5)) for _ in range(20000)] + [3_600_000_000]
    arr, ref, refused = _fill(params, values)
    assert refused == 0
    got = arr.to_hdr()
    _assert_same(got, ref)
    assert got.get_value_at_percentile(100) == ref.get_max_value() >= 3_600_000_000


def test_values_only_at_zero_and_below_lowest():
    # Values below 2**unit_magnitude share index 0 with 0: get_min_value() is 0.
    params = (1000, 10**9, 2)
    arr, ref, _ = _fill(params, [0, 5, 511, 0])
    assert arr.counts_index(511) == 0 and arr.counts_index(512) == 1
    _assert_same(arr.to_hdr(), ref)
    assert arr.to_hdr().get_min_value() == 0


def test_empty_exports_like_an_empty_histogram():
    for params in PARAMS:
        got = HdrArray(*params).to_hdr()
        _assert_same(got, HdrHistogram(*params))


def test_to_hdr_is_a_copy():
    arr = HdrArray()
    arr.record_py(100)
    h = arr.to_hdr()
    arr.record_py(200)
    h.record_value(300)
    assert h.get_total_count() == 2 and arr.total_count == 2
    assert arr.to_hdr().get_max_value() == 200
    assert h.get_max_value() == h.get_highest_equivalent_value(300)


def test_overflows_are_not_recorded():
    params = (1, 3_600_000_000, 3)
    arr = HdrArray(*params)
    last = _last_recordable(HdrHistogram(*params))
    assert last == (1 << 32) - 1            # the last bucket reaches past highest
    assert arr.record_py(3_600_000_001) is True
    assert arr.record_py(last) is True
    assert arr.record_py(last + 1) is False
    assert arr.record_py(INT64_MAX, 5) is False
    assert arr.record_py(-1) is False
    assert (arr.total_count, arr.overflows) == (2, 7)
    assert arr.max_value == last
    with pytest.raises(OverflowError):      # past int64: refused before recording
        arr.record_py(1 << 63)
    assert (arr.total_count, arr.overflows) == (2, 7)


# ---------------------------------------------------------------- reset

def test_reset_zeroes_everything():
    params = (1, 60_000_000, 3)
    values = _random_values(HdrHistogram(*params), random.Random(5), 2000)
    arr, _, refused = _fill(params, values)
    assert arr.total_count > 0 and refused > 0
    arr.reset()
    assert (arr.total_count, arr.overflows, arr.min_value, arr.max_value) == (0, 0, INT64_MAX, 0)
    assert all(arr.count_at_index(i) == 0 for i in range(arr.counts_len))
    _assert_same(arr.to_hdr(), HdrHistogram(*params))
    # Recording again gives what a fresh histogram gives.
    more = [3, 17, 4096, 59_999_999]
    ref = HdrHistogram(*params)
    for v in more:
        arr.record_py(v)
        ref.record_value(v)
    _assert_same(arr.to_hdr(), ref)


def test_copy_and_reset_gives_intervals():
    params = (1, 3_600_000_000, 3)
    rng = random.Random(11)
    arr = HdrArray(*params)
    overflows = 0
    for _ in range(3):
        ref = HdrHistogram(*params)
        for v in _random_values(ref, rng, 1500) + _edge_values(ref):
            if not ref.record_value(v):
                overflows += 1
            arr.record_py(v)
        interval = arr.copy_and_reset()
        _assert_same(interval, ref)
        assert (arr.total_count, arr.min_value, arr.max_value) == (0, INT64_MAX, 0)
        assert all(arr.count_at_index(i) == 0 for i in range(arr.counts_len))
        assert arr.overflows == overflows   # kept across intervals
    assert overflows > 0


# ---------------------------------------------------------------- merge

def test_merge_into_adds_as_if_recorded():
    params = (1, 3_600_000_000, 3)
    rng = random.Random(3)
    mine = _random_values(HdrHistogram(*params), rng, 2000)
    theirs = _random_values(HdrHistogram(*params), rng, 2000)
    arr, _, _ = _fill(params, mine)
    target = HdrHistogram(*params)
    both = HdrHistogram(*params)
    for v in theirs:
        target.record_value(v)
    for v in theirs + mine:
        both.record_value(v)
    arr.merge_into(target)
    _assert_same(target, both)
    arr.merge_into(target)                  # twice: counts add again
    for v in mine:
        both.record_value(v)
    _assert_same(target, both)
    HdrArray(*params).merge_into(target)    # empty: nothing changes
    _assert_same(target, both)


def test_merge_into_keeps_the_lower_min_and_higher_max():
    params = (1, 3_600_000_000, 3)
    for mine, theirs in [([1000, 2000], [5, 50_000]), ([5, 50_000], [1000, 2000])]:
        arr, _, _ = _fill(params, mine)
        target = HdrHistogram(*params)
        both = HdrHistogram(*params)
        for v in theirs:
            target.record_value(v)
        for v in theirs + mine:
            both.record_value(v)
        arr.merge_into(target)
        _assert_same(target, both)
        assert (target.min_value, target.max_value) == (5, 50_000)


def test_merge_into_another_highest_of_the_same_layout():
    # As HdrHistogram.add: the layout must match, not the parameters.
    arr, _, _ = _fill((1, 3_600_000_000, 3), [1, 77, 1 << 31])
    target = HdrHistogram(1, 4_000_000_000, 3)
    ref = HdrHistogram(1, 4_000_000_000, 3)
    for v in [1, 77, 1 << 31]:
        ref.record_value(v)
    arr.merge_into(target)
    _assert_same(target, ref)


def test_merge_into_refuses_another_layout():
    arr = HdrArray(1, 3_600_000_000, 3)
    arr.record_py(5)
    for other in [(1, 60_000_000, 3), (1, 3_600_000_000, 2), (1000, 3_600_000_000, 3),
                  (2, 7_200_000_000, 3)]:     # the last: same counts_len, unit magnitude 1
        h = HdrHistogram(*other)
        if other[0] == 2:
            assert h.counts_len == arr.counts_len
        with pytest.raises(ValueError):
            arr.merge_into(h)
        assert h.get_total_count() == 0
    with pytest.raises(ValueError):
        arr.merge_into(HdrHistogram(1, 3_600_000_000, 3, word_size=4))


# ---------------------------------------------------------------- bulk

def test_record_many_is_record_py():
    params = (1, 1 << 40, 2)
    values = _random_values(HdrHistogram(*params), random.Random(9), 5000)
    arr, ref, refused = _fill(params, values)
    bulk = HdrArray(*params)
    assert bulk.record_many(array("q", values)) == len(values) - refused
    assert bulk.overflows == refused
    _assert_same(bulk.to_hdr(), ref)
    assert bulk.record_many(array("q")) == 0
    with pytest.raises(TypeError):
        bulk.record_many(array("i", [1, 2]))
    with pytest.raises(TypeError):
        bulk.record_many(array("d", [1.0]))
    with pytest.raises(TypeError):
        bulk.record_many([1, 2, 3])


# ---------------------------------------------------------------- cost

def test_record_cost_is_printed(capsys):
    """Not asserted: record_py from Python, record_many (the C loop) and
    HdrHistogram.record_value, per value."""
    n = 200_000
    rng = random.Random(1)
    values = [int(rng.lognormvariate(6, 1.5)) for _ in range(n)]
    arr = HdrArray()
    rec = arr.record_py
    t0 = time.perf_counter()
    for v in values:
        rec(v)
    t_py = (time.perf_counter() - t0) / n
    buf = array("q", values)
    t0 = time.perf_counter()
    for _ in range(10):
        arr.record_many(buf)
    t_c = (time.perf_counter() - t0) / (10 * n)
    ref = HdrHistogram(1, 3_600_000_000, 3)
    t0 = time.perf_counter()
    for v in values[:20000]:
        ref.record_value(v)
    t_ref = (time.perf_counter() - t0) / 20000
    t0 = time.perf_counter()
    for _ in range(20):
        arr.to_hdr()
    t_exp = (time.perf_counter() - t0) / 20
    with capsys.disabled():
        print(f"\nHdrArray.record_py {t_py * 1e9:.0f} ns, record (C loop) {t_c * 1e9:.1f} ns, "
              f"HdrHistogram.record_value {t_ref * 1e9:.0f} ns, "
              f"to_hdr {t_exp * 1e6:.0f} us per call")
    assert arr.total_count == 11 * n


def test_record_path_is_pure_c(tmp_path):
    """`cython -a` marks no line of index_of, record, record_n or the
    record_many loop as touching Python (score 0: white)."""
    src = Path(__file__).resolve().parents[2] / "src" / "fastgw"
    if not (src / "hdr.pxi").exists() or shutil.which("gcc") is None:
        pytest.skip("sources not available")
    pytest.importorskip("Cython")
    for f in list(src.glob("*.pyx")) + list(src.glob("*.pxd")) + list(src.glob("*.pxi")):
        shutil.copy(f, tmp_path / f.name)
    res = subprocess.run(
        [sys.executable, "-m", "cython", "-a", "-3", "-X", "boundscheck=False",
         "-X", "wraparound=False", "-X", "cdivision=True", "_core.pyx"],
        cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = {}
    page = (tmp_path / "hdr.html").read_text()
    for m in re.finditer(r'<pre class="cython line score-(\d+)"[^>]*>(.*?)</pre>', page, re.S):
        text = html.unescape(re.sub(r"<[^>]+>", "", m.group(2)))
        num, _, code = text.partition(":")
        lines[int(num.strip("+ "))] = (int(m.group(1)), code)
    source = (src / "hdr.pxi").read_text().splitlines()

    def body(header: str) -> list[int]:
        start = next(i for i, s in enumerate(source, 1) if s.strip().startswith(header))
        indent = len(source[start - 1]) - len(source[start - 1].lstrip())
        out = [start]
        for i in range(start + 1, len(source) + 1):
            s = source[i - 1]
            if s.strip() and len(s) - len(s.lstrip()) <= indent:
                break
            out.append(i)
        return out

    checked = []
    for header in ("cdef Py_ssize_t index_of(", "cdef void record(", "cdef void record_n(",
                   "for i in range(n):"):
        for i in body(header):
            score, code = lines[i]
            assert score == 0, f"hdr.pxi:{i} touches Python: {code.strip()}"
            checked.append(i)
    assert len(checked) > 15
