"""Messages through the gateway, with the `websockets` library as client
and with picows' echo backend and a `websockets` backend."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml

# On uvloop and on the standard library's loop (`fastgw run --loop asyncio`).
pytestmark = pytest.mark.both_loops


async def test_text_binary_empty_and_large(gateway):
    async with websockets.connect(gateway.url("/"), max_size=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01\xff")
        assert await ws.recv() == b"\x00\x01\xff"
        await ws.send("")
        assert await ws.recv() == ""
        await ws.send(b"")
        assert await ws.recv() == b""
        big = bytes(range(256)) * 4096          # 1 MiB
        await ws.send(big)
        assert await ws.recv() == big
    assert gateway.gw.accepted == 1


async def test_fragmented_message_same_content(gateway):
    async with websockets.connect(gateway.url("/")) as ws:
        await ws.send(["part one, ", "part two, ", "part three"])
        assert await ws.recv() == "part one, part two, part three"
        await ws.send([b"\x01" * 70000, b"\x02" * 10, b"\x03" * 200000])
        got = await ws.recv()
        assert got == b"\x01" * 70000 + b"\x02" * 10 + b"\x03" * 200000


async def test_ping_answered_by_gateway(gateway):
    async with websockets.connect(gateway.url("/")) as ws:
        waiter = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(waiter, 2)
        assert latency >= 0


async def test_close_code_from_client_reaches_backend_and_back(gateway):
    # The echo backend answers a close with the same code and reason.
    async with websockets.connect(gateway.url("/")) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        await ws.close(4001, "bye")
    assert ws.close_code == 4001
    assert ws.close_reason == "bye"


async def test_backend_close_code_and_reason_reach_client(gateway_factory):
    async def handler(conn):
        await conn.recv()
        await conn.close(4001, "bye")

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gw.url("/")) as ws:
            await ws.send("go")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 4001
        assert ws.close_reason == "bye"


async def test_client_close_reaches_websockets_backend(gateway_factory):
    seen = asyncio.get_running_loop().create_future()

    async def handler(conn):
        try:
            async for _ in conn:
                pass
        finally:
            seen.set_result((conn.close_code, conn.close_reason))

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gw.url("/")) as ws:
            await ws.close(4002, "client says bye")
        assert await asyncio.wait_for(seen, 5) == (4002, "client says bye")


async def test_websockets_backend_echo_and_subprotocol(gateway_factory):
    async def handler(conn):
        async for msg in conn:
            await conn.send(msg)

    async with ws_serve(handler, "127.0.0.1", 0, subprotocols=["b.v1", "a.v1"]) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        async with websockets.connect(gw.url("/"), subprotocols=["a.v1", "b.v1"]) as ws:
            # websockets' server picks the first of its own list the client offered.
            assert ws.subprotocol == "b.v1"
            for i in range(50):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]


async def test_backend_choice_of_subprotocol_reaches_client(gateway):
    # The echo backend takes the first offered of chat.v2 and chat.v1.
    async with websockets.connect(gateway.url("/"), subprotocols=["other", "chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v2"
    async with websockets.connect(gateway.url("/"), subprotocols=["chat.v1", "other"]) as ws:
        assert ws.subprotocol == "chat.v1"
    async with websockets.connect(gateway.url("/")) as ws:
        assert ws.subprotocol is None


async def test_headers_and_path_forwarded(gateway_factory, echo_backend):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/base", path="/api"))
    async with websockets.connect(
        gw.url("/api/headers/x?q=1"),
        additional_headers={"X-Custom": "kept", "Authorization": "Bearer t",
                            "Connection": "Upgrade, X-Hop", "X-Hop": "dropped",
                            "X-Forwarded-For": "10.9.9.9"},
        user_agent_header="test-agent",
    ) as ws:
        report = json.loads(await ws.recv())
    h = report["headers"]
    assert report["path"] == "/base/headers/x?q=1"
    assert h["x-custom"] == "kept"
    assert h["authorization"] == "Bearer t"
    assert h["user-agent"] == "test-agent"
    assert "x-hop" not in h
    assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert h["host"] == f"127.0.0.1:{echo_backend}"
    # extensions: pass (the default since issue 12): the client's permessage-deflate offer only.
    assert h["sec-websocket-extensions"] == "permessage-deflate; client_max_window_bits"


async def test_no_compression_negotiated(gateway):
    # websockets offers permessage-deflate by default: it must not be accepted.
    async with websockets.connect(gateway.url("/")) as ws:
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        await ws.send("plain")
        assert await ws.recv() == "plain"


async def test_picows_client_pipelined_through_gateway(gateway):
    """picows (the benchmark's load generator) as the client: every byte checked."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "loadgen.py"
    spec = importlib.util.spec_from_file_location("fastgw_bench_loadgen_e2e", path)
    loadgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loadgen)
    for size in (64, 70_000):
        res = await loadgen.run_throughput(gateway.url("/"), connections=4, inflight=16, size=size,
                                           duration=0.5, warmup=0.1, verify="full")
        assert res["ok"], res
        assert res["sent_total"] == res["received_total"] > 0
        assert res["lost"] == res["out_of_order"] == res["bad_payload"] == 0
