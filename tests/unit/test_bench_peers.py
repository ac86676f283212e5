"""The benchmark's peer proxies (bench/peers.py, bench/pyproxy.py).

Each peer whose binary is installed is started in front of the bundled echo backend and must
pass text and 64 KiB binary messages through unchanged, and the close code both ways. pyproxy
always runs. Peers are not installed here: bench/peers.ensure_installed does that for bench/run.py.
Real processes on 127.0.0.1; a few seconds in all.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]


import peers  # noqa: E402  (bench/peers.py, on sys.path by conftest)


def _require(name: str) -> None:
    binary = peers.PEER_BINARY[name]
    if binary is not None and peers.find_binary(binary) is None:
        pytest.skip(f"{name}: {binary} is not installed (bench/peers.py ensure_installed "
                    f"installs Debian package {peers.DEBIAN_PACKAGES[binary]})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(name: str, backend_port: int, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    port = peers.free_port()
    argv, extra_env = peers.peer_command(name, port, backend_port, workdir, sys.executable)
    log = workdir / "peer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **extra_env}, cwd=workdir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


@pytest.mark.parametrize("name", peers.PEERS)
async def test_peer_relays_messages_and_close_codes(name, echo_backend, tmp_path):
    _require(name)
    proc, port, log = _start(name, echo_backend, tmp_path)
    try:
        try:
            await asyncio.to_thread(peers.wait_listening, port, 10, proc)
        except RuntimeError as exc:
            pytest.fail(f"{name} did not start: {exc}\n{log.read_text(errors='replace')}")
        url = f"ws://127.0.0.1:{port}/some/path?x=1"
        big = os.urandom(65536)
        messages = ["hello", "é" * 1000, big, b"\x00\xff" * 40_000, "", b"", big[::-1]]
        async with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
            for msg in messages:  # one at a time
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), 5)
                assert type(got) is type(msg) and got == msg
            for msg in messages:  # pipelined
                await ws.send(msg)
            for msg in messages:
                got = await asyncio.wait_for(ws.recv(), 5)
                assert type(got) is type(msg) and got == msg
            await asyncio.wait_for(ws.close(1000, "bye"), 5)
            assert (ws.close_code, ws.close_reason) == (1000, "bye")
        # an application close code comes back too
        async with connect(url, compression=None, ping_interval=None) as ws:
            await ws.send("x")
            assert await asyncio.wait_for(ws.recv(), 5) == "x"
            await asyncio.wait_for(ws.close(4001, "custom"), 5)
            assert (ws.close_code, ws.close_reason) == (4001, "custom")
        assert proc.poll() is None, f"{name} exited:\n{log.read_text(errors='replace')}"
    finally:
        # in a thread: the echo backend runs on this event loop and must go on answering
        # while the peer shuts down (pyproxy closes its backend connections cleanly)
        await asyncio.to_thread(_stop, proc)


@pytest.mark.parametrize("name", [n for n in peers.PEERS if peers.PEER_BINARY[n] is not None])
def test_written_config_is_valid(name, tmp_path):
    _require(name)
    peers.peer_command(name, 18001, 18002, tmp_path, sys.executable)
    argv, extra_env = peers.check_command(name, tmp_path)
    done = subprocess.run(argv, env={**os.environ, **extra_env}, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"


def test_configs_differ_only_where_meant(tmp_path):
    """Templates are filled completely; nginx-64k differs from nginx by its proxy buffers."""
    texts = {}
    for name in ("nginx", "nginx-64k", "haproxy", "caddy"):
        workdir = tmp_path / name
        if peers.find_binary(peers.PEER_BINARY[name]) is None:
            continue  # peer_command needs the binary
        peers.peer_command(name, 18001, 18002, workdir, sys.executable)
        (config,) = [p for p in workdir.iterdir() if p.is_file()]
        text = config.read_text()
        assert "@{" not in text and "18001" in text and "127.0.0.1:18002" in text
        texts[name] = text.replace(str(workdir.resolve()), "WORKDIR")
    if "nginx" in texts:
        def directives(text: str) -> set[str]:
            lines = (line.strip() for line in text.splitlines())
            return {line for line in lines if line and not line.startswith("#")}

        extra = directives(texts["nginx-64k"]) - directives(texts["nginx"])
        assert extra == {"proxy_buffer_size 64k;", "proxy_buffers 4 64k;"}
        assert {"daemon off;", "master_process off;"} <= directives(texts["nginx"])


def test_pyproxy_command_and_install_check():
    argv, env = peers.peer_command("pyproxy", 18001, 18002, Path("/tmp"), "/some/python")
    assert argv == ["/some/python", str(ROOT / "bench" / "pyproxy.py"), "--listen-port", "18001",
                    "--backend", "ws://127.0.0.1:18002"]
    assert env == {}
    assert peers.check_command("pyproxy", Path("/tmp")) is None
    assert peers.ensure_installed(["pyproxy"], log=lambda _: None) == {"pyproxy": None}
    with pytest.raises(ValueError):
        peers.ensure_installed(["no-such-peer"])


def test_wait_listening_reports_exit_and_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(RuntimeError, match="status 3"):
            peers.wait_listening(peers.free_port(), 10, proc)
    finally:
        _stop(proc)
    with pytest.raises(RuntimeError, match="nothing listening"):
        peers.wait_listening(peers.free_port(), 0.2)
