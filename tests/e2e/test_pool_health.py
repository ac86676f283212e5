"""A pool's health end to end (issue 12): two echo backends behind a pool with retries, the
outlier detection and active health checks; one backend's port is closed under a steady
100 upgrades/s from `websockets` clients, and comes back on the same port. Nobody sees a
failure, the outlier ejects it, the checks mark it down and up in time, and the metrics and
events say so. A single target-url renders the target metrics too."""

from __future__ import annotations

import asyncio
import json
import time

import websockets

from conftest import gateway_yaml, get_metrics, value
from fastgw.echo import close_connections, serve as echo_serve, server_port
from fastgw.observe.events import EventSink
from fastgw.pool import DIAL_FAILURE_REASONS

INTERVAL, UNHEALTHY_AFTER, HEALTHY_AFTER = 0.5, 2, 2
RATE = 100                  # upgrades per second


def pool_yaml(ports: list[int]) -> str:
    targets = "".join(f"\n  - url: ws://127.0.0.1:{p}/" for p in ports)
    extra = (f"targets:{targets}\nretries: 2\noutlier: {{failures: 3, eject: 1s}}\n"
             f"health-check: {{interval: {INTERVAL}s, timeout: 0.3s, path: /health, "
             f"unhealthy-after: {UNHEALTHY_AFTER}, healthy-after: {HEALTHY_AFTER}}}")
    return gateway_yaml("X", extra_upgrade=extra).replace("        target-url: X\n", "")


class Load:
    """`RATE` upgrades per second, each echoing one message and closing; every failure a
    client sees is kept."""

    def __init__(self, url: str):
        self.url = url
        self.started = self.ok = 0
        self.failures: list[str] = []
        self.tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None

    async def _one(self, n: int) -> None:
        try:
            async with websockets.connect(self.url, compression=None, open_timeout=5) as ws:
                await ws.send(f"m{n}")
                assert await asyncio.wait_for(ws.recv(), 5) == f"m{n}"
            self.ok += 1
        except Exception as exc:           # anything a client sees is a failure
            self.failures.append(f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            due = t0 + self.started / RATE
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self._one(self.started))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.started += 1

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._runner.cancel()
        try:
            await self._runner
        except asyncio.CancelledError:
            pass
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)


async def wait_for(predicate, timeout: float, what: str) -> float:
    """Look every 5 ms until `predicate()` is true; the time it took (fails after `timeout`)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def test_a_target_killed_under_load(gateway_factory, admin_for, tmp_path):
    a = await echo_serve("127.0.0.1", 0)
    b = await echo_serve("127.0.0.1", 0)
    port_b = server_port(b)
    rg = await gateway_factory(pool_yaml([server_port(a), port_b]))
    gw = rg.gw
    events_path = tmp_path / "events.jsonl"
    gw.events = EventSink(str(events_path))
    admin = await admin_for(rg)
    ta, tb = gw.pools["test"].targets
    load = Load(rg.url("/"))
    try:
        load.start()
        # Both healthy, both checked: the checks are no dials.
        await wait_for(lambda: tb.health_checks.get("success", 0) >= 2, 3 * INTERVAL + 1, "checks")
        assert tb.dial_failures == {} and ta.dial_failures == {}
        # b's port is closed (its server stopped; its few live echoes end on their own).
        b.close()
        killed = time.monotonic()
        await wait_for(lambda: tb.ejected_until > gw.clock.now(), 2, "outlier ejection")
        ejected_after = time.monotonic() - killed
        await wait_for(lambda: not tb.healthy, INTERVAL * UNHEALTHY_AFTER + 1 - ejected_after,
                       "health-check down")
        down_after = time.monotonic() - killed
        m = await get_metrics(admin)
        label = dict(api="test", target=tb.label)
        assert value(m, "fastgw_target_up", **label) == 0
        assert value(m, "fastgw_target_up", api="test", target=ta.label) == 1
        # The dials that ejected it: refused, or reset when one was in b's accept queue as
        # its listening socket closed ("Connection reset by peer", seen in CI).
        failed = {r: value(m, "fastgw_target_dial_failures_total", reason=r, **label)
                  for r in ("refused", "reset")}
        assert failed["refused"] >= 1 and sum(failed.values()) >= 3, failed
        assert value(m, "fastgw_target_health_checks_total", result="failure", **label) >= UNHEALTHY_AFTER
        await asyncio.sleep(0.5)                         # a while longer down: a carries it all
        close_connections(b)
        # b comes back on the same port.
        b = await echo_serve("127.0.0.1", port_b)
        back = time.monotonic()
        up_after = await wait_for(lambda: tb.healthy, INTERVAL * HEALTHY_AFTER + 1,
                                  "health-check up")
        await wait_for(lambda: tb.up(gw.clock.now()), 2.5, "ejection over")
        served = tb.health_checks.get("success", 0)
        await asyncio.sleep(0.3)
        await load.stop()
        m = await get_metrics(admin)
    finally:
        if not load._runner.done():
            await load.stop()
        await rg.wait_idle()
        a.close()
        b.close()
        await gw.events.aclose()
    print(f"\nb killed: ejected after {ejected_after:.3f}s, down after {down_after:.3f}s "
          f"(bound {INTERVAL * UNHEALTHY_AFTER + 1:g}s); back: up after {up_after:.3f}s "
          f"(bound {INTERVAL * HEALTHY_AFTER + 1:g}s); {load.ok} upgrades, "
          f"{len(load.failures)} failures; b's dial failures {tb.dial_failures}")
    assert load.failures == [], load.failures[:5]
    assert load.ok == load.started and load.ok >= 3 * RATE
    assert value(m, "fastgw_target_up", **label) == 1
    assert value(m, "fastgw_target_health_checks_total", result="success", **label) >= served
    for reason, n in tb.dial_failures.items():
        assert value(m, "fastgw_target_dial_failures_total", reason=reason, **label) == n
    assert value(m, "fastgw_target_connections_active", **label) == 0
    assert tb.dial_failures["refused"] > 0 and set(tb.dial_failures) <= {"refused", "reset"}
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    told = [(e["event"], e["reason"]) for e in events if e["event"].startswith("target_")
            and e["target"] == tb.label]
    assert told[0] == ("target_down", "outlier")
    assert ("target_down", "health-check") in told and told[-1] == ("target_up", "health-check")
    assert not [e for e in events if e["event"].startswith("target_") and e["target"] == ta.label]
    # The health checks left no trace in the gateway's own counts.
    assert gw.accepted == load.ok and ta.active == tb.active == 0


async def test_a_single_target_url_renders_target_metrics(gateway_factory, admin_for, echo_backend):
    rg = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    admin = await admin_for(rg)
    label = dict(api="test", target=f"ws://127.0.0.1:{echo_backend}/")
    async with websockets.connect(rg.url("/"), compression=None) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        m = await get_metrics(admin)
    assert value(m, "fastgw_target_connections_active", **label) == 1
    assert value(m, "fastgw_target_up", **label) == 1
    for reason in DIAL_FAILURE_REASONS:
        assert ("fastgw_target_dial_failures_total",
                frozenset({**label, "reason": reason}.items())) in m
    for result in ("success", "failure"):
        assert ("fastgw_target_health_checks_total",
                frozenset({**label, "result": result}.items())) in m
    assert rg.gw.health.loops == {}                      # no health-check: no checks
    await rg.wait_idle()
    m = await get_metrics(admin)
    assert value(m, "fastgw_target_connections_active", **label) == 0
