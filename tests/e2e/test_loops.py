"""`fastgw run --loop asyncio|uvloop`: the gateway on the standard library's loop, and where
uvloop is missing (so too `fastgw client` and the echo backend). `fastgw run` processes relaying through the `websockets` library; the
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
# `python -m fastgw.echo` likewise.
ECHO_WITHOUT_UVLOOP = (sys.executable, "-c", "import sys; sys.modules['uvloop'] = None; "
                       "from fastgw.echo import main; raise SystemExit(main())")
WARNING = "uvloop is not installed: running on asyncio's loop"
TIMEOUT = 30


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


async def test_without_uvloop_the_client_and_the_echo_backend_fall_back_to_asyncio():
    echo = await asyncio.create_subprocess_exec(
        *ECHO_WITHOUT_UVLOOP, "--port", "0", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    client = None
    try:
        line = (await asyncio.wait_for(echo.stdout.readline(), TIMEOUT)).decode()
        assert line.startswith("echo: listening on ws://127.0.0.1:"), line
        url = line.split()[-1] + "/"
        await echoes(url)                               # the websockets library against it
        assert not uvloop_loaded(echo.pid)

        client = await asyncio.create_subprocess_exec(
            *WITHOUT_UVLOOP, "client", url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        client.stdin.write(b"hello\n")
        assert await asyncio.wait_for(client.stdout.readline(), TIMEOUT) == b"hello\n"
        assert not uvloop_loaded(client.pid)
        client.stdin.write(b"second line\n")
        client.stdin.close()                            # end of input: close 1000
        out, err = await asyncio.wait_for(client.communicate(), TIMEOUT)
        assert client.returncode == 0, err
        assert out == b"second line\n"
        assert err.decode().splitlines() == [
            "fastgw client: warning: uvloop is not installed: running on asyncio's loop (slower)",
            f"connected: {url}", "closed: 1000"]

        echo.send_signal(signal.SIGTERM)
        err = (await asyncio.wait_for(echo.stderr.read(), TIMEOUT)).decode()
        assert await asyncio.wait_for(echo.wait(), TIMEOUT) == 0
        assert err.splitlines() == [
            "echo: warning: uvloop is not installed: running on asyncio's loop (slower)"]
    finally:
        for proc in (client, echo):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
