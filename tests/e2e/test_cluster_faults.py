"""Issue 13, faults of the shared store: three `fastgw run` nodes sharing a client's count-limit
(max 10) through a real redis-server that is stopped mid-test and restarted empty, or made
slow by a delaying TCP proxy (tests/redislib.py DelayProxy, +200 ms each way).

- hold: an already-known client's upgrades do not wait on Redis (their p99 unchanged), the
  nodes admit within their last shares (a new key: limit / nodes), fastgw_cluster_errors_total
  grows; after the restart the nodes are back within two refreshes and the limit holds (never
  more than 10 at the backend), the whole limit usable again once Redis has learnt.
- open: each node applies the whole limit on its own.
- closed: 503 "the cluster store is unreachable" (just after the stop, a new key's failed first
  renewal may be 503 "did not answer in time": slowness); messages under a cluster-wide
  message-rate-limit are over it (its action, drop, applies).
- Redis behind +200 ms: upgrade and message latency unchanged.

"Unchanged" is p99(during) <= max(1.2 x p99(before), p99(before) + A) with A = 10 ms for
upgrades and 5 ms for messages: on loopback the p99s before are a few ms (upgrades: the dial
of the backend included) or a fraction of one (messages), where 20% is scheduler noise on a
small VM; a wait on Redis costs at least the store's timeout (50 ms), 5x A, so the floor still
catches it. Each test prints its figures (run with -s).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from clusterlib import (KEYS, EchoProbe, UpgradeProbe, attempts_spread, backend, close_all,  # noqa: F401
                        cluster_section, count_limit, errors_by_kind, errors_total, hold_open, start_nodes, statuses,
                        retry_until_admitted, unchanged, upgrade, wait_learned)
from redislib import delay_proxy, redis_server  # noqa: F401

LEASE, REFRESH = 2.0, 0.5
CLUSTER = dict(lease="2s", refresh="500ms", timeout="50ms")
MAX = 10
UPGRADE_FLOOR, MESSAGE_FLOOR = 0.010, 0.005
UNREACHABLE, SLOW = b"the cluster store is unreachable", b"the cluster store did not answer in time"
ROOMY = {"policy": "message-rate-limit", "name": "roomy", "messages": "100000/1s", "burst": 10000,
         "scope": "client", "action": "drop"}


async def admitted_per_node(nodes, key: str, per_node: int) -> tuple[list[int], list]:
    """per_node attempts on every node at once: the 101s per node, and the attempts."""
    attempts = await attempts_spread([n.port for n in nodes], per_node * len(nodes), key)
    return [sum(1 for a in attempts if a.node == i and a.status == 101) for i in range(len(nodes))], attempts


async def test_hold_redis_stopped_then_restarted_empty(start_nodes, backend, redis_server):
    nodes = start_nodes(3, cluster=cluster_section(redis_server.url, **CLUSTER, on_unreachable="hold"),
                        pre=[count_limit(MAX)])
    await wait_learned([redis_server.port], LEASE)
    alice = KEYS["alice"]
    held = []
    for i, node in enumerate(nodes):          # 3 on each node: 9 of alice's 10
        held += await hold_open(node.port, alice, 3, node=i)
    # dave, already known on every node (one connection each; its share has a spare slot):
    # the probe's upgrades, one at a time, fit in it.
    for i, node in enumerate(nodes):
        held += await hold_open(node.port, KEYS["dave"], 1, node=i)
    probe = UpgradeProbe(nodes, KEYS["dave"]).start()
    base = 3                                  # dave's at the backend while the probe pauses
    extra: list = []
    try:
        await asyncio.sleep(2.0)
        errors_before = [errors_total(n) for n in nodes]
        probe.phase = "down"
        t_down = time.monotonic()
        redis_server.stop()
        await asyncio.sleep(LEASE + 0.5)          # the shares' leases are over: hold keeps them
        down = [n.cluster() for n in nodes]
        errors_down = [errors_total(n) for n in nodes]
        kinds_down = [errors_by_kind(n) for n in nodes]
        # The shares of alice's key (the count entries with 3 in use) that hold keeps: the last
        # ones granted before the stop. Read after it, since the spare slot (the 10th) moves
        # between the nodes at every renewal while all three want one more.
        last = []
        for d in down:
            mine = [sh for sh in d["shares"] if sh["kind"] == "count" and sh["used"] == 3]
            assert len(mine) == 1, d
            last.append(mine[0]["share"])
        await probe.pause()
        backend.reset_peak()
        got, attempts = await admitted_per_node(nodes, alice, 5)
        extra += [a for a in attempts if a.status == 101]
        s = await backend.wait_live(base + 9 + sum(got))
        new, attempts = await admitted_per_node(nodes, KEYS["carol"], 5)   # a key new to all
        carol = [a for a in attempts if a.status == 101]
        extra += carol
        print(f"hold, Redis down {time.monotonic() - t_down:.1f} s: alice's last shares {last} "
              f"(3 in use on each), 5 more tried on each node: {got} admitted; a new key: {new} "
              f"admitted per node; backend {s}; errors {errors_before} -> {errors_down}; "
              f"/cluster down {[d['down'] for d in down]}, errors {[d['errors'] for d in down]}")
        assert all(d["down"] for d in down), down
        assert all(b < a for b, a in zip(errors_before, errors_down)), (errors_before, errors_down)
        # Redis stopped: its port refuses (kind connection), then the breaker answers (refused).
        assert all(k.get("connection", 0) > 0 for k in kinds_down), kinds_down
        assert all(set(k) == {"timeout", "connection", "script", "cluster", "refused"} for k in kinds_down), kinds_down
        assert all(g <= sh - 3 for g, sh in zip(got, last)), (got, last)
        assert 9 + sum(got) <= MAX and s["peak"] <= base + 9 + sum(got), (got, s)
        assert sum(new) <= MAX and all(n <= MAX // 3 for n in new), new     # limit / nodes
        close_all(carol)
        extra = [a for a in extra if a not in carol]
        await backend.wait_live(base + 9 + sum(got))
        probe.resume()
        await asyncio.sleep(0.5)

        # Restarted empty: the nodes back within two refreshes, the limit in force throughout.
        probe.phase = "after"
        redis_server.start()
        t_up = time.monotonic()
        deadline = t_up + 2 * REFRESH + 2.0
        up_at: list[float | None] = [None] * 3
        while True:
            states = [n.cluster() for n in nodes]
            for i, st in enumerate(states):
                if up_at[i] is None and not st["down"]:
                    up_at[i] = round(time.monotonic() - t_up, 3)
            # Back: no node down, and every share in use (alice's, dave's) valid again.
            if not any(st["down"] for st in states) and all(
                    sh["valid"] for st in states for sh in st["shares"] if sh["used"]):
                back = time.monotonic() - t_up
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
        print(f"not down again at {up_at} s after the start; shares then: "
              f"{[[(sh['share'], sh['used'], sh['valid']) for sh in st['shares']] for st in states]}")
        await probe.pause()
        backend.reset_peak()
        # The limit in force at once: alice, at her 10, is refused on every node.
        live_alice = 9 + sum(got)
        more, attempts = await admitted_per_node(nodes, alice, 4)
        extra += [a for a in attempts if a.status == 101]
        at_once = more
        live_alice += sum(more)
        # Three of hers given back on node a: usable again (Redis learns for a lease first),
        # never more than 10.
        mine_a = [u for u in held if u.node == 0][:3]
        close_all(mine_a)
        held = [u for u in held if u not in mine_a]
        live_alice -= 3
        t_freed = time.monotonic() - t_up
        tries = []
        deadline = t_up + LEASE + 1 + 2 * REFRESH + 1.0
        while live_alice < MAX and time.monotonic() < deadline:
            more, attempts = await admitted_per_node(nodes, alice, 2)
            extra += [a for a in attempts if a.status == 101]
            live_alice += sum(more)
            if sum(more):
                tries.append((round(time.monotonic() - t_up, 2), more))
            await asyncio.sleep(0.1)
        s = await backend.wait_live(base + live_alice)
        probe.resume()
        await asyncio.sleep(0.5)
        before, during = probe.latencies("before"), probe.latencies("down")
        ok, text = unchanged(before, during, UPGRADE_FLOOR)
        print(f"restarted empty: all nodes up, shares valid {back * 1e3:.0f} ms after the start "
              f"(refresh {REFRESH * 1e3:.0f} ms); 4 more of alice on each at once: {at_once}; 3 freed "
              f"at {t_freed:.2f} s, taken again (s after the start, per node) {tries}; alice live "
              f"{live_alice}, backend {s}")
        print(f"probe (dave, an already-known client): before {probe.statuses('before')}, "
              f"down {probe.statuses('down')}, after {probe.statuses('after')}; upgrade {text}")
        assert back <= 2 * REFRESH, f"{back:.2f} s to be back"
        assert at_once == [0, 0, 0] and s["peak"] <= base + MAX, (at_once, s)
        assert live_alice == MAX, (live_alice, tries)
        assert ok, f"upgrades waited while Redis was down: {text}"
    finally:
        await probe.stop()
        close_all(held)
        close_all(extra)
    assert (await backend.wait_live(0))["live"] == 0


async def test_open_each_node_applies_the_whole_limit_on_its_own(start_nodes, backend, redis_server):
    nodes = start_nodes(3, cluster=cluster_section(redis_server.url, **CLUSTER, on_unreachable="open"),
                        pre=[count_limit(MAX)])
    await wait_learned([redis_server.port], LEASE)
    alice = KEYS["alice"]
    backend.reset_peak()
    kept = []
    try:
        # alice known on every node (3, 1, 1), then the rest of her 10 in one go: cluster-wide.
        for i, n in enumerate((3, 1, 1)):
            kept += await hold_open(nodes[i].port, alice, n, node=i)
        got, attempts = await admitted_per_node(nodes, alice, 10)
        kept += [a for a in attempts if a.status == 101]
        s = await backend.wait_live(5 + sum(got))
        print(f"open, Redis up: 10 more tried on each node (5 open): {got} admitted; backend {s}")
        assert 5 + sum(got) <= MAX and s["peak"] <= MAX, (got, s)
        close_all(a for a in attempts if a.status == 101)
        kept = kept[:5]
        assert (await backend.wait_live(5))["live"] == 5
        redis_server.stop()
        await asyncio.sleep(LEASE + 0.5)              # the shares' leases are over
        got, attempts = await admitted_per_node(nodes, alice, 12)
        kept += [a for a in attempts if a.status == 101]
        s = await backend.wait_live(5 + sum(got))
        print(f"open, Redis down: 12 tried on each node (3, 1, 1 already open): {got} admitted, "
              f"{statuses(attempts)}; backend {s}")
        assert got == [MAX - 3, MAX - 1, MAX - 1], got
        assert s["live"] == 3 * MAX
    finally:
        close_all(kept)
    assert (await backend.wait_live(0))["live"] == 0


async def test_closed_refuses_with_503_and_drops_messages(start_nodes, backend, redis_server):
    drop = {**ROOMY, "name": "strict"}
    nodes = start_nodes(3, cluster=cluster_section(redis_server.url, **CLUSTER, on_unreachable="closed"),
                        pre=[count_limit(MAX)], request=[drop])
    await wait_learned([redis_server.port], LEASE)
    alice = KEYS["alice"]
    probe = await EchoProbe(nodes, alice, every=0.01).start()   # alice known on every node
    kept = await hold_open(nodes[0].port, alice, 2)
    try:
        await asyncio.sleep(1.0)
        assert probe.latencies("before")
        redis_server.stop()
        t_down = time.monotonic()
        bob = await upgrade(nodes[1].port, KEYS["bob"])        # a new key, at once
        t_bob = time.monotonic() - t_down
        await asyncio.sleep(LEASE + 0.5)
        probe.phase = "down"
        lost_before = probe.lost
        answers = [await upgrade(n.port, alice) for n in nodes]
        carol = [await upgrade(n.port, KEYS["carol"]) for n in nodes]   # new, the store gone for long
        await asyncio.sleep(1.5)
        lost = probe.lost - lost_before
        echoed = len(probe.latencies("down"))
        await probe.stop()
        print(f"closed: a new key {t_bob * 1e3:.0f} ms after the stop: {bob.status} {bob.body!r}; "
              f"after the lease: alice on each node {[a.status for a in answers]} "
              f"{answers[0].body!r}, a new key {[a.status for a in carol]} {carol[0].body!r}; "
              f"messages on alice's open connections: {echoed} echoed, {lost} not within 1 s; "
              f"errors {[errors_total(n) for n in nodes]}")
        # At once a new key's failed first renewal is slowness (503, "did not answer in time").
        assert bob.status == 503 and (SLOW in bob.body or UNREACHABLE in bob.body), (bob.status, bob.body)
        for u in [*answers, *carol]:
            assert u.status == 503 and UNREACHABLE in u.body, (u.status, u.head, u.body)
        assert echoed == 0 and lost >= 1
        assert all(errors_total(n) > 0 for n in nodes)
    finally:
        await probe.stop()
        close_all(kept)
    assert (await backend.wait_live(0))["live"] == 0


async def test_redis_200ms_slower_leaves_upgrade_and_message_latency_unchanged(
        start_nodes, backend, redis_server, delay_proxy):
    nodes = start_nodes(3, cluster=cluster_section(delay_proxy.url, **CLUSTER, on_unreachable="hold"),
                        pre=[count_limit(MAX)], request=[ROOMY])
    await wait_learned([redis_server.port], LEASE)
    held = []
    for i, node in enumerate(nodes):          # alice busy on every node, dave's upgrades probed
        held += await hold_open(node.port, KEYS["alice"], 2, node=i)
        held += await hold_open(node.port, KEYS["dave"], 1, node=i)   # dave known (a spare slot)
    echo = await EchoProbe(nodes, KEYS["alice"]).start()
    probe = UpgradeProbe(nodes, KEYS["dave"]).start()
    # Not measured: the first second, while the message bucket's shares settle (a fresh key's
    # first node holds all of it for about a refresh: see test_cluster_messages).
    echo.phase = probe.phase = "warm"
    try:
        await asyncio.sleep(1.5)
        echo.phase = probe.phase = "before"
        t_start = time.monotonic()
        await asyncio.sleep(3.0)
        errors_before = [errors_total(n) for n in nodes]
        echo.phase = probe.phase = "slow"
        delay_proxy.delay = 0.2
        t_slow = time.monotonic()
        await asyncio.sleep(3.0)
        errors_slow = [errors_total(n) for n in nodes]
        await probe.stop()
        await echo.stop()
        up_ok, up_text = unchanged(probe.latencies("before"), probe.latencies("slow"), UPGRADE_FLOOR)
        msg_ok, msg_text = unchanged(echo.latencies("before"), echo.latencies("slow"), MESSAGE_FLOOR)
        print(f"Redis +200 ms each way: probe before {probe.statuses('before')}, slow "
              f"{probe.statuses('slow')}; upgrade {up_text}")
        t_slow = t_slow - t_start
        print(f"message round trip {msg_text}; {echo.lost} lost "
              f"{[(p, n, round(t - t_start, 2)) for p, n, t in echo.lost_at]} (1 s after their send) (slow from {t_slow:.2f} s); "
              f"errors {errors_before} -> {errors_slow}")
        assert probe.statuses("slow").get(101), probe.statuses("slow")
        assert not [lost for lost in echo.lost_at if lost[0] != "warm"], echo.lost_at
        assert up_ok, f"upgrades waited on the slow Redis: {up_text}"
        assert msg_ok, f"messages waited on the slow Redis: {msg_text}"
    finally:
        await probe.stop()
        await echo.stop()
        close_all(held)
    delay_proxy.delay = 0.0
    assert (await backend.wait_live(0))["live"] == 0


async def test_open_a_node_that_had_no_key_applies_the_whole_limit_in_an_outage(
        start_nodes, backend, redis_server):
    nodes = start_nodes(2, cluster=cluster_section(redis_server.url, **CLUSTER, on_unreachable="open"),
                        pre=[count_limit(MAX)])
    await wait_learned([redis_server.port], LEASE)
    kept = await hold_open(nodes[0].port, KEYS["alice"], 1)      # node a has a key, b none
    try:
        redis_server.stop()
        await asyncio.sleep(LEASE + 0.5)
        first = await upgrade(nodes[1].port, KEYS["alice"])
        kept.append(first)
        later, refused, took = None, 0, 0.0
        if first.status != 101:
            later, refused, took = await retry_until_admitted(nodes[1].port, KEYS["alice"], 2.0)
            kept.append(later)
        print(f"open, Redis down {LEASE + 0.5:.1f} s: a key new to a node with no key: "
              f"{first.status} {first.body!r}; then {refused} more refusals, a 101 after "
              f"{took:.2f} s" + ("" if later else " (none)") + f"; node b /cluster down "
              f"{nodes[1].cluster()['down']}")
        assert first.status == 101, (first.status, first.body)
    finally:
        close_all(u for u in kept if u is not None)
    assert (await backend.wait_live(0))["live"] == 0
