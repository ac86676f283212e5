"""wss on both sides: a TLS listener, and verified wss backends (certificates from trustme)."""

from __future__ import annotations

import logging
import ssl

import pytest
import trustme
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import InvalidStatus

from conftest import gateway_yaml


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def echo(conn):
    async for msg in conn:
        await conn.send(msg)


@pytest.fixture
async def wss_backend(ca, tmp_path):
    """A websockets echo backend speaking TLS with a certificate for api.internal and 127.0.0.1."""
    cert = ca.issue_cert("api.internal", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    async with ws_serve(echo, "127.0.0.1", 0, ssl=ctx) as server:
        yield server.sockets[0].getsockname()[1]


async def test_wss_listener(ca, tmp_path, gateway_factory, echo_backend):
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    yaml_text = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/").replace(
        "    port: 0\n", f"    port: 0\n    tls: {{cert: {tmp_path}/gw.pem, key: {tmp_path}/gw.key}}\n", 1)
    gw = await gateway_factory(yaml_text)
    assert gw.scheme == "wss"
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with websockets.connect(gw.url("/headers"), ssl=client_ctx) as ws:
        report = await ws.recv()
        assert '"x-forwarded-proto": "https"' in report
        big = b"z" * 300_000
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send("over tls")
        assert await ws.recv() == "over tls"


async def test_wss_backend_verified(ca, tmp_path, gateway_factory, wss_backend):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    profiles = f"tls-profiles:\n  backend:\n    ca: {tmp_path}/ca.pem\n    server-name: api.internal\n"
    gw = await gateway_factory(gateway_yaml(f"wss://127.0.0.1:{wss_backend}/",
                                            tls_profiles=profiles, extra_upgrade="tls-profile: backend"))
    async with websockets.connect(gw.url("/")) as ws:
        for i in range(20):
            await ws.send(f"secure {i}")
            assert await ws.recv() == f"secure {i}"


async def test_wss_backend_untrusted_certificate_502(tmp_path, gateway_factory, wss_backend, caplog):
    # No tls-profile: the system trust store, which does not know trustme's CA.
    gw = await gateway_factory(gateway_yaml(f"wss://127.0.0.1:{wss_backend}/"))
    with caplog.at_level(logging.WARNING, logger="fastgw"):
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(gw.url("/")):
                pass
    assert info.value.response.status_code == 502
    assert b"certificate" in info.value.response.body
    assert any("certificate" in r.getMessage() for r in caplog.records)


async def test_wss_backend_wrong_name_502(ca, tmp_path, gateway_factory, wss_backend):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    profiles = f"tls-profiles:\n  backend:\n    ca: {tmp_path}/ca.pem\n    server-name: other.internal\n"
    gw = await gateway_factory(gateway_yaml(f"wss://127.0.0.1:{wss_backend}/",
                                            tls_profiles=profiles, extra_upgrade="tls-profile: backend"))
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(gw.url("/")):
            pass
    assert info.value.response.status_code == 502


async def test_wss_backend_verify_false(tmp_path, gateway_factory, wss_backend):
    profiles = "tls-profiles:\n  lax:\n    verify: false\n"
    gw = await gateway_factory(gateway_yaml(f"wss://127.0.0.1:{wss_backend}/",
                                            tls_profiles=profiles, extra_upgrade="tls-profile: lax"))
    async with websockets.connect(gw.url("/")) as ws:
        await ws.send("unchecked")
        assert await ws.recv() == "unchecked"


def _two_listeners_yaml(tmp_path, ca, target: str, extra_api: str = "", extra_top: str = "") -> str:
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    return f"""
listeners:
  - {{host: 127.0.0.1, port: 0}}
  - {{host: 127.0.0.1, port: 0, tls: {{cert: {tmp_path}/gw.pem, key: {tmp_path}/gw.key}}}}
{extra_top}
apis:
  - name: secure-only
    path: /
    schemes: [wss]
{extra_api}
    assembly:
      - {{policy: websocket-upgrade, target-url: "{target}"}}
"""


async def test_api_with_schemes_wss_refused_on_a_plain_listener(ca, tmp_path, gateway_factory):
    """IBM API Connect's API-level schemes: [wss] reached over ws:// is a 403, never dialled."""
    dialled = []

    async def counting(reader, writer):
        dialled.append(1)
        writer.close()

    import asyncio
    counter = await asyncio.start_server(counting, "127.0.0.1", 0)
    port = counter.sockets[0].getsockname()[1]
    gw = await gateway_factory(_two_listeners_yaml(tmp_path, ca, f"ws://127.0.0.1:{port}/"))
    plain = [a for a in gw.gw.addresses if a[0] == "ws"][0]
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(f"ws://127.0.0.1:{plain[2]}/"):
            pass
    assert info.value.response.status_code == 403
    assert b"this API requires wss" in info.value.response.body
    assert gw.gw.metrics.api("secure-only").rejected["forbidden"] == 1
    await asyncio.sleep(0.1)
    assert dialled == []
    counter.close()


async def test_api_with_schemes_wss_served_over_tls_and_https_target(ca, tmp_path, gateway_factory,
                                                                   wss_backend):
    """schemes: [wss] is served on the TLS listener; an https:// target URL means wss://."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    yaml_text = _two_listeners_yaml(
        tmp_path, ca, f"https://127.0.0.1:{wss_backend}/",
        extra_top=f"tls-profiles:\n  backend:\n    ca: {tmp_path}/ca.pem\n")
    yaml_text = yaml_text.replace('target-url: "https', 'tls-profile: backend, target-url: "https')
    gw = await gateway_factory(yaml_text)
    secure = [a for a in gw.gw.addresses if a[0] == "wss"][0]
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with websockets.connect(f"wss://127.0.0.1:{secure[2]}/", ssl=client_ctx) as ws:
        await ws.send("both sides TLS")
        assert await ws.recv() == "both sides TLS"


async def test_http_target_url_means_ws(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"http://127.0.0.1:{echo_backend}/"))
    async with websockets.connect(gw.url("/")) as ws:
        await ws.send("plain")
        assert await ws.recv() == "plain"
