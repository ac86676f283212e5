"""The limit zone shared by worker processes: process slots, per-process
shares of the counts, heartbeats, reconcile() of a dead process, and the
buckets as GCRA (one atomic word), first in one process, then with real
forked processes hammering the same keys (no mocks), SIGKILLed at random."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from hypothesis import given, settings, strategies as st

from fastgw._core import LimitZone, TokenBucket, key_hash

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


# ---------------------------------------------------------------- one process

def test_process_slots_pid_and_beat():
    z = LimitZone(64, workers=4)
    assert z.workers == 4 and z.worker == 0
    assert z.worker_info(0) == {"pid": 0, "beat": 0.0, "held": 0}   # nobody said so yet
    z.set_worker(2)
    z.beat(1234.5)
    assert z.worker == 2
    assert z.worker_info(2) == {"pid": os.getpid(), "beat": 1234.5, "held": 0}
    assert z.worker_info(0)["pid"] == 0
    for bad in (-1, 4):
        with pytest.raises(ValueError):
            z.set_worker(bad)
        with pytest.raises(ValueError):
            z.worker_info(bad)
        with pytest.raises(ValueError):
            z.reconcile(bad)


def test_shares_are_per_process_slot_and_reconcile_gives_back_exactly_them():
    z = LimitZone(64, workers=3)
    a, b = key_hash("client-a"), key_hash("client-b")
    z.set_worker(0)
    assert [z.acquire_py(a, 10) for _ in range(2)] == [1, 1]
    z.set_worker(1)
    assert z.acquire_py(a, 10) == 1 and z.acquire_py(b, 10) == 1
    assert (z.count(a), z.count(b)) == (3, 1)
    assert (z.share(a, 0), z.share(a, 1), z.share(b, 1)) == (2, 1, 1)
    assert z.worker_info(0)["held"] == 2 and z.worker_info(1)["held"] == 2
    # A process gives back only what it holds: slot 1 holds one of a.
    z.release_py(a)
    z.release_py(a)
    assert z.count(a) == 2 and z.share(a, 1) == 0 and z.share(a, 0) == 2
    # Slot 0's process died: reconcile gives back its 2, nothing else.
    z.set_worker(2)
    assert z.reconcile(0) == 2
    assert (z.count(a), z.count(b)) == (0, 1)
    assert z.worker_info(0) == {"pid": 0, "beat": 0.0, "held": 0}
    assert z.reconcile(0) == 0                      # idempotent
    assert z.reconcile(1) == 1 and z.count(b) == 0 and z.counts_used() == 0
    assert z.acquire_py(a, 1) == 1                  # no key stuck


def test_limits_count_every_slot_s_holders():
    z = LimitZone(64, workers=4)
    k = key_hash("k")
    got = []
    for w in range(4):                              # 4 processes, 3 each, limit 10
        z.set_worker(w)
        got += [z.acquire_py(k, 10) for _ in range(3)]
    assert got.count(1) == 10 and got.count(0) == 2 and z.count(k) == 10
    assert sum(z.share(k, w) for w in range(4)) == 10


def test_a_recycled_count_slot_keeps_its_tag_discipline():
    # A count slot at 0 goes to another key; the old key, coming back, gets a slot
    # of its own again (and never two).
    z = LimitZone(16)
    for k in range(1, 17):
        assert z.acquire_py(k, 5) == 1
    z.release_py(5)
    assert z.acquire_py(100, 5) == 1 and z.count_reuses == 1
    assert z.acquire_py(5, 5) == -1
    z.release_py(100)
    assert z.acquire_py(5, 5) == 1 and z.count(5) == 1 and z.count(100) == 0
    assert z.acquire_py(5, 5) == 1 and z.count(5) == 2
    assert z.counts_used() == 16


# ---------------------------------------------------------------- GCRA == token bucket

dyadic_rates = st.sampled_from([0.0625, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0])
dyadic_bursts = st.sampled_from([1.0, 2.0, 4.0, 5.0, 8.0, 32.0])


@settings(max_examples=200)
@given(rate=dyadic_rates, burst=dyadic_bursts, t0=st.integers(0, 64).map(lambda q: q / 4.0),
       steps=st.lists(st.tuples(st.integers(0, 16).map(lambda q: q / 16.0),     # time step
                                st.integers(0, 96).map(lambda q: q / 4.0)),     # cost, > burst too
                      min_size=1, max_size=200))
def test_gcra_take_answers_as_the_token_bucket(rate, burst, t0, steps):
    # One key, constant parameters, time not going backwards, exact (dyadic) values:
    # the zone's GCRA word gives bucket_take's answers, debt above the burst included.
    z = LimitZone(16)
    b = TokenBucket(rate, burst, t0)
    now = t0
    for dt, cost in steps:
        now += dt
        assert z.take_py(7, rate, burst, now, cost) == b.take(now, cost), (now, cost)
        if b.tokens < burst:                        # not full: the zone's word is full_at
            assert z.bucket(7) == b.stamp + (burst - b.tokens) / rate


# ---------------------------------------------------------------- processes

def _fork(fn, *args):
    """A child process running fn(*args), exiting 0 if it returns True."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn(*args) else 1
        finally:
            os._exit(code)
    return pid


def _wait_all(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    codes = {}
    while pids:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                pids.remove(pid)
        if pids and time.monotonic() > deadline:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise AssertionError(f"children still running after {timeout}s: {pids}")
        time.sleep(0.005)
    return codes


def test_a_forked_worker_s_shares_are_its_own():
    z = LimitZone(64, workers=2)
    k = key_hash("k")
    z.acquire_py(k, 10)                              # the parent: slot 0

    def child():
        z.set_worker(1)
        z.beat(5.0)
        return all(z.acquire_py(k, 10) == 1 for _ in range(3))

    pid = _fork(child)
    assert _wait_all([pid]) == {pid: 0}
    assert z.count(k) == 4 and z.share(k, 1) == 3 and z.share(k, 0) == 1
    assert z.worker_info(1) == {"pid": pid, "beat": 5.0, "held": 3}
    assert z.reconcile(1) == 3 and z.count(k) == 1
