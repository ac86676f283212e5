"""One set of metrics over worker processes (fastgw.observe.aggregate), checked with real
in-process gateways carrying real traffic as the "workers" of a small fake supervisor (the
interface of fastgw.workers' supervisor: workers, ask, ask_all, last_snapshot,
restarts_total, reload, drain, rolling_restart, on_retired), and the real admin app on
loopback in front of it."""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass

import aiohttp
import msgspec
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml, samples
from fastgw.observe.admin import start_admin
from fastgw.observe.aggregate import (RESTART_REASONS, SupervisorBackend, Totals, snapshot,
                                     snapshot_async)
from fastgw.observe.metrics import _FAMILIES

WORKER_FAMILIES = ("fastgw_workers", "fastgw_worker_restarts")


@dataclass
class FakeWorker:
    """A WorkerProc of the supervisor's interface, whose "process" is an in-process Gateway."""
    index: int
    incarnation: int
    gw: object
    pid: int = 0
    slot: int = 0
    started: float = 0.0
    restarts: int = 0
    ready: bool = True
    gone: bool = False              # its "process" is dead: asks fail at once
    mute: bool = False              # alive, but never answers (a stuck loop)


class FakeSupervisor:
    """The supervisor's interface over in-process gateways (no fork: the aggregation is
    what is under test here; the real supervisor is tested against the CLI)."""

    def __init__(self):
        self.workers: list[FakeWorker] = []
        self.last_snapshot: dict[int, dict] = {}
        self.restarts_total = {r: 0 for r in RESTART_REASONS}
        self.on_retired = None
        self.rolling_gate = asyncio.Event()
        self.rolls = 0
        self.reloads = 0
        self.drains: list[tuple[float, bool]] = []
        self.draining = False

    def add(self, index: int, incarnation: int, rg) -> FakeWorker:
        # Connection ids id_base + n with id_base = incarnation << 32, as a worker's.
        rg.gw._ids = incarnation << 32
        w = FakeWorker(index, incarnation, rg.gw, pid=os.getpid(), slot=index, started=time.time())
        if index < len(self.workers):
            w.restarts = self.workers[index].restarts + 1
            self.workers[index] = w
        else:
            self.workers.append(w)
        return w

    async def ask(self, w: FakeWorker, op: str, **args):
        if w.gone:
            raise ConnectionError("worker gone")
        if w.mute:
            await asyncio.sleep(3600)
        gw = w.gw
        if op == "snapshot":         # as a worker answers it
            return msgspec.msgpack.decode(msgspec.msgpack.encode(await snapshot_async(gw)))
        handlers = {
                    "connections": lambda api=None, client=None: gw.connections(api, client),
                    "close": lambda id: gw.close_connection(id),
                    "close_client": lambda client: gw.close_client(client),
                    "status": gw.status}
        # Through msgpack, as over the control channel.
        return msgspec.msgpack.decode(msgspec.msgpack.encode(handlers[op](**args)))

    async def ask_all(self, op: str, **args):
        out = []
        for w in self.workers:
            try:
                out.append((w, await asyncio.wait_for(self.ask(w, op, **args), 2.0)))
            except (TimeoutError, ConnectionError):
                pass
        return out

    def poll(self) -> None:
        for w in self.workers:
            if not w.gone:
                self.last_snapshot[w.incarnation] = snapshot(w.gw)

    async def reload(self):
        self.reloads += 1
        return None

    async def drain(self, grace: float, exit: bool) -> None:
        self.drains.append((grace, exit))
        self.draining = True

    async def rolling_restart(self) -> None:
        self.rolls += 1
        await self.rolling_gate.wait()


def two_api_yaml(port: int) -> str:
    return (gateway_yaml(f"ws://127.0.0.1:{port}/", path="/a", name="a")
            + "  - name: b\n    path: /b\n    assembly:\n      - policy: websocket-upgrade\n"
            + f"        target-url: ws://127.0.0.1:{port}/\n")


async def traffic(rg, path: str, messages: int, size: int, close_code: int = 1000) -> None:
    """One connection through `rg` that echoes `messages` messages of `size` bytes."""
    async with websockets.connect(rg.url(path), compression=None) as ws:
        for _ in range(messages):
            await ws.send(b"x" * size)
        for _ in range(messages):
            assert len(await ws.recv()) == size
        await ws.close(close_code)


async def refused(rg, path: str) -> None:
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(rg.url(path))


async def busy_gateways(gateway_factory, echo_backend):
    """Two gateways with different traffic: messages of several sizes, several close
    codes, refusals with and without an API."""
    g1 = await gateway_factory(two_api_yaml(echo_backend))
    g2 = await gateway_factory(two_api_yaml(echo_backend))
    await traffic(g1, "/a", 10, 10)
    await traffic(g1, "/b", 3, 1000, 4001)
    await traffic(g2, "/a", 7, 100, 4002)
    await traffic(g2, "/a", 1, 70000)
    await refused(g1, "/nowhere")
    await refused(g2, "/nowhere")
    await refused(g2, "/nowhere")
    await g1.wait_idle()
    await g2.wait_idle()
    return g1, g2


def families(text: str) -> list[str]:
    return re.findall(r"^# TYPE (\S+) ", text, re.M)


def counters(m: dict) -> dict:
    """The samples of counters (and histogram buckets/sums/counts): those that never go down."""
    return {k: v for k, v in m.items()
            if not k[0].startswith(("fastgw_connections_active", "fastgw_connections_max",
                                    "fastgw_workers", "fastgw_target_connections_active",
                                    "fastgw_target_up"))}


async def test_snapshot_is_plain_data_and_renders_as_the_gateway_does(gateway_factory, echo_backend):
    g1, _ = await busy_gateways(gateway_factory, echo_backend)
    snap = snapshot(g1.gw)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(snap)) == snap
    later = await snapshot_async(g1.gw)
    assert later["taken"] > snap["taken"] and {**later, "taken": 0} == {**snap, "taken": 0}
    assert snap["histograms"].keys() == set(g1.gw.histogram_names())
    text = Totals().render([snap], workers=1, restarts={})
    single = await g1.gw.metrics_text()
    # Byte for byte the single process's exposition, then the two families of workers.
    assert text.startswith(single)
    assert families(text) == families(single) + list(WORKER_FAMILIES)
    assert families(single) == [n[:-6] if k == "counter" and n.endswith("_total") else n
                                for n, k, _ in _FAMILIES]
    m = samples(text)
    assert m[("fastgw_workers", frozenset())] == 1
    for reason in RESTART_REASONS:
        assert m[("fastgw_worker_restarts_total", frozenset({("reason", reason)}))] == 0


async def test_the_sum_of_two_gateways_has_the_families_of_one(gateway_factory, echo_backend):
    g1, g2 = await busy_gateways(gateway_factory, echo_backend)
    one, two = samples(await g1.gw.metrics_text()), samples(await g2.gw.metrics_text())
    text = Totals().render([snapshot(g1.gw), snapshot(g2.gw)], workers=2,
                           restarts={"signal": 3, "rolling": 2})
    assert families(text) == families(await g1.gw.metrics_text()) + list(WORKER_FAMILIES)
    m = samples(text)
    # A target is up where every worker finds it up (the minimum); the rest are sums.
    up = {k: min(one.get(k, 1), two.get(k, 1)) for k in set(one) | set(two)
          if k[0] == "fastgw_target_up"}
    expected = {k: one.get(k, 0) + two.get(k, 0) for k in set(one) | set(two)}
    expected.update(up)
    got = {k: v for k, v in m.items() if not k[0].startswith(WORKER_FAMILIES)}
    assert got == pytest.approx(expected)
    assert up and set(up.values()) == {1.0}
    # The figures are those of the traffic.
    a_req = frozenset({("api", "a"), ("direction", "request")})
    assert m[("fastgw_messages_total", a_req)] == 10 + 7 + 1
    assert m[("fastgw_bytes_total", a_req)] == 100 + 700 + 70000
    assert m[("fastgw_upgrades_rejected_total", frozenset({("api", ""), ("reason", "not_found")}))] == 3
    assert m[("fastgw_closes_total", frozenset({("api", "a"), ("code", "4002"), ("side", "client")}))] == 1
    assert m[("fastgw_handshake_seconds_count", frozenset({("api", "a")}))] == 3
    assert m[("fastgw_workers", frozenset())] == 2
    assert [m[("fastgw_worker_restarts_total", frozenset({("reason", r)}))] for r in RESTART_REASONS] \
        == [0, 3, 0, 2]


async def test_histograms_merge(gateway_factory, echo_backend):
    g1, g2 = await busy_gateways(gateway_factory, echo_backend)
    s1, s2 = snapshot(g1.gw), snapshot(g2.gw)
    totals = Totals()
    assert totals.histogram_names([s1, s2]) == sorted(g1.gw.histogram_names())
    merged = totals.histogram("a/handshake_us", [s1, s2])
    h1, h2 = g1.gw.histogram("a/handshake_us"), g2.gw.histogram("a/handshake_us")
    assert merged.get_total_count() == h1.get_total_count() + h2.get_total_count() == 3
    assert merged.get_max_value() == max(h1.get_max_value(), h2.get_max_value())
    # A folded worker's histogram stays in the merge.
    totals.fold(s2)
    assert totals.histogram("a/handshake_us", [s1]).get_total_count() == 3
    assert totals.histogram("a/request_held_us", [s1]).get_total_count() == 0
    assert totals.histogram("nope/handshake_us", [s1]) is None


async def scrape(http, url: str) -> dict:
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        return samples(await r.text())


@pytest.fixture
async def supervised(gateway_factory, echo_backend):
    """A fake supervisor of two "workers" (gateways), its backend and admin API."""
    servers = []

    async def start():
        sup = FakeSupervisor()
        sup.add(0, 1, await gateway_factory(two_api_yaml(echo_backend)))
        sup.add(1, 2, await gateway_factory(two_api_yaml(echo_backend)))
        backend = SupervisorBackend(sup)
        admin = await start_admin(backend, "127.0.0.1", 0, None)
        servers.append(admin)
        return sup, backend, admin

    yield start
    for admin in servers:
        await admin.close()


async def test_a_replaced_worker_is_folded_and_counters_never_go_down(supervised, gateway_factory,
                                                                     echo_backend):
    sup, backend, admin = await supervised()
    g1, g2 = sup.workers[0].gw, sup.workers[1].gw
    rg = {id(w.gw): w for w in sup.workers}
    assert sup.on_retired == backend.retire
    from conftest import RunningGateway
    r1, r2 = RunningGateway(g1), RunningGateway(g2)
    await traffic(r1, "/a", 5, 10)
    await traffic(r2, "/a", 4, 10)
    sup.poll()                                  # the supervisor's last poll: 4 messages on g2
    await traffic(r2, "/b", 6, 10)              # after it: only a fresh scrape sees these
    live = await websockets.connect(r2.url("/a"))
    await r1.wait_idle()
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, admin.url)
        req = lambda api: frozenset({("api", api), ("direction", "request")})  # noqa: E731
        assert before[("fastgw_messages_total", req("a"))] == 9
        assert before[("fastgw_messages_total", req("b"))] == 6
        assert before[("fastgw_connections_active", frozenset({("api", "a")}))] == 1
        # Worker 1 dies (its connection with it) and is replaced by a new process;
        # the supervisor hands over its last *polled* snapshot, older than the scrape's.
        stale = sup.last_snapshot[2]
        sup.workers[1].gone = True
        sup.restarts_total["signal"] += 1
        new = sup.add(1, 3, await gateway_factory(two_api_yaml(echo_backend)))
        sup.on_retired(rg[id(g2)], stale)
        sup.on_retired(rg[id(g2)], stale)       # twice: folded once
        await live.close()
        await traffic(RunningGateway(new.gw), "/a", 2, 10)
        after = await scrape(http, admin.url)
        for k, v in counters(before).items():
            assert after.get(k, 0) >= v, k
        assert after[("fastgw_messages_total", req("a"))] == 11
        assert after[("fastgw_messages_total", req("b"))] == 6
        assert after[("fastgw_connections_total", frozenset({("api", "a")}))] == 4
        # Gauges are not folded: the dead worker's live connection is gone with it.
        assert after[("fastgw_connections_active", frozenset({("api", "a")}))] == 0
        assert after[("fastgw_worker_restarts_total", frozenset({("reason", "signal")}))] == 1
        assert after[("fastgw_workers", frozenset())] == 2
        # A worker that does not answer counts with its last snapshot, within the timeout.
        backend.timeout = 0.2
        sup.poll()
        sup.workers[0].mute = True
        t0 = time.monotonic()
        muted = await scrape(http, admin.url)
        assert time.monotonic() - t0 < 1.0
        assert muted[("fastgw_messages_total", req("a"))] == 11
        sup.workers[0].mute = False
        async with http.get(f"{admin.url}/histograms") as r:
            assert await r.json() == sorted(g1.histogram_names())
        async with http.get(f"{admin.url}/histograms/a/handshake_us") as r:
            assert (await r.json())["total_count"] == 4     # a/: 1 + 2 + 1 upgrades


async def test_workers_connections_and_routing_through_the_admin_app(supervised):
    from conftest import RunningGateway
    sup, backend, admin = await supervised()
    r1, r2 = RunningGateway(sup.workers[0].gw), RunningGateway(sup.workers[1].gw)
    c1 = await websockets.connect(r1.url("/a"))
    c2 = [await websockets.connect(r2.url("/b")) for _ in range(2)]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin.url}/workers") as r:
            assert r.status == 200
            listed = await r.json()
        assert [(w["index"], w["connections"], w["restarts"]) for w in listed] == [(0, 1, 0), (1, 2, 0)]
        assert all(w["pid"] == os.getpid() and abs(w["started"] - time.time()) < 60 for w in listed)
        async with http.get(f"{admin.url}/connections") as r:
            conns = await r.json()
        assert sorted((c["worker"], c["api"]) for c in conns) == [(0, "a"), (1, "b"), (1, "b")]
        assert all(c["id"] >> 32 == (1 if c["worker"] == 0 else 2) for c in conns)
        async with http.get(f"{admin.url}/connections?api=a") as r:
            assert [c["worker"] for c in await r.json()] == [0]
        # DELETE goes to the worker whose incarnation is id >> 32.
        target = next(c for c in conns if c["worker"] == 1)
        async with http.delete(f"{admin.url}/connections/{target['id']}") as r:
            assert r.status == 200 and await r.json() == {"closed": 1}
        done = 0
        for ws in c2:
            try:
                await asyncio.wait_for(ws.recv(), 0.5)
            except ConnectionClosed:
                assert (ws.close_code, ws.close_reason) == (1001, "closed by administrator")
                done += 1
            except TimeoutError:
                pass
        assert done == 1
        for bad in ((1 << 32) + 999, (7 << 32) + 1, 5):      # unknown id; no such incarnation
            async with http.delete(f"{admin.url}/connections/{bad}") as r:
                assert r.status == 404
        # ?client= reaches every worker; the counts add up.
        async with http.delete(f"{admin.url}/connections?client=127.0.0.1") as r:
            assert await r.json() == {"closed": 2}
        async with http.post(f"{admin.url}/reload") as r:
            assert r.status == 200 and sup.reloads == 1
        async with http.get(f"{admin.url}/readyz") as r:
            assert r.status == 200
        async with http.post(f"{admin.url}/drain?grace=3&exit=true") as r:
            assert r.status == 202 and sup.drains == [(3.0, True)]
        async with http.get(f"{admin.url}/readyz") as r:
            assert r.status == 503
        # A rolling restart: 202 and started; 409 while it runs; 202 again once it is over.
        async with http.post(f"{admin.url}/workers/restart") as r:
            assert r.status == 202 and await r.json() == {"restarting": True}
        await asyncio.sleep(0)
        assert sup.rolls == 1
        async with http.post(f"{admin.url}/workers/restart") as r:
            assert r.status == 409 and "error" in await r.json()
        sup.rolling_gate.set()
        await backend._rolling
        async with http.post(f"{admin.url}/workers/restart") as r:
            assert r.status == 202
        await backend._rolling
        assert sup.rolls == 2
    for ws in [c1, *c2]:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    await r1.wait_idle()
    await r2.wait_idle()


async def test_a_single_gateway_has_no_workers_routes(gateway, admin_for):
    admin = await admin_for(gateway)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin.url}/workers") as r:
            assert r.status == 404
        async with http.post(f"{admin.url}/workers/restart") as r:
            assert r.status == 404


async def test_the_shared_zones_count_is_not_multiplied_by_the_workers(gateway_factory, echo_backend):
    """Messages limited for want of a slot are counted in the limit zone, which every worker
    shares: each reports the machine's number. The supervisor reads it from the zone."""
    g1, g2 = await busy_gateways(gateway_factory, echo_backend)
    snaps = [snapshot(g1.gw), snapshot(g2.gw)]
    for s in snaps:
        s["process"]["table_full"]["message-rate-limit"] = 5      # the one region's count
        s["process"]["table_full"]["count-limit"] = 2             # each process's own
    totals = Totals()
    totals.fold(snaps[0])
    m = samples(totals.render(snaps, 2, {}, zone_table_full={"message-rate-limit": 7}))
    assert m[("fastgw_limit_table_full_total", frozenset({("policy", "message-rate-limit")}))] == 7
    assert m[("fastgw_limit_table_full_total", frozenset({("policy", "count-limit")}))] == 6


async def test_a_histogram_is_encoded_again_only_once_recorded_into(gateway_factory, echo_backend):
    from hdrh.histogram import HdrHistogram
    g1, _ = await busy_gateways(gateway_factory, echo_backend)
    am = g1.gw.metrics.apis["a"]
    first = am.encoded_histograms()
    assert am.encoded_histograms()["handshake_us"] is first["handshake_us"]     # kept
    assert first["request_held_us"] == b""                                      # empty
    am.record("handshake_us", 123)
    again = snapshot(g1.gw)["histograms"]["a/handshake_us"]
    assert again != first["handshake_us"]
    assert HdrHistogram.decode(again).get_total_count() == 2      # one upgrade on /a, one recorded
    assert again == g1.gw.histogram("a/handshake_us").encode()
