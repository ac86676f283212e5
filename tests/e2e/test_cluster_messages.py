"""Issue 13, a client-scoped message-rate-limit shared by three gateway nodes: `messages:
1000/10s`, burst 100, action drop; one client with a connection open on each node (the
`websockets` library) sends on one of them at a time, hopping every 2 s, at 3x the limit. What
the echo backend sends back is what was admitted: over every sliding 10 s window at most
burst + rate x 10 s = 1,100 (zero windows over), and once demand is steady at least 90% of
rate x 10 s = 900.

Three nodes each limiting on its own (no cluster section) admit ~1.5x in the same run (each
node's bucket refills while the client is elsewhere): the check fails them, so it can fail.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets

from clusterlib import (KEYS, backend, cluster_section, max_window, start_nodes,  # noqa: F401
                        wait_learned, window_counts, ws_connect)
from conftest import value
from redislib import RedisServer, command

RATE, BURST, WINDOW = 100.0, 100, 10.0        # 1000/10s
LIMIT = {"policy": "message-rate-limit", "name": "hop", "messages": "1000/10s", "burst": BURST,
         "scope": "client", "action": "drop"}
LEASE = 2.0
HOP, RUN, DEMAND = 2.0, 24.0, 3 * RATE       # hop every 2 s for 24 s at 300 msg/s


async def hopping_client(nodes, key: str, run: float = RUN) -> tuple[list[float], int, float]:
    """One connection per node; send at DEMAND msg/s on one at a time, moving to the next node
    every HOP s, for `run` s. Returns (the echoes' arrival times, relative to the start; the
    messages sent; the time the last was sent)."""
    conns = [await ws_connect(n, key, max_queue=None) for n in nodes]
    arrivals: list[float] = []
    t0 = time.monotonic()

    async def receive(ws) -> None:
        try:
            async for _ in ws:
                arrivals.append(time.monotonic() - t0)
        except websockets.ConnectionClosed:
            pass

    readers = [asyncio.create_task(receive(ws)) for ws in conns]
    sent = 0
    payload = b"x" * 16
    tick = 0.01                               # 3 messages every 10 ms
    per_tick = int(DEMAND * tick)
    i = 0
    try:
        t0 = time.monotonic()
        while (now := time.monotonic() - t0) < run:
            ws = conns[int(now // HOP) % len(conns)]
            for _ in range(per_tick):
                await ws.send(payload)
            sent += per_tick
            i += 1
            await asyncio.sleep(max(0.0, i * tick - (time.monotonic() - t0)))
        t_end = time.monotonic() - t0
        await asyncio.sleep(0.5)              # the last echoes
    finally:
        for ws in conns:
            await ws.close()
        await asyncio.gather(*readers)
    return sorted(arrivals), sent, t_end


def judge(arrivals: list[float], sent: int, t_end: float, label: str) -> tuple[int, int]:
    """(most in a window, least in a steady window); printed."""
    most, at = max_window(arrivals, WINDOW)
    starts = [HOP + 0.25 * k for k in range(int((t_end - WINDOW - HOP) / 0.25) + 1)] or [0.0]
    counts = window_counts(arrivals, starts, WINDOW)
    over = sum(1 for c in window_counts(arrivals, [t for t in arrivals if t <= t_end - WINDOW], WINDOW)
               if c > BURST + RATE * WINDOW)
    print(f"{label}: sent {sent} in {t_end:.1f} s ({sent / t_end:.0f}/s), admitted {len(arrivals)}; "
          f"most in a 10 s window {most} (at {at:.2f} s; bound {BURST + RATE * WINDOW:.0f}), "
          f"{over} windows over; steady windows (start {starts[0]:.2f}..{starts[-1]:.2f} s) "
          f"least {min(counts)}, most {max(counts)} (floor {0.9 * RATE * WINDOW:.0f})")
    return most, min(counts)


@pytest.fixture(scope="module")
def redis_module():
    """One redis-server for the module (its learning after the start waited for once)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis(redis_module):
    command(redis_module.port, "FLUSHALL")
    return redis_module


async def test_client_hopping_nodes_at_3x_stays_within_burst_plus_rate_in_every_10s_window(
        start_nodes, backend, redis):
    nodes = start_nodes(3, cluster=cluster_section(redis.url, lease="2s", refresh="200ms"),
                        request=[LIMIT])
    await wait_learned([redis.port], LEASE)
    arrivals, sent, t_end = await hopping_client(nodes, KEYS["alice"])
    most, least = judge(arrivals, sent, t_end, "cluster")
    limited = sum(value(n.metrics(), "fastgw_messages_limited_total", api="chat", direction="request",
                        action="drop") for n in nodes)
    print(f"fastgw_messages_limited_total summed over the nodes: {limited:.0f} "
          f"(sent - admitted = {sent - len(arrivals)})")
    assert most <= BURST + RATE * WINDOW, f"{most} admitted in a 10 s window"
    assert least >= 0.9 * RATE * WINDOW, f"only {least} admitted in a steady 10 s window"


async def test_without_the_cluster_the_same_client_gets_more_than_the_bound(start_nodes, backend):
    """The check above can fail: three nodes each limiting on its own admit more."""
    nodes = start_nodes(3, request=[LIMIT])
    arrivals, sent, t_end = await hopping_client(nodes, KEYS["alice"], run=10.5)
    most, _ = judge(arrivals, sent, t_end, "per node")
    assert most > BURST + RATE * WINDOW


ROOMY = {"policy": "message-rate-limit", "name": "roomy", "messages": "100000/1s", "burst": 10000,
         "scope": "client", "action": "drop"}


@pytest.mark.xfail(strict=True, reason=(
    "a fresh key's first node takes the whole limit: a client opening a connection on node a, "
    "then at once one on node b, under a client-scoped message-rate-limit of 100000/1s (burst "
    "10000, drop), sending 100 msg/s (0.1% of it) on b: b's share is 0 at first (/cluster: "
    "0.0 on b, 100000.0 on a) and b drops its first messages until a reports its measured "
    "demand: at main 53dc1b1 5 of 97 dropped, the first echo 0.05 s in (one refresh / 10); "
    "before f346e36 0.39-0.47 s of drops (about one refresh)"))
async def test_a_client_s_second_node_admits_its_first_messages_under_a_roomy_limit(
        start_nodes, backend, redis):
    nodes = start_nodes(2, cluster=cluster_section(redis.url, lease="2s", refresh="500ms"),
                        request=[ROOMY])
    await wait_learned([redis.port], LEASE)
    on_a = await ws_connect(nodes[0], KEYS["bob"])
    on_b = await ws_connect(nodes[1], KEYS["bob"])
    echoed: list[float] = []
    t0 = time.monotonic()

    async def receive() -> None:
        async for _ in on_b:
            echoed.append(time.monotonic() - t0)

    reader = asyncio.create_task(receive())
    sent = 0
    try:
        while time.monotonic() - t0 < 1.0:
            await on_b.send(b"m")
            sent += 1
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        shares = [[s["share"] for s in n.cluster()["shares"]] for n in nodes]
    finally:
        await on_a.close()
        await on_b.close()
        await reader
    print(f"second node: {sent} sent over 1 s at 100/s, {len(echoed)} echoed, the first at "
          f"{echoed[0] if echoed else float('nan'):.2f} s; shares (a, b) {shares}")
    assert len(echoed) == sent, f"{sent - len(echoed)} of {sent} dropped"
