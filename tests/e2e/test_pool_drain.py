"""Draining a target of a pool for a deploy (issue 12): its live connections closed with 1001
"backend draining" spread over the grace, no new connection on it meanwhile, each client's
reconnect on the rest of the pool, and enable bringing it back. Real loopback sockets: a
`fastgw run` process with its admin API, two counting echo backends in their own processes
(tests/countecho.py) that count from outside the gateway what reached each; and gateways in
this process for the drain's schedule itself (replaced, cancelled, a late dial, shutdown)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from conftest import gateway_yaml
from wire import CLOSE, close_payload, frame, open_ws, read_close
from workerlib import CountingBackend

N = 300
GRACE = 3.0


@pytest.fixture(scope="module")
def pair():
    """Two counting echo backends, A and B (one process each) for the module."""
    a, b = CountingBackend(), CountingBackend()
    yield a, b
    a.stop()
    b.stop()


def pool_yaml(a: int, b: int, *, extra: str = "") -> str:
    return ("listeners:\n  - {host: 127.0.0.1, port: 0}\n"
            "limits: {max-handshakes-per-ip: 0}\n" + extra +
            "apis:\n  - name: chat\n    path: /\n    assembly:\n"
            "      - policy: websocket-upgrade\n        targets:\n"
            f"          - url: ws://127.0.0.1:{a}/\n          - url: ws://127.0.0.1:{b}/\n")


async def post(http, url: str) -> tuple[int, dict]:
    async with http.post(url) as r:
        return r.status, await r.json()


async def get_json(http, url: str):
    async with http.get(url) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


def by_target(rows: list[dict]) -> dict[str, dict]:
    return {r["target"]: r for r in rows}


async def open_many(port: int, n: int, at_once: int = 50) -> list:
    gate = asyncio.Semaphore(at_once)

    async def one():
        async with gate:
            return await open_ws(port)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def closed_then_reconnect(reader, writer, port: int, t0: float):
    """Wait for the gateway's CLOSE (its time since t0, code, reason), answer it, reconnect."""
    f, _ = await read_close(reader, timeout=GRACE + 3)
    at = time.monotonic() - t0
    code, reason = f.close
    writer.write(frame(CLOSE, close_payload(code)))
    writer.close()
    again = await open_ws(port)
    return at, code, reason, again


def most_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_drain_300_connections_spread_over_the_grace_reconnect_to_b_enable_brings_a_back(
        gateway_with_admin, pair):
    a, b = pair
    ta, tb = f"ws://127.0.0.1:{a.port}/", f"ws://127.0.0.1:{b.port}/"
    gp = gateway_with_admin(pool_yaml(a.port, b.port))
    base_a, base_b = a.stats()["total"], b.stats()["total"]
    api = gp.admin_url
    clients, again = [], []
    async with aiohttp.ClientSession() as http:
        try:
            # All 300 on A: B drained (grace 0, nothing to close) while they connect.
            status, view = await post(http, f"{api}/targets/drain?api=chat&target={tb}&grace=0")
            assert status == 200 and view["state"] == "draining" and view["target"] == tb
            clients = await open_many(gp.port, N)
            assert (await a.wait_live(N))["live"] == N
            status, view = await post(http, f"{api}/targets/enable?api=chat&target={tb}")
            assert status == 200 and view["state"] == "healthy"
            rows = await get_json(http, f"{api}/connections")
            assert len(rows) == N and {r["target"] for r in rows} == {ta}

            # Drain A over 3 s; each client reconnects once closed.
            t0 = time.monotonic()
            waits = [asyncio.ensure_future(closed_then_reconnect(r, w, gp.port, t0))
                     for r, w in clients]
            status, view = await post(http, f"{api}/targets/drain?api=chat&target={ta}&grace={GRACE}")
            assert status == 200, view
            assert view["state"] == "draining" and view["connections"] > N * 0.9
            seen = []
            for at in (1.0, 2.0):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                seen.append(by_target((await get_json(http, f"{api}/targets"))["targets"]))
            results = await asyncio.gather(*waits)
            again = [r[3] for r in results]
            times = [r[0] for r in results]

            assert {(code, reason) for _, code, reason, _ in results} == {(1001, b"backend draining")}
            assert max(times) <= GRACE + 0.5, max(times)
            widest = most_in_window(times, 0.5)
            assert widest <= N // 2, widest
            assert min(times) < 0.5 and max(times) > GRACE - 0.5    # spread, not at once
            print(f"closes: first {min(times):.3f} s, last {max(times):.3f} s, "
                  f"most in a 0.5 s window {widest} of {N}")
            # /targets during the drain: A draining, its live count going down.
            one, two = seen[0][ta], seen[1][ta]
            assert one["state"] == two["state"] == "draining"
            assert N > one["connections"] > two["connections"], (one, two)
            assert seen[1][tb]["state"] == "healthy" and seen[1][tb]["connections"] > 0

            # No new connection on A during the drain; every reconnect on B.
            sa, sb = a.stats(), b.stats()
            assert sa["total"] - base_a == N and sa["live"] == 0, sa
            assert sb["total"] - base_b == N and sb["live"] == N, sb
            rows = await get_json(http, f"{api}/connections")
            assert len(rows) == N and {r["target"] for r in rows} == {tb}
            after = by_target((await get_json(http, f"{api}/targets"))["targets"])
            assert after[ta]["state"] == "draining" and after[ta]["connections"] == 0
            assert after[tb]["connections"] == N

            # Enable: A is back, and (least-connections) the next ones go to it.
            status, view = await post(http, f"{api}/targets/enable?api=chat&target={ta}")
            assert status == 200 and view["state"] == "healthy" and view["up"] is True
            more = await open_many(gp.port, 20)
            again += more
            assert (await a.wait_live(20))["live"] == 20
            assert b.stats()["live"] == N
        finally:
            for _, w in [*clients, *again]:
                w.close()
    assert (await a.wait_live(0))["live"] == 0 and (await b.wait_live(0))["live"] == 0
    err = gp.stderr()
    assert f"target {ta} draining: {N} connections closed with 1001 over 3s" in err
    assert f"target {ta} enabled" in err
    assert "Traceback" not in err
