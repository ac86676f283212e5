"""A node's refresh task: its LeaseBook's calls run through the Store every `refresh`.

    refresher = Refresher(book, store, refresh=0.5)
    refresher.start()                 # on the running loop
    refresher.soon("client:42")       # a key that needs more than its share: renewed now
    await refresher.stop()

Each round is one pipelined run of the lease script for every key the book holds or wants
(`LeaseBook.requests`); the replies are applied at once, and the keys whose share fell are
renewed again at once (that renewal is what lets Redis hand the released share on). A key
is never in two calls at a time (the book applies only the reply to a key's latest call).
A failed round (the Store's time-out, its breaker open, Redis gone) changes nothing: the
book keeps what it applied (fastgw.cluster.lease, N3); the first failure and the recovery
are logged once each, never a key. Nothing here runs on the frame path or per upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from fastgw.cluster.lease import SCRIPT, LeaseBook
from fastgw.cluster.store import Store, StoreError

log = logging.getLogger("fastgw")

STOP_WAIT = 5.0                          # seconds stop() waits for the rounds to end


class Refresher:
    """Renews the shares of one node (`book`) through `store`."""

    def __init__(self, book: LeaseBook, store: Store, refresh: float,
                 now: Callable[[], float] = time.monotonic):
        self.book = book
        self.store = store
        self.refresh = float(refresh)
        self.now = now
        self.on_applied: Callable[[], None] | None = None   # after each applied round
        # Around every round: before(keys) before its calls are made (the demands), after(keys,
        # ok) once it ended, answered or not (keys: the set asked for).
        self.before: Callable[[set[str]], None] | None = None
        self.after: Callable[[set[str], bool], None] | None = None
        self.rounds = 0                 # runs that got an answer
        self.failed = 0                 # runs that did not
        self.renewals = 0               # calls answered
        self.down = False               # the last run failed
        self.down_since = 0.0           # when the failures in a row began (self.now())
        self._inflight: set[str] = set()
        self._task: asyncio.Task | None = None
        self._extra: set[asyncio.Task] = set()
        self._stopping = False

    async def renew(self, keys: Iterable[str] | None = None) -> bool:
        """One round for `keys` (default: every key not in a call already); the keys whose
        share fell are renewed once more at once. False when the run failed."""
        wanted = set(self.book.keys if keys is None else keys) - self._inflight
        ok = await self._round(wanted)
        return ok

    async def _round(self, keys: set[str]) -> bool:
        told = [False]
        ok = False
        try:
            ok = await self._run_round(keys, told)
        finally:
            if self.after is not None and not told[0]:
                self.after(keys, ok)
        return ok

    async def _run_round(self, keys: set[str], told: list) -> bool:
        if self.before is not None:
            self.before(keys)
        calls = self.book.requests(self.now(), keys)
        if not calls:
            return True
        names = {c.key for c in calls}
        self._inflight |= names
        try:
            results = await self.store.run(SCRIPT, calls)
        except StoreError as exc:
            self.failed += 1
            if not self.down:
                self.down = True
                self.down_since = self.now()
                log.warning("cluster: the store did not answer a renewal (%s); the shares in"
                            " force are kept", exc)
            return False
        finally:
            self._inflight -= names
        if self.down:
            self.down = False
            log.warning("cluster: the store answers again (%d renewals had failed)", self.failed)
        self.rounds += 1
        self.renewals += len(calls)
        fell = self.book.apply(calls, results)
        if self.on_applied is not None:
            self.on_applied()
        if self.after is not None:          # the shares in force before the releases' renewal
            told[0] = True
            self.after(keys, True)
        if fell:
            return await self._round(set(fell) - self._inflight)
        return True

    def soon(self, key: str) -> None:
        """Renew `key` now, not at the next round (a demand beyond its share)."""
        if self._stopping or key in self._inflight or key not in self.book.keys:
            return
        task = asyncio.get_running_loop().create_task(self._round({key}))
        self._extra.add(task)
        task.add_done_callback(self._extra.discard)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:        # (a cancellation that a library swallowed ends it too)
            began = loop.time()
            try:
                await self.renew()
            except Exception:            # a bug must not end the renewals
                log.exception("cluster: a renewal round failed")
            await asyncio.sleep(max(0.0, self.refresh - (loop.time() - began)))

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the rounds and wait for them to end: a task that swallowed its cancellation
        (inside a client library) is cancelled again; after `STOP_WAIT` seconds it is left."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._extra) if t is not None]
        self._task = None
        await cancel_and_wait(tasks)


async def cancel_and_wait(tasks: Iterable[asyncio.Task], wait: float = STOP_WAIT) -> None:
    """Cancel `tasks` and wait until they ended, cancelling again those that swallowed it
    (redis-py may); after `wait` seconds the rest is left running, with a warning."""
    pending = set(tasks)
    deadline = asyncio.get_running_loop().time() + wait
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
        if pending and asyncio.get_running_loop().time() >= deadline:
            log.warning("cluster: %d renewal task(s) did not stop", len(pending))
            return
