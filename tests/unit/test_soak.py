"""The soak run (bench/soak.py), shortened: a few seconds, a few dozen connections.

Each test runs the script as a user would, as a subprocess: it starts a real `fastgw run`
(and, unless told otherwise, the bundled echo backend) and its client processes. Against the
echo backend the verdict must be PASS and its counts must agree with the gateway's own
metrics; against a backend in this test that damages exactly one message (drops it, swaps it
with the next one, flips a byte, sends it twice, or sends it down another connection) the
script must count exactly that one fault, nothing else, and FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from picows import WSMsgType, ws_create_server

from fastgw import echo

import soak  # noqa: E402  (bench/soak.py, on sys.path by conftest)

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "bench" / "soak.py"
_DATA = (int(WSMsgType.TEXT), int(WSMsgType.BINARY))

SHORT = ["--duration", "3s", "--warmup", "1s", "--connections", "30", "--interval", "250ms",
         "--churn", "0.1", "--sample-interval", "500ms", "--no-pin", "--echo-timeout", "2s"]
FAULT_AT = 40  # the data message (counted over all connections) that the faulty backend damages


async def run_soak(tmp_path: Path, *extra: str, timeout: float = 90) -> tuple[int, dict, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), *SHORT, "--out", str(tmp_path), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode() + err.decode()
    assert (tmp_path / "soak.json").exists(), text
    return proc.returncode, json.loads((tmp_path / "soak.json").read_text()), text


class FaultyBackend:
    """The bundled echo listener, except for message number FAULT_AT (over all connections):

    drop       not echoed
    reorder    held back and echoed right after the next message of the same connection
    flip       echoed with one payload byte changed
    duplicate  echoed twice
    misroute   echoed on another connection instead of its own
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.count = 0
        self.faulted = 0
        self.live: list[echo.EchoListener] = []
        self.server = None

    async def start(self) -> FaultyBackend:
        backend = self

        class Listener(echo.EchoListener):
            held: bytes | None = None

            def on_ws_connected(self, transport):
                super().on_ws_connected(transport)
                backend.live.append(self)

            def on_ws_disconnected(self, transport):
                super().on_ws_disconnected(transport)
                backend.live.remove(self)

            def on_ws_frame(self, transport, frame):
                mt = int(frame.msg_type)
                if mt not in _DATA or not frame.fin or self.closing:
                    return super().on_ws_frame(transport, frame)
                payload = frame.get_payload_as_bytes()
                backend.count += 1
                out = [payload]
                if backend.count == FAULT_AT:
                    backend.faulted += 1
                    if backend.kind == "drop":
                        out = []
                    elif backend.kind == "reorder":
                        self.held, out = payload, []
                    elif backend.kind == "flip":
                        damaged = bytearray(payload)
                        damaged[len(damaged) // 2] ^= 0x01
                        out = [bytes(damaged)]
                    elif backend.kind == "duplicate":
                        out = [payload, payload]
                    elif backend.kind == "misroute":
                        other = next(x for x in backend.live if x is not self and not x.closing)
                        other.write(echo.encode_frame(mt, payload))
                        out = []
                elif self.held is not None:
                    out.append(self.held)
                    self.held = None
                for p in out:
                    self.write(echo.encode_frame(mt, p))

        self.server = await ws_create_server(lambda request: Listener(), "127.0.0.1", 0,
                                             use_aiofastnet=False, enable_auto_pong=False)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    def close(self) -> None:
        for listener in list(self.live):
            listener.shutdown()
        self.server.close()


async def test_soak_passes_against_the_echo_backend(tmp_path):
    rc, res, text = await run_soak(tmp_path)
    s, meta = res["summary"], res["meta"]
    assert rc == 0, text
    assert s["verdict"] == "PASS" and s["failed"] == [], text
    assert all(c["ok"] for c in s["checks"])
    assert s["opened"] == 30 and s["open_failed"] == 0
    for key in ("lost", "reordered", "corrupted", "duplicated", "misrouted",
                "unexpected_closes", "close_errors", "connect_failures"):
        assert s[key] == 0, key
    # about 30 connections x 4 messages/s x 3 s; churn replaced about 10% of them per second
    assert 250 <= s["sent"] == s["received"] <= 370
    assert 5 <= s["churned"] <= 9
    # the script's counts are what the gateway itself relayed
    assert meta["gateway_messages"] == {"request": s["sent"], "response": s["received"]}
    assert meta["gateway_upgrades"] == 30 + s["churned"]
    assert s["table_empty"] is True and s["active_max"] == 30
    assert s["latency_us"]["count"] == s["received"]
    # samples: one at the start, then every 0.5 s; p99 per interval once messages flow
    samples = res["samples"]
    assert [r["t"] for r in samples] == [0.5 * k for k in range(7)]
    assert all(r["rss_kib"] > 0 for r in samples)
    assert all(r["p99_us"] > 0 and r["active"] > 0 for r in samples[1:])
    assert s["rss_deviation_pct"] is not None and s["rss_deviation_pct"] <= 5
    for suffix in ("json", "md"):
        assert (tmp_path / f"soak.{suffix}").stat().st_size > 0
    md = (tmp_path / "soak.md").read_text()
    # the plot needs the bench extra (matplotlib); without it the report says so and links none
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "soak.png").stat().st_size > 0 and "![soak](soak.png)" in md
    else:
        assert not (tmp_path / "soak.png").exists() and "![soak]" not in md
        assert "matplotlib is not installed" in text
    assert "**PASS**" in md and "| table empty at the end | yes" in md


EXPECTED = {
    # kind: the counts that must be 1 (every other fault count must be 0)
    "drop": {"lost"},
    "reorder": {"reordered"},
    "flip": {"corrupted"},
    "duplicate": {"duplicated"},
    "misroute": {"misrouted", "lost"},  # the connection it was meant for never got it back
}


async def soak_against(kind: str, tmp_path: Path) -> tuple[FaultyBackend, int, dict, str]:
    backend = await FaultyBackend(kind).start()
    # misroute: no churn, so that the connection picked to receive the message stays open
    extra = ["--churn", "0"] if kind == "misroute" else []
    try:
        rc, res, text = await run_soak(tmp_path / kind, "--backend-url", backend.url,
                                       "--no-plot", *extra)
    finally:
        backend.close()
    return backend, rc, res, text


async def test_soak_counts_each_fault_of_a_faulty_backend_and_fails(tmp_path):
    # the five runs at once: each has its own backend, gateway and client
    runs = await asyncio.gather(*(soak_against(kind, tmp_path) for kind in EXPECTED))
    for kind, (backend, rc, res, text) in zip(EXPECTED, runs):
        assert backend.faulted == 1, kind
        s = res["summary"]
        assert rc == 1, (kind, text)
        assert s["verdict"] == "FAIL", kind
        for key in ("lost", "reordered", "corrupted", "duplicated", "misrouted"):
            assert s[key] == (1 if key in EXPECTED[kind] else 0), (kind, key, text)
        assert {f"0 {key}" for key in EXPECTED[kind]} <= set(s["failed"]), kind
        # nothing else went wrong: the run itself was sound, the gateway's table emptied
        assert s["unexpected_closes"] == 0 and s["close_errors"] == 0, (kind, text)
        assert s["opened"] == 30 and s["table_empty"] is True, (kind, text)
        assert "**FAIL**" in (tmp_path / kind / "soak.md").read_text(), kind


async def test_end_checks_see_a_connection_left_open(tmp_path, echo_backend):
    import run  # bench/run.py
    import websockets

    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(soak.GATEWAY_YAML.format(backend_url=f"ws://127.0.0.1:{echo_backend}/"))
    gw = run.Started("gateway", [sys.executable, "-m", "fastgw", "run", "-c", str(cfg)], None,
                     tmp_path, "stderr")
    try:
        port = await asyncio.to_thread(gw.wait_port, 15)
        admin = await asyncio.to_thread(soak.wait_admin_url, gw, 10)
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send("held")
            assert await ws.recv() == "held"
            held = await asyncio.to_thread(soak.end_checks, admin, gw, 0.3)
        after = await asyncio.to_thread(soak.end_checks, admin, gw, 5)
    finally:
        gw.stop()
    assert held["table_empty"] is False and held["table_rows_left"] == 1
    assert "fastgw_connections_active 1" in held["table_detail"]
    assert "status active 1" in held["table_detail"]
    assert after["table_empty"] is True and after["table_rows_left"] == 0, after


def _summary(rss: list[int], **counts: int) -> dict:
    """summarize() over synthetic samples, one a second, of a 10 s run with a 2 s warm-up."""
    a = soak.parse_args(["--duration", "10s", "--warmup", "2s", "--connections", "2"])
    rows = [{"k": k, "t": float(k), "rss_kib": r, "active": 2, "p99_us": 500}
            for k, r in enumerate(rss)]
    result = {key: 0 for key in soak.COUNTS} | {"sent": 10, "received": 10} | counts
    return soak.summarize(a, {"opened": 2, "open_failed": 0}, rows, [result],
                          {"table_empty": True, "table_detail": "empty"})


def test_the_rss_check_starts_at_the_end_of_the_warm_up():
    # grows 50% during the warm-up, then flat within 4%: PASS
    s = _summary([40_000, 50_000, 60_000, 61_000, 62_000, 62_400, 60_000, 61_000, 62_000,
                  60_500, 61_000])
    assert s["verdict"] == "PASS", s["failed"]
    assert s["rss_warmup_end_kib"] == 60_000 and s["rss_max_kib"] == 62_400
    assert s["rss_deviation_pct"] == 4.0 and s["rss_end_kib"] == 61_000
    # 6% above the warm-up's end once: FAIL
    s = _summary([60_000] * 7 + [63_600] + [60_000] * 3)
    assert s["verdict"] == "FAIL" and s["failed"] == ["RSS flat within 5% after the warm-up"]
    assert s["rss_deviation_pct"] == 6.0
    # shrinking counts too
    assert _summary([60_000] * 10 + [56_000])["rss_deviation_pct"] == 6.67
    # and a message unanswered fails the run on its own
    s = _summary([60_000] * 11, received=9, lost=1)
    assert s["failed"] == ["0 lost", "every message answered"]


def test_durations_and_options():
    assert soak.parse_duration("30m") == 1800
    assert soak.parse_duration("1h30m") == 5400
    assert soak.parse_duration("90") == 90
    assert soak.parse_duration("250ms") == 0.25
    for bad in ("", "5x", "m", "1m junk"):
        with pytest.raises(argparse.ArgumentTypeError):
            soak.parse_duration(bad)
    a = soak.parse_args(["--duration", "30m"])
    assert a.warmup == 120 and a.connections == 9900 and a.churn == 0.01
    assert soak.parse_args(["--duration", "2m"]).warmup == 24
    for bad in (["--duration", "1m", "--warmup", "1m"], ["--size", "19"], ["--churn", "2"],
                ["--connections", "2", "--clients", "3"]):
        with pytest.raises(SystemExit):
            soak.parse_args(bad)
