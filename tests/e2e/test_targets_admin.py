"""The admin API's targets routes (issue 12): GET /targets, POST /targets/drain and
POST /targets/enable, their errors, the token; and with `workers: 2` the supervisor's merge of
every worker's targets and a drain that reaches both workers' connections. Real loopback
sockets: gateways in this process with their admin API, or `fastgw run` with workers and the
counting echo backend (tests/countecho.py) in its own process."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
import yaml

from fastgw.observe.aggregate import merge_targets
from fastgw.observe.events import TargetDrainEvent, TargetUpEvent
from wire import CLOSE, close_payload, frame, free_port, open_ws, read_close
from workerlib import CountingBackend, Events, backend, gateway_config, start_gateway  # noqa: F401

FIELDS = {"api", "target", "balance", "weight", "state", "up", "connections", "dial_failures",
          "ejected_for", "health_check"}


def two_apis(x: int, y: int, z: int, *, top: str = "", upgrade: str = "") -> str:
    """API "zeta" (a pool of X, weight 2, and Y; round-robin) and API "alpha" (one target-url,
    Z, with a secret in its query), in that order."""
    return ("listeners:\n  - {host: 127.0.0.1, port: 0}\n" + top +
            "apis:\n"
            "  - name: zeta\n    path: /z\n    assembly:\n"
            "      - policy: websocket-upgrade\n        balance: round-robin\n" + upgrade +
            "        targets:\n"
            f"          - {{url: 'ws://127.0.0.1:{x}/', weight: 2}}\n"
            f"          - {{url: 'ws://127.0.0.1:{y}/'}}\n"
            "  - name: alpha\n    path: /a\n    assembly:\n"
            f"      - {{policy: websocket-upgrade, target-url: 'ws://127.0.0.1:{z}/?key=hush'}}\n")


async def call(http, method: str, url: str, headers=None) -> tuple[int, object]:
    async with http.request(method, url, headers=headers) as r:
        assert r.content_type == "application/json", (url, r.status, await r.text())
        return r.status, await r.json()


async def test_get_targets_every_pool_api_names_in_order_targets_as_configured(
        gateway_factory, admin_for, echo_backend):
    e = echo_backend
    rg = await gateway_factory(two_apis(e, free_port(), e))
    admin = await admin_for(rg)
    reader, writer = await open_ws(rg.port, path="/z")         # round-robin: X first
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await call(http, "GET", f"{admin.url}/targets")
    finally:
        writer.close()
    assert status == 200 and list(body) == ["targets"]
    rows = body["targets"]
    assert [(r["api"], r["target"], r["weight"], r["balance"]) for r in rows] == [
        ("alpha", f"ws://127.0.0.1:{e}/", 1, "least-connections"),   # no query: no secret
        ("zeta", f"ws://127.0.0.1:{e}/", 2, "round-robin"),
        ("zeta", rows[2]["target"], 1, "round-robin")]
    assert all(set(r) == FIELDS for r in rows)
    assert "hush" not in str(body)
    x = rows[1]
    assert (x["state"], x["up"], x["connections"], x["dial_failures"], x["ejected_for"],
            x["health_check"]) == ("healthy", True, 1, 0, 0.0, None)


async def test_drain_and_enable_find_a_target_by_its_url_with_or_without_its_query(
        gateway_factory, admin_for, echo_backend, caplog):
    e = echo_backend
    rg = await gateway_factory(two_apis(e, free_port(), e,
                                        top="drain-time: 7s\n"))
    admin = await admin_for(rg)
    events = rg.gw.events = Events()
    caplog.set_level(logging.WARNING, "fastgw")
    label = f"ws://127.0.0.1:{e}/"
    async with aiohttp.ClientSession() as http:
        # No grace: the configuration's drain-time.
        status, view = await call(http, "POST", f"{admin.url}/targets/drain?api=alpha&target={label}%3Fkey%3Dhush")
        assert status == 200 and set(view) == FIELDS
        assert (view["api"], view["target"], view["state"], view["up"]) == ("alpha", label, "draining", True)
        status, view = await call(http, "POST", f"{admin.url}/targets/drain?api=alpha&target={label}&grace=0.25")
        assert status == 200 and view["state"] == "draining"
        status, body = await call(http, "GET", f"{admin.url}/targets")
        assert [r["state"] for r in body["targets"]] == ["draining", "healthy", "healthy"]
        status, view = await call(http, "POST", f"{admin.url}/targets/enable?api=alpha&target={label}")
        assert status == 200 and view["state"] == "healthy"
    assert [(ev.api, ev.target, ev.grace_s, ev.connections) for ev in events.of(TargetDrainEvent)] == [
        ("alpha", label, 7.0, 0), ("alpha", label, 0.25, 0)]
    assert [(ev.target, ev.reason) for ev in events.of(TargetUpEvent)] == [(label, "enable")]
    text = caplog.text
    assert f"api alpha: target {label} draining: 0 connections closed with 1001 over 7s" in text
    assert f"api alpha: target {label} enabled" in text
    assert "hush" not in text


@pytest.mark.parametrize("method, query, status, says", [
    ("drain", "", 400, "give the API and the target"),
    ("drain", "?api=zeta", 400, "give the API and the target"),
    ("drain", "?target=ws://127.0.0.1:1/", 400, "give the API and the target"),
    ("drain", "?api=&target=ws://127.0.0.1:1/", 400, "give the API and the target"),
    ("drain", "?api=zeta&target={x}&grace=abc", 400, "grace must be a number of seconds >= 0"),
    ("drain", "?api=zeta&target={x}&grace=-1", 400, "grace must be a number of seconds >= 0"),
    ("drain", "?api=zeta&target={x}&grace=nan", 400, "grace must be a number of seconds >= 0"),
    ("drain", "?api=zeta&target={x}&grace=inf", 400, "grace must be a number of seconds >= 0"),
    ("drain", "?api=nope&target={x}", 404, "no API named 'nope'"),
    ("drain", "?api=zeta&target=ws://127.0.0.1:1/", 404, "API 'zeta' has no target 'ws://127.0.0.1:1/'"),
    ("drain", "?api=zeta&target=ws://127.0.0.1:1/%3Fkey%3Dhush", 404, "has no target 'ws://127.0.0.1:1/'"),
    ("enable", "", 400, "give the API and the target"),
    ("enable", "?api=zeta", 400, "give the API and the target"),
    ("enable", "?api=nope&target={x}", 404, "no API named 'nope'"),
    ("enable", "?api=alpha&target={x}/other", 404, "API 'alpha' has no target"),
])
async def test_route_errors_json_and_nothing_changed(gateway_factory, admin_for, echo_backend,
                                                     method, query, status, says):
    e = echo_backend
    rg = await gateway_factory(two_apis(e, free_port(), e))
    admin = await admin_for(rg)
    x = f"ws://127.0.0.1:{e}/"
    async with aiohttp.ClientSession() as http:
        got, body = await call(http, "POST", f"{admin.url}/targets/{method}" + query.format(x=x))
        assert (got, list(body)) == (status, ["error"]), body
        assert says in body["error"] and "hush" not in body["error"]
        _, listed = await call(http, "GET", f"{admin.url}/targets")
    assert {r["state"] for r in listed["targets"]} == {"healthy"}


async def test_the_routes_need_the_token_and_a_post(gateway_factory, admin_for, echo_backend):
    e = echo_backend
    rg = await gateway_factory(two_apis(e, free_port(), e))
    admin = await admin_for(rg, token="t0ken")
    good = {"Authorization": "Bearer t0ken"}
    drain = f"{admin.url}/targets/drain?api=alpha&target=ws://127.0.0.1:{e}/"
    async with aiohttp.ClientSession() as http:
        for method, url in (("GET", f"{admin.url}/targets"), ("POST", drain),
                            ("POST", drain.replace("/drain", "/enable"))):
            status, body = await call(http, method, url)
            assert status == 401 and list(body) == ["error"]
        assert {r["state"] for r in rg.gw.targets()} == {"healthy"}
        status, body = await call(http, "GET", f"{admin.url}/targets/drain", headers=good)
        assert status == 405 and list(body) == ["error"]
        status, body = await call(http, "GET", f"{admin.url}/targets", headers=good)
        assert status == 200 and len(body["targets"]) == 3
        status, view = await call(http, "POST", drain, headers=good)
        assert status == 200 and view["state"] == "draining"
        status, view = await call(http, "POST", drain.replace("/drain", "/enable"), headers=good)
        assert status == 200 and view["state"] == "healthy"


async def test_enable_clears_an_outlier_ejection(gateway_factory, admin_for, echo_backend):
    e, dead = echo_backend, free_port()
    rg = await gateway_factory(two_apis(dead, e, e, upgrade="        outlier: {failures: 1, eject: 30s}\n"))
    admin = await admin_for(rg)
    events = rg.gw.events = Events()
    reader, writer = await open_ws(rg.port, path="/z")    # X (dead) first, then Y: relayed
    writer.close()
    d = f"ws://127.0.0.1:{dead}/"
    async with aiohttp.ClientSession() as http:
        _, body = await call(http, "GET", f"{admin.url}/targets")
        x = {r["target"]: r for r in body["targets"] if r["api"] == "zeta"}[d]
        assert (x["state"], x["up"], x["dial_failures"]) == ("ejected", False, 1)
        assert 25 < x["ejected_for"] <= 30
        status, view = await call(http, "POST", f"{admin.url}/targets/enable?api=zeta&target={d}")
    assert status == 200
    assert (view["state"], view["up"], view["ejected_for"]) == ("healthy", True, 0.0)
    assert not rg.gw._eject_timers                        # no "back after its ejection" later
    assert [(ev.target, ev.reason) for ev in events.of(TargetUpEvent)] == [(d, "enable")]
    await rg.wait_idle()


def test_merge_targets_sums_and_takes_the_most_severe():
    def row(state, up, conns, fails, check=None, ejected=0.0):
        return {"api": "a", "target": "t", "balance": "random", "weight": 1, "state": state,
                "up": up, "connections": conns, "dial_failures": fails, "ejected_for": ejected,
                "health_check": check}
    late = {"result": "failure", "at": 20.0, "detail": "refused"}
    early = {"result": "success", "at": 10.0, "detail": ""}
    for states, merged in ((("healthy", "ejected"), "ejected"), (("unhealthy", "ejected"), "unhealthy"),
                           (("healthy", "draining"), "draining"), (("healthy", "healthy"), "healthy"),
                           (("draining", "unhealthy"), "draining")):
        rows = merge_targets([[row(states[0], True, 3, 1, late)],
                              [row(states[1], states[1] == "healthy", 4, 2, early, 5.0)]])
        assert len(rows) == 1
        m = rows[0]
        assert (m["state"], m["connections"], m["dial_failures"], m["ejected_for"]) == (merged, 7, 3, 5.0)
        assert m["up"] is (states[1] == "healthy")
        assert m["health_check"] == late


# ---- workers: 2 ------------------------------------------------------------------------------


def pool_config(a: int, b: int) -> str:
    doc = yaml.safe_load(gateway_config(a, 2))
    upgrade = doc["apis"][0]["assembly"][-1]
    del upgrade["target-url"]
    upgrade["targets"] = [{"url": f"ws://127.0.0.1:{a}/"}, {"url": f"ws://127.0.0.1:{b}/"}]
    return yaml.safe_dump(doc, sort_keys=False)


async def test_workers_targets_merged_and_a_drain_reaches_both_workers(start_gateway, backend):
    b = CountingBackend()
    try:
        ta, tb = f"ws://127.0.0.1:{backend.port}/", f"ws://127.0.0.1:{b.port}/"
        gw = start_gateway(pool_config(backend.port, b.port), 2)
        status, view = await asyncio.to_thread(gw.request, "POST", f"/targets/drain?api=chat&target={tb}&grace=0")
        assert status == 200 and (view["target"], view["state"]) == (tb, "draining")
        clients = []
        try:
            for _ in range(40):
                clients.append(await open_ws(gw.port, extra="X-API-Key: alice-secret\r\n"))
            rows = await gw.aget("/connections")
            assert {r["worker"] for r in rows} == {0, 1} and {r["target"] for r in rows} == {ta}
            status, view = await asyncio.to_thread(gw.request, "POST", f"/targets/enable?api=chat&target={tb}")
            assert status == 200 and view["state"] == "healthy"
            listed = {r["target"]: r for r in (await gw.aget("/targets"))["targets"]}
            assert list(listed) == [ta, tb]
            assert (listed[ta]["connections"], listed[ta]["state"], listed[ta]["up"]) == (40, "healthy", True)
            assert (listed[tb]["connections"], listed[tb]["state"]) == (0, "healthy")
            status, body = await asyncio.to_thread(gw.request, "POST", "/targets/drain?api=chat&target=ws://127.0.0.1:1/")
            assert status == 404 and "has no target" in body["error"]

            t0 = time.monotonic()
            status, view = await asyncio.to_thread(gw.request, "POST", f"/targets/drain?api=chat&target={ta}&grace=1")
            assert status == 200 and view["state"] == "draining" and view["connections"] <= 40

            async def closed(reader, writer):
                f, _ = await read_close(reader, timeout=3)
                writer.write(frame(CLOSE, close_payload(1001)))
                return time.monotonic() - t0, f.close

            got = await asyncio.gather(*(closed(r, w) for r, w in clients))
            assert {c for _, c in got} == {(1001, b"backend draining")}
            assert max(t for t, _ in got) < 1.5
            assert (await backend.wait_live(0))["live"] == 0
            listed = {r["target"]: r for r in (await gw.aget("/targets"))["targets"]}
            assert (listed[ta]["connections"], listed[ta]["state"]) == (0, "draining")
            more = [await open_ws(gw.port, extra="X-API-Key: alice-secret\r\n") for _ in range(6)]
            clients += more
            assert {r["target"] for r in await gw.aget("/connections")} == {tb}
            status, view = await asyncio.to_thread(gw.request, "POST", f"/targets/enable?api=chat&target={ta}")
            assert status == 200 and view["state"] == "healthy"
        finally:
            for _, w in clients:
                w.close()
        assert (await b.wait_live(0))["live"] == 0
    finally:
        b.stop()


async def test_workers_a_worker_restarted_after_a_drain_is_told_of_it(start_gateway, backend):
    import os
    import signal
    b = CountingBackend()
    try:
        ta, tb = f"ws://127.0.0.1:{backend.port}/", f"ws://127.0.0.1:{b.port}/"
        gw = start_gateway(pool_config(backend.port, b.port), 2)
        status, _ = await asyncio.to_thread(gw.request, "POST", f"/targets/drain?api=chat&target={tb}&grace=0")
        assert status == 200
        pids = await asyncio.to_thread(gw.pids)
        os.kill(pids[0], signal.SIGKILL)
        await asyncio.to_thread(gw.wait_workers, 2, 10.0, {0: pids[0]})
        clients = []
        try:
            for _ in range(40):
                clients.append(await open_ws(gw.port, extra="X-API-Key: alice-secret\r\n"))
            rows = await gw.aget("/connections")
            assert {r["worker"] for r in rows} == {0, 1}
            assert {r["target"] for r in rows} == {ta}       # none on B in the new worker
        finally:
            for _, w in clients:
                w.close()
    finally:
        b.stop()
