"""The core's ClusterStore: a process's leased shares of cluster-wide keys, spent locally."""

import math
import random

import pytest

from fastgw._core import ClusterStore, LimitZone, ShareKind, ShareMode, key_hash

COUNT, BUCKET = ShareKind.SHARE_COUNT, ShareKind.SHARE_BUCKET
LEASED, LOCAL, CLOSED = ShareMode.SHARE_LEASED, ShareMode.SHARE_LOCAL, ShareMode.SHARE_CLOSED


@pytest.fixture
def store():
    return ClusterStore(LimitZone(64), idle_wait=0.05)


def test_a_key_not_added_goes_to_the_zone(store):
    k = key_hash("not shared")
    lease = store.try_acquire([(k, 2)])
    assert store.local.count(k) == 1 and store.used(k) == 0
    lease.release()
    assert store.local.count(k) == 0
    assert store.take_py(k, 1.0, 1.0, 10.0) == 0.0 and store.take_py(k, 1.0, 1.0, 10.0) > 0


def test_counts_spend_the_share_never_the_limit(store):
    k = key_hash("client")
    assert store.add(k, COUNT, 0.0) is True and store.add(k, COUNT, 0.0) is False
    assert store.acquire_py(k, 10) == 0                 # no share yet
    store.set_count(k, 3)
    leases = [store.try_acquire([(k, 10)]) for _ in range(4)]
    assert leases[3] == 0 and store.used(k) == 3
    assert store.local.count(k) == 0                    # nothing in the zone
    store.set_count(k, 1)                               # the share fell: held ones stay
    assert store.used(k) == 3 and store.acquire_py(k, 10) == 0
    for lease in leases[:3]:
        lease.release()
    assert store.used(k) == 0
    store.set_count(k, 20)
    assert [store.acquire_py(k, 2) for _ in range(3)] == [1, 1, 0]   # never above the limit
    assert store.report(k) == (2, 4)                    # used, refused (4 refusals so far)
    assert store.report(k) == (2, 0)


def test_count_modes(store):
    k = key_hash("modes")
    store.add(k, COUNT, 0.0)
    store.set_count(k, 0, LOCAL)                        # open: the whole limit here
    assert [store.acquire_py(k, 2) for _ in range(3)] == [1, 1, 0]
    store.set_count(k, 5, CLOSED)
    assert store.acquire_py(k, 10) == 0
    store.release_py(k)
    store.release_py(k)
    store.release_py(k)                                 # never below zero
    assert store.used(k) == 0


def test_a_bucket_grows_only_by_its_credit_and_shrinks_at_once(store):
    k = key_hash("bucket")
    store.add(k, BUCKET, 0.0)
    assert store.take_py(k, 100.0, 10.0, 0.0) == pytest.approx(0.05)   # no share: idle_wait
    store.set_bucket(k, 50.0, 5.0, 2.0, 0.0)            # half the limit, 2 tokens of credit
    assert store.info(k)["tokens"] == 2.0
    assert [store.take_py(k, 100.0, 10.0, 0.0) for _ in range(3)][:2] == [0.0, 0.0]
    # Refill at the share's rate (50/s) up to its burst (5), not the configured one.
    assert store.info(k)["rate"] == 50.0
    assert store.take_py(k, 100.0, 10.0, 1.0, 5.0) == 0.0
    assert store.take_py(k, 100.0, 10.0, 1.0) > 0
    assert store.set_bucket(k, 100.0, 10.0, 0.0, 2.0) == 0.0   # grown without credit: refill only
    assert store.info(k)["tokens"] == pytest.approx(5.0)   # 1 s at 50/s, capped at 5
    # Shrunk: clamped to the new burst; what the clamp took is returned (for the pool).
    assert store.set_bucket(k, 10.0, 1.0, 0.0, 2.0) == pytest.approx(4.0)
    assert store.info(k)["tokens"] == 1.0
    taken, wanted, first, last, takes, gap = store.report(k)
    assert (taken, wanted, first, last, takes) == (7.0, 3.0, 0.0, 1.0, 6)


def test_a_bucket_past_its_validity_takes_its_expired_mode(store):
    k = key_hash("expiry")
    store.add(k, BUCKET, 0.0)
    store.set_bucket(k, 1.0, 1.0, 1.0, 0.0, LEASED, 5.0, CLOSED)
    assert store.take_py(k, 100.0, 100.0, 1.0) == 0.0
    assert store.take_py(k, 100.0, 100.0, 5.0) == pytest.approx(0.05)     # closed
    store.set_bucket(k, 1.0, 1.0, 0.0, 6.0, LEASED, 5.0, LOCAL)
    assert store.take_py(k, 100.0, 100.0, 10.0) == 0.0   # open: the configured 100/s here
    assert store.take_py(k, 100.0, 100.0, 10.0) == 0.0


def test_due_names_keys_that_want_more_and_buckets_gone_idle(store):
    a, b, c = (key_hash(x) for x in "abc")
    store.add(a, COUNT, 0.0)
    store.add(b, BUCKET, 0.0)
    store.add(c, BUCKET, 0.0)
    store.set_bucket(c, 100.0, 100.0, 100.0, 0.0)
    assert store.due(0.0, 0.1) == []
    store.acquire_py(a, 5)                              # refused: no share
    store.take_py(b, 1.0, 1.0, 0.0)                     # refused: no share
    for i in range(10):
        store.take_py(c, 1.0, 1.0, i * 0.01)            # taken, every 10 ms
    assert sorted(store.due(0.1, 0.1)) == sorted([a, b])
    assert store.due(0.1, 0.1) == []                    # once per episode
    assert store.due(0.2, 0.1) == [c]                   # idle for > 0.1 s (and 4 gaps)
    assert store.due(5.0, 0.1) == []                    # b has no share to give back
    assert store.due(9.0, 0.1) == []


def test_many_keys_grow_and_remove_without_losing_one():
    store = ClusterStore(LimitZone(64))
    rng = random.Random(7)
    keys = [key_hash(f"k{i}") for i in range(3000)]
    for k in keys:
        store.add(k, COUNT, 0.0)
        store.set_count(k, 1)
    assert len(store) == 3000
    gone = set(rng.sample(keys, 2000))
    for k in gone:
        assert store.remove(k)
    assert len(store) == 1000
    for k in keys:
        assert (k in store) == (k not in gone)
        if k not in gone:
            assert store.acquire_py(k, 5) == 1
    held = next(k for k in keys if k not in gone)
    assert store.remove(held) is False                  # a connection holds it
    store.release_py(held)
    assert store.remove(held) is True and held not in store


def test_bad_arguments(store):
    k = key_hash("x")
    with pytest.raises(KeyError):
        store.set_count(k, 1)
    store.add(k, BUCKET, 0.0)
    with pytest.raises(ValueError):
        store.set_bucket(k, -1.0, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        ClusterStore(LimitZone(64), idle_wait=0.0)
    assert math.isinf(store.info(k)["valid_until"])
