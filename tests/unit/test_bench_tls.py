"""The TLS configurations bench/run.py writes are valid: fastgw's (fastgw check) and the
peers' (nginx -t, haproxy -c, caddy validate), each with a TLS 1.3 listener."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import run  # noqa: E402


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return run.tls_setup(d)


def test_fastgw_tls_config_checks(tmp_path, tls_files):
    run.TLS_FILES.clear()
    run.TLS_FILES.update(tls_files)
    body = run.GATEWAY_YAML.format(backend_port=9)
    new = body.replace("listeners: [{host: 127.0.0.1, port: 0}]\n", run.tls_listener_yaml(8443), 1)
    assert new != body and "tls: {cert:" in new
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("metrics: false\n" + new)
    done = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["nginx", "haproxy", "caddy"])
def test_peer_tls_config_valid(tmp_path, tls_files, name):
    if peers.find_binary(peers.PEER_BINARY[name]) is None:
        pytest.skip(f"{name} not installed")
    tls = dict(tls_files, port=peers.free_port())
    peers.peer_command(name, peers.free_port(), 9, tmp_path, tls=tls)
    text = next(p for p in tmp_path.iterdir() if p.is_file()).read_text()
    assert str(tls["port"]) in text and "TLS" in text.upper()
    argv, env = peers.check_command(name, tmp_path)
    import os
    done = subprocess.run(argv, env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_loadgen_tls_args():
    import loadgen
    a = loadgen.parse_args(["--url", "wss://127.0.0.1:1/", "--ca", "x.pem", "--tls-resume"])
    assert a.ca == "x.pem" and a.tls_resume
    assert loadgen.parse_args([]).ca is None
