"""The gateway's one source of time: what it is now, and timers.

Everything that reads time or sets a timer (the core's delay queue and close
timer, idle and lifetime limits, JWT expiry, the handshake timeout, the limit
buckets' ``now``) goes through one ``Clock`` that the gateway is given, so a
test can replace it with a ``SimClock`` and move time by hand instead of
sleeping.

``now()`` is CLOCK_MONOTONIC in seconds (``time.monotonic``), the clock the
core reads in C when it is given the real ``Clock``; timers are the event
loop's. A ``SimClock`` starts at a fixed time and only moves in ``advance``,
which runs the timers that fall due, in time order, each at its own time.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from typing import Any, Callable

_log = logging.getLogger("fastgw")


class Clock:
    """Real time: ``time.monotonic`` and the event loop's timers."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # The functions themselves, not methods that call them: read several times per upgrade.
    now = staticmethod(time.monotonic)
    # Seconds since the epoch (for JWT ``exp``/``nbf``, which are wall-clock times).
    wall = staticmethod(time.time)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any):
        """Run ``callback(*args)`` after ``delay`` seconds; returns a handle with ``cancel()``."""
        return self.loop.call_later(delay, callback, *args)


class SimTimer:
    """A SimClock timer: ``cancel()`` as an asyncio handle has it."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple):
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def when_due(self) -> float:
        return self.when


class SimClock(Clock):
    """Simulated time for tests: nothing moves until ``advance``."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1_800_000_000.0):
        super().__init__(None)
        self.t = float(start)
        self._wall_offset = float(wall_start) - self.t
        self._timers: list[tuple[float, int, SimTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self._wall_offset

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> SimTimer:
        timer = SimTimer(self.t + max(0.0, float(delay)), callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def pending(self) -> int:
        """Timers set and neither run nor cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> int:
        """Move time forward, running each timer that falls due at its own time.

        Returns how many timers ran. Timers that a callback sets inside the
        window run in the same call when they fall due.
        """
        end = self.t + float(seconds)
        ran = 0
        while self._timers and self._timers[0][0] <= end:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.t = max(self.t, when)
            timer.cancelled = True
            timer.callback(*timer.args)
            ran += 1
        self.t = end
        return ran


class Deadline:
    """One entry of a Deadlines list: ``cancel()`` as a timer handle has it."""

    __slots__ = ("when", "callback")

    def __init__(self, when: float, callback: Callable[[], Any]):
        self.when, self.callback = when, callback

    def cancel(self) -> None:
        self.callback = None            # what it would call is released now, not at `when`


class Deadlines:
    """Deadlines a fixed ``delay`` after they are set (the handshake timeout of every
    connection), on a Clock: set in time order, they come due in that order, so they are a
    FIFO with one clock timer for the earliest instead of an event-loop timer each (a timer
    handle and a libuv timer to make and cancel per connection). A cancelled entry stays,
    small and empty, until its time comes. Another delay (a reload) is another Deadlines."""

    def __init__(self, clock: Clock, delay: float):
        self.clock = clock
        self.delay = float(delay)
        self._queue: collections.deque[Deadline] = collections.deque()
        self._timer = None

    def __len__(self) -> int:
        return len(self._queue)

    def call_later(self, callback: Callable[[], Any]) -> Deadline:
        """Run ``callback()`` ``delay`` seconds from now, unless cancelled first."""
        entry = Deadline(self.clock.now() + self.delay, callback)
        self._queue.append(entry)
        if self._timer is None:
            self._timer = self.clock.call_later(self.delay, self._due)
        return entry

    def _due(self) -> None:
        self._timer = None
        queue, now = self._queue, self.clock.now()
        while queue and queue[0].when <= now:
            callback = queue.popleft().callback
            if callback is not None:
                try:
                    callback()
                except Exception:   # as the loop does for a timer: logged, the others run
                    _log.exception("deadline callback %r failed", callback)
        while queue and queue[0].callback is None:      # nothing to wake up for
            queue.popleft()
        if queue and self._timer is None:               # (a callback may have armed it)
            self._timer = self.clock.call_later(queue[0].when - now, self._due)

    def cancel(self) -> None:
        """Drop every entry (the gateway's shutdown)."""
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
