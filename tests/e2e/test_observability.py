"""Metrics, the admin API and reload, through real sockets."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import gateway_yaml, get_metrics, samples, value
from fastgw.observe.admin import start_admin


async def test_counters_equal_the_traffic(gateway_factory, echo_backend, admin_for):
    yaml_text = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo")
    yaml_text += ("  - name: down\n    path: /down\n    assembly:\n      - policy: websocket-upgrade\n"
                  "        target-url: ws://127.0.0.1:1/\n")
    gw = await gateway_factory(yaml_text)
    admin = await admin_for(gw)
    sizes = [10, 100, 1000]
    n = 1000
    conns = [await websockets.connect(gw.url("/echo"), compression=None) for _ in range(3)]
    for ws, size in zip(conns, sizes):
        for i in range(n):
            await ws.send(b"x" * size)
        for i in range(n):
            assert len(await ws.recv()) == size
    m = await get_metrics(admin)
    assert value(m, "fastgw_connections_active", api="echo") == 3
    for ws in conns:
        await ws.close(4000 + 1, "done")
    # One refusal of each reason this configuration can provoke.
    with pytest.raises(InvalidStatus):
        await websockets.connect(gw.url("/nowhere"))
    with pytest.raises(InvalidStatus):
        await websockets.connect(gw.url("/down"))
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url("/echo").replace("ws://", "http://")) as r:
            assert r.status == 426
    await gw.wait_idle()
    m = await get_metrics(admin)
    total_bytes = n * sum(sizes)
    assert value(m, "fastgw_connections_total", api="echo") == 3
    assert value(m, "fastgw_connections_active", api="echo") == 0
    for direction in ("request", "response"):
        assert value(m, "fastgw_messages_total", api="echo", direction=direction) == 3 * n
        assert value(m, "fastgw_bytes_total", api="echo", direction=direction) == total_bytes
        for action in ("reject", "delay", "drop"):
            assert value(m, "fastgw_messages_limited_total", api="echo", direction=direction,
                         action=action) == 0
    assert value(m, "fastgw_closes_total", api="echo", code="4001", side="client") == 3
    assert value(m, "fastgw_upgrades_rejected_total", api="", reason="not_found") == 1
    assert value(m, "fastgw_upgrades_rejected_total", api="echo", reason="bad_request") == 1
    assert value(m, "fastgw_upgrades_rejected_total", api="down", reason="upstream_error") == 1
    assert value(m, "fastgw_handshake_seconds_count", api="echo") == 3
    assert value(m, "fastgw_upstream_connect_seconds_count", api="echo") == 3
    assert value(m, "fastgw_connection_duration_seconds_count", api="echo") == 3


async def test_admin_lists_and_closes_connections(gateway_factory, admin_for):
    backend_closed = []

    async def handler(conn):
        try:
            async for msg in conn:
                await conn.send(msg)
        finally:
            backend_closed.append(conn.close_code)

    # No compression: bytes_in is a plain size (with permessage-deflate it is the wire's).
    async with ws_serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        admin = await admin_for(gw, token="s3cret")
        a = await websockets.connect(gw.url("/"))
        b = await websockets.connect(gw.url("/"))
        await a.send("hi")
        assert await a.recv() == "hi"
        auth = {"Authorization": "Bearer s3cret"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{admin.url}/connections") as r:
                assert r.status == 401
            async with http.get(f"{admin.url}/connections", headers=auth) as r:
                listed = await r.json()
            assert len(listed) == 2
            first = next(c for c in listed if c["messages_in"] == 1)
            assert first["api"] == "test" and first["client"] == "127.0.0.1" and first["bytes_in"] == 2
            async with http.delete(f"{admin.url}/connections/{first['id']}", headers=auth) as r:
                assert r.status == 200
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(a.recv(), 5)
            assert (a.close_code, a.close_reason) == (1001, "closed by administrator")
            await gw.wait_idle(0.5)
            assert len(gw.gw.live) == 1
            async with http.delete(f"{admin.url}/connections?client=127.0.0.1", headers=auth) as r:
                assert (await r.json()) == {"closed": 1}
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(b.recv(), 5)
        await gw.wait_idle()
        for _ in range(50):
            if len(backend_closed) == 2:
                break
            await asyncio.sleep(0.05)
        assert backend_closed == [1001, 1001]


async def test_reload_changes_limits_for_new_connections_and_refuses_bad_files(
        tmp_path, gateway_factory, echo_backend, admin_for):
    from fastgw import config as cfgmod
    from fastgw.gateway import Gateway
    path = tmp_path / "gw.yaml"
    base = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/")
    path.write_text(base)
    gw = Gateway(cfgmod.load(str(path)), str(path))
    await gw.start()
    port = gw.addresses[0][2]
    admin = await start_admin(gw, "127.0.0.1", 0, None)
    try:
        live = [await websockets.connect(f"ws://127.0.0.1:{port}/") for _ in range(100)]
        stop = asyncio.Event()
        counts = [0] * len(live)

        async def chatter(i, ws):
            while not stop.is_set():
                await ws.send(f"{i}")
                assert await ws.recv() == f"{i}"
                counts[i] += 1

        tasks = [asyncio.create_task(chatter(i, ws)) for i, ws in enumerate(live)]
        await asyncio.sleep(0.3)
        # A limit of 5 messages per connection for new connections.
        path.write_text(base + "        request:\n          - policy: message-rate-limit\n"
                               "            messages: 1/10s\n            burst: 5\n")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{admin.url}/reload") as r:
                assert r.status == 200 and (await r.json())["reloaded"] is True
            new = await websockets.connect(f"ws://127.0.0.1:{port}/")
            for i in range(5):
                await new.send("n")
                assert await new.recv() == "n"
            await new.send("too many")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(new.recv(), 5)
            assert new.close_code == 1008
            # An invalid file is refused and the running configuration stays.
            path.write_text(base.replace("target-url", "target-urll"))
            async with http.post(f"{admin.url}/reload") as r:
                assert r.status == 422
                body = await r.json()
            assert "target-urll" in body["error"] and "gw.yaml" in body["error"]
            probe = await websockets.connect(f"ws://127.0.0.1:{port}/")
            for i in range(5):
                await probe.send("p")
                assert await probe.recv() == "p"
            await probe.close()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        assert all(c > 0 for c in counts)
        for ws in live:                         # none of the live connections was dropped
            await ws.send("still")
            assert await ws.recv() == "still"
            await ws.close()
    finally:
        await admin.close()
        await gw.shutdown(1.0)


async def test_events_one_per_upgrade_close_and_refusal(gateway_factory, echo_backend, tmp_path):
    from fastgw.observe.events import CloseEvent, EventSink, RejectEvent, UpgradeEvent, decode_event
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo"))
    log = tmp_path / "events.jsonl"
    gw.gw.events = EventSink(str(log))
    conns = [await websockets.connect(gw.url("/echo"), compression=None) for _ in range(3)]
    for ws in conns:
        await ws.send("a" * 10)
        assert await ws.recv() == "a" * 10
        await ws.close(4002, "bye")
    with pytest.raises(InvalidStatus):
        await websockets.connect(gw.url("/nope"))
    await gw.wait_idle()
    gw.gw.events.close()
    events = [decode_event(line) for line in log.read_bytes().splitlines()]
    ups = [e for e in events if isinstance(e, UpgradeEvent)]
    closes = [e for e in events if isinstance(e, CloseEvent)]
    rejects = [e for e in events if isinstance(e, RejectEvent)]
    assert len(ups) == len(closes) == 3 and len(rejects) == 1
    assert sorted(e.id for e in ups) == sorted(e.id for e in closes)
    for e in closes:
        assert (e.api, e.code, e.reason, e.side) == ("echo", 4002, "bye", "client")
        assert (e.messages_in, e.messages_out, e.bytes_in, e.bytes_out) == (1, 1, 10, 10)
    assert ups[0].client == "127.0.0.1" and ups[0].plan == "default" and ups[0].handshake_ms > 0
    assert (rejects[0].api, rejects[0].reason, rejects[0].status) == (None, "not_found", 404)


async def test_histograms_export_decodes_with_hdrhistogram(gateway_factory, echo_backend, admin_for):
    from hdrh.histogram import HdrHistogram
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo"))
    admin = await admin_for(gw)
    sizes = [5, 50, 500, 5000, 50000]
    for _ in range(3):
        async with websockets.connect(gw.url("/echo"), compression=None, max_size=None) as ws:
            for size in sizes:
                await ws.send(b"z" * size)
                await ws.recv()
    await gw.wait_idle()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin.url}/histograms") as r:
            names = await r.json()
        assert {"echo/handshake_us", "echo/upstream_connect_us", "echo/duration_ms",
                "echo/request_held_us"} <= set(names)
        async with http.get(f"{admin.url}/histograms/echo/handshake_us") as r:
            body = await r.json()
        async with http.get(f"{admin.url}/histograms/echo/duration_ms?format=hdr") as r:
            duration = HdrHistogram.decode(await r.read())
    handshake = HdrHistogram.decode(body["encoded"].encode())
    assert handshake.get_total_count() == 3 and duration.get_total_count() == 3
    assert body["percentiles"]["100.0"] == handshake.get_value_at_percentile(100)
    assert handshake.get_value_at_percentile(50) > 0
    # Message sizes: a Prometheus histogram with power-of-4 buckets.
    m = await get_metrics(admin)
    for le, expected in (("15", 3), ("63", 6), ("1023", 9), ("16383", 12), ("+Inf", 15)):
        assert value(m, "fastgw_message_size_bytes_bucket", api="echo", direction="request", le=le) == expected
    assert value(m, "fastgw_message_size_bytes_sum", api="echo", direction="response") == 3 * sum(sizes)


async def test_interval_log_reads_back(gateway_factory, echo_backend, tmp_path):
    from hdrh.histogram import HdrHistogram
    from hdrh.log import HistogramLogReader
    from fastgw.observe.histograms import IntervalLog
    log_path = tmp_path / "fastgw.hlog"
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo",
                                            extra_top=f"histogram-log: {{path: {log_path}, interval: 1s}}"))
    log = IntervalLog(gw.gw.metrics, str(log_path), 1.0)
    for round_ in range(2):
        async with websockets.connect(gw.url("/echo"), compression=None) as ws:
            for size in (10, 20, 30)[: round_ + 2]:
                await ws.send(b"q" * size)
                await ws.recv()
        await gw.wait_idle()
        log.write_interval()
    log.close()
    reader = HistogramLogReader(str(log_path), HdrHistogram(1, 1 << 40, 2))
    seen = {}
    while (h := reader.get_next_interval_histogram()) is not None:
        seen.setdefault(h.get_tag(), []).append(h.get_total_count())
    assert seen["echo/handshake_us"][:2] == [1, 1]                 # per interval, not cumulative
    assert seen["echo/request_held_us"][:2] == [0, 0]
    assert seen["echo/duration_ms"][:2] == [1, 1]


async def test_every_refusal_reason_is_counted(gateway_factory, echo_backend, admin_for):
    silent_writers = []

    async def silent(reader, writer):
        silent_writers.append(writer)
        await reader.read()

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = silent_server.sockets[0].getsockname()[1]
    target = f"ws://127.0.0.1:{echo_backend}/"
    gw = await gateway_factory(f"""\
listeners: [{{host: 127.0.0.1, port: 0}}]
clients: [{{id: alice, key: alice-key, apis: [keyed]}}, {{id: bob, key: bob-key, apis: [slow]}}]
apis:
  - name: keyed
    path: /keyed
    assembly:
      - {{policy: api-key}}
      - {{policy: websocket-upgrade, target-url: "{target}"}}
  - name: counted
    path: /counted
    assembly:
      - {{policy: count-limit, key: client-ip, max: 1}}
      - {{policy: websocket-upgrade, target-url: "{target}"}}
  - name: rated
    path: /rated
    assembly:
      - {{policy: rate-limit, key: client-ip, rate: 1/1m, burst: 1}}
      - {{policy: websocket-upgrade, target-url: "{target}"}}
  - name: slow
    path: /slow
    assembly:
      - {{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{silent_port}/", timeout: 300ms}}
""")
    admin = await admin_for(gw)

    async def refused(path, **kw):
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(gw.url(path), **kw)
        return info.value.response.status_code

    assert await refused("/keyed") == 401                                              # unauthorized
    assert await refused("/keyed", additional_headers={"X-API-Key": "bob-key"}) == 403  # forbidden
    held = await websockets.connect(gw.url("/counted"))
    assert await refused("/counted") == 429                                            # count_limit
    first = await websockets.connect(gw.url("/rated"))
    await first.close()
    await gw.wait_idle(0.5)
    assert await refused("/rated") == 429                                              # rate_limit
    assert await refused("/slow") == 504                                               # upstream_timeout
    await held.close()
    await gw.wait_idle()
    await gw.gw.drain(1.0)
    assert await refused("/keyed", additional_headers={"X-API-Key": "alice-key"}) == 503  # capacity (draining)
    await gw.wait_idle()
    m = await get_metrics(admin)
    expected = {("keyed", "unauthorized"): 1, ("keyed", "forbidden"): 1, ("counted", "count_limit"): 1,
                ("keyed", "capacity"): 1, ("rated", "rate_limit"): 1, ("slow", "upstream_timeout"): 1}
    for api in ("keyed", "counted", "rated", "slow"):
        for reason in ("bad_request", "unauthorized", "forbidden", "count_limit", "rate_limit",
                       "capacity", "upstream_error", "upstream_timeout"):
            assert value(m, "fastgw_upgrades_rejected_total", api=api, reason=reason) == \
                expected.get((api, reason), 0), (api, reason)
    assert value(m, "fastgw_connections_total", api="counted") == 1
    assert value(m, "fastgw_connections_total", api="rated") == 1
    for w in silent_writers:
        w.close()
    silent_server.close()


async def test_reload_removing_an_api_closes_its_connections_after_the_grace(tmp_path, echo_backend):
    from fastgw import config as cfgmod
    from fastgw.gateway import Gateway
    path = tmp_path / "gw.yaml"
    keep = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/keep", name="keep",
                        extra_top="reload-grace: 300ms")
    gone = ("  - name: gone\n    path: /gone\n    assembly:\n      - policy: websocket-upgrade\n"
            f"        target-url: ws://127.0.0.1:{echo_backend}/\n")
    path.write_text(keep + gone)
    gw = Gateway(cfgmod.load(str(path)), str(path))
    await gw.start()
    port = gw.addresses[0][2]
    try:
        kept = await websockets.connect(f"ws://127.0.0.1:{port}/keep")
        removed = await websockets.connect(f"ws://127.0.0.1:{port}/gone")
        path.write_text(keep)
        assert await gw.reload() is None
        await removed.send("still served during the grace")
        assert await removed.recv() == "still served during the grace"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(removed.recv(), 5)
        assert (removed.close_code, removed.close_reason) == (1001, "API removed by reload")
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/gone")
        await kept.send("kept")
        assert await kept.recv() == "kept"
        await kept.close()
    finally:
        await gw.shutdown(1.0)


async def test_drain_turns_readiness_off_and_closes_with_1001(gateway_factory, echo_backend, admin_for):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    admin = await admin_for(gw)
    ws = await websockets.connect(gw.url("/"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin.url}/readyz") as r:
            assert r.status == 200
        async with http.post(f"{admin.url}/drain?grace=2") as r:
            assert r.status == 202
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert (ws.close_code, ws.close_reason) == (1001, "gateway shutting down")
        async with http.get(f"{admin.url}/readyz") as r:
            assert r.status == 503
    # The listener stays open while draining: a new upgrade is answered 503, not refused by TCP.
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gw.url("/"), open_timeout=2)
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Connection"] == "close"


# --- the active gauge: counted at attach and at the end of life, never by walking ----------


def active_gauge(text: str) -> dict[str, float]:
    return {dict(labels)["api"]: v for (name, labels), v in samples(text).items()
            if name == "fastgw_connections_active"}


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


async def test_active_gauge_follows_opens_closes_refusals_and_reload(tmp_path, echo_backend,
                                                                     gateway_factory):
    from collections import Counter

    def api(name: str, target: str = f"ws://127.0.0.1:{echo_backend}/") -> str:
        return (f"  - name: {name}\n    path: /{name}\n    assembly:\n"
                f"      - policy: websocket-upgrade\n        target-url: {target}\n")

    head = "listeners: [{host: 127.0.0.1, port: 0}]\nreload-grace: 300ms\napis:\n"
    first = head + api("keep") + api("gone") + api("down", "ws://127.0.0.1:1/")
    rg = await gateway_factory(first)
    gw, port = rg.gw, rg.port
    path = tmp_path / "gw.yaml"
    path.write_text(first)
    gw.config_path = str(path)                 # what a reload reads

    async def check(expected: dict[str, int]) -> None:
        """The gauge of every API is `expected` and is what the live table holds."""
        gauge = active_gauge(await gw.metrics_text())
        live = Counter(conn.api for conn in gw.live.values())
        assert gauge == {name: float(n) for name, n in expected.items()}
        assert {name: n for name, n in live.items()} == {k: v for k, v in expected.items() if v}

    async def connect(name: str):
        return await websockets.connect(f"ws://127.0.0.1:{port}/{name}")

    await check({"keep": 0, "gone": 0, "down": 0})
    keep = [await connect("keep") for _ in range(3)]
    gone = [await connect("gone") for _ in range(2)]
    await check({"keep": 3, "gone": 2, "down": 0})
    # Refusals never count as live: before routing (404), at the dial (502), not an upgrade (426).
    for name in ("nowhere", "down"):
        with pytest.raises(InvalidStatus):
            await connect(name)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/keep") as r:
            assert r.status == 426
    await check({"keep": 3, "gone": 2, "down": 0})
    await keep.pop().close()
    await until(lambda: len(gw.live) == 4)
    await check({"keep": 2, "gone": 2, "down": 0})
    # A reload removing "gone" and adding "new": gone's connections stay live (and counted)
    # until the grace is over, then end with 1001; the new API starts at 0.
    path.write_text(head + api("keep") + api("down", "ws://127.0.0.1:1/") + api("new"))
    assert await gw.reload() is None
    await check({"keep": 2, "gone": 2, "down": 0, "new": 0})
    new = await connect("new")
    await check({"keep": 2, "gone": 2, "down": 0, "new": 1})
    for ws in gone:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    await until(lambda: len(gw.live) == 3)
    await check({"keep": 2, "gone": 0, "down": 0, "new": 1})
    for ws in (*keep, new):
        await ws.close()
    await until(lambda: not gw.live)
    await check({"keep": 0, "gone": 0, "down": 0, "new": 0})
    m = samples(await gw.metrics_text())
    assert value(m, "fastgw_connections_total", api="keep") == 3
    assert value(m, "fastgw_connections_total", api="gone") == 2
    assert value(m, "fastgw_closes_total", api="gone", code="1001", side="gateway") == 2


class _NoWalk(dict):
    """A live table that fails the test when something iterates it."""

    def _walked(self, *args):
        raise AssertionError("a scrape walked the live connections")

    __iter__ = values = items = keys = _walked


async def test_a_scrape_never_walks_the_live_connections(gateway_factory, echo_backend, admin_for):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo"))
    admin = await admin_for(gw)
    conns = [await websockets.connect(gw.url("/echo")) for _ in range(2)]
    real = gw.gw.live
    before = await gw.gw.metrics_text()
    # 10,000 more entries that a walk would count, in a table that cannot be walked.
    walled = _NoWalk(real)
    dict.update(walled, {10**9 + i: None for i in range(10_000)})
    gw.gw.live = walled
    try:
        text = await gw.gw.metrics_text()
        m = await get_metrics(admin)                   # through the admin API too
    finally:
        gw.gw.live = real
    assert text == before
    assert value(m, "fastgw_connections_active", api="echo") == 2
    for ws in conns:
        await ws.close()
    await gw.wait_idle()
    assert active_gauge(await gw.gw.metrics_text()) == {"echo": 0.0}
