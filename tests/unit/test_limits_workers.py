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


# The steps at which _zone_crash_at() makes a process SIGKILL itself (limits.pxi).
BEFORE_CAS, AFTER_CAS, AFTER_SHARE, LOCKED, RESERVED, CLAIMED = 1, 2, 3, 4, 5, 6


@pytest.mark.parametrize("step, landed", [(BEFORE_CAS, 0), (AFTER_CAS, 1), (AFTER_SHARE, 1)])
def test_killed_inside_an_acquire(step, landed):
    z = LimitZone(64, workers=3)
    k = key_hash("k")
    z.acquire_py(k, 10)                              # the parent: slot 0

    from fastgw._core import _zone_crash_at

    def child():
        z.set_worker(1)
        assert z.acquire_py(k, 10) == 1
        _zone_crash_at(step)
        z.acquire_py(k, 10)
        return False

    pid = _fork(child)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert z.count(k) == 2 + landed and z.share(k, 1) == 1 + (step == AFTER_SHARE)
    assert z.reconcile(1) == 1 + landed              # what it held, the landed +1 included
    assert z.pending_ops == 1
    assert z.count(k) == 1 and z.share(k, 1) == 0
    assert z.reconcile(1) == 0 and z.count(k) == 1


@pytest.mark.parametrize("step, landed", [(BEFORE_CAS, 0), (AFTER_CAS, 1), (AFTER_SHARE, 1)])
def test_killed_inside_a_release(step, landed):
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=3)
    k = key_hash("k")
    z.acquire_py(k, 10)

    def child():
        z.set_worker(2)
        assert z.acquire_py(k, 10) == 1 and z.acquire_py(k, 10) == 1
        _zone_crash_at(step)
        z.release_py(k)
        return False

    pid = _fork(child)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert z.count(k) == 3 - landed
    assert z.reconcile(2) == 2 - landed
    assert z.count(k) == 1 and z.share(k, 0) == 1 and z.share(k, 2) == 0


@pytest.mark.parametrize("step", [AFTER_CAS, AFTER_SHARE])
def test_killed_inside_an_acquire_while_others_hammer_the_key(step):
    # reconcile() needs a quiet snapshot of the key's slot while two live
    # processes keep acquiring and releasing it: it must give back exactly the
    # dead one's 2 (its landed +1 included), never a live one's.
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=4)
    k = key_hash("hot")
    stop = _shared_ints(1)

    def hammer(w):
        z.set_worker(w)
        deadline = time.monotonic() + 10
        held = 0
        while not stop[0] and time.monotonic() < deadline:
            if z.acquire_py(k, 1000) == 1:
                held += 1
            if held > 2:
                z.release_py(k)
                held -= 1
        while held:
            z.release_py(k)
            held -= 1
        return z.share(k, w) == 0

    def victim():
        z.set_worker(3)
        assert z.acquire_py(k, 1000) == 1
        _zone_crash_at(step)
        z.acquire_py(k, 1000)
        return False

    live = [_fork(hammer, w) for w in (1, 2)]
    time.sleep(0.05)                                # they are hammering
    pid = _fork(victim)
    os.waitpid(pid, 0)
    assert z.reconcile(3) == 2
    assert z.pending_ops == 1 and z.unquiet == 0
    stop[0] = 1
    assert set(_wait_all(live).values()) == {0}
    assert z.count(k) == 0


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_reconcile_waits_for_a_live_process_stalled_inside_an_operation():
    # A live process stopped between its CAS and its share on the key (its +1
    # is in the count, not in a share yet), and a dead one killed after its
    # share (nothing pending): reconcile must not take the live one's +1 for
    # the dead one's; it waits until the live one has finished (quiet).
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=4)
    k = key_hash("k")

    def stalled():
        z.set_worker(1)
        _zone_crash_at(AFTER_CAS + 10)              # SIGSTOP there, once
        return z.acquire_py(k, 10) == 1 and z.share(k, 1) == 1

    def victim():
        z.set_worker(2)
        assert z.acquire_py(k, 10) == 1
        _zone_crash_at(AFTER_SHARE)
        z.acquire_py(k, 10)
        return False

    live = _fork(stalled)
    deadline = time.monotonic() + 5
    while _state(live) != "T":
        assert time.monotonic() < deadline
        time.sleep(0.001)
    dead = _fork(victim)
    os.waitpid(dead, 0)
    assert z.count(k) == 3 and z.share(k, 1) == 0   # the stalled +1 has no share yet

    def wake():
        time.sleep(0.2)
        os.kill(live, signal.SIGCONT)
        return True

    waker = _fork(wake)
    t = time.monotonic()
    assert z.reconcile(2) == 2                      # not 3
    assert time.monotonic() - t >= 0.15             # it waited for the stalled one
    assert z.pending_ops == 1 and z.unquiet == 0
    assert _wait_all([live, waker]) == {live: 0, waker: 0}
    assert z.count(k) == 1 and z.share(k, 1) == 1


def test_a_lock_held_by_a_dead_process_is_taken_over():
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=2)

    def child():
        z.set_worker(1)
        _zone_crash_at(LOCKED)
        z.acquire_py(key_hash("new"), 5)            # an insert: killed holding the lock
        return False

    pid = _fork(child)
    os.waitpid(pid, 0)                               # reaped: kill(pid, 0) says it is gone
    t = time.monotonic()
    assert z.acquire_py(key_hash("other"), 5) == 1   # waits ~100 us, then takes the lock
    assert z.take_py(key_hash("b"), 1.0, 1.0, 0.0) == 0.0
    assert time.monotonic() - t < 0.5
    assert z.lock_steals == 1 and z.lock_timeouts == 0
    assert z.count(key_hash("new")) == 0


def test_reconcile_frees_the_lock_of_its_dead_process():
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=2)

    def child():
        z.set_worker(1)
        _zone_crash_at(LOCKED)
        z.take_py(key_hash("new"), 1.0, 1.0, 0.0)
        return False

    pid = _fork(child)
    os.waitpid(pid, 0)
    assert z.reconcile(1) == 0
    assert z.acquire_py(key_hash("other"), 5) == 1 and z.lock_steals == 0


def test_a_zombie_holding_the_lock_makes_waiters_give_up_not_hang():
    from fastgw._core import _zone_crash_at
    z = LimitZone(64, workers=2)

    def child():
        z.set_worker(1)
        _zone_crash_at(LOCKED)
        z.acquire_py(key_hash("new"), 5)
        return False

    pid = _fork(child)
    deadline = time.monotonic() + 5                 # until it died holding the lock
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.001)
    t = time.monotonic()
    assert z.acquire_py(key_hash("other"), 5) == -1        # not reaped: still "alive"
    assert z.take_py(key_hash("b"), 1.0, 1.0, 0.0) == -1.0
    assert time.monotonic() - t < 0.5
    assert z.lock_timeouts == 2 and z.count_overflows == 1 and z.overflows == 1
    os.waitpid(pid, 0)
    assert z.reconcile(1) == 0
    assert z.acquire_py(key_hash("other"), 5) == 1


def _idle_table(z, now):
    """Fill a 16-slot zone's buckets with keys 1..16, all idle from t = 1."""
    for k in range(1, 17):
        assert z.take_py(k, 1.0, 1.0, 0.0) == 0.0
    assert z.buckets_used(now) == 0


@pytest.mark.parametrize("repair", ["reconcile", "steal"])
def test_killed_while_re_keying_a_bucket(repair):
    from fastgw._core import _zone_crash_at
    z = LimitZone(16, workers=2)
    _idle_table(z, 5.0)

    def child():
        z.set_worker(1)
        _zone_crash_at(RESERVED)
        z.take_py(100, 1.0, 1.0, 5.0)               # evicts key 1 (idle the longest: a tie)
        return False

    pid = _fork(child)
    os.waitpid(pid, 0)
    if repair == "reconcile":
        assert z.reconcile(1) == 0
    # The slot went to key 100, idle: the dead re-keyer admitted nothing.
    assert z.take_py(100, 1.0, 1.0, 5.0) == 0.0
    assert z.take_py(100, 1.0, 1.0, 5.0) > 0.0
    assert z.lock_steals == (repair == "steal")
    assert sum(z.bucket(k) is not None for k in range(1, 17)) == 15
    assert z.overflows == 0 and z.buckets_used(5.0) == 1


def test_killed_between_claiming_a_count_slot_and_storing_its_key():
    from fastgw._core import _zone_crash_at
    z = LimitZone(16, workers=2)
    k = key_hash("k")

    def child():
        z.set_worker(1)
        _zone_crash_at(CLAIMED)
        z.acquire_py(k, 5)
        return False

    pid = _fork(child)
    os.waitpid(pid, 0)
    assert z.reconcile(1) == 0
    assert z.count(k) == 0
    assert [z.acquire_py(k, 2) for _ in range(3)] == [1, 1, 0]   # one slot, the limit holds
    assert z.counts_used() == 1
    for j in range(100):                            # the half-claimed slot is reusable
        if z.acquire_py(key_hash(f"x{j}"), 1) == -1:
            break
    assert z.counts_used() == 16


# ---------------------------------------------------------------- processes, concurrently

def _shared_ints(n):
    """n int32 in anonymous shared memory (each child writes its own)."""
    import mmap
    return memoryview(mmap.mmap(-1, 4 * n)).cast("i")


def _wait_for(flags, i, timeout=10.0):
    """In a child: spin until the parent sets flags[i] (a start line)."""
    deadline = time.monotonic() + timeout
    while not flags[i]:
        if time.monotonic() > deadline:
            os._exit(3)


def _sample_counts(z, keys, limits, pids, deadline):
    """Sample the counts while the children run; return the highest seen per key."""
    top = {k: 0 for k in keys}
    samples = 0
    codes = {}
    while pids and time.monotonic() < deadline:
        for k, limit in zip(keys, limits):
            c = z.count(k)
            assert c <= limit, (k, c, limit)
            top[k] = max(top[k], c)
        samples += 1
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                pids.remove(pid)
    codes.update(_wait_all(pids, timeout=1.0))
    assert samples > 10
    return top, codes


def test_processes_hammering_counts_never_exceed_the_limit_and_end_exact():
    n, seconds = 4, 1.0
    z = LimitZone(16, workers=n)                    # 16 slots, 24 keys: slots change keys
    keys = [key_hash(f"c{i}") for i in range(24)]
    limits = [10, 10] + [3] * 22
    held = _shared_ints(n * len(keys))              # what each child holds at its end

    def child(w):
        z.set_worker(w)
        rng = random.Random(w)
        mine = [0] * len(keys)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            i = rng.randrange(len(keys)) if rng.random() < 0.3 else rng.randrange(2)
            if mine[i] and rng.random() < 0.5:
                z.release_py(keys[i])
                mine[i] -= 1
            elif z.acquire_py(keys[i], limits[i]) == 1:
                mine[i] += 1
        for i in range(len(keys)):                  # keep a few, give the rest back
            while mine[i] > (i == w % 2):
                z.release_py(keys[i])
                mine[i] -= 1
            held[w * len(keys) + i] = mine[i]
        return True

    pids = [_fork(child, w) for w in range(n)]
    top, codes = _sample_counts(z, keys, limits, pids, time.monotonic() + 20)
    assert set(codes.values()) == {0}
    assert top[keys[0]] == 10 and top[keys[1]] == 10        # the limit was reached
    for i, k in enumerate(keys):
        shares = [z.share(k, w) for w in range(n)]
        assert shares == [held[w * len(keys) + i] for w in range(n)]
        assert z.count(k) == sum(shares)
    total = sum(held[j] for j in range(n * len(keys)))
    assert 0 < total <= 4 and z.counts_used() == sum(z.count(k) > 0 for k in keys[:2])
    assert sum(z.reconcile(w) for w in range(n)) == total
    assert z.counts_used() == 0 and z.lock_timeouts == 0


def test_processes_taking_at_one_now_admit_exactly_the_burst():
    n = 4
    z = LimitZone(16, workers=n)
    keys = list(range(1, 13))                       # 12 keys, inserted concurrently
    admitted = _shared_ints(n * 2 * len(keys))
    go = _shared_ints(2)

    def child(w, phase, now):
        z.set_worker(w)
        ks = keys if phase == 0 else [k + 100 for k in keys]   # phase 1: re-keying idle slots
        got = [0] * len(ks)
        _wait_for(go, phase)
        for r in range(3000 // len(ks) + 1):
            for i in range(len(ks)):
                i = (i + r + w) % len(ks)
                if z.take_py(ks[i], 2.0, 5.0, now) == 0.0:
                    got[i] += 1
        for i in range(len(ks)):
            admitted[(phase * n + w) * len(keys) + i] = got[i]
        return True

    for phase, now in ((0, 100.0), (1, 1000.0)):
        pids = [_fork(child, w, phase, now) for w in range(n)]
        go[phase] = 1                               # all start together
        assert set(_wait_all(pids).values()) == {0}
        for i in range(len(keys)):
            assert sum(admitted[(phase * n + w) * len(keys) + i] for w in range(n)) == 5, (phase, i)
    assert z.overflows == 0 and z.bucket_reuses == 8     # and 4 never-used slots claimed
    # Time moves on: exactly rate * elapsed more (2.5 s at 2/s: 5), again from 4 processes.
    key = keys[0] + 100

    def later(w):
        return sum(z.take_py(key, 2.0, 5.0, 1002.5) == 0.0 for _ in range(1000))

    pids = [_fork(lambda w: os._exit(later(w)), w) for w in range(n)]
    assert sum(_wait_all(pids).values()) == 5


def test_sigkill_churn_leaves_every_count_exact():
    n, kills = 3, 50
    z = LimitZone(16, workers=2 * n)
    keys = [key_hash("hot"), key_hash("warm")] + [key_hash(f"k{i}") for i in range(20)]
    limits = [10, 10] + [2] * 20
    rng = random.Random(11)

    def worker(slot):
        z.set_worker(slot)
        r = random.Random(slot * 7919 + os.getpid())
        mine = [0] * len(keys)
        t = 0.0
        while True:
            i = r.randrange(len(keys)) if r.random() < 0.2 else r.randrange(2)
            if mine[i] and r.random() < 0.5:
                z.release_py(keys[i])
                mine[i] -= 1
            elif z.acquire_py(keys[i], limits[i]) == 1:
                mine[i] += 1
            t += 0.001
            z.take_py(keys[i] + 1, 1.0, 2.0, t)

    # Slots 0..2 and 3..5: a replaced process takes the other slot of its pair
    # (as the supervisor's rolling restarts do), after reconcile of the dead one.
    live = {}
    for w in range(n):
        live[w] = _fork(worker, w)
    deadline = time.monotonic() + 30
    for _ in range(kills):
        assert time.monotonic() < deadline
        end = time.monotonic() + rng.uniform(0.002, 0.03)
        while time.monotonic() < end:               # sample while they run
            for k, limit in zip(keys, limits):
                assert z.count(k) <= limit
        slot = rng.choice(list(live))
        pid = live.pop(slot)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        z.reconcile(slot)
        assert z.worker_info(slot) == {"pid": 0, "beat": 0.0, "held": 0}
        new = (slot + n) % (2 * n)
        live[new] = _fork(worker, new)
    for slot, pid in live.items():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        z.reconcile(slot)
    for k in keys:
        assert z.count(k) == 0
    assert z.counts_used() == 0
    assert all(z.worker_info(w)["held"] == 0 for w in range(2 * n))
    assert [z.acquire_py(keys[0], 10) for _ in range(11)].count(1) == 10   # no key stuck
    assert z.acquire_py(key_hash("fresh"), 1) == 1
    assert z.unquiet == 0
    print(f"churn: {kills} kills, {z.pending_ops} inside an operation, "
          f"{z.lock_steals} lock steals")
