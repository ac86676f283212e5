"""The limit tables of the core: token buckets, the keyed bucket table and the
connection-count table, with time passed in (no sleeping)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from fastgw._core import Lease, LimitStore, LimitZone, TokenBucket, key_hash

M64 = (1 << 64) - 1


# ---------------------------------------------------------------- TokenBucket

def test_bucket_starts_full_and_refills_at_rate():
    b = TokenBucket(2.0, 3.0, 100.0)          # 2 tokens/s, burst 3
    assert b.tokens == 3.0
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.tokens == 0.0
    assert b.take(100.0) == pytest.approx(0.5)  # one token needs 0.5 s
    assert b.tokens == 0.0                      # a refusal takes nothing
    assert b.take(100.25) == pytest.approx(0.25)
    assert b.take(100.5) == 0.0
    assert b.tokens == pytest.approx(0.0)
    assert b.stamp == 100.5


def test_bucket_clamps_at_burst():
    b = TokenBucket(10.0, 5.0, 0.0)
    b.take(0.0, 5.0)
    assert b.take(1000.0) == 0.0              # 10000 tokens' worth of time...
    assert b.tokens == 4.0                     # ...but never more than the burst
    assert [b.take(1000.0) for _ in range(4)] == [0.0] * 4
    assert b.take(1000.0) > 0.0


def test_bucket_ignores_time_going_backwards():
    b = TokenBucket(1.0, 2.0, 10.0)
    b.take(10.0, 2.0)
    assert b.take(5.0) == pytest.approx(1.0)   # no refill, stamp unchanged
    assert b.stamp == 10.0
    assert b.tokens == 0.0
    assert b.take(10.5) == pytest.approx(0.5)  # refill counts from 10.0, not 5.0
    assert b.take(11.0) == 0.0


def test_bucket_cost_above_burst_passes_when_full_and_leaves_a_debt():
    b = TokenBucket(100.0, 1000.0, 0.0)        # byte limit: 100 B/s, burst 1000 B
    assert b.take(0.0, 5000.0) == 0.0          # a message bigger than the burst passes once full
    assert b.tokens == -4000.0
    # It waits for the debt to be repaid and the bucket to fill: 50 s.
    assert b.take(0.0, 5000.0) == pytest.approx(50.0)
    assert b.take(10.0, 1.0) == pytest.approx(30.01)  # even 1 byte waits for the debt
    assert b.take(50.0, 5000.0) == 0.0


def test_bucket_partial_cost_waits_for_exactly_what_is_missing():
    b = TokenBucket(4.0, 10.0, 0.0)
    b.take(0.0, 9.0)
    assert b.take(0.0, 3.0) == pytest.approx(0.5)   # 1 token, 2 missing at 4/s
    assert b.tokens == 1.0


def test_bucket_rejects_bad_parameters():
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 0.5, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 1.0, 0.0).take(0.0, -1.0)


# ---------------------------------------------------------------- the region

def test_region_layout():
    z = LimitZone(100)
    lay = z.layout()
    assert z.capacity == 128                    # rounded up to a power of two
    assert z.workers == lay["workers"] == 1
    assert lay["magic"] == int.from_bytes(b"FGWLIMIT", "little")
    assert lay["version"] == 3
    assert lay["header_size"] == lay["worker_off"] == 192
    assert lay["worker_slot_size"] == 64
    assert lay["bucket_off"] == 192 + 64
    assert lay["bucket_slot_size"] == 16 and lay["count_slot_size"] == 24   # 16 + one share
    assert lay["bucket_cap"] == lay["count_cap"] == 128
    assert lay["count_off"] == 256 + 128 * 16
    assert lay["region_size"] == 256 + 128 * 16 + 128 * 24
    assert lay["probe_limit"] == 32
    assert LimitZone(16).layout()["probe_limit"] == 16
    assert LimitZone(16).capacity == 16
    assert LimitZone(1024).capacity == 1024
    w8 = LimitZone(16, workers=8).layout()
    assert w8["workers"] == 8 and w8["count_slot_size"] == 16 + 8 * 4
    assert w8["bucket_off"] == 192 + 8 * 64
    w3 = LimitZone(16, workers=3).layout()
    assert w3["count_slot_size"] == 32                  # 16 + 12, padded to 8
    for lay in (w8, w3):                                # every atomic word 8-byte aligned
        assert lay["bucket_off"] % 64 == 0 and lay["count_off"] % 8 == 0


@pytest.mark.parametrize("bad", [0, 15, -1, 1 << 31])
def test_zone_size_bounds(bad):
    with pytest.raises(ValueError):
        LimitZone(bad)


@pytest.mark.parametrize("bad", [0, -1, 4097])
def test_zone_workers_bounds(bad):
    with pytest.raises(ValueError):
        LimitZone(16, workers=bad)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_region_is_shared_with_a_forked_child():
    z = LimitZone(64)
    z.acquire_py(7, 10)
    z.take_py(8, 1.0, 5.0, 0.0, 5.0)
    pid = os.fork()
    if pid == 0:                                 # child: write through the shared region
        try:
            z.acquire_py(7, 10)
            z.take_py(9, 1.0, 5.0, 0.0, 5.0)
            os._exit(0 if z.take_py(8, 1.0, 5.0, 0.0) > 0.0 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0   # the child saw the parent's bucket
    assert z.count(7) == 2                          # the parent sees the child's acquire
    assert z.take_py(9, 1.0, 5.0, 0.0) > 0.0        # and the child's bucket


# ---------------------------------------------------------------- keyed buckets

def test_distinct_keys_do_not_interfere_and_one_key_is_shared():
    z = LimitZone(1024)
    keys = [key_hash(f"client-{i}") for i in range(500)]
    for k in keys:                               # every client: burst 2 at 1/s
        assert z.take_py(k, 1.0, 2.0, 0.0) == 0.0
    for k in keys:
        assert z.take_py(k, 1.0, 2.0, 0.0) == 0.0
    for k in keys:                               # each has spent its own burst
        assert z.take_py(k, 1.0, 2.0, 0.0) == pytest.approx(1.0)
    assert z.overflows == 0
    assert z.buckets_used(0.0) == 500
    # Two connections of one client draw from the same bucket.
    shared = key_hash("shared")
    assert z.take_py(shared, 1.0, 3.0, 0.0) == 0.0   # connection A
    assert z.take_py(shared, 1.0, 3.0, 0.0) == 0.0   # connection B
    assert z.take_py(shared, 1.0, 3.0, 0.0) == 0.0   # connection A
    assert z.take_py(shared, 1.0, 3.0, 0.0) > 0.0    # connection B: the client's 3 are gone
    assert z.bucket(shared) == 3.0                   # full again at t = 3: no token left


def test_key_state_is_kept_and_reset_once_idle():
    z = LimitZone(16)
    z.take_py(5, 2.0, 4.0, 10.0, 3.0)
    assert z.bucket(5) == 11.5                   # full_at: 1 token left of 4 at t = 10
    assert z.take_py(5, 2.0, 4.0, 10.5, 2.0) == 0.0   # 1 + 1 refilled
    assert z.bucket(5) == 12.5                   # 0 left at t = 10.5
    assert z.buckets_used(12.4) == 1
    assert z.buckets_used(12.5) == 0              # full again: idle
    assert z.bucket(77) is None


def test_idle_key_starts_over_with_the_parameters_of_the_call():
    z = LimitZone(16)
    z.take_py(5, 1.0, 2.0, 0.0, 2.0)            # burst 2: full again at t = 2
    # Idle at t = 3, now with burst 10 (a reload): a new, full bucket of 10.
    assert z.take_py(5, 1.0, 10.0, 3.0, 10.0) == 0.0
    assert z.bucket(5) == 13.0
    # Not idle: the state carries on (no reset), as a deficit: full again at
    # t = 13, so 9 tokens short at t = 4; a new burst applies at once (GCRA):
    # with 20, 11 tokens are there.
    assert z.take_py(5, 1.0, 20.0, 4.0, 11.0) == 0.0
    assert z.bucket(5) == 24.0
    assert z.take_py(5, 1.0, 20.0, 4.0, 1.0) == pytest.approx(1.0)
    # With a lower burst the deficit is a debt: 20 s short of a burst of 2.
    assert z.take_py(5, 1.0, 2.0, 4.0, 1.0) == pytest.approx(19.0)


def test_key_zero_is_a_key():
    z = LimitZone(16)
    assert z.take_py(0, 1.0, 1.0, 0.0) == 0.0
    assert z.take_py(0, 1.0, 1.0, 0.0) > 0.0
    assert z.acquire_py(0, 1) == 1
    assert z.count(0) == 1 and z.counts_used() == 1


def test_tiny_table_full_of_active_keys_refuses_new_keys():
    z = LimitZone(16)
    for k in range(1, 17):                       # 16 keys, each drained: active for 10 s
        assert z.take_py(k, 0.1, 1.0, 0.0) == 0.0
    assert z.buckets_used(0.0) == 16
    assert z.overflows == 0
    before = [z.bucket(k) for k in range(1, 17)]
    # A 17th key finds no slot: never admitted (-1.0: the caller refuses), counted every time.
    for _ in range(3):
        assert z.take_py(1000, 0.1, 1.0, 1.0) == -1.0
    assert z.overflows == 3 and z.bucket_reuses == 0
    assert z.bucket(1000) is None
    assert [z.bucket(k) for k in range(1, 17)] == before     # no active state evicted
    # The 16 keys are still limited.
    assert all(z.take_py(k, 0.1, 1.0, 1.0) > 0.0 for k in range(1, 17))
    # Once one of them is full again (t = 10), the new key takes its slot.
    assert z.take_py(1000, 0.1, 1.0, 10.0) == 0.0
    assert z.overflows == 3 and z.bucket_reuses == 1


def test_a_new_key_evicts_the_least_recently_used_idle_bucket():
    z = LimitZone(16)
    # Keys 1..16, full again at t = 1 + (k * 5) % 16 (all distinct, in a shuffled order).
    for k in range(1, 17):
        full_at = 1 + (k * 5) % 16
        assert z.take_py(k, 1.0 / full_at, 1.0, 0.0) == 0.0
        assert z.bucket(k) == pytest.approx(full_at)
    order = sorted(range(1, 17), key=lambda k: (k * 5) % 16)   # least recently used first
    # At t = 100 all are idle: each new key evicts the one full again the longest.
    for i, new in enumerate(range(101, 117)):
        assert z.take_py(new, 1.0, 4.0, 100.0) == 0.0
        assert z.bucket(order[i]) is None
        assert all(z.bucket(k) is not None for k in order[i + 1:])
    assert z.bucket_reuses == 16 and z.overflows == 0
    # Only idle ones go: keys 101.. are full again at t = 101 (a token out of 4 taken),
    # so a newcomer finds no slot before, and takes the slot of one of them then.
    assert z.take_py(200, 1.0, 4.0, 100.5) == -1.0
    assert z.take_py(200, 1.0, 4.0, 101.0) == 0.0
    assert sum(z.bucket(k) is None for k in range(101, 117)) == 1
    assert z.overflows == 1 and z.bucket_reuses == 17


def test_a_never_used_slot_is_taken_before_an_idle_one_is_evicted():
    z = LimitZone(1024)
    a, b, c = _colliding(z, 3)
    assert z.take_py(a, 10.0, 1.0, 0.0) == 0.0              # idle from t = 0.1
    assert z.take_py(b, 10.0, 1.0, 1.0) == 0.0              # b goes past a's idle slot
    assert z.take_py(c, 10.0, 1.0, 1.0) == 0.0
    assert z.bucket_reuses == 0
    assert all(z.bucket(k) is not None for k in (a, b, c))


def test_idle_slots_are_reused_by_new_keys():
    z = LimitZone(16)
    for k in range(1, 17):
        z.take_py(k, 1.0, 1.0, 0.0)              # full again at t = 1
    assert z.take_py(100, 1.0, 1.0, 0.5) == -1.0 and z.overflows == 1
    # At t = 1 every old bucket is idle: 16 new keys get slots, with their own state.
    for k in range(101, 117):
        assert z.take_py(k, 1.0, 1.0, 1.0) == 0.0
    assert z.overflows == 1
    assert z.bucket_reuses == 16
    assert z.buckets_used(1.0) == 16
    assert all(z.take_py(k, 1.0, 1.0, 1.0) > 0.0 for k in range(101, 117))
    assert all(z.bucket(k) is None for k in range(1, 17))
    # An old key coming back starts full (its slot is gone, or it would be idle).
    for k in range(101, 117):
        z.take_py(k, 1.0, 1.0, 2.0)
    assert z.take_py(3, 1.0, 1.0, 3.0) == 0.0 and z.overflows == 1


def _colliding(z, n, start=1):
    """n keys with the same home slot."""
    home = z.home_slot(start)
    keys, k = [start], start + 1
    while len(keys) < n:
        if z.home_slot(k) == home:
            keys.append(k)
        k += 1
    return keys


def test_probe_bound_and_reuse_inside_a_chain():
    z = LimitZone(1024)
    keys = _colliding(z, 34)
    # The first key has a fast bucket (idle 0.1 s after its take), the others slow.
    assert z.take_py(keys[0], 10.0, 1.0, 0.0) == 0.0
    for k in keys[1:32]:
        assert z.take_py(k, 0.01, 1.0, 0.0) == 0.0
    # The chain holds 32 slots: the 33rd colliding key finds none.
    assert z.take_py(keys[32], 0.01, 1.0, 0.0) == -1.0
    assert z.overflows == 1 and z.bucket(keys[32]) is None
    # Once the first is idle, a key further on is still found (not put in the idle slot)...
    assert z.take_py(keys[20], 0.01, 1.0, 0.5) > 0.0
    assert z.bucket_reuses == 0
    # ...and a new key takes the idle slot at the head of the chain...
    assert z.take_py(keys[33], 0.01, 1.0, 0.5) == 0.0
    assert z.overflows == 1 and z.bucket_reuses == 1
    assert z.bucket(keys[0]) is None
    # ...and the keys behind it are still found with their state (not re-inserted full).
    for k in keys[1:32]:
        if k != keys[20]:
            assert z.bucket(k) == 100.0
        assert z.take_py(k, 0.01, 1.0, 0.5) > 0.0
    assert z.take_py(keys[33], 0.01, 1.0, 0.5) > 0.0
    assert z.overflows == 1


def test_take_py_rejects_bad_parameters():
    z = LimitZone(16)
    for rate, burst, cost in [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -1.0),
                              (float("nan"), 1.0, 1.0)]:
        with pytest.raises(ValueError):
            z.take_py(1, rate, burst, 0.0, cost)


# ---------------------------------------------------------------- connection counts

def test_acquire_release_and_limit():
    z = LimitZone(16)
    assert [z.acquire_py(42, 2) for _ in range(3)] == [1, 1, 0]
    assert z.count(42) == 2
    assert z.acquire_py(42, 3) == 1                # the limit is the caller's, per call
    assert z.acquire_py(42, 1) == 0                # over a lowered limit: refused
    assert z.count(42) == 3
    assert z.acquire_py(43, 0) == 0 and z.count(43) == 0
    for _ in range(5):
        z.release_py(42)
    assert z.count(42) == 0                        # never below 0
    z.release_py(999)                              # unknown: ignored
    assert z.count(999) == 0 and z.counts_used() == 0
    assert z.acquire_py(42, 1) == 1


def test_acquire_when_table_is_full():
    z = LimitZone(16)
    for k in range(1, 17):
        assert z.acquire_py(k, 5) == 1
    assert z.counts_used() == 16
    assert z.acquire_py(100, 5) == -1              # no slot: the caller answers 503
    assert z.count_overflows == 1
    assert z.acquire_py(3, 5) == 1                 # keys already in still count
    assert z.acquire_py(3, 2) == 0                 # and are limited, full or not
    z.release_py(5)                                # key 5 at 0: its slot can be reused
    assert z.acquire_py(100, 5) == 1
    assert z.count_reuses == 1
    assert z.count(5) == 0 and z.count(100) == 1
    assert z.acquire_py(5, 5) == -1                # 5 lost its slot to 100
    z.release_py(100)
    assert z.acquire_py(5, 5) == 1
    assert z.count_overflows == 2


def test_count_chain_survives_reuse():
    z = LimitZone(1024)
    keys = _colliding(z, 34)
    for k in keys[:32]:
        assert z.acquire_py(k, 4) == 1
    assert z.acquire_py(keys[32], 4) == -1         # probe bound
    z.release_py(keys[0])
    assert z.acquire_py(keys[33], 4) == 1          # takes the head slot
    for k in keys[1:32]:                           # the rest of the chain is intact
        assert z.count(k) == 1
        assert z.acquire_py(k, 4) == 1
        assert z.count(k) == 2
    for k in keys[1:32]:
        z.release_py(k)
        z.release_py(k)
    assert z.counts_used() == 1 and z.count(keys[33]) == 1


def test_try_acquire_is_all_or_nothing():
    z = LimitZone(64)
    a, b, c = key_hash("api"), key_hash("client"), key_hash("ip")
    lease = z.try_acquire([(a, 100), (b, 1), (c, 10)])
    assert isinstance(lease, Lease) and len(lease) == 3 and not lease.released
    assert (z.count(a), z.count(b), z.count(c)) == (1, 1, 1)
    # b is at its limit: index 1 comes back, and a's count is given back.
    assert z.try_acquire([(a, 100), (b, 1), (c, 10)]) == 1
    assert (z.count(a), z.count(b), z.count(c)) == (1, 1, 1)
    assert z.try_acquire([(c, 1), (a, 100)]) == 0
    assert (z.count(a), z.count(c)) == (1, 1)
    lease.release()
    assert lease.released
    assert z.counts_used() == 0
    empty = z.try_acquire([])
    assert isinstance(empty, Lease) and len(empty) == 0
    with pytest.raises(ValueError):
        z.try_acquire([(1, 1)] * 5)
    with pytest.raises(TypeError):                   # a bad pair: nothing is taken
        z.try_acquire([(a, 5), (b, "x")])
    with pytest.raises(OverflowError):
        z.try_acquire([(a, 5), (-1, 5)])
    assert z.counts_used() == 0


def test_try_acquire_reports_a_full_table():
    z = LimitZone(16)
    for k in range(1, 16):
        assert z.acquire_py(k, 1) == 1
    # One slot is left: the first new key takes it, the second finds none.
    assert z.try_acquire([(100, 5), (101, 5)]) == -1
    assert z.count(100) == 0 and z.counts_used() == 15
    lease = z.try_acquire([(100, 5), (1, 2)])        # a new key and one already in
    assert isinstance(lease, Lease)
    assert z.count(1) == 2 and z.count(100) == 1


def test_lease_release_twice_is_harmless():
    z = LimitZone(16)
    l1 = z.try_acquire([(1, 5), (2, 5)])
    l2 = z.try_acquire([(1, 5)])
    assert z.count(1) == 2
    l1.release()
    l1.release()
    assert (z.count(1), z.count(2)) == (1, 0)        # l2 still holds its own
    l2.release()
    assert z.count(1) == 0
    assert z.lease_leaks == 0


def test_lease_dropped_without_release_gives_back_its_keys():
    z = LimitZone(16)
    lease = z.try_acquire([(1, 5), (1, 5), (2, 5)])
    assert z.count(1) == 2
    del lease
    gc.collect()
    assert z.count(1) == 0 and z.count(2) == 0
    assert z.lease_leaks == 1


def test_lease_cannot_be_built_from_python():
    with pytest.raises(TypeError):
        Lease()


# ---------------------------------------------------------------- key_hash

def _reference_hash(data: bytes) -> int:
    """The documented algorithm: FNV-1a 64, then the MurmurHash3 finalizer."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    h ^= h >> 33
    return h


FIXED = {
    "": 17280346270528514342,
    "a": 9413272369427828315,
    "client-42": 14147514789787144491,
    "api-key:abc123": 15790627444380440497,
    "Grüße": 1796437955847890174,
    "10.0.0.1": 14445829539779861640,
}


def test_key_hash_fixed_values():
    for s, expected in FIXED.items():
        assert key_hash(s) == expected
        assert key_hash(s.encode()) == expected       # str hashes as its UTF-8 bytes
        assert _reference_hash(s.encode()) == expected


def test_key_hash_differs_and_is_never_empty():
    hashes = {key_hash(f"k{i}") for i in range(10000)}
    assert len(hashes) == 10000
    assert 0 not in hashes and M64 not in hashes
    with pytest.raises(TypeError):
        key_hash(42)
    with pytest.raises(TypeError):
        key_hash(bytearray(b"x"))


def test_key_hash_same_in_another_process():
    code = ("import sys; from fastgw._core import key_hash; "
            "print(' '.join(str(key_hash(s)) for s in sys.argv[1:]))")
    strings = list(FIXED) + ["x" * 1000, "\u2603 snow"]
    env = dict(os.environ, PYTHONHASHSEED="12345",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code, *strings], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [key_hash(s) for s in strings]


# ---------------------------------------------------------------- the LimitStore seam

def test_limit_zone_is_a_limit_store():
    zone = LimitZone(16)
    assert isinstance(zone, LimitStore)
    lease = zone.try_acquire([(7, 1)])
    assert isinstance(lease, Lease) and zone.count(7) == 1
    lease.release()
    assert zone.count(7) == 0


def test_the_bare_limit_store_has_no_room_for_anything():
    # The interface's own behaviour: every take and acquire finds no room, so a
    # caller refuses (admission: 503; a message rule: the message is over its limit).
    store = LimitStore()
    assert store.take_py(1, 10.0, 5.0, 0.0) == -1.0
    assert store.acquire_py(1, 3) == -1
    assert store.try_acquire([(1, 3)]) == -1
    assert len(store.try_acquire([])) == 0           # nothing asked: an empty lease
    store.release_py(1)
