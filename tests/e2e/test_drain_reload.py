"""Drain and reload do what they say: while draining the listeners stay open and answer 503,
the process exits 0 when asked; a reload applies listener changes or refuses with the reason.
`fastgw run` processes, real sockets on loopback."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import time

import aiohttp
import pytest
import trustme
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import gateway_yaml
from wire import free_port, open_ws, read_close_code


def config(target: str, ports: list[int], extra_top: str = "") -> str:
    listeners = "".join(f"  - {{host: 127.0.0.1, port: {p}}}\n" for p in ports)
    return (f"listeners:\n{listeners}{extra_top}apis:\n  - name: test\n    path: /\n    assembly:\n"
            f"      - {{policy: websocket-upgrade, target-url: \"{target}\"}}\n")


async def refused_status(url: str) -> websockets.http11.Response:
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(url, open_timeout=5)
    return info.value.response


async def echoes(url: str, text: str = "hello", **kw) -> None:
    async with websockets.connect(url, open_timeout=5, **kw) as ws:
        await ws.send(text)
        assert await ws.recv() == text


async def wait_exit(proc, timeout: float) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, timeout)


# ---- drain -----------------------------------------------------------------------------


async def test_drain_exit_true_answers_503_until_the_live_ones_are_gone_then_exits_0(
        gateway_with_admin, echo_backend):
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_top="drain-time: 30s"))
    clients = [await websockets.connect(gp.url("/")) for _ in range(2)]
    reader, writer = await open_ws(gp.port)          # live, and never answers the gateway's close
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gp.admin_url}/drain?grace=20&exit=true") as r:
            assert r.status == 202
            assert (await r.json())["draining"] is True
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert (ws.close_code, ws.close_reason) == (1001, "gateway shutting down")
        assert await read_close_code(reader) == 1001
        async with http.get(f"{gp.admin_url}/readyz") as r:
            assert r.status == 503
    response = await refused_status(gp.url("/"))    # not ECONNREFUSED
    assert response.status_code == 503
    assert response.headers["Connection"] == "close"
    assert b"shutting down" in response.body
    assert gp.proc.poll() is None                   # one connection is still live
    writer.close()                                  # the last one leaves: the drain is over
    assert await wait_exit(gp.proc, 10) == 0
    err = gp.stderr()
    assert "fastgw: drained, exiting" in err and "fastgw: stopped" in err
    assert "Traceback" not in err


async def test_drain_without_exit_keeps_answering_503(gateway_with_admin, echo_backend):
    gp = gateway_with_admin(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    ws = await websockets.connect(gp.url("/"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gp.admin_url}/drain?grace=0.5") as r:
            assert r.status == 202
            assert (await r.json())["draining"] is True
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
        await asyncio.sleep(1.0)                    # past the grace: drained
        for _ in range(3):
            assert (await refused_status(gp.url("/"))).status_code == 503
        async with http.get(f"{gp.admin_url}/readyz") as r:
            assert r.status == 503
        async with http.get(f"{gp.admin_url}/healthz") as r:
            assert r.status == 200
    assert gp.proc.poll() is None
    gp.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gp.proc, 10) == 0


async def test_sigterm_answers_503_while_draining_then_exits_0(gateway_process, echo_backend):
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_top="drain-time: 20s"))
    reader, writer = await open_ws(gp.port)
    gp.proc.send_signal(signal.SIGTERM)
    assert await read_close_code(reader) == 1001
    assert (await refused_status(gp.url("/"))).status_code == 503
    assert gp.proc.poll() is None
    writer.close()
    t0 = time.monotonic()
    assert await wait_exit(gp.proc, 10) == 0
    assert time.monotonic() - t0 < 5                # once the live ones are gone, not drain-time
    assert "Traceback" not in gp.stderr()


# ---- reload ----------------------------------------------------------------------------


async def test_reload_opens_new_listeners_and_closes_removed_ones(gateway_with_admin, echo_backend):
    target = f"ws://127.0.0.1:{echo_backend}/"
    removed, added = free_port(), free_port()
    gp = gateway_with_admin(config(target, [0, removed]))
    on_removed = await websockets.connect(f"ws://127.0.0.1:{removed}/")
    gp.write_config(config(target, [0, added]))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gp.admin_url}/reload") as r:
            assert r.status == 200, await r.text()
    await echoes(f"ws://127.0.0.1:{added}/", "on the new listener")
    with pytest.raises(OSError):
        await websockets.connect(f"ws://127.0.0.1:{removed}/", open_timeout=5)
    await on_removed.send("accepted before the reload")         # live connections are untouched
    assert await on_removed.recv() == "accepted before the reload"
    await on_removed.close()
    await echoes(gp.url("/"), "on the kept listener")
    err = gp.stderr()
    assert f"+ws://127.0.0.1:{added}" in err and f"-127.0.0.1:{removed}" in err


async def test_reload_refused_when_a_new_port_is_taken_and_the_old_listeners_stay(
        gateway_with_admin, echo_backend):
    target = f"ws://127.0.0.1:{echo_backend}/"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    gp = gateway_with_admin(config(target, [0]))
    gp.write_config(config(target, [0, port]))
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(f"{gp.admin_url}/reload") as r:
                assert r.status == 422
                body = await r.json()
        finally:
            taken.close()
        assert body["reloaded"] is False
        assert f"cannot listen on 127.0.0.1:{port}" in body["error"]
        assert "in use" in body["error"] and "gateway.yaml" in body["error"]
        await echoes(gp.url("/"), "the running configuration stays")
        with pytest.raises(OSError):
            await websockets.connect(f"ws://127.0.0.1:{port}/", open_timeout=5)
        # Once the port is free, the same file applies.
        async with http.post(f"{gp.admin_url}/reload") as r:
            assert r.status == 200
    await echoes(f"ws://127.0.0.1:{port}/", "now it listens")


async def test_reload_refuses_a_new_admin_address_with_the_reason(gateway_with_admin, echo_backend):
    target = f"ws://127.0.0.1:{echo_backend}/"
    gp = gateway_with_admin(config(target, [0]))
    gp.config_path.write_text(config(target, [0]) + f"admin: {{host: 127.0.0.1, port: {free_port()}}}\n")
    gp.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "fastgw: reload" not in gp.stderr():
        assert time.monotonic() < deadline, gp.stderr()
        await asyncio.sleep(0.05)
    line = next(l for l in gp.stderr().splitlines() if l.startswith("fastgw: reload"))
    assert line.startswith("fastgw: reload refused:") and "admin" in line, line
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gp.admin_url}/reload") as r:       # still at its address
            assert r.status == 422
            assert "admin" in (await r.json())["error"]
    await echoes(gp.url("/"))


async def test_reload_reads_a_listeners_new_certificate(tmp_path, echo_backend):
    from fastgw import config as cfgmod
    from fastgw.gateway import Gateway
    old_ca, new_ca = trustme.CA(), trustme.CA()
    pem, key = tmp_path / "gw.pem", tmp_path / "gw.key"

    def issue(ca):
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        cert.private_key_pem.write_to_path(str(key))

    def trusting(ca):
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    issue(old_ca)
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/").replace(
        "    port: 0\n", f"    port: 0\n    tls: {{cert: {pem}, key: {key}}}\n", 1))
    gw = Gateway(cfgmod.load(str(path)), str(path))
    await gw.start()
    url = f"wss://127.0.0.1:{gw.addresses[0][2]}/"
    try:
        before = await websockets.connect(url, ssl=trusting(old_ca))
        issue(new_ca)                                # same files, new contents (a renewal)
        assert await gw.reload() is None
        await echoes(url, "new certificate", ssl=trusting(new_ca))
        with pytest.raises(ssl.SSLCertVerificationError):
            await websockets.connect(url, ssl=trusting(old_ca), open_timeout=5)
        await before.send("old certificate, still live")
        assert await before.recv() == "old certificate, still live"
        await before.close()
        # A key that cannot be read is refused, and the running certificate stays.
        key.write_text("not a key")
        problem = await gw.reload()
        assert problem is not None and "listeners[0].tls" in problem
        await echoes(url, "still the new certificate", ssl=trusting(new_ca))
    finally:
        await gw.shutdown(1.0)
