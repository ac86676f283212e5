"""The command line: check, --version, python -m fastgw, the bundled demo."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

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
                                                                 "target-url: http://127.0.0.1:9000/"))
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


async def test_demo_relays_messages(tmp_path):
    """`fastgw demo`: the bundled example and echo backend, on ports 8080 and 9000."""
    import socket
    for port in (8080, 9000):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "demo"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with websockets.connect("ws://127.0.0.1:8080/echo", open_timeout=2) as ws:
                    await ws.send("hello through the demo")
                    assert await ws.recv() == "hello through the demo"
                break
            except (OSError, websockets.InvalidStatus):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
