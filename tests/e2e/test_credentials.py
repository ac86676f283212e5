"""Credentials and identity on the way to the backend, and secrets out of the logs.

Real sockets on 127.0.0.1, the `websockets` library as client, the bundled echo backend at a
path holding `/headers` (its first message reports the path and headers it received), a
closed port (502) and a backend that never answers (504).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import jwt
import pytest
import websockets
import yaml
from websockets.exceptions import InvalidStatus

from fastgw import upstream
from fastgw.clock import SimClock
from fastgw.observe.admin import start_admin
from wire import free_port

SECRET = "fastgw-test-secret-of-at-least-32-bytes!"
ALICE_KEY = "alice-secret-key-123"
CLIENTS = [{"id": "alice", "key": ALICE_KEY, "plan": "gold"}, {"id": "bob", "key": "bob-key-456"}]


def config(target: str, identity: dict | None = None, **top) -> str:
    assembly = [identity] if identity else []
    assembly.append({"policy": "websocket-upgrade", "target-url": target, "timeout": 1})
    doc = {"listeners": [{"host": "127.0.0.1", "port": 0}], "plans": ["gold"],
           "clients": CLIENTS, **top,
           "apis": [{"name": "test", "path": "/", "assembly": assembly}]}
    return yaml.safe_dump(doc, sort_keys=False)


def api_key(**extra) -> dict:
    return {"policy": "api-key", "header": "X-API-Key", "query": "api_key", **extra}


def jwt_policy(**extra) -> dict:
    return {"policy": "jwt", "algorithms": ["HS256"], "secret-env": "FASTGW_TEST_JWT",
            "plan-claim": "plan", "query": "access_token", **extra}


def token(sub: str = "dave", plan: str = "gold") -> str:
    return jwt.encode({"sub": sub, "plan": plan, "exp": time.time() + 300}, SECRET, algorithm="HS256")


@pytest.fixture(autouse=True)
def jwt_secret(monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_JWT", SECRET)


async def seen_by_backend(url: str, headers: dict | list | None = None) -> dict:
    """Upgrade through the gateway; the echo backend's report of the request it got."""
    async with websockets.connect(url, additional_headers=headers or {}, open_timeout=5) as ws:
        report = json.loads(await asyncio.wait_for(ws.recv(), 5))
    report["names"] = [name for name, _ in report["raw_headers"]]
    return report


def values(report: dict, name: str) -> list[str]:
    return [v for k, v in report["raw_headers"] if k == name]


# ------------------------------------------------------------------ hide-credentials

# (policy, how the client sends the credential, where it shows at the backend)
FORMS = {
    "header X-API-Key": (api_key, lambda: ({"X-API-Key": ALICE_KEY}, ""), ALICE_KEY),
    "query api_key": (api_key, lambda: ({}, f"api_key={ALICE_KEY}&"), ALICE_KEY),
    "Authorization Bearer": (jwt_policy, lambda: ({"Authorization": f"Bearer {TOKEN}"}, ""), None),
    "query access_token": (jwt_policy, lambda: ({}, f"access_token={TOKEN}&"), None),
}
TOKEN = token()


@pytest.mark.parametrize("hide", [False, True], ids=["kept", "hidden"])
@pytest.mark.parametrize("form", list(FORMS))
async def test_hide_credentials(gateway_factory, echo_backend, form, hide):
    policy, send, secret = FORMS[form]
    secret = secret or TOKEN
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/headers?fixed=1",
                                      policy(**{"hide-credentials": hide} if hide else {})))
    headers, credential_query = send()
    headers = {**headers, "X-Other": "kept", "Cookie": "c=1"}
    report = await seen_by_backend(gw.url(f"/p?a=1&{credential_query}b=2&b=3"), headers)
    # everything else intact, in order
    assert values(report, "x-other") == ["kept"] and values(report, "cookie") == ["c=1"]
    if hide:
        assert report["path"] == "/headers/p?fixed=1&a=1&b=2&b=3"
        assert secret not in json.dumps(report)
        assert "x-api-key" not in report["names"] and "authorization" not in report["names"]
    else:
        expected = f"/headers/p?fixed=1&a=1&{credential_query}b=2&b=3"
        assert report["path"] == expected
        assert secret in json.dumps(report)
    await gw.wait_idle()


async def test_hide_credentials_removes_only_what_was_read(gateway_factory, echo_backend):
    """A JWT read from the query: the client's other Authorization (Basic) stays; every
    copy of the parameter goes, under any spelling that parse_qs reads as that name."""
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/headers",
                                      jwt_policy(**{"hide-credentials": True})))
    report = await seen_by_backend(
        gw.url(f"/?x=1&access_token={TOKEN}&access%5Ftoken=again&y=%20"),
        {"Authorization": "Basic dXNlcjpwdw=="})
    assert report["path"] == "/headers/?x=1&y=%20"
    assert values(report, "authorization") == ["Basic dXNlcjpwdw=="]


# ------------------------------------------------------------------ identity propagation

@pytest.mark.parametrize("policy, send, client, plan", [
    (api_key, {"X-API-Key": ALICE_KEY}, "alice", "gold"),
    (api_key, {"X-API-Key": "bob-key-456"}, "bob", "default"),
    (jwt_policy, {"Authorization": f"Bearer {TOKEN}"}, "dave", "gold"),
])
async def test_identity_headers(gateway_factory, echo_backend, policy, send, client, plan):
    gw = await gateway_factory(config(
        f"ws://127.0.0.1:{echo_backend}/headers",
        policy(**{"client-id-header": "X-Client-Id", "plan-header": "X-Plan"})))
    forged = [*send.items(), ("X-Client-Id", "mallory"), ("x-client-id", "root"),
              ("X-Plan", "platinum")]
    report = await seen_by_backend(gw.url("/"), forged)
    assert values(report, "x-client-id") == [client]
    assert values(report, "x-plan") == [plan]
    await gw.wait_idle()


async def test_identity_header_names_removed_without_propagation_of_plan(gateway_factory, echo_backend):
    """Only client-id-header set: a client's X-Client-Id is replaced, its X-Plan passes."""
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/headers",
                                      api_key(**{"client-id-header": "X-Client-Id"})))
    report = await seen_by_backend(gw.url("/"), [("X-API-Key", ALICE_KEY), ("X-Client-Id", "bob")])
    assert values(report, "x-client-id") == ["alice"]


async def test_identity_from_a_token_cannot_inject_headers(gateway_factory, echo_backend):
    """A claim is text of the issuer's choosing: it is percent-encoded, never a new line."""
    gw = await gateway_factory(config(
        f"ws://127.0.0.1:{echo_backend}/headers",
        jwt_policy(**{"client-id-header": "X-Client-Id", "plan-header": "X-Plan"})))
    evil = token(sub="eve\r\nX-Admin: 1", plan="gold é")
    report = await seen_by_backend(gw.url("/"), {"Authorization": f"Bearer {evil}"})
    assert values(report, "x-client-id") == ["eve%0D%0AX-Admin:%201"]
    assert values(report, "x-plan") == ["gold%20%C3%A9"]
    assert "x-admin" not in report["names"]


# ------------------------------------------------------------------ X-Real-IP and Forwarded

FORGED_FORWARDING = [("X-Real-IP", "6.6.6.6"), ("Forwarded", "for=6.6.6.6;proto=https"),
                     ("X-Forwarded-For", "203.0.113.7")]


async def test_forwarding_headers_from_an_untrusted_peer(gateway_factory, echo_backend):
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/headers",
                                      **{"trusted-proxies": ["10.0.0.0/8"]}))
    report = await seen_by_backend(gw.url("/"), FORGED_FORWARDING)
    host = f"127.0.0.1:{gw.port}"
    assert values(report, "x-real-ip") == ["127.0.0.1"]
    assert values(report, "forwarded") == [f'for=127.0.0.1;host="{host}";proto=http']
    assert "6.6.6.6" not in json.dumps(report)
    assert values(report, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]   # as before


async def test_forwarding_headers_from_a_trusted_proxy(gateway_factory, echo_backend):
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/headers",
                                      **{"trusted-proxies": ["127.0.0.1"]}))
    report = await seen_by_backend(gw.url("/"), FORGED_FORWARDING)
    host = f"127.0.0.1:{gw.port}"
    # X-Real-IP: the client the gateway established (from the proxy's X-Forwarded-For)
    assert values(report, "x-real-ip") == ["203.0.113.7"]
    # Forwarded: the proxy's elements, then the gateway's own for the proxy's request
    assert values(report, "forwarded") == [
        f'for=6.6.6.6;proto=https, for=127.0.0.1;host="{host}";proto=http']


# ------------------------------------------------------------------ logs



@pytest.fixture
async def silent_backend():
    """Accepts connections and never answers: the dial times out (504)."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in conns:
        w.close()
    server.close()


async def refused_status(url: str, headers=None) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=headers or {}, open_timeout=5):
            pass
    return info.value.response.status_code


@pytest.mark.parametrize("kind", ["502", "504"])
async def test_upstream_error_logs_no_query_and_no_secret(gateway_factory, silent_backend, caplog, kind):
    port = free_port() if kind == "502" else silent_backend
    gw = await gateway_factory(config(f"ws://127.0.0.1:{port}/z?fixed=sekrit-in-target", api_key()))
    with caplog.at_level(logging.INFO, logger="fastgw"):
        status = await refused_status(gw.url(f"/z?api_key={ALICE_KEY}&access_token=tok-999"),
                                      {"X-API-Key": "bob-key-456"})
    assert status == int(kind)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fastgw")]
    upstream_lines = [line for line in lines if f"-> {kind}" in line]
    assert upstream_lines, lines
    assert f"/z/z -> {kind}" in upstream_lines[0]          # the path alone
    text = "\n".join(lines)
    for secret in (ALICE_KEY, "tok-999", "bob-key-456", "sekrit-in-target", "?"):
        assert secret not in text, (secret, text)


async def test_log_flood_is_bounded_and_repeats_suppressed(gateway_factory, caplog):
    """Long paths to an unreachable backend: each line bounded, one line per interval,
    and the next line after it says how many were suppressed."""
    gw = await gateway_factory(config(f"ws://127.0.0.1:{free_port()}/"))
    clock = SimClock()
    gw.gw.log_throttle.clock = clock
    path = "/" + "p" * 15000 + "?api_key=" + ALICE_KEY
    n = 50
    with caplog.at_level(logging.INFO, logger="fastgw"):
        for _ in range(n):
            assert await refused_status(gw.url(path)) == 502
        clock.advance(60)
        assert await refused_status(gw.url(path)) == 502
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fastgw")]
    assert len(lines) == 4, lines             # warning + refused, twice
    assert max(len(line) for line in lines) < 400, [len(line) for line in lines]
    assert sum(f"({n - 1} similar suppressed)" in line for line in lines) == 2, lines
    assert ALICE_KEY not in "\n".join(lines)


async def test_log_flood_through_fastgw_run(gateway_process):
    """The CLI's own log (stderr, default level): a flood of 15 KB paths that used to add
    15 KB per request adds one bounded line."""
    gp = gateway_process(config(f"ws://127.0.0.1:{free_port()}/"))
    before = len(gp.stderr())
    path = "/" + "x" * 15000 + f"?api_key={ALICE_KEY}"
    for _ in range(200):
        assert await refused_status(gp.url(path)) == 502
    grown = gp.stderr()[before:]
    assert "-> 502" in grown
    assert len(grown) < 2000, len(grown)
    assert ALICE_KEY not in grown and "?" not in grown


async def test_admin_huge_header_is_answered_without_a_traceback(caplog):
    class Backend:
        def ready(self):
            return True

    admin = await start_admin(Backend(), "127.0.0.1", 0, None)

    def ask() -> bytes:
        with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as s:
            # The server answers and closes before it has read all 200 KB: our send may then
            # fail (EPIPE/ECONNRESET), so it runs beside the reader, which must see the answer.
            def send():
                try:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                              + b"s" * 200_000 + b"\r\n\r\n")
                except OSError:
                    pass
            sender = threading.Thread(target=send)
            sender.start()
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:     # the rest of our 200 KB was never read
                pass
            sender.join()
            return data

    try:
        with caplog.at_level(logging.DEBUG):
            answers = [await asyncio.to_thread(ask) for _ in range(5)]
    finally:
        await admin.close()
    for answer in answers:
        assert answer.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"431"), answer[:100]
    records = [r for r in caplog.records if r.name.startswith(("fastgw", "aiohttp"))]
    assert all(r.levelno < logging.ERROR and not r.exc_info for r in records), \
        [(r.name, r.levelname, r.getMessage()[:80]) for r in records]
    shown = [r for r in records if r.levelno >= logging.INFO]
    assert len(shown) <= 1 and all(len(r.getMessage()) < 200 for r in shown)


# ------------------------------------------------------------------ the backend URL cache

async def test_backend_url_cache_does_not_grow_with_queries(gateway_factory, echo_backend):
    gw = await gateway_factory(config(f"ws://127.0.0.1:{echo_backend}/"))
    caches = [f for f in vars(upstream).values()
              if callable(getattr(f, "cache_info", None)) and f.__module__ == upstream.__name__]
    assert caches
    for f in caches:
        f.cache_clear()
    for i in range(100):
        async with websockets.connect(gw.url(f"/?q={i}"), open_timeout=5):
            pass
    sizes = {f.__name__: f.cache_info().currsize for f in caches}
    assert all(size <= 1 for size in sizes.values()), sizes
    await gw.wait_idle()
