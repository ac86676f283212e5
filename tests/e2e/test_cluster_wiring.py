"""The cluster wired into `fastgw run`: no store call per message or per upgrade (Redis's own
INFO commandstats), workers as members, a cluster-wide max-connections, on-unreachable with a
store never reached, and what GET /cluster and /metrics show. Real redis-server, real nodes."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import pytest
import websockets
import yaml

from conftest import samples, start_gateway_process, stop_process, value
from redislib import RedisServer, command
from wire import free_port
from workerlib import CountingBackend, WorkersGateway

KEY = {"X-API-Key": "k-alice"}


def node_config(backend_port: int, redis_url: str, *, pre=(), request=(), limits=None,
                cluster=None, workers: int = 1) -> str:
    upgrade = {"policy": "websocket-upgrade", "target-url": f"ws://127.0.0.1:{backend_port}/"}
    if request:
        upgrade["request"] = list(request)
    doc = {"workers": workers,
           "listeners": [{"host": "127.0.0.1", "port": 0}],
           "admin": {"host": "127.0.0.1", "port": 0},
           "drain-time": "1s",
           "clients": [{"id": "alice", "key": "k-alice"}],
           "limits": {"max-handshakes-per-ip": 0, **(limits or {})},
           "cluster": {"redis": {"url": redis_url, "timeout": "150ms"}, "lease": f"{LEASE:g}s",
                       "refresh": f"{REFRESH * 1000:g}ms",
                       **(cluster or {})},
           "apis": [{"name": "chat", "path": "/",
                     "assembly": [{"policy": "api-key", "header": "X-API-Key"}, *pre, upgrade]}]}
    return yaml.safe_dump(doc, sort_keys=False)


class Node:
    """One `fastgw run` node (one process), its admin URL read from its start lines."""

    def __init__(self, tmp_path, text: str):
        self.gp = start_gateway_process(tmp_path, text)
        deadline = time.monotonic() + 10
        while not (m := re.search(r"admin on (http://\S+)", self.gp.stderr())):
            assert time.monotonic() < deadline, self.gp.stderr()
            time.sleep(0.02)
        self.admin = m[1]
        self.url = self.gp.url()

    def get(self, path: str):
        with urllib.request.urlopen(self.admin + path, timeout=5) as r:
            return r.read().decode()

    def cluster(self) -> dict:
        return json.loads(self.get("/cluster"))

    def stop(self) -> None:
        stop_process(self.gp.proc)


@pytest.fixture
def backend():
    b = CountingBackend()
    yield b
    b.stop()


LEASE = 2.0
REFRESH = 0.4           # with a time-out of 150 ms: a busy machine's round trips fit in it


@pytest.fixture(scope="module")
def redis_module():
    """One redis-server for the module, past its learning period (a fresh server grants
    nothing new for one lease, plus up to two seconds of INFO's uptime: fastgw.cluster.lease S5)."""
    with RedisServer() as server:
        deadline = time.monotonic() + LEASE + 5
        while True:
            up = int(re.search(rb"uptime_in_seconds:(\d+)", command(server.port, "INFO", "server"))[1])
            if up * 1000 > LEASE * 1000 + 2000:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield server


@pytest.fixture
def redis(redis_module):
    command(redis_module.port, "FLUSHALL")      # each test's nodes start from nothing
    return redis_module


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(text: str) -> Node:
        d = tmp_path / f"node{len(started)}"
        d.mkdir()
        started.append(Node(d, text))
        return started[-1]

    yield start
    for n in started:
        n.stop()


def evalsha_calls(port: int) -> int:
    info = command(port, "INFO", "commandstats").decode()
    m = re.search(r"cmdstat_evalsha:calls=(\d+)", info)
    return int(m[1]) if m else 0


async def connect(url: str, **kw):
    return await websockets.connect(url, additional_headers=KEY, open_timeout=5, **kw)


async def attempt(url: str):
    try:
        return await connect(url)
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def test_messages_and_upgrades_make_no_store_call_each(backend, redis, nodes):
    node = nodes(node_config(backend.port, redis.url,
                             pre=[{"policy": "count-limit", "key": "client-id", "max": 100}],
                             request=[{"policy": "message-rate-limit", "scope": "client",
                                       "messages": "100000/1s", "action": "drop"}]))
    ws = await connect(node.url)
    await ws.send("warm")
    assert await ws.recv() == "warm"
    before = evalsha_calls(redis.port)
    began = time.monotonic()
    for i in range(4000):
        await ws.send(f"m{i}")
        if i % 100 == 99:
            await asyncio.sleep(0.02)
    got = 0
    while got < 4000:
        await asyncio.wait_for(ws.recv(), 5)
        got += 1
    conns = [await connect(node.url) for _ in range(40)]     # 40 upgrades of a known client
    elapsed = time.monotonic() - began
    calls = evalsha_calls(redis.port) - before
    # Two keys (the count and the bucket), renewed every refresh, plus at-once renewals (a
    # spare taken, a bucket's demand changing): bounded by time, not by 4,000 messages and
    # 40 upgrades.
    rounds = elapsed / REFRESH
    print(f"evalsha calls: {calls} in {elapsed:.2f} s (4,000 messages, 40 upgrades)")
    assert calls <= 2 * (rounds + 1) * 5, (calls, elapsed)
    assert calls < 4000 / 20
    status = node.cluster()
    assert status["rounds"] >= 1 and not status["down"]
    kinds = {s["policy"]: s for s in status["shares"]}
    assert kinds["chat/count-limit#1"]["used"] == 41
    assert "chat/request/message-rate-limit#0/messages" in kinds
    m = samples(node.get("/metrics"))
    assert value(m, "fastgw_cluster_renewals_total") >= status["renewals"] - 10
    assert value(m, "fastgw_cluster_share", policy="chat/count-limit#1") >= 41
    assert value(m, "fastgw_cluster_redis_seconds_count") >= 1
    assert value(m, "fastgw_cluster_errors_total", kind="timeout") == 0
    for c in [ws, *conns]:
        await c.close()


async def test_workers_are_members_each_and_the_limit_holds_over_them(tmp_path, backend, redis):
    text = node_config(backend.port, redis.url, workers=2,
                       pre=[{"policy": "count-limit", "key": "client-id", "max": 4}])
    gw = WorkersGateway(tmp_path, text, 2)
    try:
        results = await asyncio.gather(*(attempt(f"ws://127.0.0.1:{gw.port}/") for _ in range(40)))
        live = [r for r in results if not isinstance(r, int)]
        assert len(live) == 4 and {r for r in results if isinstance(r, int)} == {429}
        assert (await backend.wait_live(4))["peak"] == 4
        with urllib.request.urlopen(gw.admin_url + "/cluster", timeout=5) as r:
            status = json.loads(r.read())
        members = {w["member"] for w in status["workers"]}
        assert len(members) == 2
        with urllib.request.urlopen(gw.admin_url + "/metrics", timeout=5) as r:
            m = samples(r.read().decode())
        assert value(m, "fastgw_cluster_share", policy="chat/count-limit#1") >= 4
        for c in live:
            await c.close()
    finally:
        gw.stop()


async def test_max_connections_is_one_cap_over_the_nodes(backend, redis, nodes):
    a = nodes(node_config(backend.port, redis.url, limits={"max-connections": 6}))
    b = nodes(node_config(backend.port, redis.url, limits={"max-connections": 6}))

    async def try_open(url):
        try:
            return await websockets.connect(url, additional_headers=KEY, open_timeout=1.0)
        except (asyncio.TimeoutError, TimeoutError, OSError):
            return None

    opened = []
    for url in (a.url, b.url, a.url, b.url):          # in waves: each node asks as it fills
        opened += [c for c in await asyncio.gather(*(try_open(url) for _ in range(3))) if c]
    assert len(opened) == 6
    stats = await backend.wait_live(6)
    assert stats["live"] == 6 and stats["peak"] == 6
    shares = [n.cluster()["shares"][0] for n in (a, b)]
    assert sum(s["share"] for s in shares) <= 6 and sum(s["used"] for s in shares) == 6
    for c in opened:
        await c.close()


@pytest.mark.parametrize("mode", ["hold", "open", "closed"])
async def test_a_store_never_reached(backend, nodes, mode):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    node = nodes(node_config(backend.port, dead, cluster={"on-unreachable": mode},
                             pre=[{"policy": "count-limit", "key": "client-id", "max": 3}]))
    began = time.monotonic()
    results, live = [], []
    while len(live) < 3 and time.monotonic() - began < 2.0:
        r = await attempt(node.url)
        (results if isinstance(r, int) else live).append(r)
        if mode == "closed" and len(results) == 5:
            break
        await asyncio.sleep(0.02)
    waited = time.monotonic() - began
    # A new key waits until the store is unreachable for a refresh: 503 until then.
    assert set(results) <= {503}
    if mode == "closed":
        assert results == [503] * 5 and not live
    else:                           # hold: limit / nodes (1 here); open: the limit, on its own
        assert len(live) == 3 and waited < 1.0
        assert [await attempt(node.url) for _ in range(2)] == [429, 429]
    status = node.cluster()
    assert status["down"] and status["failed"] >= 1
    m = samples(node.get("/metrics"))
    assert value(m, "fastgw_cluster_errors_total", kind="connection") + \
        value(m, "fastgw_cluster_errors_total", kind="refused") >= 1
    assert "password" not in node.gp.stderr()
    for c in live:
        await c.close()


async def test_a_stopped_node_gives_its_slots_back_at_once(backend, redis, nodes):
    pre = [{"policy": "count-limit", "key": "client-id", "max": 4}]
    a = nodes(node_config(backend.port, redis.url, pre=pre))
    b = nodes(node_config(backend.port, redis.url, pre=pre))
    held = [await connect(a.url) for _ in range(4)]
    assert await attempt(b.url) == 429
    a.gp.proc.send_signal(15)                           # SIGTERM: drain (1 s), then stop
    a.gp.proc.wait(10)
    exited = time.monotonic()
    opened = []
    while len(opened) < 4:
        r = await attempt(b.url)
        if isinstance(r, int):
            assert r == 429
            assert time.monotonic() - exited < 1.0, "not given back (a lease is 2 s)"
            await asyncio.sleep(0.02)
        else:
            opened.append(r)
    took = time.monotonic() - exited
    print(f"4 slots usable on the other node {took * 1000:.0f} ms after the stop")
    assert "stopped" in a.gp.stderr()
    for c in [*held, *opened]:
        await c.close()
