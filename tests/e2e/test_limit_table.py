"""A full limit table (`limits.max-keys`), end to end: never a silent admission.

The smallest table (`max-keys: 16`, 32 slots: one probe window covers it) is filled
from loopback with distinct client addresses (`X-Forwarded-For` from a trusted
127.0.0.1). A new key then gets 503 (upgrades) or its rule's action (messages),
counted in `fastgw_limit_table_full_total{policy}` and logged; once states are idle
(a bucket full again, a count at 0) they are evicted and new keys are admitted.

Real sockets on 127.0.0.1, the `websockets` library as client, the bundled echo backend.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import websockets
import yaml
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import get_metrics, value
from fastgw.clock import Clock

SLOTS = 32                     # max-keys 16: twice the slots are allocated


class TwoHoursLater(Clock):
    """The gateway's clock moved two hours on (the buckets it admits with)."""

    def now(self) -> float:
        return time.monotonic() + 7200.0


def config(target: str, apis: list[dict]) -> str:
    doc = {"listeners": [{"host": "127.0.0.1", "port": 0}],
           "trusted-proxies": ["127.0.0.1/32"],
           "limits": {"max-keys": 16},
           "apis": [{"name": a["name"], "path": a["path"],
                     "assembly": [*a.get("pre", []),
                                  {"policy": "websocket-upgrade", "target-url": target,
                                   **({"request": a["request"]} if "request" in a else {})}]}
                    for a in apis]}
    return yaml.safe_dump(doc, sort_keys=False)


def xff(i: int) -> dict:
    return {"X-Forwarded-For": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}


async def echo_once(url: str, i: int) -> None:
    async with websockets.connect(url, additional_headers=xff(i), open_timeout=5) as ws:
        await ws.send(f"m{i}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"m{i}"


async def refused(url: str, i: int):
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=xff(i), open_timeout=5):
            pass
    return info.value.response


async def warning_line(caplog, timeout: float = 5.0) -> str:
    """The gateway's WARNING about the full table (checked once a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.WARNING and "limit table is full" in r.getMessage()]
        if lines:
            return lines[-1]
        await asyncio.sleep(0.05)
    raise AssertionError("no warning about the full limit table")


RATE = {"name": "rated", "path": "/",
        "pre": [{"policy": "rate-limit", "key": "client-ip", "rate": "1/1h", "burst": 1}]}


async def test_rate_limit_at_a_full_table_refuses_503_counts_logs_and_evicts_idle_keys(
        gateway_factory, echo_backend, admin_for, caplog):
    caplog.set_level(logging.WARNING, logger="fastgw")
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/", [RATE]))
    admin = await admin_for(gw)
    url = gw.url("/")
    for i in range(SLOTS):                   # 32 addresses, each with its attempt spent for an hour
        await echo_once(url, i)
    assert gw.gw.zone.buckets_used(time.monotonic()) == SLOTS
    # Five new addresses: five refusals (503, not 101), counted, none dialled.
    for i in range(SLOTS, SLOTS + 5):
        response = await refused(url, i)
        assert response.status_code == 503
        assert b"the gateway's limit table is full" in response.body
    assert await refused(url, 0) is not None            # a key in the table: its own 429
    m = await get_metrics(admin)
    assert value(m, "fastgw_limit_table_full_total", policy="rate-limit") == 5
    assert value(m, "fastgw_limit_table_full_total", policy="count-limit") == 0
    assert value(m, "fastgw_limit_table_full_total", policy="message-rate-limit") == 0
    assert value(m, "fastgw_upgrades_rejected_total", api="rated", reason="capacity") == 5
    assert value(m, "fastgw_upgrades_rejected_total", api="rated", reason="rate_limit") == 1
    assert value(m, "fastgw_connections_total", api="rated") == SLOTS
    line = await warning_line(caplog)
    assert "5 refusals" in line and "rate-limit: 5" in line
    assert "10." not in line                             # no client address in the line
    # Two hours later every bucket is full again (idle): new addresses evict them.
    gw.gw.clock = TwoHoursLater()
    for i in range(SLOTS + 5, SLOTS + 10):
        await echo_once(url, i)
    assert gw.gw.zone.bucket_reuses == 5
    m = await get_metrics(admin)
    assert value(m, "fastgw_limit_table_full_total", policy="rate-limit") == 5
    await gw.wait_idle()


async def test_count_limit_at_a_full_table_refuses_503_and_reuses_freed_slots(
        gateway_factory, echo_backend, admin_for):
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/", [
        {"name": "counted", "path": "/",
         "pre": [{"policy": "count-limit", "key": "client-ip", "max": 2}]}]))
    admin = await admin_for(gw)
    url = gw.url("/")
    held = [await websockets.connect(url, additional_headers=xff(i)) for i in range(SLOTS)]
    assert gw.gw.zone.counts_used() == SLOTS
    for i in range(SLOTS, SLOTS + 3):
        response = await refused(url, i)
        assert response.status_code == 503
        assert b"the gateway's limit table is full" in response.body
    # An address already in the table is counted as before.
    again = await websockets.connect(url, additional_headers=xff(0))
    m = await get_metrics(admin)
    assert value(m, "fastgw_limit_table_full_total", policy="count-limit") == 3
    assert value(m, "fastgw_limit_table_full_total", policy="rate-limit") == 0
    assert value(m, "fastgw_upgrades_rejected_total", api="counted", reason="capacity") == 3
    # One address leaves: its slot (count 0) goes to a new address.
    await held[5].close()
    deadline = time.monotonic() + 5
    while gw.gw.zone.counts_used() == SLOTS and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    newcomer = await websockets.connect(url, additional_headers=xff(SLOTS))
    await newcomer.send("hello")
    assert await asyncio.wait_for(newcomer.recv(), 5) == "hello"
    assert gw.gw.zone.count_reuses == 1
    assert (await refused(url, SLOTS + 1)).status_code == 503     # full again
    for ws in [*held, again, newcomer]:
        await ws.close()
    await gw.wait_idle()
    m = await get_metrics(admin)
    assert value(m, "fastgw_limit_table_full_total", policy="count-limit") == 4
    assert gw.gw.zone.counts_used() == 0


async def test_client_scope_message_at_a_full_table_gets_the_rules_action(
        gateway_factory, echo_backend, admin_for, caplog):
    caplog.set_level(logging.WARNING, logger="fastgw")
    rule = {"policy": "message-rate-limit", "messages": "1/1h", "burst": 100, "scope": "client"}
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/", [
        {**RATE, "name": "fill", "path": "/fill"},
        {"name": "chat", "path": "/chat", "request": [{**rule, "name": "per-client", "action": "reject"}]},
        {"name": "quiet", "path": "/quiet", "request": [{**rule, "name": "hush", "action": "drop"}]},
    ]))
    admin = await admin_for(gw)
    # Before the table is full, the rule passes messages (a slot for the client's bucket).
    await echo_once(gw.url("/chat"), 100_000)
    for i in range(SLOTS - 1):               # the other 31 slots: attempt buckets, busy for an hour
        await echo_once(gw.url("/fill"), i)
    assert (await refused(gw.url("/fill"), SLOTS)).status_code == 503
    # A new client's message finds no slot for its bucket: over the limit, never passed.
    async with websockets.connect(gw.url("/chat"), additional_headers=xff(SLOTS + 1)) as ws:
        await ws.send("hello")
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    assert await ws.recv() != "hello"
        assert ws.close_code == 1008
        assert ws.close_reason == "message rate limit exceeded: per-client"
    # With action drop, its messages are dropped and counted; the connection stays.
    async with websockets.connect(gw.url("/quiet"), additional_headers=xff(SLOTS + 2)) as ws:
        await ws.send("one")
        await ws.send("two")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = await get_metrics(admin)
            if value(m, "fastgw_messages_limited_total", api="quiet", direction="request",
                     action="drop") == 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(await ws.ping(), 5)
    m = await get_metrics(admin)
    assert value(m, "fastgw_messages_limited_total", api="quiet", direction="request", action="drop") == 2
    assert value(m, "fastgw_messages_limited_total", api="chat", direction="request", action="reject") == 1
    assert value(m, "fastgw_messages_total", api="quiet", direction="request") == 2
    assert value(m, "fastgw_limit_table_full_total", policy="message-rate-limit") == 3
    assert value(m, "fastgw_limit_table_full_total", policy="rate-limit") == 1
    line = await warning_line(caplog)
    assert "message-rate-limit: 3" in line
    await gw.wait_idle()
