"""Properties of the limit tables, in simulated time (hypothesis).

Bucket properties, for a bucket of rate r > 0 and burst b >= 1:

1. It never holds more than b tokens.
2. Upper bound: for requests at non-decreasing times with costs <= b, and for
   every window of requests i..j (whatever came before i), the cost admitted
   in the window is at most b + r * (t_j - t_i).
3. Lower bound under steady demand: the bucket is created full at t_0, the
   first request comes at t_0, costs lie in [c_min, c_max] with
   2 * c_max <= b, and every gap between requests is at most c_min / r (the
   demand is at least the rate). Then nothing is lost to the clamp at b
   (admitted + tokens left == b + r * (t_n - t_0)), and the cost admitted
   over [t_0, t_n] is at least
       b + r * (t_n - t_0) - max(c_max, b - c_min),
   hence at least 99% of b + r * (t_n - t_0) once t_n - t_0 >= 99 * b / r.
   (With b < 2 * cost, irregular arrivals can waste refill at the clamp: the
   bound is not claimed there.)

Table properties: with a 16-slot zone (the probe covers the whole table),
take() equals a model of independent per-key buckets, where an idle bucket
(full again) is the same as an absent one and a new key finds no slot only
when 16 other keys are active; the connection table equals a dict of counts
through any sequence of acquire, release, try_acquire and lease releases
(twice included). Times, rates and costs of the table models are dyadic
(exact in binary floating point), so the model is compared for equality.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from fastgw._core import Lease, LimitZone, TokenBucket

EPS = 1e-9

rates = st.floats(0.01, 1000.0)
bursts = st.floats(1.0, 1000.0)


def _tol(x: float) -> float:
    return EPS * max(1.0, abs(x))


# ---------------------------------------------------------------- buckets

@given(rate=rates, burst=bursts,
       steps=st.lists(st.tuples(st.floats(-10.0, 100.0), st.floats(0.0, 5000.0)), max_size=200))
def test_bucket_never_holds_more_than_burst(rate, burst, steps):
    now = 0.0
    b = TokenBucket(rate, burst, now)
    for dt, cost in steps:                      # time may go backwards; costs above the burst
        now += dt
        wait = b.take(now, cost)
        assert wait >= 0.0
        assert b.tokens <= burst
        if wait > 0.0:
            assert b.tokens < min(cost, burst)


@st.composite
def request_streams(draw, max_cost_ratio=1.0):
    rate = draw(rates)
    burst = draw(bursts)
    n = draw(st.integers(1, 200))
    # Gaps up to burst / rate (demand above the rate: the bucket runs dry) or,
    # sometimes, up to 10 times that (it fills up again).
    span = draw(st.sampled_from([1.0, 1.0, 10.0])) * burst / rate
    gaps = draw(st.lists(st.floats(0.0, span), min_size=n, max_size=n))
    costs = draw(st.lists(st.floats(0.0, burst * max_cost_ratio), min_size=n, max_size=n))
    return rate, burst, gaps, costs


@given(request_streams(), st.floats(0.0, 50.0))
def test_admitted_cost_never_exceeds_burst_plus_refill(stream, t0):
    rate, burst, gaps, costs = stream
    b = TokenBucket(rate, burst, t0)
    now = t0
    times, admitted = [], []
    for gap, cost in zip(gaps, costs):
        now += gap
        times.append(now)
        admitted.append(cost if b.take(now, cost) == 0.0 else 0.0)
    # Every window i..j, whatever the requests before i did to the bucket.
    for i in range(len(times)):
        total = 0.0
        for j in range(i, len(times)):
            total += admitted[j]
            bound = burst + rate * (times[j] - times[i])
            assert total <= bound + _tol(bound), (i, j, total, bound)


def _steady(rate, burst, c_min, c_max, gap_fracs, cost_fracs, n):
    """Run n requests (patterns cycled); return (admitted, elapsed, tokens left)."""
    t0 = 1000.0
    b = TokenBucket(rate, burst, t0)
    now, admitted = t0, 0.0
    for k in range(n):
        if k:
            now += gap_fracs[k % len(gap_fracs)] * c_min / rate
        cost = c_min + cost_fracs[k % len(cost_fracs)] * (c_max - c_min)
        cost = min(max(cost, c_min), c_max)
        if b.take(now, cost) == 0.0:
            admitted += cost
    return admitted, now - t0, b.tokens


@st.composite
def steady_demand(draw, min_gap_frac=0.0, min_cost_ratio=0.0):
    # min_cost_ratio > 0: c_max >= burst * min_cost_ratio and c_min >= c_max / 4
    # (bounds the number of requests a long run needs).
    rate = draw(rates)
    burst = draw(bursts)
    c_max = draw(st.floats(max(0.5, burst * min_cost_ratio), burst / 2.0))
    c_min = draw(st.floats(c_max / 4 if min_cost_ratio else 0.01, c_max))
    gap_fracs = draw(st.lists(st.floats(min_gap_frac, 1.0), min_size=1, max_size=20))
    cost_fracs = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
    return rate, burst, c_min, c_max, gap_fracs, cost_fracs


@given(steady_demand(), st.integers(1, 400))
def test_steady_demand_admits_all_but_a_bounded_remainder(params, n):
    rate, burst, c_min, c_max, gap_fracs, cost_fracs = params
    admitted, elapsed, left = _steady(rate, burst, c_min, c_max, gap_fracs, cost_fracs, n)
    offered = burst + rate * elapsed
    tol = 1e-7 * max(1.0, offered)
    # Nothing lost to the clamp: what was not admitted is still in the bucket...
    assert abs(admitted + left - offered) <= tol, (admitted, left, offered)
    # ...and that is less than one request, or the burst less the smallest cost.
    floor = offered - max(c_max, burst - c_min)
    assert admitted >= floor - tol, (admitted, floor, offered)


@settings(max_examples=50)
@given(steady_demand(min_gap_frac=0.25, min_cost_ratio=1 / 8))
def test_steady_demand_over_many_periods_admits_99_percent(params):
    rate, burst, c_min, c_max, gap_fracs, cost_fracs = params
    # Enough requests for elapsed >= 99 * burst / rate.
    period = sum(gap_fracs) / len(gap_fracs) * c_min / rate
    n = int(99.0 * burst / rate / period) + 2 * len(gap_fracs) + 2
    admitted, elapsed, _ = _steady(rate, burst, c_min, c_max, gap_fracs, cost_fracs, n)
    assert elapsed >= 99.0 * burst / rate
    assert admitted >= 0.99 * (burst + rate * elapsed)


# ---------------------------------------------------------------- keyed buckets against a model

CAP = 16
KEYS = list(range(0, 32))          # twice as many keys as slots; key 0 included


def _params(key):
    """Fixed dyadic rate and burst per key."""
    return (0.0625, 0.25, 1.0, 4.0)[key % 4], (1.0, 2.0, 4.0, 8.0)[(key // 4) % 4]


class BucketModel:
    def __init__(self):
        self.entries = {}          # key -> [tokens, stamp, full_at]
        self.overflows = 0

    def take(self, key, rate, burst, now, cost):
        e = self.entries.get(key)
        if e is None or e[2] <= now:           # absent, or idle: the same
            # A new bucket, full; the key may have lost its slot: it needs one.
            active = sum(1 for v in self.entries.values() if v[2] > now)
            if active >= CAP:
                self.overflows += 1
                return 0.0
            e = self.entries[key] = [burst, now, now]
        if now > e[1]:
            e[0] = min(burst, e[0] + (now - e[1]) * rate)
            e[1] = now
        elif e[0] > burst:
            e[0] = burst
        needed = min(cost, burst)
        if e[0] >= needed:
            e[0] -= cost
            wait = 0.0
        else:
            wait = (needed - e[0]) / rate
        e[2] = e[1] + (burst - e[0]) / rate
        return wait

    def used(self, now):
        return sum(1 for v in self.entries.values() if v[2] > now)


bucket_ops = st.lists(
    st.tuples(st.sampled_from(KEYS),
              st.integers(-16, 8).map(lambda q: max(q, 0) / 8.0),  # time step, often 0
              st.integers(0, 12).map(lambda q: q / 2.0)),     # cost, may exceed the burst
    min_size=40, max_size=300)


@given(bucket_ops)
def test_keyed_buckets_match_independent_buckets(ops):
    z = LimitZone(CAP)
    model = BucketModel()
    now = 0.0
    for key, dt, cost in ops:
        now += dt
        rate, burst = _params(key)
        assert z.take_py(key, rate, burst, now, cost) == model.take(key, rate, burst, now, cost)
        assert z.overflows == model.overflows
        assert z.buckets_used(now) == model.used(now)
    for key, e in model.entries.items():
        got = z.bucket(key)
        if e[2] > now:                          # active keys are all in the table
            assert got is not None and list(got) == e


# ---------------------------------------------------------------- connection table against a model

class CountModel:
    def __init__(self):
        self.counts = {}

    def acquire(self, key, limit):
        c = self.counts.get(key, 0)
        if c >= limit:
            return 0
        if c == 0 and sum(1 for v in self.counts.values() if v > 0) >= CAP:
            return -1
        self.counts[key] = c + 1
        return 1

    def release(self, key):
        if self.counts.get(key, 0) > 0:
            self.counts[key] -= 1

    def try_acquire(self, pairs):
        for i, (key, limit) in enumerate(pairs):
            r = self.acquire(key, limit)
            if r != 1:
                for k, _ in reversed(pairs[:i]):
                    self.release(k)
                return i if r == 0 else -1
        return [k for k, _ in pairs]


limits = st.integers(0, 3)
acquires = st.tuples(st.just("acquire"), st.sampled_from(KEYS), limits)
count_ops = st.lists(st.one_of(
    acquires, acquires,            # more acquires than releases: the table fills up
    st.tuples(st.just("release"), st.sampled_from(KEYS)),
    st.tuples(st.just("lease"), st.lists(st.tuples(st.sampled_from(KEYS), limits), max_size=4)),
    st.tuples(st.just("drop"), st.integers(0, 50)),                    # release a lease
), min_size=40, max_size=300)


@settings(max_examples=150)
@given(count_ops)
def test_connection_table_matches_a_dict(ops):
    z = LimitZone(CAP)
    model = CountModel()
    leases = []                      # (Lease, model keys)
    for op in ops:
        if op[0] == "acquire":
            _, key, limit = op
            before = z.count(key)
            r = z.acquire_py(key, limit)
            assert r == model.acquire(key, limit)
            if r == 1:
                assert z.count(key) == before + 1 <= limit
        elif op[0] == "release":
            z.release_py(op[1])
            model.release(op[1])
        elif op[0] == "lease":
            pairs = op[1]
            got = z.try_acquire(list(pairs))
            want = model.try_acquire(pairs)
            if isinstance(want, list):
                assert isinstance(got, Lease) and len(got) == len(pairs)
                leases.append((got, want))
            else:
                assert got == want
        elif leases:                  # release a lease, possibly again
            lease, keys = leases[op[1] % len(leases)]
            if not lease.released:
                for k in keys:
                    model.release(k)
            lease.release()
            assert lease.released
        for key in KEYS:
            assert z.count(key) == model.counts.get(key, 0) >= 0
        assert z.counts_used() == sum(1 for v in model.counts.values() if v > 0)
    for lease, keys in leases:
        if not lease.released:
            for k in keys:
                model.release(k)
        lease.release()
    assert z.counts_used() == sum(1 for v in model.counts.values() if v > 0)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, (1 << 64) - 1), st.integers(1, 3)),
                max_size=400))
def test_large_table_matches_a_dict(ops):
    # 1024 slots, probe bound 32, at most 400 keys: no key may lack a slot.
    z = LimitZone(1024)
    model = {}
    for is_acquire, key, limit in ops:
        if is_acquire:
            c = model.get(key, 0)
            assert z.acquire_py(key, limit) == (1 if c < limit else 0)
            if c < limit:
                model[key] = c + 1
        else:
            z.release_py(key)
            if model.get(key, 0) > 0:
                model[key] -= 1
    for key, c in model.items():
        assert z.count(key) == c
    assert z.count_overflows == 0
