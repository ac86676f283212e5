"""Active health checks (fastgw.health): one check against real loopback servers (a closed
port, a plain HTTP server, a hand-made 101, the bundled echo, a silent server), the state
a run of results gives a target, and the loops that start(), a reload and close() keep."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme
from websockets.asyncio.server import serve as ws_serve

from conftest import gateway_yaml
from fastgw import config as cfgmod
from fastgw.clock import Clock
from fastgw.config.schema import HealthCheck
from fastgw.config.web import parse_target
from fastgw.echo import serve as echo_serve, server_port
from fastgw.gateway import Gateway
from fastgw.health import check
from wire import CLOSE, accept_key, free_port, head_fields, read_frame


def hc(**kw) -> HealthCheck:
    return HealthCheck(**kw)


def target(port: int):
    return parse_target(f"ws://127.0.0.1:{port}/")


class Server:
    """A loopback TCP server whose connections run `handle(reader, writer)`; it keeps the
    request heads it read."""

    def __init__(self, handle):
        self.handle = handle
        self.heads: list[bytes] = []
        self.after: list[bytes] = []
        self.server = None

    async def __aenter__(self):
        async def on_client(reader, writer):
            try:
                await self.handle(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
        self.server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def answer(status_line: bytes, accept: str | None = None):
    async def handle(srv, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        srv.heads.append(head)
        _, headers = head_fields(head)
        key = headers["sec-websocket-key"]
        extra = b""
        if accept is not None:
            extra = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
                     + (accept_key(key) if accept == "right" else accept).encode() + b"\r\n")
        writer.write(status_line + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        if accept == "right":          # what follows the 101: a masked CLOSE
            srv.after.append(await read_frame(reader, masked=True))
    return handle


async def test_a_closed_port_fails():
    detail = await check(target(free_port()), hc(), Clock())
    assert detail is not None and "refused" in detail.lower(), detail


async def test_a_plain_http_server_answering_200_fails():
    async with Server(await answer(b"HTTP/1.1 200 OK")) as srv:
        detail = await check(target(srv.port), hc(path="/health"), Clock())
    assert detail == "answered HTTP 200 instead of 101"
    first, headers = head_fields(srv.heads[0])
    assert first == "GET /health HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{srv.port}"
    assert headers["upgrade"] == "websocket" and headers["sec-websocket-version"] == "13"


async def test_a_101_passes_and_is_closed_with_1000():
    async with Server(await answer(b"HTTP/1.1 101 Switching Protocols", accept="right")) as srv:
        assert await check(target(srv.port), hc(path="/health"), Clock()) is None
        assert await check(target(srv.port), hc(path="/health"), Clock()) is None
        deadline = time.monotonic() + 2
        while len(srv.after) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    keys = [head_fields(h)[1]["sec-websocket-key"] for h in srv.heads]
    assert len(set(keys)) == 2                      # a fresh key each time
    assert [(f.opcode, f.payload) for f in srv.after] == [(CLOSE, b"\x03\xe8")] * 2


async def test_a_101_with_a_wrong_accept_fails():
    async with Server(await answer(b"HTTP/1.1 101 Switching Protocols", accept="bm9wZQ==")) as srv:
        detail = await check(target(srv.port), hc(), Clock())
    assert detail == "101 with a wrong Sec-WebSocket-Accept"


async def test_the_echo_backend_passes():
    server = await echo_serve("127.0.0.1", 0)
    try:
        assert await check(target(server_port(server)), hc(path="/health"), Clock()) is None
    finally:
        server.close()


async def test_tcp_checks_only_connect():
    async def silent(srv, reader, writer):
        srv.heads.append(await reader.read(100))
    async with Server(silent) as srv:
        assert await check(target(srv.port), hc(tcp=True), Clock()) is None
        deadline = time.monotonic() + 2
        while not srv.heads and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert srv.heads == [b""]                       # connected, nothing sent, closed
    detail = await check(target(free_port()), hc(tcp=True), Clock())
    assert detail is not None and "refused" in detail.lower()


async def test_no_answer_within_the_timeout_fails_in_time():
    async def silent(srv, reader, writer):
        srv.heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()             # no answer, until the check gives up and closes
    async with Server(silent) as srv:
        t0 = time.monotonic()
        detail = await check(target(srv.port), hc(timeout=0.2), Clock())
        took = time.monotonic() - t0
    assert detail == "no answer within 0.2s"
    assert 0.19 <= took < 0.5, took
    assert len(srv.heads) == 1


async def test_a_cancel_from_outside_is_not_a_timeout():
    async def silent(srv, reader, writer):
        await reader.read()
    async with Server(silent) as srv:
        task = asyncio.ensure_future(check(target(srv.port), hc(timeout=3), Clock()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- a target's state from the results ---------------------------------------------------

class Events(list):
    def emit(self, event) -> None:
        self.append(event)


def pool_yaml(ports, health: str) -> str:
    targets = "".join(f"\n  - url: ws://127.0.0.1:{p}/" for p in ports)
    return gateway_yaml("X", extra_upgrade=f"targets:{targets}\n{health}").replace(
        "        target-url: X\n", "")


def test_results_in_a_row_mark_a_target_down_and_up():
    config = cfgmod.loads(pool_yaml([1, 2], "health-check: {unhealthy-after: 2, healthy-after: 3}"),
                          "yaml", "t.yaml")
    gw = Gateway(config)
    gw.events = Events()
    t = gw.pools["test"].targets[0]
    h = gw.pools["test"].upgrade.health
    record = gw.health.record
    record(t, h, "backend unreachable: Connection refused")
    assert t.healthy and t.check_streak == 1
    record(t, h, None)                       # a success in between starts again
    assert t.healthy and t.check_streak == 0
    record(t, h, "x")
    record(t, h, "backend unreachable: Connection refused")
    assert not t.healthy and t.check_streak == 0 and not t.up(gw.clock.now())
    assert t.last_check["result"] == "failure"
    assert t.last_check["detail"] == "backend unreachable: Connection refused"
    assert abs(t.last_check["at"] - time.time()) < 5
    (down,) = gw.events
    assert (down.api, down.target, down.reason, down.detail) == (
        "test", "ws://127.0.0.1:1/", "health-check", "backend unreachable: Connection refused")
    record(t, h, None)
    record(t, h, None)
    assert not t.healthy and t.check_streak == 2
    record(t, h, None)
    assert t.healthy and t.check_streak == 0
    assert t.last_check == {"result": "success", "at": t.last_check["at"], "detail": ""}
    assert [e.reason for e in gw.events[1:]] == ["health-check"]
    assert type(gw.events[1]).__name__ == "TargetUpEvent"
    assert t.health_checks == {"failure": 3, "success": 4}
    # Not dials, not connections, not the outlier's.
    assert t.dial_failures == {} and t.active == 0 and t.fails_in_row == 0


# ---- the loops ------------------------------------------------------------------------------

async def test_loops_follow_start_reload_and_close(tmp_path):
    a, b = await echo_serve("127.0.0.1", 0), await echo_serve("127.0.0.1", 0)
    pa, pb = server_port(a), server_port(b)
    path = tmp_path / "gw.yaml"
    fast = "health-check: {interval: 0.1s, path: /health}"
    path.write_text(pool_yaml([pa, pb], fast))
    gw = Gateway(cfgmod.load(str(path)), str(path))
    try:
        assert gw.health.loops == {}
        await gw.start()
        ta, tb = gw.pools["test"].targets
        assert set(gw.health.loops) == {ta, tb}
        first = dict(gw.health.loops)
        deadline = time.monotonic() + 3
        while not (ta.health_checks.get("success", 0) >= 2 and tb.health_checks.get("success", 0) >= 2):
            assert time.monotonic() < deadline, (ta.health_checks, tb.health_checks)
            await asyncio.sleep(0.02)
        # A reload that keeps both targets and their checks keeps their loops.
        assert await gw.reload() is None
        assert gw.health.loops == first
        # b leaves the pool: its loop stops; a's check changes: a new loop.
        tb.healthy = False
        path.write_text(pool_yaml([pa], "health-check: {interval: 0.2s, path: /health}"))
        assert await gw.reload() is None
        assert set(gw.health.loops) == {ta} and gw.health.loops[ta] is not first[ta]
        assert first[ta].task.cancelled() or first[ta].task.cancelling()
        await asyncio.sleep(0)
        assert first[tb].task.done()
        # No checks any more: no loop, and a target marked down counts as healthy again.
        ta.healthy = False
        path.write_text(pool_yaml([pa], ""))
        assert await gw.reload() is None
        assert gw.health.loops == {} and ta.healthy
        path.write_text(pool_yaml([pa, pb], fast))
        assert await gw.reload() is None
        loops = list(gw.health.loops.values())
        assert len(loops) == 2
    finally:
        await gw.close()
        a.close()
        b.close()
    assert gw.health.loops == {}
    await asyncio.sleep(0)
    assert all(loop.task.done() for loop in loops)


# ---- a real third-party backend with a /health path, over TLS too ------------------------

class HealthBackend:
    """A `websockets` server that upgrades /health only (404 elsewhere) and keeps the close
    code of each connection; with `cert` (trustme), over TLS."""

    def __init__(self, cert=None):
        self.codes: list[int | None] = []
        self.ctx = None
        if cert is not None:
            self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(self.ctx)

    async def __aenter__(self):
        async def handler(conn):
            try:
                await conn.wait_closed()
            finally:
                self.codes.append(conn.close_code)

        def only_health(conn, request):
            if request.path != "/health":
                return conn.respond(404, "no such path\n")
            return None

        self.server = await ws_serve(handler, "127.0.0.1", 0, ssl=self.ctx,
                                     process_request=only_health)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def wait_codes(self, n: int) -> list:
        deadline = time.monotonic() + 2
        while len(self.codes) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.codes


async def test_a_websockets_backend_is_healthy_on_its_health_path_only():
    async with HealthBackend() as srv:
        assert await check(target(srv.port), hc(path="/health"), Clock()) is None
        assert await check(target(srv.port), hc(path="/"), Clock()) == "answered HTTP 404 instead of 101"
        assert await srv.wait_codes(1) == [1000]


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def test_wss_targets_are_checked_with_the_apis_tls_context(ca):
    cert = ca.issue_cert("api.internal")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    wss = lambda port: parse_target(f"wss://127.0.0.1:{port}/")  # noqa: E731
    async with HealthBackend(cert) as srv:
        assert await check(wss(srv.port), hc(path="/health"), Clock(), trusting,
                           "api.internal") is None
        assert await srv.wait_codes(1) == [1000]
        # The certificate does not name 127.0.0.1: without the server name, it is refused;
        # without the CA too.
        detail = await check(wss(srv.port), hc(path="/health"), Clock(), trusting)
        assert detail.startswith("backend certificate rejected"), detail
        detail = await check(wss(srv.port), hc(path="/health"), Clock(), ssl.create_default_context(),
                             "api.internal")
        assert detail.startswith("backend certificate rejected"), detail
        # A tcp check of a wss target is a bare connect: no TLS.
        assert await check(wss(srv.port), hc(tcp=True), Clock()) is None


# ---- the target metrics, and their sum over workers -----------------------------------------

def test_target_metrics_sum_over_workers_with_up_the_minimum():
    from conftest import samples
    from fastgw.observe.aggregate import Totals, snapshot
    from fastgw.pool import DIAL_FAILURE_REASONS

    def worker(ports):
        return Gateway(cfgmod.loads(pool_yaml(ports, "health-check: {}"), "yaml", "t.yaml"))

    g1, g2 = worker([1, 2]), worker([1, 3])
    a1, b1 = g1.pools["test"].targets
    a2, c2 = g2.pools["test"].targets
    a1.healthy = False                              # down for worker 1 only
    a1.dial_failures = {"refused": 2, "timeout": 1}
    a2.dial_failures = {"refused": 5}
    a1.health_checks = {"failure": 2}
    a2.health_checks = {"success": 4, "failure": 1}
    a1.active, a2.active, c2.active = 1, 2, 7
    c2.ejected_until = g2.clock.now() + 60          # ejected: down
    one = samples(Totals().render([snapshot(g1)], 1, {}))
    label = lambda port: {"api": "test", "target": f"ws://127.0.0.1:{port}/"}  # noqa: E731

    def v(m, name, port, **kw):
        return m.get((name, frozenset({**label(port), **kw}.items())))

    assert v(one, "fastgw_target_up", 1) == 0 and v(one, "fastgw_target_up", 2) == 1
    assert [v(one, "fastgw_target_dial_failures_total", 1, reason=r) for r in DIAL_FAILURE_REASONS] \
        == [2, 0, 0, 0, 0, 1, 0, 0]
    m = samples(Totals().render([snapshot(g1), snapshot(g2)], 2, {}))
    assert v(m, "fastgw_target_up", 1) == 0                      # the minimum
    assert v(m, "fastgw_target_up", 2) == 1 and v(m, "fastgw_target_up", 3) == 0   # as it is
    assert v(m, "fastgw_target_connections_active", 1) == 3
    assert v(m, "fastgw_target_connections_active", 3) == 7
    assert v(m, "fastgw_target_dial_failures_total", 1, reason="refused") == 7
    assert v(m, "fastgw_target_dial_failures_total", 1, reason="timeout") == 1
    assert v(m, "fastgw_target_health_checks_total", 1, result="failure") == 3
    assert v(m, "fastgw_target_health_checks_total", 1, result="success") == 4
    assert v(m, "fastgw_target_health_checks_total", 3, result="success") == 0
    # Worker 1 retired: its counters stay, its gauges go; b is known to it only.
    totals = Totals()
    totals.fold(snapshot(g1))
    m = samples(totals.render([snapshot(g2)], 1, {}))
    assert v(m, "fastgw_target_up", 1) == 1 and v(m, "fastgw_target_up", 2) is None
    assert v(m, "fastgw_target_connections_active", 1) == 2
    assert v(m, "fastgw_target_connections_active", 2) == 0
    assert v(m, "fastgw_target_dial_failures_total", 1, reason="refused") == 7
    assert v(m, "fastgw_target_dial_failures_total", 2, reason="refused") == 0


async def test_the_checks_run_on_the_gateways_clock():
    """With a SimClock nothing is checked until time moves: the first check comes within
    one interval (its random offset), then one per interval."""
    from fastgw.clock import SimClock
    server = await echo_serve("127.0.0.1", 0)
    clock = SimClock()
    gw = Gateway(cfgmod.loads(pool_yaml([server_port(server)], "health-check: {interval: 10s}"),
                              "yaml", "t.yaml"), clock=clock)
    try:
        await gw.start()
        (t,) = gw.pools["test"].targets
        count = lambda: t.health_checks.get("success", 0)  # noqa: E731

        async def settle(n: int) -> None:
            deadline = time.monotonic() + 2
            while count() < n:
                assert time.monotonic() < deadline, t.health_checks
                await asyncio.sleep(0.005)
            for _ in range(5):
                await asyncio.sleep(0)         # the loop's next sleep is set
        await asyncio.sleep(0.05)
        assert count() == 0                    # time has not moved
        clock.advance(10.0)
        await settle(1)
        assert t.last_check["at"] == clock.wall() and t.last_check["result"] == "success"
        for n in (2, 3):
            clock.advance(9.9)
            await asyncio.sleep(0.05)
            assert count() == n - 1
            clock.advance(0.1)
            await settle(n)
        assert t.health_checks == {"success": 3}
    finally:
        await gw.close()
        server.close()
