"""A node's refresh task (fastgw.cluster.refresh) over the real Store and a real redis-server:
three nodes' Refreshers share one count limit by demand, never holding more than the limit
between them; a Redis stopped and restarted empty is ridden through; `soon` renews at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastgw.cluster.lease import LeaseBook
from fastgw.cluster.refresh import Refresher
from fastgw.cluster.store import Store
from redislib import RedisServer

KEY = "c|api|id|alice"
LEASE = 0.6


@pytest.fixture
def server():
    with RedisServer() as s:
        yield s


async def nodes(server, demands, refresh=0.1, hold=False):
    out = []
    for i, demand in enumerate(demands):
        book = LeaseBook(f"edge-{i}", LEASE, hold=hold)
        book.count(KEY, 10)
        book.want(KEY, demand)
        store = Store.from_config(url=server.url, timeout=0.05)
        out.append(Refresher(book, store, refresh))
    return out


def shares(refreshers) -> list[int]:
    now = time.monotonic()
    return [int(r.book.share(KEY, now)) for r in refreshers]


async def until(refreshers, predicate, timeout: float) -> list[int]:
    """Sample the shares every 10 ms until `predicate` holds; the sum never over 10."""
    deadline = time.monotonic() + timeout
    while True:
        s = shares(refreshers)
        assert sum(s) <= 10, s
        if predicate(s):
            return s
        assert time.monotonic() < deadline, f"shares {s}"
        await asyncio.sleep(0.01)


async def stop_all(refreshers):
    for r in refreshers:
        await r.stop()
        await r.store.close()


async def test_three_nodes_share_a_count_by_demand_and_ride_through_a_restart(server):
    rs = await nodes(server, [2, 5, 9])
    try:
        for r in rs:
            r.start()
        # A fresh Redis learns for a lease (and up to two seconds of its uptime) before any growth.
        assert await until(rs, lambda s: s == [2, 4, 4], 5.0) == [2, 4, 4]
        assert all(r.rounds > 0 and not r.down for r in rs)
        server.stop()
        await until(rs, lambda s: all(r.down for r in rs), 2.0)
        assert all(r.failed > 0 for r in rs)
        # Without hold the shares end with their lease; the sum stays within the limit.
        assert await until(rs, lambda s: s == [0, 0, 0], LEASE + 1.0) == [0, 0, 0]
        server.start()           # empty
        assert await until(rs, lambda s: s == [2, 4, 4], 6.0) == [2, 4, 4]
        assert not any(r.down for r in rs)
    finally:
        await stop_all(rs)


async def test_hold_keeps_the_last_shares_while_redis_is_gone(server):
    rs = await nodes(server, [3, 3, 3], hold=True)
    try:
        for r in rs:
            r.start()
        await until(rs, lambda s: s == [3, 3, 3], 5.0)
        server.stop()
        await asyncio.sleep(LEASE * 2)
        assert shares(rs) == [3, 3, 3]
    finally:
        await stop_all(rs)


async def test_soon_renews_a_key_before_the_next_round(server):
    (r,) = await nodes(server, [4])
    try:
        r.start()
        await until([r], lambda s: s == [4], 5.0)    # past the fresh Redis's learning
        r.refresh = 30.0                             # the next sleep is 30 s: no round
        await asyncio.sleep(0.3)
        rounds = r.rounds
        await asyncio.sleep(0.3)
        assert r.rounds == rounds
        r.book.want(KEY, 7)
        began = time.monotonic()
        r.soon(KEY)
        await until([r], lambda s: s == [7], 1.0)
        assert time.monotonic() - began < 1.0
    finally:
        await stop_all([r])
