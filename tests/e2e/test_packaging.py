"""`pip install .` in a fresh venv: `fastgw --version`, a message relayed through the gateway,
and the README's two commands (`fastgw demo`, then `fastgw client`) with nothing else
installed. (The built wheel and the sdist, installed as a user would: tests/e2e/test_wheels.py.)"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from conftest import gateway_yaml

ROOT = Path(__file__).resolve().parents[2]


def copy_source(dest: Path) -> Path:
    """The tracked sources only (no build products of this checkout)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


async def run_ok(*cmd: str, timeout: float = 600) -> None:
    """Run a command to its end; fail with the end of its output unless it exits 0."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}: {out.decode()[-3000:]}"


def fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


async def relay_through(bin_dir: Path, tmp_path: Path) -> None:
    """Start the venv's echo backend and gateway, and send a message through them."""
    backend = subprocess.Popen([str(bin_dir / "python"), "-m", "fastgw.echo", "--port", "0"],
                               stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    gateway = None
    try:
        port = int(re.search(r":(\d+)", backend.stdout.readline()).group(1))
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        err = tmp_path / "gw.err"
        gateway = subprocess.Popen([str(bin_dir / "fastgw"), "run", "-c", str(cfg)],
                                   stderr=err.open("w"), cwd=tmp_path)
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", err.read_text())):
            assert time.monotonic() < deadline and gateway.poll() is None, err.read_text()
            await asyncio.sleep(0.05)
        async with websockets.connect(f"ws://127.0.0.1:{m.group(1)}/") as ws:
            await ws.send("installed")
            assert await ws.recv() == "installed"
    finally:
        for p in (gateway, backend):
            if p is not None:
                p.terminate()
                p.wait(10)


def newcomer_path(bin_dir: Path, tmp_path: Path) -> None:
    """The README's two commands in a venv that has only what `pip install .` brought:
    `fastgw demo` (on free ports), then `fastgw client` talking to it."""
    out = subprocess.run([str(bin_dir / "python"), "-c", "import websockets"], capture_output=True)
    assert out.returncode != 0, "websockets is installed: the check below would prove nothing"
    import socket
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    port, backend_port = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    err = tmp_path / "demo.err"
    demo = subprocess.Popen([str(bin_dir / "fastgw"), "demo", "--port", str(port),
                             "--backend-port", str(backend_port)], stderr=err.open("w"), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"try +(\S+) client (\S+)", err.read_text())):
            assert time.monotonic() < deadline and demo.poll() is None, err.read_text()
            time.sleep(0.05)
        assert m.group(1) == str(bin_dir / "fastgw")
        assert m.group(2) == f"ws://127.0.0.1:{port}/echo"
        out = subprocess.run([m.group(1), "client", m.group(2)], input="hello newcomer\n",
                             capture_output=True, text=True, timeout=30)
        assert (out.returncode, out.stdout) == (0, "hello newcomer\n"), out.stderr
        assert out.stderr.splitlines()[-1] == "closed: 1000"
    finally:
        demo.terminate()
        demo.wait(15)
    assert demo.returncode == 0, err.read_text()


@pytest.mark.slow
async def test_pip_install_in_a_fresh_venv(tmp_path):
    src = copy_source(tmp_path / "src")
    env_bin = fresh_venv(tmp_path / "venv-pip")
    await run_ok(str(env_bin / "pip"), "install", "-q", str(src))
    out = subprocess.run([str(env_bin / "fastgw"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fastgw ")
    # The installed package carries its compiled core and the bundled example.
    code = ("import fastgw._core, importlib.resources as r; "
            "print(r.files('fastgw').joinpath('examples/demo.yaml').is_file())")
    out = subprocess.run([str(env_bin / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    await relay_through(env_bin, tmp_path)
    newcomer_path(env_bin, tmp_path)
