"""The policies of an API's assembly, end to end: identity (API keys, JWT),
Origin, count and attempt limits before the upgrade, and the per-message
rate and size limits of the request and response flows after it.

Real sockets on 127.0.0.1, the `websockets` library as client, the bundled
picows echo backend or a `websockets` backend. Every test ends with an empty
connection table and no connection slot held in the limit zone.
"""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
import websockets
import yaml
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wire import free_port

# On uvloop and on the standard library's loop (`fastgw run --loop asyncio`).
pytestmark = pytest.mark.both_loops

SECRET = "fastgw-test-secret-of-at-least-32-bytes!"

CLIENTS = [
    {"id": "alice", "key": "alice-key", "plan": "gold"},
    {"id": "bob", "key": "bob-key"},
    {"id": "carol", "key": "carol-key", "apis": ["other"]},
]
API_KEY = {"policy": "api-key", "header": "X-API-Key", "query": "api_key"}


def config_yaml(target: str, *, pre=(), request=(), response=(), upgrade=None, api=None,
                top=None, extra_apis=None) -> str:
    """A configuration with one API "test" at "/" whose assembly is `pre` followed by a
    websocket-upgrade to `target` with the given request and response message policies.
    `extra_apis` are more APIs at "/NAME" (default: "other" when there are clients, whom
    carol needs)."""
    if extra_apis is None:
        extra_apis = ("other",) if top and "clients" in top else ()
    up = {"policy": "websocket-upgrade", "target-url": target, **(upgrade or {})}
    if request:
        up["request"] = list(request)
    if response:
        up["response"] = list(response)
    apis = [{"name": "test", "path": "/", **(api or {}), "assembly": [*pre, up]}]
    for name in extra_apis:
        apis.append({"name": name, "path": f"/{name}",
                     "assembly": [*pre, {"policy": "websocket-upgrade", "target-url": target}]})
    doc = {"listeners": [{"host": "127.0.0.1", "port": 0}], **(top or {}), "apis": apis}
    return yaml.safe_dump(doc, sort_keys=False)


def with_clients(**top):
    return {"plans": ["gold"], "clients": CLIENTS, **top}


async def refused(url: str, **kwargs) -> websockets.Response:
    """Connect, expecting an HTTP refusal; return the response."""
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            pass
    return info.value.response


async def wait_live(gw, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(gw.gw.live) != n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(gw.gw.live) == n


async def settled(gw) -> None:
    """After everything is closed: no connection in the table, no slot held."""
    await gw.wait_idle()
    assert not gw.gw.live
    assert not gw.gw.handshakes
    assert gw.gw.zone.counts_used() == 0


async def closed_by_gateway(ws, timeout: float = 5.0):
    """Read until the connection closes; return (messages read, close code, reason)."""
    got = []
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                got.append(await ws.recv())
    return got, ws.close_code, ws.close_reason


class Backend:
    """A `websockets` echo backend that records its connections and their close codes."""

    def __init__(self, greeting: int = 0):
        self.greeting = greeting        # messages sent to each new connection first
        self.opened = 0
        self.received: list = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.port = 0

    async def handler(self, conn):
        self.opened += 1
        try:
            for i in range(self.greeting):
                await conn.send(f"g{i}")
            async for msg in conn:
                self.received.append(msg)
                await conn.send(msg)
        except ConnectionClosed:
            pass
        finally:
            self.closes.append((conn.close_code, conn.close_reason))

    async def wait_closes(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.closes) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(self.closes) >= n, self.closes


@pytest.fixture
async def backend():
    b = Backend()
    # No compression: these tests judge plain sizes (a compressing backend negotiates
    # permessage-deflate through the gateway, whose limits see wire sizes: test_deflate.py).
    async with ws_serve(b.handler, "127.0.0.1", 0, compression=None) as server:
        b.port = server.sockets[0].getsockname()[1]
        yield b


def retry_after(response) -> int:
    value = response.headers.get("Retry-After")
    assert value is not None, dict(response.headers)
    return int(value)


# ------------------------------------------------------------------ count-limit


async def test_count_limit_per_client_ip(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 2}]))
    url = gw.url("/")
    a = await websockets.connect(url)
    b = await websockets.connect(url)
    response = await refused(url)
    assert response.status_code == 429
    assert retry_after(response) >= 1
    assert backend.opened == 2          # the refused upgrade never reached the backend
    for ws in (a, b):
        await ws.send("still fine")
        assert await ws.recv() == "still fine"
    await a.close()
    await wait_live(gw, 1)
    c = await websockets.connect(url)   # a slot is free again
    await c.send("c")
    assert await c.recv() == "c"
    assert (await refused(url)).status_code == 429        # full again
    await b.close()
    await c.close()
    await settled(gw)
    assert gw.gw.refused[429] == 2


async def test_count_limit_per_client_id(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[API_KEY, {"policy": "count-limit", "key": "client-id", "max": 2}],
        top=with_clients()))
    url = gw.url("/")
    alice = [await websockets.connect(url, additional_headers={"X-API-Key": "alice-key"})
             for _ in range(2)]
    response = await refused(url, additional_headers={"X-API-Key": "alice-key"})
    assert response.status_code == 429
    assert retry_after(response) >= 1
    # Same address, another client: its own count.
    bob = [await websockets.connect(url, additional_headers={"X-API-Key": "bob-key"})
           for _ in range(2)]
    assert (await refused(url, additional_headers={"X-API-Key": "bob-key"})).status_code == 429
    await alice[0].close()
    await wait_live(gw, 3)
    alice.append(await websockets.connect(url, additional_headers={"X-API-Key": "alice-key"}))
    for ws in alice[1:] + bob:
        await ws.send("x")
        assert await ws.recv() == "x"
        await ws.close()
    await settled(gw)


async def test_slot_released_on_later_refusal_abort_and_backend_down(gateway_factory, echo_backend):
    # A count slot taken before a later refusal (rate-limit) is given back at once;
    # so is the slot of a connection the client cuts without a close.
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 1},
             {"policy": "rate-limit", "key": "client-ip", "rate": "1/10s", "burst": 2}]))
    url = gw.url("/")
    ws = await websockets.connect(url)
    assert gw.gw.zone.counts_used() == 1
    ws.transport.abort()                 # connection lost without a close
    await settled(gw)
    ws = await websockets.connect(url)   # the slot came back
    await ws.close()
    await settled(gw)
    response = await refused(url)        # count-limit passes, rate-limit refuses
    assert response.status_code == 429
    assert gw.gw.zone.counts_used() == 0
    await settled(gw)


async def test_slot_released_when_backend_unreachable(gateway_factory):
    dead = free_port()
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{dead}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 1}]))
    for _ in range(3):
        assert (await refused(gw.url("/"))).status_code == 502
    await settled(gw)


# ------------------------------------------------------------------ rate-limit


async def test_rate_limit_upgrade_attempts(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        pre=[{"policy": "rate-limit", "key": "client-ip", "rate": "1/10s", "burst": 3}]))
    for i in range(3):
        async with websockets.connect(gw.url("/")) as ws:
            await ws.send(f"attempt {i}")
            assert await ws.recv() == f"attempt {i}"
    response = await refused(gw.url("/"))
    assert response.status_code == 429
    assert 9 <= retry_after(response) <= 10         # the time until the next attempt token
    assert backend.opened == 3
    await settled(gw)


# ------------------------------------------------------------------ message-rate-limit


async def test_message_rate_limit_reject(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 5,
                  "action": "reject", "name": "chat"}]))
    async with websockets.connect(gw.url("/")) as ws:
        for i in range(5):
            await ws.send(f"m{i}")
            assert await ws.recv() == f"m{i}"
        await ws.send("one too many")
        got, code, reason = await closed_by_gateway(ws)
    assert got == []
    assert code == 1008
    assert reason == "message rate limit exceeded: chat"
    await backend.wait_closes(1)
    assert backend.closes[0][0] == 1001
    await settled(gw)


async def paced_echoes(gw, n: int):
    """Send n messages as fast as the gateway takes them while reading the echoes; return
    the echoes, the rate measured from the first echo to the last, and the client leg."""
    async with websockets.connect(gw.url("/")) as ws:
        async def sender():
            for i in range(n):
                await ws.send(f"{i}")       # waits only when the gateway stops reading

        async def receiver():
            out = []
            for _ in range(n):
                out.append((await asyncio.wait_for(ws.recv(), 5), time.monotonic()))
            return out

        _, got = await asyncio.gather(sender(), receiver())
        (conn,) = gw.gw.live.values()
        leg = conn.relay.client
        counters = (leg.delayed, leg.rejected, leg.dropped, leg.rule_limited())
    assert [m for m, _ in got] == [f"{i}" for i in range(n)]      # all of them, in order
    return (n - 1) / (got[-1][1] - got[0][1]), counters


async def test_message_rate_limit_delay_burst_1_keeps_the_rate(gateway_factory, echo_backend):
    # Real time, end to end (tests/unit/test_core_sim.py paces in simulated time, burst 2 too).
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        request=[{"policy": "message-rate-limit", "messages": "500/1s", "burst": 1,
                  "action": "delay", "name": "pace"}]))
    n = 1501
    rate, (delayed, rejected, dropped, _) = await paced_echoes(gw, n)
    assert delayed >= n - 10 and rejected == dropped == 0
    await settled(gw)
    assert 475.0 <= rate <= 525.0, f"{rate:.2f} messages/s"


async def test_close_while_messages_are_delayed_keeps_order(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        request=[{"policy": "message-rate-limit", "messages": "5/1s", "burst": 1,
                  "action": "delay", "name": "slow"}]))
    async with websockets.connect(gw.url("/")) as ws:
        for i in range(4):
            await ws.send(f"m{i}")
        t0 = time.monotonic()
        await ws.close(4000, "done")
    assert time.monotonic() - t0 >= 0.5           # the close waited behind 3 delayed messages
    assert (ws.close_code, ws.close_reason) == (4000, "done")
    await backend.wait_closes(1)
    assert backend.received == ["m0", "m1", "m2", "m3"]
    assert backend.closes == [(4000, "done")]
    await settled(gw)


async def test_client_lost_while_messages_are_delayed(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 1}],
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 1,
                  "action": "delay", "name": "slow"}]))
    ws = await websockets.connect(gw.url("/"))
    try:
        for i in range(5):
            await ws.send(f"m{i}")
        assert await ws.recv() == "m0"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)           # the others are held
        (conn,) = gw.gw.live.values()
        assert conn.relay.client.paused                      # held: the client is not read
        ws.transport.abort()                                 # gone without a close
        await backend.wait_closes(1, timeout=2.0)
        assert backend.closes[0][0] == 1001
        await settled(gw)
        async with websockets.connect(gw.url("/")):          # the slot is free again
            pass
        await settled(gw)
    finally:
        ws.transport.abort()
        for conn in list(gw.gw.live.values()):               # leave the fixture a clean table
            if conn.relay is not None:
                conn.relay.client.abort_transport()


async def test_message_rate_limit_drop_counts(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 3,
                  "action": "drop", "name": "lossy"}]))
    async with websockets.connect(gw.url("/")) as ws:
        for i in range(10):
            await ws.send(f"m{i}")
        got = []
        deadline = time.monotonic() + 1.0
        with pytest.raises(TimeoutError):
            while True:
                got.append(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
        assert got == ["m0", "m1", "m2"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        (conn,) = gw.gw.live.values()
        relay = conn.relay
        assert relay.client.dropped == 7
        assert relay.client.rule_limited() == [7]
        assert relay.client.rejected == 0
        # Dropping does not close: pings still cross (they are not messages).
        await asyncio.wait_for(await ws.ping(), 2)
    assert ws.close_code == 1000
    await settled(gw)


async def test_message_rate_limit_client_scope_shared(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[API_KEY],
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 6,
                  "scope": "client", "action": "reject", "name": "per-client"}],
        top=with_clients()))
    url = gw.url("/")
    bobs = [await websockets.connect(url, additional_headers={"X-API-Key": "bob-key"})
            for _ in range(3)]
    for ws in bobs:
        for i in range(2):
            await ws.send(f"b{i}")
            assert await ws.recv() == f"b{i}"
    # The client's bucket of 6 is empty: a 7th message on any connection closes that one.
    await bobs[1].send("seventh")
    got, code, reason = await closed_by_gateway(bobs[1])
    assert (got, code) == ([], 1008)
    assert reason == "message rate limit exceeded: per-client"
    # The two others are still open (pings are not limited).
    for ws in (bobs[0], bobs[2]):
        await asyncio.wait_for(await ws.ping(), 2)
    # Another client has a bucket of its own.
    async with websockets.connect(url, additional_headers={"X-API-Key": "alice-key"}) as alice:
        for i in range(6):
            await alice.send(f"a{i}")
            assert await alice.recv() == f"a{i}"
    for ws in (bobs[0], bobs[2]):
        await ws.close()
    await settled(gw)


async def test_message_rate_limit_client_scope_survives_reconnection(gateway_factory, echo_backend):
    # The client's bucket lives in the zone, not in the connection: reconnecting does not refill it.
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[API_KEY],
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 3,
                  "scope": "client", "action": "reject", "name": "per-client"}],
        top=with_clients()))
    headers = {"X-API-Key": "bob-key"}
    async with websockets.connect(gw.url("/"), additional_headers=headers) as ws:
        for i in range(3):
            await ws.send(f"b{i}")
            assert await ws.recv() == f"b{i}"
    async with websockets.connect(gw.url("/"), additional_headers=headers) as ws:
        await ws.send("again")
        got, code, _ = await closed_by_gateway(ws)
    assert (got, code) == ([], 1008)
    await settled(gw)


async def test_message_rate_limit_api_scope_shared_by_everyone(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[API_KEY],
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 3,
                  "scope": "api", "action": "reject", "name": "whole-api"}],
        top=with_clients()))
    alice = await websockets.connect(gw.url("/"), additional_headers={"X-API-Key": "alice-key"})
    bob = await websockets.connect(gw.url("/"), additional_headers={"X-API-Key": "bob-key"})
    for ws, text in ((alice, "a0"), (alice, "a1"), (bob, "b0")):
        await ws.send(text)
        assert await ws.recv() == text
    await bob.send("b1")
    got, code, reason = await closed_by_gateway(bob)
    assert (got, code, reason) == ([], 1008, "message rate limit exceeded: whole-api")
    await asyncio.wait_for(await alice.ping(), 2)
    await alice.close()
    await settled(gw)


async def test_message_rate_limit_client_scope_without_identity_is_the_address(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        request=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 2,
                  "scope": "client", "action": "reject", "name": "per-address"}]))
    a = await websockets.connect(gw.url("/"))
    b = await websockets.connect(gw.url("/"))
    for ws in (a, b):
        await ws.send("one")
        assert await ws.recv() == "one"
    await a.send("two")
    got, code, _ = await closed_by_gateway(a)
    assert (got, code) == ([], 1008)
    await b.close()
    await settled(gw)


async def test_message_byte_rate_limit_reject(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        request=[{"policy": "message-rate-limit", "bytes": "1000/10s", "byte-burst": 1000,
                  "action": "reject", "name": "bytes"}]))
    async with websockets.connect(gw.url("/")) as ws:
        for size in (600, 300, 90):
            await ws.send(b"z" * size)
            assert await ws.recv() == b"z" * size
        await ws.send(b"z" * 50)                 # 1040 bytes in all: over the burst of 1000
        got, code, reason = await closed_by_gateway(ws)
    assert (got, code, reason) == ([], 1008, "message rate limit exceeded: bytes")
    await settled(gw)


async def test_count_limit_global_across_apis(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "count-limit", "key": "global", "max": 2}], extra_apis=["other"]))
    a = await websockets.connect(gw.url("/"))
    b = await websockets.connect(gw.url("/other"))
    assert (await refused(gw.url("/"))).status_code == 429
    assert (await refused(gw.url("/other/x"))).status_code == 429
    await b.close()
    await wait_live(gw, 1)
    async with websockets.connect(gw.url("/other")):
        pass
    await a.close()
    await settled(gw)


async def test_per_plan_message_rates(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[API_KEY],
        request=[{"policy": "message-rate-limit",
                  "messages": {"default": "1/10s", "gold": "100/1s"},
                  "burst": {"default": 2, "gold": 50}, "action": "reject", "name": "plan"}],
        top=with_clients()))
    url = gw.url("/")
    async with websockets.connect(url, additional_headers={"X-API-Key": "alice-key"}) as alice:
        for i in range(20):
            await alice.send(f"a{i}")
        assert [await alice.recv() for _ in range(20)] == [f"a{i}" for i in range(20)]
    async with websockets.connect(url, additional_headers={"X-API-Key": "bob-key"}) as bob:
        for i in range(2):
            await bob.send(f"b{i}")
            assert await bob.recv() == f"b{i}"
        await bob.send("b2")
        got, code, reason = await closed_by_gateway(bob)
    assert (got, code) == ([], 1008)
    assert reason == "message rate limit exceeded: plan"
    await settled(gw)


async def test_per_plan_count_and_size(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        pre=[API_KEY, {"policy": "count-limit", "key": "client-id",
                       "max": {"default": 1, "gold": 3}}],
        request=[{"policy": "message-size-limit", "max": {"default": "1KiB", "gold": "4KiB"}}],
        top=with_clients()))
    url = gw.url("/")
    alice = [await websockets.connect(url, additional_headers={"X-API-Key": "alice-key"})
             for _ in range(3)]
    assert (await refused(url, additional_headers={"X-API-Key": "alice-key"})).status_code == 429
    bob = await websockets.connect(url, additional_headers={"X-API-Key": "bob-key"})
    assert (await refused(url, additional_headers={"X-API-Key": "bob-key"})).status_code == 429
    await alice[0].send(b"g" * 4096)
    assert await alice[0].recv() == b"g" * 4096
    await bob.send(b"d" * 1024)
    assert await bob.recv() == b"d" * 1024
    await bob.send(b"d" * 1025)
    got, code, _ = await closed_by_gateway(bob)
    assert (got, code) == ([], 1009)
    await alice[1].send(b"g" * 4097)
    got, code, _ = await closed_by_gateway(alice[1])
    assert (got, code) == ([], 1009)
    for ws in (alice[0], alice[2]):
        await ws.close()
    await settled(gw)


async def test_response_flow_rate_limit_reject(gateway_factory):
    b = Backend(greeting=50)
    async with ws_serve(b.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(config_yaml(
            f"ws://127.0.0.1:{port}/",
            response=[{"policy": "message-rate-limit", "messages": "1/10s", "burst": 5,
                       "action": "reject", "name": "downstream"}]))
        async with websockets.connect(gw.url("/")) as ws:
            got, code, reason = await closed_by_gateway(ws)
        assert got == [f"g{i}" for i in range(5)]
        assert code == 1008
        assert reason == "message rate limit exceeded: downstream"
        await b.wait_closes(1)
        assert b.closes[0][0] == 1001
        await settled(gw)


# ------------------------------------------------------------------ message-size-limit


async def test_message_size_limit_fragmented(gateway_factory, backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        request=[{"policy": "message-size-limit", "max": "1KiB"}]))
    async with websockets.connect(gw.url("/")) as ws:
        await ws.send(b"x" * 900)
        assert await ws.recv() == b"x" * 900
        await ws.send([b"c" * 400, b"d" * 400])        # fragmented, 800 in all: fine
        assert await ws.recv() == b"c" * 400 + b"d" * 400
        await ws.send(b"y" * 1024)                     # exactly the limit
        assert await ws.recv() == b"y" * 1024
        await ws.send([b"a" * 600, b"b" * 600])        # each frame under, the message over
        got, code, _ = await closed_by_gateway(ws)
    assert (got, code) == ([], 1009)
    await backend.wait_closes(1)
    assert backend.closes[0][0] == 1001
    await settled(gw)


# ------------------------------------------------------------------ credentials


async def test_api_key_credentials(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/", pre=[API_KEY], top=with_clients()))
    response = await refused(gw.url("/"))
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").startswith("ApiKey")
    response = await refused(gw.url("/"), additional_headers={"X-API-Key": "nobody-key"})
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers
    assert (await refused(gw.url("/?api_key=wrong"))).status_code == 401
    # carol may use the API "other" only.
    response = await refused(gw.url("/"), additional_headers={"X-API-Key": "carol-key"})
    assert response.status_code == 403
    async with websockets.connect(gw.url("/other"), additional_headers={"X-API-Key": "carol-key"}) as ws:
        await ws.send("carol")
        assert await ws.recv() == "carol"
    async with websockets.connect(gw.url("/"), additional_headers={"X-API-Key": "bob-key"}) as ws:
        await ws.send("bob")
        assert await ws.recv() == "bob"
    async with websockets.connect(gw.url("/?api_key=alice-key")) as ws:
        await ws.send("alice")
        assert await ws.recv() == "alice"
        (conn,) = gw.gw.live.values()
        assert (conn.admission.client_id, conn.admission.plan) == ("alice", "gold")
    assert gw.gw.refused == {401: 3, 403: 1}
    await settled(gw)


def token(secret: str = SECRET, **claims) -> str:
    return jwt.encode({"sub": "jwt-user", **claims}, secret, algorithm="HS256")


async def test_jwt_credentials(gateway_factory, echo_backend, monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_SECRET", SECRET)
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "jwt", "algorithms": ["HS256"], "secret-env": "FASTGW_TEST_SECRET",
              "query": "access_token"}]))
    url = gw.url("/")
    now = time.time()
    good = token(exp=int(now) + 600)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {good}"}) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        (conn,) = gw.gw.live.values()
        assert conn.admission.client_id == "jwt-user"
    async with websockets.connect(gw.url(f"/?access_token={good}")) as ws:
        await ws.send("via query")
        assert await ws.recv() == "via query"
    response = await refused(url)
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    expired = token(exp=int(now) - 60)
    response = await refused(url, additional_headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.headers.get("WWW-Authenticate", "")
    forged = token("another-secret-of-at-least-32-bytes!!!!", exp=int(now) + 600)
    response = await refused(url, additional_headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert (await refused(gw.url(f"/?access_token={forged}"))).status_code == 401
    assert (await refused(url, additional_headers={"Authorization": "Bearer not.a.jwt"})).status_code == 401
    await settled(gw)


async def test_jwt_query_not_read_unless_configured(gateway_factory, echo_backend, monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_SECRET", SECRET)
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "jwt", "algorithms": ["HS256"], "secret-env": "FASTGW_TEST_SECRET"}]))
    good = token(exp=int(time.time()) + 600)
    assert (await refused(gw.url(f"/?access_token={good}"))).status_code == 401
    async with websockets.connect(gw.url("/"), additional_headers={"Authorization": f"Bearer {good}"}):
        pass
    await settled(gw)


async def test_jwt_close_on_expiry(gateway_factory, backend, monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_SECRET", SECRET)
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{backend.port}/",
        pre=[{"policy": "jwt", "algorithms": ["HS256"], "secret-env": "FASTGW_TEST_SECRET",
              "close-on-expiry": True}]))
    t0 = time.time()
    short = token(exp=t0 + 1.5)
    async with websockets.connect(gw.url("/"), additional_headers={"Authorization": f"Bearer {short}"}) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        got, code, reason = await closed_by_gateway(ws, timeout=5)
    elapsed = time.time() - t0
    assert got == []
    assert (code, reason) == (1008, "token expired")
    assert 1.0 <= elapsed <= 3.0, elapsed
    await backend.wait_closes(1)
    assert backend.closes[0][0] == 1001
    await settled(gw)


# ------------------------------------------------------------------ origins


async def test_origins(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/", api={"origins": ["https://app.example.com"]}))
    async with websockets.connect(gw.url("/"), origin="https://app.example.com") as ws:
        await ws.send("ok")
        assert await ws.recv() == "ok"
    async with websockets.connect(gw.url("/"), origin="https://App.Example.COM") as ws:
        pass
    assert (await refused(gw.url("/"), origin="https://evil.example.com")).status_code == 403
    assert (await refused(gw.url("/"), origin="http://app.example.com")).status_code == 403
    assert (await refused(gw.url("/"))).status_code == 403
    assert gw.gw.refused == {403: 3}
    await settled(gw)


# ------------------------------------------------------------------ trusted proxies


async def test_trusted_proxy_forwarded_for_is_the_client(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 1}],
        top={"trusted-proxies": ["127.0.0.1/32"]}))
    url = gw.url("/")
    one = await websockets.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
    two = await websockets.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.2"})
    response = await refused(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
    assert response.status_code == 429
    assert sorted(c.admission.client_ip for c in gw.gw.live.values()) == ["10.0.0.1", "10.0.0.2"]
    await one.close()
    await two.close()
    await settled(gw)


async def test_untrusted_forwarded_for_is_ignored(gateway_factory, echo_backend):
    gw = await gateway_factory(config_yaml(
        f"ws://127.0.0.1:{echo_backend}/",
        pre=[{"policy": "count-limit", "key": "client-ip", "max": 1}]))
    url = gw.url("/")
    one = await websockets.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
    response = await refused(url, additional_headers={"X-Forwarded-For": "10.0.0.2"})
    assert response.status_code == 429
    await one.close()
    await settled(gw)
