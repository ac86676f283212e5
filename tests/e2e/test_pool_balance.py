"""Balancing over a pool, end to end: real loopback sockets, the gateway in this process (to
read its pools and its connection table), and real backends in their own processes
(tests/countecho.py: the bundled echo, counting its live connections), whose counts are the
proof of where the connections landed.

Each raw client connects from an address of its own in 127.0.0.0/8 (127.2.x.y), so that the
gateway's table (a connection's `peer`) tells which client a connection is.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fastgw import config as cfgmod
from fastgw.gateway import Gateway
from wire import check_101, connect, free_port, new_key, read_head, status_of, upgrade_request
from workerlib import CountingBackend


N_BACKENDS = 4
WEIGHTS = (1, 1, 2)


@pytest.fixture(scope="module")
def backends():
    started = []
    try:
        for _ in range(N_BACKENDS):
            started.append(CountingBackend())
        yield started
    finally:
        for b in started:
            b.stop()


def url_of(b: CountingBackend) -> str:
    return f"ws://127.0.0.1:{b.port}/"


def config_text(targets: list[tuple[str, int]], *, balance: str = "least-connections",
                extra: dict | None = None, clients: int = 0) -> str:
    upgrade = {"policy": "websocket-upgrade",
               "targets": [{"url": u, "weight": w} for u, w in targets],
               "balance": balance, "timeout": "5s", **(extra or {})}
    assembly = [upgrade]
    doc = {"listeners": [{"host": "127.0.0.1", "port": 0}],
           "limits": {"max-handshakes-per-ip": 0},
           "drain-time": "1s"}
    if clients:
        doc["clients"] = [{"id": f"client-{i}", "key": f"key-{i}"} for i in range(clients)]
        assembly.insert(0, {"policy": "api-key", "header": "X-API-Key"})
    doc["apis"] = [{"name": "chat", "path": "/", "assembly": assembly}]
    return yaml.safe_dump(doc, sort_keys=False)


class PoolGateway:
    def __init__(self, gw: Gateway, path: Path):
        self.gw, self.path = gw, path
        self.port = gw.addresses[0][2]

    @property
    def pool(self):
        return self.gw.pools["chat"]

    def targets_by_peer(self) -> dict[str, str]:
        """{client address: target label} of the live connections."""
        return {c.peer: c.target.label for c in self.gw.live.values() if c.target is not None}

    def by_target(self) -> Counter:
        return Counter(c.target.label for c in self.gw.live.values() if c.target is not None)

    async def reload(self, text: str) -> None:
        self.path.write_text(text)
        assert await self.gw.reload() is None


@pytest.fixture
async def start_gateway(tmp_path, backends):
    """start_gateway(yaml_text): an in-process gateway reading tmp_path/gw.yaml (reloadable).
    At the end: no connection left in its table, at the backends, or in its pools."""
    started: list[PoolGateway] = []
    held: list = []

    async def start(text: str) -> PoolGateway:
        path = tmp_path / "gw.yaml"
        path.write_text(text)
        gw = Gateway(cfgmod.load(str(path)), str(path))
        await gw.start()
        pg = PoolGateway(gw, path)
        pg.held = held
        started.append(pg)
        return pg

    yield start
    for w in held:
        w.close()
    problems = []
    for pg in started:
        deadline = time.monotonic() + 10
        while (pg.gw.live or pg.gw.handshakes) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if pg.gw.live or pg.gw.handshakes:
            problems.append(f"{len(pg.gw.live)} live, {len(pg.gw.handshakes)} handshakes left")
        active = {t.label: t.active for p in pg.gw.pools.values() for t in p.targets if t.active}
        if active:
            problems.append(f"targets still counting connections: {active}")
        await pg.gw.shutdown(1.0)
    gc.collect()
    for b in backends:
        s = await b.wait_live(0, timeout=10)
        if s["live"]:
            problems.append(f"{s['live']} connections left at backend {b.port}")
    assert not problems, "; ".join(problems)


# ---- raw clients, each from its own address ----------------------------------------------------


def local_ip(i: int) -> str:
    return f"127.2.{i // 250 + 1}.{i % 250 + 1}"


@dataclass
class Client:
    ip: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


async def upgrade(pg: PoolGateway, ip: str, api_key: str | None = None) -> Client | int:
    """One upgrade from `ip`: the live Client, or the refusal's status (its connection closed)."""
    reader, writer = await connect(pg.port, local_addr=(ip, 0))
    pg.held.append(writer)
    key = new_key()
    extra = f"X-API-Key: {api_key}\r\n" if api_key else ""
    writer.write(upgrade_request("/", key=key, extra=extra))
    head = await read_head(reader, 10)
    if status_of(head) != 101:
        writer.close()
        return status_of(head)
    check_101(head, key)
    return Client(ip, reader, writer)


async def open_clients(pg: PoolGateway, n: int, first: int = 0, at_once: int = 200) -> list[Client]:
    """n clients (addresses first .. first+n-1), at most `at_once` upgrades under way."""
    sem = asyncio.Semaphore(at_once)

    async def one(i: int) -> Client:
        async with sem:
            c = await upgrade(pg, local_ip(i))
            assert isinstance(c, Client), f"upgrade {i}: HTTP {c}"
            return c

    return list(await asyncio.gather(*(one(first + i) for i in range(n))))


async def backend_live(backends, n: int, timeout: float = 10.0) -> list[int]:
    """The backends' live counts once they sum to n (or the last counts after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [b.stats()["live"] for b in backends]
        if sum(live) == n or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.02)


def assert_shares(live: list[int], weights, tolerance: float = 0.10) -> None:
    total, wsum = sum(live), sum(weights)
    for n, w in zip(live, weights):
        assert abs(n / total - w / wsum) <= tolerance * w / wsum, (live, weights)


async def close_all(pg: PoolGateway, clients: list[Client], backends) -> None:
    for c in clients:
        c.close()
    assert await backend_live(backends, 0) == [0] * len(backends)


# ---- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["round-robin", "random", "least-connections"])
async def test_3000_connections_follow_the_weights(start_gateway, backends, balance):
    three = backends[:3]
    pg = await start_gateway(config_text([(url_of(b), w) for b, w in zip(three, WEIGHTS)],
                                         balance=balance))
    clients = await open_clients(pg, 3000)
    live = await backend_live(three, 3000)
    assert sum(live) == 3000, live
    assert_shares(live, WEIGHTS)
    # the gateway's own counts agree with the backends'
    assert [pg.by_target()[url_of(b)] for b in three] == live
    assert [t.active for t in pg.pool.targets] == live
    await close_all(pg, clients, three)


async def test_least_connections_refills_the_emptied_target_first(start_gateway, backends):
    three = backends[:3]
    pg = await start_gateway(config_text([(url_of(b), w) for b, w in zip(three, WEIGHTS)]))
    clients = await open_clients(pg, 3000)
    live = await backend_live(three, 3000)
    assert_shares(live, WEIGHTS)
    on = pg.targets_by_peer()
    emptied = url_of(three[0])
    mine = [c for c in clients if on[c.ip] == emptied]
    assert len(mine) == live[0]
    for c in mine:
        c.close()
    rest = [c for c in clients if on[c.ip] != emptied]
    after = await backend_live(three, 3000 - len(mine))
    assert after == [0, live[1], live[2]], after
    new = await open_clients(pg, 500, first=3000)
    now = await backend_live(three, 3000 - len(mine) + 500)
    assert now == [500, live[1], live[2]], now               # all 500 went to the emptied one
    on = pg.targets_by_peer()
    assert {on[c.ip] for c in new} == {emptied}
    await close_all(pg, rest + new, three)


# ---- consistent-hash by client-id --------------------------------------------------------------


async def test_the_same_client_reaches_the_same_target(start_gateway, backends):
    pg = await start_gateway(config_text([(url_of(b), 1) for b in backends],
                                         balance="consistent-hash", clients=8))
    reached = {}
    for i in range(8):
        before = [b.stats()["total"] for b in backends]
        seen = set()
        for n in range(100):
            c = await upgrade(pg, local_ip(n), api_key=f"key-{i}")   # 100 addresses too
            assert isinstance(c, Client), c
            (conn,) = pg.gw.live.values()
            assert conn.describe()["client"] == f"client-{i}"
            seen.add(conn.target.label)
            c.close()
            while pg.gw.live:
                await asyncio.sleep(0.001)
        gained = [b.stats()["total"] - t for b, t in zip(backends, before)]
        assert len(seen) == 1 and sorted(gained) == [0, 0, 0, 100], (seen, gained)
        reached[f"client-{i}"] = seen.pop()
        assert gained[[url_of(b) for b in backends].index(reached[f"client-{i}"])] == 100
    assert len(set(reached.values())) >= 2          # 8 clients do not all hash to one target


async def test_a_reload_without_one_of_four_moves_only_its_keys(start_gateway, backends):
    n_clients = 200
    four = [(url_of(b), 1) for b in backends]
    pg = await start_gateway(config_text(four, balance="consistent-hash", clients=n_clients))

    async def key_map() -> dict[str, str]:
        sem = asyncio.Semaphore(100)

        async def one(i):
            async with sem:
                c = await upgrade(pg, local_ip(i), api_key=f"key-{i}")
                assert isinstance(c, Client), c
                return c

        clients = await asyncio.gather(*(one(i) for i in range(n_clients)))
        live = await backend_live(backends, n_clients)
        on = pg.targets_by_peer()
        out = {f"client-{i}": on[c.ip] for i, c in enumerate(clients)}
        assert sorted(Counter(out.values()).values()) == sorted(x for x in live if x)
        await close_all(pg, clients, backends)
        return out

    keys = [f"client-{i}" for i in range(1000)]
    before = await key_map()
    pool_before = {k: pg.pool.pick(k, (), 0.0).url for k in keys}
    removed = url_of(backends[2])
    await pg.reload(config_text(four[:2] + four[3:], balance="consistent-hash",
                                clients=n_clients))
    after = await key_map()
    moved = [k for k in before if before[k] != after[k]]
    assert {before[k] for k in moved} <= {removed}
    assert set(moved) == {k for k in before if before[k] == removed} and moved
    assert len(moved) <= 0.35 * n_clients
    # 1,000 keys on the gateway's own pool, before and after the reload
    pool_after = {k: pg.pool.pick(k, (), 0.0).url for k in keys}
    moved = [k for k in keys if pool_before[k] != pool_after[k]]
    assert len(moved) <= 350 and {pool_before[k] for k in moved} == {removed}
    assert {k for k in keys if pool_before[k] == removed} == set(moved)
    assert {k: pool_before[k] for k in before} == before      # the pool is what clients saw


# ---- retries ----------------------------------------------------------------------------------------


async def attempts(pg: PoolGateway, n: int, at_once: int = 50) -> Counter:
    """n upgrades (each closed once answered): their statuses."""
    sem = asyncio.Semaphore(at_once)

    async def one(i):
        async with sem:
            c = await upgrade(pg, local_ip(i))
            if isinstance(c, Client):
                c.close()
                return 101
            return c

    return Counter(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("balance", ["round-robin", "random", "least-connections",
                                     "consistent-hash"])
async def test_a_closed_port_is_retried_on_another_target(start_gateway, backends, balance):
    dead = f"ws://127.0.0.1:{free_port()}/"
    two = backends[:2]
    pg = await start_gateway(config_text([(dead, 1), *((url_of(b), 1) for b in two)],
                                         balance=balance, extra={"retries": 2}))
    assert await attempts(pg, 300) == {101: 300}
    failures = pg.pool.find(dead).dial_failures
    assert set(failures) == {"refused"} and failures["refused"] >= 30, failures
    assert [t.dial_failures for t in pg.pool.targets[1:]] == [{}, {}]
    assert sum(b.stats()["total"] for b in two) >= 300
    await backend_live(two, 0)


async def test_without_retries_the_closed_port_answers_502(start_gateway, backends):
    dead = f"ws://127.0.0.1:{free_port()}/"
    two = backends[:2]
    pg = await start_gateway(config_text([(dead, 1), *((url_of(b), 1) for b in two)],
                                         balance="round-robin", extra={"retries": 0}))
    got = await attempts(pg, 300)
    assert set(got) == {101, 502} and got[502] == pg.pool.find(dead).dial_failures["refused"]
    assert 60 <= got[502] <= 140, got          # one in three: round robin


async def test_retries_are_bounded_by_the_pool(start_gateway, backends):
    """Every target refusing: one dial each (retries: 10), then the last failure (502)."""
    dead = [f"ws://127.0.0.1:{free_port()}/" for _ in range(3)]
    pg = await start_gateway(config_text([(u, 1) for u in dead], extra={"retries": 10}))
    assert await attempts(pg, 20) == {502: 20}
    assert [t.dial_failures for t in pg.pool.targets] == [{"refused": 20}] * 3


# ---- host names -------------------------------------------------------------------------------


async def test_a_host_name_is_resolved_when_dialled(start_gateway, backends):
    """`localhost` reaches the backend; a name that does not resolve loads and starts (it
    is resolved only when dialled) and its dials fail with the reason "dns"."""
    b = backends[0]
    named = f"ws://localhost:{b.port}/"
    unknown = f"ws://no-such-backend.invalid:{b.port}/"
    pg = await start_gateway(config_text([(named, 1), (unknown, 1)], balance="round-robin",
                                         extra={"retries": 0}))
    assert pg.pool.find(named).endpoint.host == "localhost"
    before = b.stats()["total"]
    got = await attempts(pg, 20, at_once=1)
    assert got == {101: 10, 502: 10}
    assert b.stats()["total"] - before == 10
    assert pg.pool.find(unknown).dial_failures == {"dns": 10}
    assert pg.pool.find(named).dial_failures == {}


# ---- what is retried, what is not -----------------------------------------------------------


@pytest.fixture
async def fake_backend():
    """fake_backend(behaviour): a hand-made backend on a free port, answering every request
    with `behaviour` ("503", "403": that HTTP status; "close": the connection closed at once;
    "silent": nothing, the connection held). Yields a starter returning (url, connections)."""
    servers, held = [], []

    async def start(behaviour: str):
        seen = []

        async def serve(reader, writer):
            seen.append(1)
            if behaviour == "close":
                writer.close()
                return
            held.append(writer)
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if behaviour != "silent":
                writer.write(f"HTTP/1.1 {behaviour} No\r\nContent-Length: 0\r\n\r\n".encode())
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", seen

    yield start
    for w in held:
        w.close()
    for s in servers:
        s.close()


@pytest.mark.parametrize(("behaviour", "cause"), [("503", "status"), ("close", "reset")])
async def test_a_5xx_or_a_reset_is_retried(start_gateway, backends, fake_backend, behaviour,
                                           cause):
    bad, seen = await fake_backend(behaviour)
    pg = await start_gateway(config_text([(bad, 1), (url_of(backends[0]), 1)],
                                         balance="round-robin", extra={"retries": 1}))
    assert await attempts(pg, 40, at_once=4) == {101: 40}
    assert pg.pool.find(bad).dial_failures == {cause: 20} and len(seen) == 20


async def test_a_4xx_answer_is_not_retried(start_gateway, backends, fake_backend):
    bad, seen = await fake_backend("403")
    pg = await start_gateway(config_text([(bad, 1), (url_of(backends[0]), 1)],
                                         balance="round-robin", extra={"retries": 2}))
    assert await attempts(pg, 40, at_once=4) == {101: 20, 502: 20}
    assert pg.pool.find(bad).dial_failures == {"status": 20}


async def test_a_time_out_is_not_retried(start_gateway, backends, fake_backend):
    silent, seen = await fake_backend("silent")
    dead = f"ws://127.0.0.1:{free_port()}/"
    pg = await start_gateway(config_text([(dead, 1), (silent, 1), (url_of(backends[0]), 1)],
                                         balance="round-robin",
                                         extra={"retries": 2, "timeout": "300ms"}))
    got = await attempts(pg, 30, at_once=30)
    # refused: retried on another target; no answer within the timeout: 504, not retried
    assert set(got) == {101, 504} and got[504] >= 5, got
    assert pg.pool.find(silent).dial_failures == {"timeout": got[504]} == {"timeout": len(seen)}
    assert got[101] == 30 - got[504]
