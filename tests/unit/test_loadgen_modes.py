"""The connrate and idle modes of the load generator (bench/loadgen.py).

Real sockets on 127.0.0.1 against an echo backend in this process that counts what it sees
(upgrades, live connections, echoed messages, CLOSE codes), so that the load generator's
figures can be compared with what really happened. A few seconds in all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram
from picows import WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from fastgw import echo

ROOT = Path(__file__).resolve().parents[2]
LOADGEN_PATH = ROOT / "bench" / "loadgen.py"


import loadgen  # noqa: E402  (bench/loadgen.py, on sys.path by conftest)

_DATA = (int(WSMsgType.CONTINUATION), int(WSMsgType.TEXT), int(WSMsgType.BINARY))
_CLOSE = int(WSMsgType.CLOSE)


class CountingBackend:
    """The bundled echo listener on a picows server that counts.

    ``refuse_every=k`` answers every k-th upgrade request with HTTP 503; ``corrupt_every=k``
    damages the sequence number of every k-th echoed message; ``answer_close=False`` hangs up
    on a CLOSE without answering it."""

    def __init__(self, refuse_every: int = 0, corrupt_every: int = 0, answer_close: bool = True):
        self.refuse_every = refuse_every
        self.corrupt_every = corrupt_every
        self.answer_close = answer_close
        self.requests = 0
        self.accepted = 0
        self.live: set[echo.EchoListener] = set()
        self.echoed = 0
        self.close_codes: list[int | None] = []
        self.server = None

    async def start(self) -> CountingBackend:
        backend = self

        class Listener(echo.EchoListener):
            def on_ws_connected(self, transport):
                super().on_ws_connected(transport)
                backend.accepted += 1
                backend.live.add(self)

            def on_ws_disconnected(self, transport):
                super().on_ws_disconnected(transport)
                backend.live.discard(self)

            def on_ws_frame(self, transport, frame):
                mt = int(frame.msg_type)
                if mt == _CLOSE:
                    backend.close_codes.append(
                        int(frame.get_close_code()) if frame.payload_size >= 2 else None)
                    if not backend.answer_close:
                        transport.disconnect(False)
                        return
                elif mt in _DATA:
                    backend.echoed += 1
                    if backend.corrupt_every and backend.echoed % backend.corrupt_every == 0:
                        p = bytearray(frame.get_payload_as_bytes())
                        p[7] ^= 0x55
                        self.out += echo.encode_frame(mt, bytes(p))
                        if frame.last_in_buffer:
                            self._flush()
                        return
                super().on_ws_frame(transport, frame)

        def factory(request):
            backend.requests += 1
            if backend.refuse_every and backend.requests % backend.refuse_every == 0:
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(503, b"busy"), None)
            return Listener()

        self.server = await ws_create_server(factory, "127.0.0.1", 0, use_aiofastnet=False,
                                             enable_auto_pong=False)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def wait_live(self, n: int, timeout: float = 3.0) -> int:
        deadline = time.monotonic() + timeout
        while len(self.live) != n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self.live)

    def close(self) -> None:
        for listener in list(self.live):
            listener.shutdown()
        self.server.close()


@pytest.fixture
async def backend():
    b = await CountingBackend().start()
    yield b
    b.close()


def _hist_count(encoded: str) -> int:
    base64.b64decode(encoded, validate=True)
    return HdrHistogram.decode(encoded).get_total_count()


async def _loadgen_proc(*args: str, stdin=asyncio.subprocess.PIPE):
    return await asyncio.create_subprocess_exec(
        sys.executable, str(LOADGEN_PATH), *args, stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _json_line(proc, timeout: float = 10.0) -> dict:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, (await proc.stderr.read()).decode()
    return json.loads(line)


async def _finish(proc, timeout: float = 10.0) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------------------------------------
# connrate


async def test_connrate_counts_every_cycle_the_backend_saw(backend):
    res = await loadgen.run_connrate(backend.url, connections=4, size=64, duration=1.0, warmup=0)
    assert res["mode"] == "connrate" and res["connections"] == 4 and res["size"] == 64
    assert res["failures"] == 0 and res["lost"] == 0 and res["errors"] == [], res["errors"]
    assert res["upgrades"] > 0
    # No warmup: every connection the backend accepted is one counted cycle, each with one
    # echoed message and a normal close.
    assert backend.accepted == res["upgrades"]
    assert backend.echoed == res["upgrades"]
    assert backend.close_codes == [1000] * res["upgrades"]
    assert await backend.wait_live(0) == 0
    assert _hist_count(res["hist"]) == res["upgrades"] == res["handshake_us"]["count"]
    hs = res["handshake_us"]
    assert 1 <= hs["p50"] <= hs["p90"] <= hs["p99"] <= hs["p99.9"] <= hs["max"]
    assert 0.9 <= res["duration"] <= 1.5
    assert res["upgrades_per_s"] == pytest.approx(res["upgrades"] / res["duration"])
    assert res["client_cpu_pct"] > 0


async def test_connrate_leaves_warmup_cycles_out(backend):
    res = await loadgen.run_connrate(backend.url, connections=2, size=100, duration=0.6,
                                     warmup=0.4, verify="full")
    assert res["failures"] == 0 and res["upgrades"] > 0, res
    assert backend.accepted == backend.echoed == len(backend.close_codes)
    assert backend.accepted > res["upgrades"]  # the warmup cycles happened, but do not count
    assert _hist_count(res["hist"]) == res["upgrades"]


async def test_connrate_detects_damaged_echoes():
    b = await CountingBackend(corrupt_every=5).start()
    try:
        res = await loadgen.run_connrate(b.url, connections=2, size=64, duration=0.5, warmup=0)
    finally:
        b.close()
    assert res["failures"] >= 1
    assert "echo did not match" in res["errors"]
    # only the good cycles are counted
    assert res["upgrades"] == b.accepted - res["failures"]
    assert _hist_count(res["hist"]) == res["upgrades"]


async def test_connrate_detects_a_peer_that_does_not_answer_close():
    b = await CountingBackend(answer_close=False).start()
    try:
        res = await loadgen.run_connrate(b.url, connections=1, size=64, duration=0.3, warmup=0)
    finally:
        b.close()
    assert res["upgrades"] == 0 and res["failures"] >= 1
    assert any(e.startswith("close:") for e in res["errors"]), res["errors"]


async def test_connrate_command_line_with_two_processes(backend):
    proc = await _loadgen_proc("--mode", "connrate", "--url", backend.url, "--connections", "4",
                               "--processes", "2", "--duration", "1", "--warmup", "0",
                               stdin=asyncio.subprocess.DEVNULL)
    rc, out, err = await _finish(proc, 20)
    assert rc == 0, err
    (line,) = out.splitlines()  # one JSON object on stdout
    res = json.loads(line)
    assert res["mode"] == "connrate" and res["connections"] == 4
    assert res["failures"] == 0 and res["upgrades"] > 0
    assert backend.accepted == res["upgrades"]  # both processes' cycles were added up
    assert _hist_count(res["hist"]) == res["upgrades"] == res["handshake_us"]["count"]
    assert "upgrades/s" in err


def test_connrate_with_nothing_listening_fails():
    reserved = socket.socket()  # bound, not listening: connects are refused
    reserved.bind(("127.0.0.1", 0))
    try:
        port = reserved.getsockname()[1]
        out = subprocess.run(
            [sys.executable, str(LOADGEN_PATH), "--mode", "connrate",
             "--url", f"ws://127.0.0.1:{port}/", "--connections", "2", "--duration", "0.5",
             "--warmup", "0"],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        )
    finally:
        reserved.close()
    assert out.returncode == 1, out.stderr
    res = json.loads(out.stdout)
    assert res["upgrades"] == 0 and res["failures"] > 0
    assert res["errors"] and "ConnectionRefusedError" in res["errors"][0]
    assert _hist_count(res["hist"]) == 0


# ---------------------------------------------------------------------------------------------
# idle


async def test_idle_holds_connections_until_stdin_says_so(backend):
    proc = await _loadgen_proc("--mode", "idle", "--url", backend.url, "--connections", "200",
                               "--concurrency", "50", "--duration", "30")
    try:
        event = await _json_line(proc)
        assert event["event"] == "holding"
        assert event["open"] == 200 and event["failed"] == 0 and event["open_seconds"] > 0
        assert len(backend.live) == backend.accepted == 200
        await asyncio.sleep(0.3)
        assert proc.returncode is None  # still holding
        assert backend.echoed == 0 and len(backend.live) == 200  # idle: nothing sent
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        res = await _json_line(proc)
        rc, rest, err = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0, err
    assert rest == ""  # exactly two lines on stdout
    assert res["mode"] == "idle" and res["connections"] == 200
    assert res["open"] == 200 and res["failed"] == 0 and res["alive"] == 200
    assert res["errors"] == []
    assert backend.echoed == 200  # one message on each connection
    assert backend.close_codes == [1000] * 200
    assert await backend.wait_live(0) == 0


async def test_idle_counts_connections_closed_while_held(backend):
    proc = await _loadgen_proc("--mode", "idle", "--url", backend.url, "--connections", "40",
                               "--duration", "30")
    try:
        event = await _json_line(proc)
        assert event["open"] == 40
        for listener in sorted(backend.live, key=id)[:20]:
            listener.shutdown()  # close 1001
        assert await backend.wait_live(20) == 20
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        res = await _json_line(proc)
        rc, _, err = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 1, err
    assert res["open"] == 40 and res["failed"] == 0
    assert res["alive"] == 20
    assert any(e.startswith("peer closed: (1001") for e in res["errors"]), res["errors"]
    assert backend.echoed == 20
    assert await backend.wait_live(0) == 0


async def test_idle_counts_refused_upgrades_and_ends_on_stdin_eof():
    b = await CountingBackend(refuse_every=4).start()
    try:
        proc = await _loadgen_proc("--mode", "idle", "--url", b.url, "--connections", "20",
                                   "--duration", "30", stdin=asyncio.subprocess.DEVNULL)
        event = await _json_line(proc)
        res = await _json_line(proc)
        rc, _, err = await _finish(proc)
    finally:
        b.close()
    assert rc == 1, err
    assert event == {"event": "holding", "open": 15, "failed": 5,
                     "open_seconds": event["open_seconds"]}
    assert res["open"] == 15 and res["failed"] == 5 and res["alive"] == 15
    assert res["errors"] and all(e.startswith("connect:") for e in res["errors"])


async def test_idle_hold_ends_after_duration(backend):
    proc = await _loadgen_proc("--mode", "idle", "--url", backend.url, "--connections", "10",
                               "--duration", "0.5")
    try:
        await _json_line(proc)
        t0 = time.monotonic()
        res = await _json_line(proc)  # stdin stays open and silent
        held = time.monotonic() - t0
        rc, _, err = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0, err
    assert res["alive"] == 10
    assert 0.3 <= held < 5


def test_idle_raises_the_open_files_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        if soft <= 64:
            pytest.skip("cannot lower the limit safely here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    try:
        assert loadgen._raise_nofile_limit() == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_options():
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--mode", "idle", "--processes", "2"])
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--mode", "idle", "--concurrency", "0"])
    assert loadgen.parse_args(["--mode", "idle"]).concurrency == 200
    assert loadgen.parse_args(["--mode", "connrate", "--processes", "2"]).processes == 2
