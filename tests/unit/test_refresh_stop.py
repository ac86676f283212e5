"""Refresher.stop ends its rounds even when the store's client swallows a cancellation (turns
it into an error of its own, as a client library may): it is cancelled again, and its loop
ends at the next turn; a task that never ends is left after the bound, with a warning."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fastgw.cluster.lease import LeaseBook
from fastgw.cluster.refresh import Refresher, cancel_and_wait
from fastgw.cluster.store import StoreConnectionError

KEY = "c|api|id|alice"


class SwallowingStore:
    """A store whose run waits for an answer that never comes and converts the first
    `swallow` cancellations into a connection error (redis-py's shape of the bug)."""

    def __init__(self, swallow: int):
        self.swallow = swallow
        self.runs = 0
        self.swallowed = 0

    async def run(self, script, calls):
        self.runs += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.swallowed < self.swallow:
                self.swallowed += 1
                raise StoreConnectionError("connection error from the store: CancelledError")
            raise
        return []


def refresher(store) -> Refresher:
    book = LeaseBook("edge-0", 0.6)
    book.count(KEY, 10)
    book.want(KEY, 2)
    return Refresher(book, store, refresh=0.01)


@pytest.mark.parametrize("swallow", [1, 3])
async def test_stop_ends_a_round_whose_cancellation_was_swallowed(swallow):
    store = SwallowingStore(swallow)
    r = refresher(store)
    r.start()
    while store.runs == 0:
        await asyncio.sleep(0.005)
    r.soon(KEY)                                 # (in a call already: no extra task)
    await asyncio.wait_for(r.stop(), 2.0)       # the old stop() waited for ever here
    assert store.swallowed >= 1
    runs = store.runs
    await asyncio.sleep(0.05)
    assert store.runs == runs, "no round after stop()"
    r.soon(KEY)
    assert not r._extra, "no renewal once stopped"


async def test_a_task_that_never_ends_is_left_after_the_bound(caplog):
    done = []

    async def stubborn():
        while not done:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="fastgw"):
        await asyncio.wait_for(cancel_and_wait([task], wait=0.2), 2.0)
    assert not task.done()
    assert "1 renewal task(s) did not stop" in caplog.text
    done.append(True)
    task.cancel()
    await task
