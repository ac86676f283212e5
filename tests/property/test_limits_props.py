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

Table properties: in a key's window of W slots (a 16-slot zone, where the
probe covers the whole table; or keys that all share one home slot in a
1024-slot zone, whose probe bound is 32), take() equals a model of
independent per-key buckets, where an idle bucket (full again) is the same
as an absent one, held in a table of W entries: a new key takes a free entry,
else evicts the idle entry full again the longest (any of them on a tie),
else finds no slot and is refused (-1.0, counted), nothing evicted. The
connection table equals a dict of counts through any sequence of acquire,
release, try_acquire and lease releases (twice included), a new key being
refused (-1) only when W other keys have a count. Times, rates and costs of
the table models are dyadic (exact in binary floating point), so the model
is compared for equality.
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


def _params(index):
    """Fixed dyadic rate and burst per key (by its index)."""
    return (0.0625, 0.25, 1.0, 4.0)[index % 4], (1.0, 2.0, 4.0, 8.0)[(index // 4) % 4]


def _colliding(z, n):
    """n keys with the same home slot in zone z."""
    home = z.home_slot(1)
    keys, k = [1], 2
    while len(keys) < n:
        if z.home_slot(k) == home:
            keys.append(k)
        k += 1
    return keys


class BucketModel:
    """Per-key buckets in a table of `cap` entries: see the module's docstring."""

    def __init__(self, cap):
        self.cap = cap
        self.entries = {}          # key -> [tokens, stamp, full_at]: the keys holding a slot
        self.overflows = 0
        self.reuses = 0
        self.evicting = ()         # the keys one of which the last take evicted

    def take(self, key, rate, burst, now, cost):
        self.evicting = ()
        e = self.entries.get(key)
        if e is None:
            if len(self.entries) >= self.cap:
                idle = [k for k, v in self.entries.items() if v[2] <= now]
                if not idle:                   # a full window: refused, nothing evicted
                    self.overflows += 1
                    return -1.0
                oldest = min(self.entries[k][2] for k in idle)
                self.evicting = tuple(k for k in idle if self.entries[k][2] == oldest)
                self.reuses += 1
            e = self.entries[key] = [burst, now, now]
        elif e[2] <= now:                      # idle: the same as a new bucket, full
            e[:] = [burst, now, now]
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

    def evicted(self, key):
        """The zone chose `key` among the least recently used idle entries."""
        assert key in self.evicting, (key, self.evicting)
        del self.entries[key]
        self.evicting = ()

    def used(self, now):
        return sum(1 for v in self.entries.values() if v[2] > now)


def _bucket_ops(n_keys):
    return st.lists(
        st.tuples(st.integers(0, n_keys - 1),                           # the key's index
                  st.integers(-16, 8).map(lambda q: max(q, 0) / 8.0),  # time step, often 0
                  st.integers(0, 12).map(lambda q: q / 2.0)),          # cost, may exceed the burst
        min_size=40, max_size=300)


def _run_bucket_model(z, keys, cap, ops):
    model = BucketModel(cap)
    now = 0.0
    for index, dt, cost in ops:
        now += dt
        key = keys[index]
        rate, burst = _params(index)
        assert z.take_py(key, rate, burst, now, cost) == model.take(key, rate, burst, now, cost)
        if model.evicting:
            gone = [k for k in model.evicting if z.bucket(k) is None]
            assert len(gone) == 1, (gone, model.evicting)
            model.evicted(gone[0])
        assert z.overflows == model.overflows
        assert z.bucket_reuses == model.reuses
        assert z.buckets_used(now) == model.used(now)
    for key in keys:                           # every key holding a slot, with its state
        e = model.entries.get(key)
        got = z.bucket(key)
        # The zone keeps a bucket as when it is full again (GCRA's tat): the model's full_at.
        assert (got is None) if e is None else (got is not None and got == e[2]), (key, got, e)
    return model


@given(_bucket_ops(len(KEYS)))
def test_keyed_buckets_match_independent_buckets(ops):
    _run_bucket_model(LimitZone(CAP), KEYS, CAP, ops)


@settings(max_examples=50)
@given(_bucket_ops(64))
def test_keyed_buckets_in_one_probe_window_match_the_model(ops):
    # 64 keys sharing one home slot: their window is the 32 slots from it.
    z = LimitZone(1024)
    assert z.layout()["probe_limit"] == 32
    _run_bucket_model(z, _colliding(z, 64), 32, ops)


def test_bucket_model_refuses_at_a_full_window_and_evicts_the_oldest_idle():
    # A fixed sequence through the model's three cases: keys 0..15 drained at t = 0
    # (full again at burst / rate: key 3 at 0.25 s, key 7 at 0.5 s, the others later);
    # key 16 refused at t = 0.125, then given key 3's slot at 0.25; key 17 key 7's at 0.5.
    z = LimitZone(CAP)
    ops = [(k, 0.0, _params(k)[1]) for k in range(16)]
    ops += [(16, 0.125, 1.0), (16, 0.125, 1.0), (17, 0.25, 1.0)]
    model = _run_bucket_model(z, KEYS, CAP, ops)
    assert model.overflows == 1 and model.reuses == 2
    assert z.overflows == 1 and z.bucket_reuses == 2
    assert z.bucket(3) is None and z.bucket(7) is None
    assert z.bucket(16) is not None and z.bucket(17) is not None


# ---------------------------------------------------------------- connection table against a model

class CountModel:
    def __init__(self, cap):
        self.cap = cap
        self.counts = {}

    def acquire(self, key, limit):
        c = self.counts.get(key, 0)
        if c >= limit:
            return 0
        if c == 0 and sum(1 for v in self.counts.values() if v > 0) >= self.cap:
            return -1               # a full window: refused
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


def _count_ops(n_keys):
    keys = st.integers(0, n_keys - 1)          # indexes into the keys of the test
    acquires = st.tuples(st.just("acquire"), keys, limits)
    return st.lists(st.one_of(
        acquires, acquires,            # more acquires than releases: the table fills up
        st.tuples(st.just("release"), keys),
        st.tuples(st.just("lease"), st.lists(st.tuples(keys, limits), max_size=4)),
        st.tuples(st.just("drop"), st.integers(0, 50)),                    # release a lease
    ), min_size=40, max_size=300)


@settings(max_examples=150)
@given(_count_ops(len(KEYS)))
def test_connection_table_matches_a_dict(ops):
    _run_count_model(LimitZone(CAP), KEYS, CAP, ops)


@settings(max_examples=50)
@given(_count_ops(64))
def test_connection_table_in_one_probe_window_matches_a_dict(ops):
    z = LimitZone(1024)
    _run_count_model(z, _colliding(z, 64), 32, ops)


def _run_count_model(z, keys, cap, ops):
    model = CountModel(cap)
    leases = []                      # (Lease, model keys)
    for op in ops:
        if op[0] in ("acquire", "release"):
            op = (op[0], keys[op[1]], *op[2:])
        elif op[0] == "lease":
            op = ("lease", [(keys[i], limit) for i, limit in op[1]])
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
            lease, held = leases[op[1] % len(leases)]
            if not lease.released:
                for k in held:
                    model.release(k)
            lease.release()
            assert lease.released
        for key in keys:
            assert z.count(key) == model.counts.get(key, 0) >= 0
        assert z.counts_used() == sum(1 for v in model.counts.values() if v > 0)
    for lease, held in leases:
        if not lease.released:
            for k in held:
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
