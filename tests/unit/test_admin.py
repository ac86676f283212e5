"""The admin API against a fake backend, over real HTTP on 127.0.0.1 port 0."""

from __future__ import annotations

import aiohttp
import pytest
from hdrh.histogram import HdrHistogram

from fastgw.observe.admin import (
    METRICS_CONTENT_TYPE,
    AdminServer,
    check_admin_exposure,
    create_app,
    histogram_unit,
    start_admin,
)

TOKEN = "s3cret-token"
METRICS = "# TYPE fastgw_connections gauge\nfastgw_connections 3\n"


def latency_histogram() -> HdrHistogram:
    """1..1000 microseconds, once each: percentiles are known to 3 significant figures."""
    h = HdrHistogram(1, 60_000_000, 3)
    for value in range(1, 1001):
        h.record_value(value)
    return h


class FakeBackend:
    """An AdminBackend that records what it was asked to do."""

    def __init__(self) -> None:
        self.is_ready = True
        self.histograms = {"upgrade_latency_us": latency_histogram()}
        self.conns = [
            {"id": 1, "api": "quotes", "client": "alice", "peer": "10.0.0.1:5000"},
            {"id": 2, "api": "quotes", "client": "bob", "peer": "10.0.0.2:5000"},
            {"id": 3, "api": "chat", "client": "alice", "peer": "10.0.0.1:5001"},
        ]
        self.closed_ids: list[int] = []
        self.closed_clients: list[str] = []
        self.connection_queries: list[tuple[str | None, str | None]] = []
        self.reload_error: str | None = None
        self.reloads = 0
        self.drains: list[float] = []
        self.exits: list[bool] = []

    def ready(self) -> bool:
        return self.is_ready

    def metrics_text(self) -> str:
        return METRICS

    def histogram_names(self) -> list[str]:
        return list(self.histograms)

    def histogram(self, name: str) -> HdrHistogram | None:
        return self.histograms.get(name)

    def connections(self, api: str | None, client: str | None) -> list[dict]:
        self.connection_queries.append((api, client))
        return [c for c in self.conns
                if (api is None or c["api"] == api) and (client is None or c["client"] == client)]

    def close_connection(self, conn_id: int) -> bool:
        for c in self.conns:
            if c["id"] == conn_id:
                self.conns.remove(c)
                self.closed_ids.append(conn_id)
                return True
        return False

    def close_client(self, client: str) -> int:
        mine = [c for c in self.conns if c["client"] == client]
        for c in mine:
            self.conns.remove(c)
        self.closed_clients.append(client)
        return len(mine)

    async def reload(self) -> str | None:
        self.reloads += 1
        return self.reload_error

    async def drain(self, grace: float, exit: bool = False) -> None:
        self.drains.append(grace)
        self.exits.append(exit)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def admin_factory(backend):
    """Start admin servers on a free loopback port; each yields (server, session)."""
    servers: list[AdminServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(token: str | None = None, headers: dict | None = None):
        server = await start_admin(backend, "127.0.0.1", 0, token)
        servers.append(server)
        session = aiohttp.ClientSession(base_url=server.url, headers=headers)
        sessions.append(session)
        return server, session

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


@pytest.fixture
async def client(admin_factory):
    """A session against an admin server without a token."""
    _, session = await admin_factory()
    return session


async def json_of(resp: aiohttp.ClientResponse):
    assert resp.content_type == "application/json"
    return await resp.json()


# --- server basics ---------------------------------------------------------------------


async def test_server_reports_bound_port_and_url(admin_factory):
    server, session = await admin_factory()
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    async with session.get("/healthz") as resp:
        assert resp.status == 200


async def test_close_stops_listening(backend):
    server = await start_admin(backend, "127.0.0.1", 0, None)
    url = server.url
    await server.close()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(url + "/healthz"):
                pass


# --- health, readiness, metrics --------------------------------------------------------


async def test_healthz(client):
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"status": "alive"}


async def test_readyz_follows_backend(client, backend):
    async with client.get("/readyz") as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"ready": True}
    backend.is_ready = False
    async with client.get("/readyz") as resp:
        assert resp.status == 503
        assert await json_of(resp) == {"ready": False}


async def test_metrics_text_and_content_type(client):
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == METRICS_CONTENT_TYPE
        assert METRICS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert await resp.text() == METRICS


# --- histograms ------------------------------------------------------------------------


async def test_histogram_names(client):
    async with client.get("/histograms") as resp:
        assert resp.status == 200
        assert await json_of(resp) == ["upgrade_latency_us"]


async def test_histogram_json(client):
    async with client.get("/histograms/upgrade_latency_us") as resp:
        assert resp.status == 200
        body = await json_of(resp)
    assert body["name"] == "upgrade_latency_us"
    assert body["total_count"] == 1000
    assert body["unit"] == "microseconds"
    assert list(body["percentiles"]) == ["50.0", "90.0", "99.0", "99.9", "99.99", "100.0"]
    # Below 2048 the histogram (3 significant figures) records values exactly.
    assert body["percentiles"] == {"50.0": 500, "90.0": 900, "99.0": 990,
                                   "99.9": 999, "99.99": 1000, "100.0": 1000}
    decoded = HdrHistogram.decode(body["encoded"])
    assert decoded.get_total_count() == 1000
    assert decoded.get_max_value() == 1000
    assert decoded.get_value_at_percentile(50.0) == 500


async def test_histogram_hdr_format(client):
    async with client.get("/histograms/upgrade_latency_us", params={"format": "hdr"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    decoded = HdrHistogram.decode(text)
    assert decoded.get_total_count() == 1000
    assert decoded.get_min_value() == 1


async def test_histogram_percentiles_format(client):
    async with client.get("/histograms/upgrade_latency_us",
                          params={"format": "percentiles"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    lines = text.splitlines()
    assert lines[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    rows = [line.split() for line in lines[2:] if line and not line.startswith("#")]
    # The first row is the minimum, the last one is the maximum at percentile 1.
    assert float(rows[0][0]) == 1.0
    assert float(rows[-1][0]) == 1000.0
    assert float(rows[-1][1]) == 1.0 and int(rows[-1][2]) == 1000
    # Values 1..1000 once each: every row's value equals its running count, and its
    # percentile is that count over 1000.
    assert len(rows) > 10
    for value, percentile, count, *_ in rows:
        assert float(value) == int(count)
        assert float(percentile) == pytest.approx(int(count) / 1000, abs=1e-3)
    assert "#[Max     =     1000.000, TotalCount     =     1000.000]" in text


async def test_histogram_unknown_name_and_format(client):
    async with client.get("/histograms/nope") as resp:
        assert resp.status == 404
        assert "nope" in (await json_of(resp))["error"]
    async with client.get("/histograms/upgrade_latency_us", params={"format": "xml"}) as resp:
        assert resp.status == 400
        assert "error" in await json_of(resp)


async def test_histogram_name_with_slash(client, backend):
    backend.histograms["quotes/connection_duration_ms"] = backend.histograms["upgrade_latency_us"]
    async with client.get("/histograms/quotes/connection_duration_ms") as resp:
        assert resp.status == 200
        body = await json_of(resp)
    assert body["name"] == "quotes/connection_duration_ms"
    assert body["unit"] == "milliseconds"
    assert body["total_count"] == 1000


def test_histogram_unit_from_name():
    assert histogram_unit("upgrade_latency_us") == "microseconds"
    assert histogram_unit("dial_seconds") == "seconds"
    assert histogram_unit("frame_ns") == "nanoseconds"
    assert histogram_unit("message_size_bytes") == "bytes"
    assert histogram_unit("frames") == "unknown"


# --- connections -----------------------------------------------------------------------


async def test_list_connections_with_filters(client, backend):
    async with client.get("/connections") as resp:
        assert resp.status == 200
        assert [c["id"] for c in await json_of(resp)] == [1, 2, 3]
    async with client.get("/connections", params={"api": "quotes", "client": "alice"}) as resp:
        assert [c["id"] for c in await json_of(resp)] == [1]
    async with client.get("/connections", params={"client": "alice"}) as resp:
        assert [c["id"] for c in await json_of(resp)] == [1, 3]
    # An empty parameter is no filter.
    async with client.get("/connections?api=&client=") as resp:
        assert len(await json_of(resp)) == 3
    assert backend.connection_queries == [(None, None), ("quotes", "alice"),
                                          (None, "alice"), (None, None)]


async def test_close_one_connection(client, backend):
    async with client.delete("/connections/2") as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"closed": 1}
    assert backend.closed_ids == [2]
    async with client.delete("/connections/2") as resp:
        assert resp.status == 404
        assert "error" in await json_of(resp)


@pytest.mark.parametrize("bad", ["abc", "1.5", "-1", "%201"])
async def test_close_connection_bad_id(client, backend, bad):
    async with client.delete(f"/connections/{bad}") as resp:
        assert resp.status == 400
        assert "error" in await json_of(resp)
    assert backend.closed_ids == []


async def test_close_client(client, backend):
    async with client.delete("/connections", params={"client": "alice"}) as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"closed": 2}
    async with client.delete("/connections", params={"client": "nobody"}) as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"closed": 0}
    assert backend.closed_clients == ["alice", "nobody"]
    assert [c["id"] for c in backend.conns] == [2]


@pytest.mark.parametrize("query", ["", "?client=", "?api=quotes"])
async def test_close_client_requires_client(client, backend, query):
    async with client.delete("/connections" + query) as resp:
        assert resp.status == 400
        assert "client" in (await json_of(resp))["error"]
    assert backend.closed_clients == []
    assert len(backend.conns) == 3


# --- reload and drain ------------------------------------------------------------------


async def test_reload_success(client, backend):
    async with client.post("/reload") as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"reloaded": True}
    assert backend.reloads == 1


async def test_reload_failure(client, backend):
    backend.reload_error = "gateway.yaml: Expected `int` >= 1 - at `$.apis[0].assembly[0].burst`"
    async with client.post("/reload") as resp:
        assert resp.status == 422
        assert await json_of(resp) == {"reloaded": False, "error": backend.reload_error}


async def test_drain_default_and_given_grace(client, backend):
    async with client.post("/drain") as resp:
        assert resp.status == 202
        assert await json_of(resp) == {"draining": True, "exit": False}
    async with client.post("/drain", params={"grace": "2.5"}) as resp:
        assert resp.status == 202
    async with client.post("/drain", params={"grace": "0", "exit": "true"}) as resp:
        assert resp.status == 202
        assert await json_of(resp) == {"draining": True, "exit": True}
    assert backend.drains == [10.0, 2.5, 0.0]
    assert backend.exits == [False, False, True]


@pytest.mark.parametrize("exit_", ["maybe", "", "2"])
async def test_drain_bad_exit(client, backend, exit_):
    async with client.post("/drain", params={"exit": exit_}) as resp:
        assert resp.status == 400
        assert "exit" in (await json_of(resp))["error"]
    assert backend.drains == []


@pytest.mark.parametrize("grace", ["soon", "-1", "nan", "inf", ""])
async def test_drain_bad_grace(client, backend, grace):
    async with client.post("/drain", params={"grace": grace}) as resp:
        assert resp.status == 400
        assert "grace" in (await json_of(resp))["error"]
    assert backend.drains == []


# --- unknown routes and methods --------------------------------------------------------


async def test_unknown_path_is_json_404(client):
    async with client.get("/nowhere") as resp:
        assert resp.status == 404
        assert "error" in await json_of(resp)


async def test_wrong_method_is_json_405(client, backend):
    async with client.post("/healthz") as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
        assert "error" in await json_of(resp)
    async with client.get("/reload") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
    async with client.put("/connections/1") as resp:
        assert resp.status == 405
    assert backend.reloads == 0 and backend.closed_ids == []


async def test_backend_failure_is_json_500(client, backend):
    def broken() -> str:
        raise RuntimeError("boom")

    backend.metrics_text = broken
    async with client.get("/metrics") as resp:
        assert resp.status == 500
        assert await json_of(resp) == {"error": "internal error"}


# --- the bearer token ------------------------------------------------------------------

PROTECTED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/histograms"),
    ("GET", "/histograms/upgrade_latency_us"),
    ("GET", "/connections"),
    ("DELETE", "/connections/1"),
    ("DELETE", "/connections?client=alice"),
    ("POST", "/reload"),
    ("POST", "/drain"),
    ("GET", "/nowhere"),
]


@pytest.mark.parametrize("method,path", PROTECTED)
async def test_token_required(admin_factory, backend, method, path):
    _, session = await admin_factory(TOKEN)
    async with session.request(method, path) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="fastgw-admin"'
        assert "error" in await json_of(resp)
    # Nothing reached the backend.
    assert backend.closed_ids == [] and backend.closed_clients == []
    assert backend.reloads == 0 and backend.drains == []


@pytest.mark.parametrize("authorization", [
    "Bearer wrong",
    f"Bearer {TOKEN}x",
    f"Basic {TOKEN}",
    TOKEN,
    "Bearer ",
    "Bearer sécret",
])
async def test_token_rejected(admin_factory, authorization):
    _, session = await admin_factory(TOKEN, headers={"Authorization": authorization})
    async with session.get("/metrics") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="fastgw-admin"'


@pytest.mark.parametrize("method,path", PROTECTED)
async def test_token_accepted(admin_factory, method, path):
    _, session = await admin_factory(TOKEN, headers={"Authorization": f"Bearer {TOKEN}"})
    async with session.request(method, path) as resp:
        assert resp.status != 401


async def test_token_scheme_is_case_insensitive(admin_factory):
    _, session = await admin_factory(TOKEN, headers={"Authorization": f"bearer {TOKEN}"})
    async with session.get("/metrics") as resp:
        assert resp.status == 200
        assert await resp.text() == METRICS


async def test_healthz_open_without_token(admin_factory):
    _, session = await admin_factory(TOKEN)
    async with session.get("/healthz") as resp:
        assert resp.status == 200
        assert await json_of(resp) == {"status": "alive"}


def test_empty_token_refused(backend):
    with pytest.raises(ValueError):
        create_app(backend, "")


# --- exposure check --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost",
                                  "LOCALHOST", "::ffff:127.0.0.1"])
def test_loopback_needs_no_token(host):
    assert check_admin_exposure(host, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.1", "example.com",
                                  "localhost.example.com", ""])
def test_exposed_host_needs_token_env(host):
    message = check_admin_exposure(host, None)
    assert message is not None and "set token-env" in message
    assert check_admin_exposure(host, "") is not None
    assert check_admin_exposure(host, "FASTGW_ADMIN_TOKEN") is None


def test_exposure_message():
    assert check_admin_exposure("0.0.0.0", None) == \
        "admin listens on 0.0.0.0 without token-env: set token-env"
