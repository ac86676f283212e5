"""`pip install .` and the wheel from `python -m build`, each in a fresh venv,
run `fastgw --version` and relay a message through the gateway."""

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


@pytest.mark.slow
async def test_pip_install_and_wheel_in_fresh_venvs(tmp_path):
    src = copy_source(tmp_path / "src")
    env_bin = fresh_venv(tmp_path / "venv-pip")
    subprocess.run([str(env_bin / "pip"), "install", "-q", str(src)], check=True, timeout=600)
    out = subprocess.run([str(env_bin / "fastgw"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fastgw ")
    await relay_through(env_bin, tmp_path)

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
                   check=True, timeout=600, capture_output=True)
    wheels = list(dist.glob("fastgw-*.whl"))
    sdists = list(dist.glob("fastgw-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    wheel_bin = fresh_venv(tmp_path / "venv-wheel")
    subprocess.run([str(wheel_bin / "pip"), "install", "-q", str(wheels[0])], check=True, timeout=600)
    out = subprocess.run([str(wheel_bin / "python"), "-m", "fastgw", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fastgw ")
    # The installed package carries its compiled core and the bundled example.
    code = ("import fastgw._core, importlib.resources as r; "
            "print(r.files('fastgw').joinpath('examples/demo.yaml').is_file())")
    out = subprocess.run([str(wheel_bin / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    await relay_through(wheel_bin, tmp_path)
