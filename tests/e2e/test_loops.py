"""`fastgw run --loop asyncio|uvloop`: the gateway on the standard library's loop, and where
uvloop is missing. `fastgw run` processes relaying through the `websockets` library; the
in-process relay, refusal, policy and framing tests run on both loops (marker both_loops)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import websockets

from conftest import FASTGW, gateway_yaml

# `python -m fastgw` in a process where `import uvloop` fails, as where it is not installed.
WITHOUT_UVLOOP = (sys.executable, "-c", "import sys; sys.modules['uvloop'] = None; "
                  "from fastgw.cli import main; sys.argv[0] = 'fastgw'; raise SystemExit(main())")
WARNING = "uvloop is not installed: running on asyncio's loop"


def uvloop_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("/uvloop/" in line for line in maps)


async def echoes(url: str) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        for message in ("hello", b"\x00\x01\xff", "", bytes(range(256)) * 1024):
            await ws.send(message)
            assert await ws.recv() == message
        await ws.close(4001, "bye")
    assert (ws.close_code, ws.close_reason) == (4001, "bye")


async def test_run_loop_asyncio_relays(gateway_process, echo_backend):
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), "--loop", "asyncio")
    await echoes(gp.url("/"))
    assert not uvloop_loaded(gp.proc.pid)
    assert gp.status()["active"] == 0
    gp.proc.send_signal(signal.SIGTERM)                 # the drain and exit, as on uvloop
    assert await asyncio.to_thread(gp.proc.wait, 10) == 0
    err = gp.stderr()
    assert "fastgw: stopped" in err
    assert WARNING not in err
    assert "Traceback" not in err


async def test_run_loop_uvloop_is_the_default(gateway_process, echo_backend):
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))
    await echoes(gp.url("/"))
    assert uvloop_loaded(gp.proc.pid)


async def test_without_uvloop_run_falls_back_to_asyncio_with_one_warning(gateway_process, echo_backend):
    gp = gateway_process(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), command=WITHOUT_UVLOOP)
    await echoes(gp.url("/"))
    assert not uvloop_loaded(gp.proc.pid)
    lines = [line for line in gp.stderr().splitlines() if WARNING in line]
    assert lines == ["fastgw: warning: uvloop is not installed: running on asyncio's loop (slower); "
                     "--loop asyncio chooses it without this warning"]


def test_without_uvloop_loop_uvloop_is_refused(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(gateway_yaml("ws://127.0.0.1:9/"))
    done = subprocess.run([*WITHOUT_UVLOOP, "run", "-c", str(cfg), "--loop", "uvloop"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("fastgw: --loop uvloop: "), done.stderr
    assert "listening" not in done.stderr


def test_loop_must_be_one_of_the_two():
    done = subprocess.run([*FASTGW, "run", "-c", "x.yaml", "--loop", "trio"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "invalid choice: 'trio'" in done.stderr
