"""The command line: check, --version, python -m fastgw, the bundled demo."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
import websockets

from conftest import gateway_yaml


def fastgw(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgw", *args], capture_output=True, text=True,
                          timeout=30, **kw)


def test_version():
    from fastgw import __version__
    out = fastgw("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"fastgw {__version__}"


def test_check_valid(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(gateway_yaml("ws://127.0.0.1:9000/"))
    out = fastgw("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_check_reports_path_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(gateway_yaml("ws://127.0.0.1:9000/").replace("target-url: ws://127.0.0.1:9000/",
                                                                 "target-url: ftp://127.0.0.1:9000/"))
    out = fastgw("check", "-c", str(cfg))
    assert out.returncode == 2
    line = next(i for i, l in enumerate(cfg.read_text().splitlines(), 1) if "target-url" in l)
    assert f"bad.yaml:{line}:" in out.stderr
    assert "$.apis[0].assembly[0].target-url" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_toml_unknown_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[listeners]]\nport = 8080\ncolour = "blue"\n\n[[apis]]\nname = "a"\npath = "/"\n'
                   '[[apis.assembly]]\npolicy = "websocket-upgrade"\ntarget-url = "ws://127.0.0.1:1/"\n')
    out = fastgw("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "bad.toml" in out.stderr and "colour" in out.stderr and "$.listeners[0]" in out.stderr


def test_check_missing_file(tmp_path):
    out = fastgw("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "nope.yaml" in out.stderr and "Traceback" not in out.stderr


def test_run_with_invalid_config_exits_nonzero(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"listeners": [], "apis": []}')
    out = fastgw("run", "-c", str(cfg))
    assert out.returncode == 2
    assert "bad.json" in out.stderr and "Traceback" not in out.stderr


def free_ports(n: int = 2) -> list[int]:
    """n distinct ports free on 127.0.0.1 (held together while they are picked)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def echo_backend_pids(port: int) -> list[int]:
    """Processes running `python -m fastgw.echo ... --port PORT` on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"fastgw.echo" in argv and str(port).encode() in argv:
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def occupied(port: int):
    """A listening socket of our own on 127.0.0.1:port."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def start_demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastgw", "demo", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 30) -> tuple[re.Match, str]:
    """Read proc's stderr (in a thread) until a line matches; return the match and the text."""
    seen = []

    def read():
        for line in proc.stderr:
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        return None

    m = await asyncio.wait_for(asyncio.to_thread(read), timeout)
    assert m is not None, "".join(seen)
    return m, "".join(seen)


def test_demo_default_ports():
    from fastgw.cli import build_parser
    args = build_parser().parse_args(["demo"])
    assert (args.port, args.backend_port) == (8080, 9000)


async def test_demo_relays_messages_on_chosen_ports():
    """`fastgw demo --port P --backend-port B`: the bundled example pointed at B, the echo
    backend on B, talked to with the websockets library; SIGINT stops both."""
    port, backend_port = free_ports(2)
    proc = start_demo("--port", str(port), "--backend-port", str(backend_port))
    try:
        m, _ = await wait_for_line(proc, rf"echo backend on ws://127\.0\.0\.1:{backend_port} \(pid (\d+)\)")
        backend_pid = int(m.group(1))
        assert echo_backend_pids(backend_port) == [backend_pid]
        _, text = await wait_for_line(proc, r"try +.* client ws://127\.0\.0\.1:(\d+)/echo")
        assert f"listening on ws://127.0.0.1:{port}" in text
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
            await ws.send("hello through the demo")
            assert await ws.recv() == "hello through the demo"
        # The backend really is on B (the gateway's target), not on the default port.
        async with websockets.connect(f"ws://127.0.0.1:{backend_port}/", open_timeout=10) as ws:
            await ws.send("direct")
            assert await ws.recv() == "direct"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not alive(backend_pid), "the echo backend outlived the demo"


@pytest.mark.parametrize("taken", ["gateway", "backend"])
def test_demo_fails_clearly_when_a_port_is_taken(taken):
    port, backend_port = free_ports(2)
    held = port if taken == "gateway" else backend_port
    with occupied(held):
        before = set(echo_backend_pids(backend_port))
        out = subprocess.run([sys.executable, "-m", "fastgw", "demo", "--port", str(port),
                              "--backend-port", str(backend_port)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        lines = out.stderr.splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(f"fastgw demo: port {held} is in use ("), out.stderr
        # Nothing left running: no echo backend, and the other port is free.
        assert set(echo_backend_pids(backend_port)) == before == set()
        other = backend_port if taken == "gateway" else port
        occupied(other).close()


async def test_demo_stops_when_its_backend_dies():
    port, backend_port = free_ports(2)
    proc = start_demo("--port", str(port), "--backend-port", str(backend_port))
    try:
        m, _ = await wait_for_line(proc, rf"echo backend on ws://127\.0\.0\.1:{backend_port} \(pid (\d+)\)")
        await wait_for_line(proc, r"try +.* client ")
        os.kill(int(m.group(1)), signal.SIGKILL)
        _, text = await wait_for_line(proc, r"the echo backend was killed by signal 9; stopping")
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The gateway went with it: nothing listens on its port any more.
    occupied(port).close()


async def test_demo_sigterm_with_a_client_connected():
    port, backend_port = free_ports(2)
    proc = start_demo("--port", str(port), "--backend-port", str(backend_port), "--drain-time", "5")
    try:
        m, _ = await wait_for_line(proc, r"\(pid (\d+)\)")
        backend_pid = int(m.group(1))
        await wait_for_line(proc, r"try +.* client ")
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 20)
            assert info.value.rcvd.code == 1001
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not alive(backend_pid)


async def test_demo_backend_that_cannot_bind_is_reported():
    """The check before starting is not the only guard: an echo backend that loses the race
    for its port is reported as such, and is gone."""
    from fastgw import cli
    [backend_port] = free_ports(1)
    with occupied(backend_port):
        proc, message = await cli._start_backend(backend_port)
    assert proc is None
    assert message.startswith(f"fastgw demo: port {backend_port} is in use ("), message
    assert echo_backend_pids(backend_port) == []


async def test_demo_gateway_that_cannot_bind_stops_its_backend(monkeypatch, capsys):
    """A gateway port taken after the check: one line, exit 1, the backend started is stopped."""
    from fastgw import cli
    monkeypatch.setattr(cli, "_port_in_use", lambda port: None)     # skip the check before
    port, backend_port = free_ports(2)
    args = cli.build_parser().parse_args(["demo", "--port", str(port),
                                          "--backend-port", str(backend_port)])
    with occupied(port):
        assert await cli._demo(args) == 1
    err = capsys.readouterr().err
    m = re.search(r"\(pid (\d+)\)", err)
    assert m, err
    assert f"fastgw demo: port {port} is in use (" in err
    assert not alive(int(m.group(1)))
    assert echo_backend_pids(backend_port) == []


@pytest.mark.parametrize("env,logged", [({"FASTGW_LOG_LEVEL": "info"}, True), ({}, False)])
async def test_run_takes_its_log_level_from_fastgw_log_level(tmp_path, env, logged):
    """FASTGW_LOG_LEVEL is --log-level's default: at info a refused upgrade is logged (README,
    Logs); at the default (warning) it is not. A plain GET on a WebSocket API gets 426."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(gateway_yaml("ws://127.0.0.1:9/"))
    environ = {k: v for k, v in os.environ.items() if k != "FASTGW_LOG_LEVEL"}
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**environ, **env})
    try:
        m, _ = await wait_for_line(proc, r"listening on ws://127\.0\.0\.1:(\d+)")
        reader, writer = await asyncio.open_connection("127.0.0.1", int(m[1]))
        writer.write(b"GET /?token=secret HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 426 "), head
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    refused = [line for line in err.splitlines() if "refused 127.0.0.1: 426" in line]
    assert bool(refused) == logged, err
    assert "secret" not in err
