"""The bundled echo backend (fastgw.echo) and the benchmark load generator (bench/loadgen.py).

Real sockets on 127.0.0.1, port 0; a few seconds in all.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from picows import WSListener, WSMsgType, ws_connect
from websockets.exceptions import ConnectionClosed

from fastgw import echo
from fastgw.echo import serve, server_port

ROOT = Path(__file__).resolve().parents[2]
LOADGEN_PATH = ROOT / "bench" / "loadgen.py"


import loadgen  # noqa: E402  (bench/loadgen.py, on sys.path by conftest)


@pytest.fixture
async def echo_server():
    server = await serve("127.0.0.1", 0, subprotocols=["b", "a"])
    yield server
    echo.close_connections(server)
    server.close()


def _url(server, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server_port(server)}{path}"


# ---------------------------------------------------------------------------------------------
# echo backend, seen by a third-party client


async def test_text_and_binary_come_back_identical(echo_server):
    async with connect(_url(echo_server), compression=None) as ws:
        for msg in ["hello", "", "é" * 500, b"\x00\xff" * 40_000, b"", bytes(range(256))]:
            await ws.send(msg)
            got = await asyncio.wait_for(ws.recv(), 2)
            assert got == msg
            assert type(got) is type(msg)


async def test_many_pipelined_messages_in_order(echo_server):
    async with connect(_url(echo_server), compression=None) as ws:
        sent = [f"m{i}" * (i % 7 + 1) for i in range(500)]
        for m in sent:
            await ws.send(m)
        got = [await asyncio.wait_for(ws.recv(), 2) for _ in sent]
        assert got == sent


async def test_fragmented_message_comes_back_fragmented_identically(echo_server):
    async with connect(_url(echo_server), compression=None) as ws:
        # websockets sends each fragment with fin=0, then an empty final frame with fin=1
        await ws.send(["ab", "cde", "", "f"])
        frags = [f async for f in ws.recv_streaming()]
        assert frags == ["ab", "cde", "", "f", ""]
        await ws.send([b"\x01" * 200, b"\x02" * 35_000])
        frags = [f async for f in ws.recv_streaming()]
        assert frags == [b"\x01" * 200, b"\x02" * 35_000, b""]


class _Recorder(WSListener):
    """A picows client that records (opcode, fin, payload) of every frame it receives."""

    def __init__(self):
        super().__init__()
        self.frames: list[tuple[int, int, bytes]] = []
        self.event = asyncio.Event()

    def on_ws_frame(self, transport, frame):
        self.frames.append((int(frame.msg_type), frame.fin, frame.get_payload_as_bytes()))
        self.event.set()

    async def wait_for(self, n: int) -> list[tuple[int, int, bytes]]:
        async with asyncio.timeout(2):
            while len(self.frames) < n:
                self.event.clear()
                await self.event.wait()
        return self.frames


async def test_frames_come_back_with_the_same_opcode_fin_and_payload(echo_server):
    rec = _Recorder()
    transport, _ = await ws_connect(lambda: rec, _url(echo_server), use_aiofastnet=False)
    try:
        sent = [
            (WSMsgType.TEXT, 0, b"ab"), (WSMsgType.CONTINUATION, 0, b"cd"),
            (WSMsgType.CONTINUATION, 1, b"ef"),
            (WSMsgType.BINARY, 0, b"\x00" * 300), (WSMsgType.CONTINUATION, 1, b"\x01" * 70_000),
            (WSMsgType.BINARY, 1, b""),
        ]
        for mt, fin, payload in sent:
            transport.send(mt, payload, fin=bool(fin))
        got = await rec.wait_for(len(sent))
        assert got == [(int(mt), fin, payload) for mt, fin, payload in sent]
    finally:
        transport.disconnect()


async def test_ping_is_answered(echo_server):
    async with connect(_url(echo_server), compression=None, ping_interval=None) as ws:
        waiter = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(waiter, 2)
        assert latency >= 0


async def test_close_code_and_reason_are_echoed(echo_server):
    async with connect(_url(echo_server), compression=None) as ws:
        await ws.close(4321, "custom reason")
        assert ws.protocol.close_rcvd is not None
        assert ws.protocol.close_rcvd.code == 4321
        assert ws.protocol.close_rcvd.reason == "custom reason"


async def test_close_without_code_is_answered_with_1000(echo_server):
    rec = _Recorder()
    transport, _ = await ws_connect(lambda: rec, _url(echo_server), use_aiofastnet=False)
    try:
        transport.send(WSMsgType.CLOSE, b"")  # a CLOSE frame with no payload at all
        (frame,) = await rec.wait_for(1)
        assert frame == (int(WSMsgType.CLOSE), 1, struct.pack("!H", 1000))
        await asyncio.wait_for(transport.wait_disconnected(), 2)  # then the server hangs up
    finally:
        transport.disconnect()


async def test_headers_path_reports_request_headers(echo_server):
    url = _url(echo_server, "/svc/headers?x=1")
    async with connect(url, compression=None, additional_headers={"X-Test-Header": "v1"}) as ws:
        report = json.loads(await asyncio.wait_for(ws.recv(), 2))
        assert report["path"] == "/svc/headers?x=1"
        assert report["method"] == "GET"
        assert report["headers"]["x-test-header"] == "v1"
        assert report["headers"]["host"] == f"127.0.0.1:{server_port(echo_server)}"
        assert all(k == k.lower() for k in report["headers"])
        # then it is a normal echo
        await ws.send("after")
        assert await asyncio.wait_for(ws.recv(), 2) == "after"


async def test_no_headers_report_on_other_paths(echo_server):
    async with connect(_url(echo_server, "/plain"), compression=None) as ws:
        await ws.send("first")
        assert await asyncio.wait_for(ws.recv(), 2) == "first"


async def test_subprotocol_first_offered_that_server_supports(echo_server):
    async with connect(_url(echo_server), subprotocols=["z", "a", "b"]) as ws:
        assert ws.subprotocol == "a"  # client's order, among the server's list
    async with connect(_url(echo_server), subprotocols=["b", "a"]) as ws:
        assert ws.subprotocol == "b"
    async with connect(_url(echo_server)) as ws:
        assert ws.subprotocol is None


async def test_oversized_frame_closes_the_connection_with_1009():
    server = await serve("127.0.0.1", 0, max_frame_size=1000)
    try:
        async with connect(_url(server), compression=None) as ws:
            await ws.send(b"x" * 1000)
            assert len(await asyncio.wait_for(ws.recv(), 2)) == 1000
            await ws.send(b"x" * 1001)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 2)
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1009
    finally:
        server.close()


async def test_close_connections_sends_going_away(echo_server):
    async with connect(_url(echo_server), compression=None) as ws:
        await ws.send("x")
        await ws.recv()
        echo.close_connections(echo_server)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 2)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001


def test_encode_frame_lengths():
    assert echo.encode_frame(1, b"abc") == b"\x81\x03abc"
    f = echo.encode_frame(2, b"x" * 200, fin=False)
    assert f[:4] == struct.pack("!BBH", 0x02, 126, 200)
    f = echo.encode_frame(2, b"x" * 70_000)
    assert f[:10] == struct.pack("!BBQ", 0x82, 127, 70_000) and len(f) == 70_010


def test_command_line_prints_port_and_exits_cleanly_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastgw.echo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("echo: listening on ws://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0

        async def talk() -> str:
            async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
                await ws.send("cli")
                return await asyncio.wait_for(ws.recv(), 2)

        assert asyncio.run(talk()) == "cli"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------------------------
# load generator


def test_frame_maker_masks_correctly():
    fm = loadgen.FrameMaker(300)
    frame = bytes(fm.frame(12345))
    assert frame[0] == 0x82 and frame[1] == 0x80 | 126
    assert struct.unpack("!H", frame[2:4])[0] == 300
    key = frame[4:8]
    assert key != b"\x00\x00\x00\x00"
    masked = frame[8:]
    payload = bytes(b ^ key[i % 4] for i, b in enumerate(masked))
    assert struct.unpack("!Q", payload[:8])[0] == 12345
    assert payload[8:] == fm.filler and len(payload) == 300


async def test_loadgen_throughput_against_echo(echo_server):
    res = await loadgen.run_throughput(
        _url(echo_server), connections=4, inflight=32, size=256, duration=1.0, warmup=0.2,
        verify="full",
    )
    assert res["ok"], res
    assert res["sent_total"] == res["received_total"] > 0
    assert res["lost"] == 0 and res["out_of_order"] == 0 and res["bad_payload"] == 0
    assert res["msgs_per_s"] > 0 and res["mb_per_s"] > 0
    assert 0 < res["client_cpu"] <= 1.5


async def test_loadgen_latency_against_echo(echo_server):
    res = await loadgen.run_latency(_url(echo_server), connections=2, size=64, rate=1000,
                                    duration=0.5, warmup=0.1)
    assert res["ok"], res
    assert res["scheduled"] == res["completed"] == 600
    assert res["recorded"] == 500
    lat = res["latency_us"]
    assert 1 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # measured from the intended send time: never below the service time
    assert lat["p50"] >= res["service_us"]["p50"]


class _CorruptingEcho(echo.EchoListener):
    """Echoes, but damages message number 100: wrong sequence number, or truncated."""

    mode = "seq"

    def on_ws_frame(self, transport, frame):
        self.count = getattr(self, "count", 0) + 1
        if self.count == 100 and frame.payload_size >= 16:
            p = bytearray(frame.get_payload_as_bytes())
            if self.mode == "seq":
                p[7] ^= 0x55
            else:
                del p[-1]
            self.out += echo.encode_frame(2, bytes(p))
            if frame.last_in_buffer:
                self._flush()
            return
        super().on_ws_frame(transport, frame)


@pytest.mark.parametrize("mode", ["seq", "length"])
async def test_loadgen_detects_damaged_echoes(mode):
    from picows import ws_create_server

    class L(_CorruptingEcho):
        pass

    L.mode = mode
    server = await ws_create_server(lambda req: L(), "127.0.0.1", 0, use_aiofastnet=False,
                                    enable_auto_pong=False)
    try:
        res = await loadgen.run_throughput(
            f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", connections=1, inflight=8,
            size=64, duration=0.3, warmup=0.1,
        )
    finally:
        server.close()
    assert not res["ok"]
    if mode == "seq":
        assert res["out_of_order"] >= 1
    else:
        assert res["bad_payload"] >= 1


def test_loadgen_command_line_json():
    from fastgw.echo import main as _unused  # noqa: F401  (the module must import)

    echo_proc = subprocess.Popen([sys.executable, "-m", "fastgw.echo", "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(echo_proc.stdout.readline().rsplit(":", 1)[1])
        out = subprocess.run(
            [sys.executable, str(LOADGEN_PATH), "--url", f"ws://127.0.0.1:{port}/",
             "--duration", "1", "--warmup", "0.2", "--connections", "2", "--inflight", "16"],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["mode"] == "throughput" and res["ok"]
        assert res["sent_total"] == res["received_total"] and res["lost"] == 0
        assert res["msgs_per_s"] > 0
        assert "msg/s" in out.stderr
    finally:
        echo_proc.send_signal(signal.SIGTERM)
        try:
            echo_proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            echo_proc.kill()
            echo_proc.wait(5)
