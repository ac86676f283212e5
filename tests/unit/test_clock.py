"""The simulated clock that the gateway's time-driven tests run on."""

from fastgw.clock import Clock, Deadlines, SimClock


def test_sim_clock_runs_timers_in_time_order_each_at_its_own_time():
    clock = SimClock(start=10.0)
    seen = []
    clock.call_later(2.0, lambda: seen.append(("b", clock.now())))
    clock.call_later(1.0, lambda: seen.append(("a", clock.now())))
    cancelled = clock.call_later(1.5, lambda: seen.append(("x", clock.now())))
    cancelled.cancel()
    assert clock.pending() == 2
    assert clock.advance(0.5) == 0 and clock.now() == 10.5 and seen == []
    assert clock.advance(5.0) == 2
    assert seen == [("a", 11.0), ("b", 12.0)] and clock.now() == 15.5
    assert clock.pending() == 0


def test_a_timer_set_by_a_timer_runs_in_the_same_advance_when_due():
    clock = SimClock(start=0.0)
    seen = []

    def first():
        seen.append(clock.now())
        clock.call_later(1.0, lambda: seen.append(clock.now()))

    clock.call_later(1.0, first)
    clock.call_later(0.0, lambda: seen.append(-1.0))
    assert clock.advance(2.0) == 3
    assert seen == [-1.0, 1.0, 2.0]


def test_wall_time_moves_with_simulated_time():
    clock = SimClock(start=5.0, wall_start=1_000.0)
    clock.advance(3.0)
    assert clock.wall() == 1_003.0


async def test_the_real_clock_is_monotonic_time_and_the_loops_timers():
    import asyncio
    import time
    clock = Clock()
    before = time.monotonic()
    assert before <= clock.now() <= time.monotonic()
    done = asyncio.get_running_loop().create_future()
    clock.call_later(0.01, done.set_result, "ran")
    assert await asyncio.wait_for(done, 2) == "ran"


def test_deadlines_fire_in_order_once_each_and_not_when_cancelled():
    clock = SimClock()
    deadlines = Deadlines(clock, 10.0)
    fired = []
    deadlines.call_later(lambda: fired.append("a"))
    clock.advance(3)
    b = deadlines.call_later(lambda: fired.append("b"))
    clock.advance(3)
    deadlines.call_later(lambda: fired.append("c"))
    b.cancel()
    assert clock.pending() == 1                   # one clock timer for the three
    clock.advance(3.9)
    assert fired == []
    clock.advance(0.1)                            # t+10: a
    assert fired == ["a"]
    clock.advance(3)                              # t+13: b, cancelled
    assert fired == ["a"]
    clock.advance(2.9)
    assert fired == ["a"]
    clock.advance(0.1)                            # t+16: c
    assert fired == ["a", "c"] and len(deadlines) == 0 and clock.pending() == 0
    # a callback that sets another deadline; one that raises does not stop the others
    deadlines.call_later(lambda: deadlines.call_later(lambda: fired.append("e")))
    deadlines.call_later(lambda: 1 / 0)
    deadlines.call_later(lambda: fired.append("d"))
    clock.advance(10)
    assert fired == ["a", "c", "d"] and len(deadlines) == 1
    clock.advance(10)
    assert fired == ["a", "c", "d", "e"] and clock.pending() == 0
    deadlines.call_later(lambda: fired.append("never"))
    deadlines.cancel()
    clock.advance(20)
    assert fired[-1] == "e" and clock.pending() == 0
