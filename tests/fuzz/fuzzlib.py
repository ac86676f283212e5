"""What the fuzz targets share: running one under atheris, and the core built
with coverage instrumentation.

Each target module `fuzz_<name>.py` defines `setup()` (import the code under
test, instrumented when fuzzing) and `test_one_input(data: bytes)`, which
raises on a broken invariant and returns normally otherwise. The same
function replays the corpus in the normal test run (test_corpus_replay.py)
and runs under libFuzzer here (`main`).

The Cython core is native code, which atheris' Python instrumentation does not
see. For the targets that drive the core (`NATIVE_TARGETS`), `build_core()`
compiles a separate copy of `_core.pyx` with clang, `-fsanitize=fuzzer-no-link`
(libFuzzer's coverage counters and comparison hooks) and AddressSanitizer, into
build/fuzz-core/ (not installed anywhere); `main` re-executes the target with
atheris' `asan_with_fuzzer.so` preloaded, as atheris' documentation on native
extensions says, and puts that copy first on the `fastgw` package path.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ_DIR = Path(__file__).resolve().parent
CORPUS = FUZZ_DIR / "corpus"
DICTS = FUZZ_DIR / "dicts"
# _core.pyx first (what is compiled), then what it includes (all of the stamp).
CORE_SOURCES = [ROOT / "src" / "fastgw" / n for n in ("_core.pyx", "_core.pxd")] + sorted(
    (ROOT / "src" / "fastgw").glob("*.pxi"))
CORE_BUILD = Path(os.environ.get("FASTGW_FUZZ_BUILD", ROOT / "build" / "fuzz-core"))

TARGETS = ("head", "frames", "config", "identity")
# The targets whose code under test is the Cython core.
NATIVE_TARGETS = {"frames"}

# The same compiler directives as setup.py: the fuzzed copy must be the shipped code.
CYTHON_DIRECTIVES = "boundscheck=False,wraparound=False,cdivision=True,initializedcheck=False"
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,fuzzer-no-link",
          "-Wno-unused-function", "-Wno-unreachable-code-fallthrough", "-Wno-unknown-warning-option"]


class NoInstrumentation(RuntimeError):
    """The instrumented core cannot be built here (no clang)."""


def _stamp() -> str:
    h = hashlib.sha256()
    for path in CORE_SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(" ".join(CFLAGS).encode() + CYTHON_DIRECTIVES.encode() + sys.version.encode())
    return h.hexdigest()


def build_core(quiet: bool = False) -> Path:
    """Build (or reuse) the instrumented core; return the directory to put
    first on `fastgw.__path__`."""
    clang = shutil.which(os.environ.get("CLANG", "clang"))
    if clang is None:
        raise NoInstrumentation("clang is not installed (apt-get install clang)")
    out = CORE_BUILD / "fastgw"
    stamp = _stamp()
    stamp_file = CORE_BUILD / "stamp"
    so = out / ("_core" + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    c_file = CORE_BUILD / "_core.c"
    if not quiet:
        print(f"fuzz: building the instrumented core in {out}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "cython", "-3", "-X", CYTHON_DIRECTIVES,
                    "-o", str(c_file), str(CORE_SOURCES[0])], check=True)
    subprocess.run([clang, "-shared", "-fPIC", *CFLAGS, "-I", sysconfig.get_paths()["include"],
                    str(c_file), "-o", str(so)], check=True)
    stamp_file.write_text(stamp)
    return out


def preload_library() -> str:
    import atheris
    return os.path.join(atheris.path(), "asan_with_fuzzer.so")


def use_instrumented_core(target: str) -> None:
    """In a fuzzing run of a native target: make sure the instrumented core is
    what `import fastgw._core` loads (re-executing with the preload if needed)."""
    if target not in NATIVE_TARGETS or os.environ.get("FASTGW_FUZZ_NATIVE") == "0":
        return
    if "fastgw._core" in sys.modules:
        raise RuntimeError("fastgw._core was imported before the instrumented copy was chosen")
    try:
        out = build_core()
    except NoInstrumentation as exc:
        print(f"fuzz: WARNING: {exc}; fuzzing the core WITHOUT native coverage", file=sys.stderr)
        return
    lib = preload_library()
    if lib not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ)
        env["LD_PRELOAD"] = lib
        # Python keeps memory for its lifetime by design: leak checks are RSS-based here.
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=16")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import fastgw
    fastgw.__path__.insert(0, str(out))


def main(target: str, module) -> None:
    """Run one target under libFuzzer: `python tests/fuzz/fuzz_<target>.py [libFuzzer args]`.

    Defaults added unless given: the target's dictionary, a per-input timeout
    (hangs) and an RSS limit (leaks).
    """
    use_instrumented_core(target)
    import atheris
    # libFuzzer runs argv[0] through the shell for -merge=1 (and -fork): the interpreter too.
    args = [f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(sys.argv[0]))}", *sys.argv[1:]]
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    dict_file = DICTS / f"{target}.dict"
    if "-dict" not in flags and dict_file.exists():
        args.append(f"-dict={dict_file}")
    if "-timeout" not in flags:
        args.append("-timeout=10")
    if "-rss_limit_mb" not in flags:
        args.append("-rss_limit_mb=1024")
    # Comparisons in str methods (startswith, endswith) guide the mutations too.
    # (atheris 3.0's regular-expression hook breaks on some bytes patterns, and
    # its generated matches cost more than they find here: not enabled.)
    atheris.enabled_hooks.add("str")
    if module.INSTRUMENT:
        with atheris.instrument_imports(include=module.INSTRUMENT):
            module.setup()
    else:
        module.setup()
    atheris.Setup(args, module.test_one_input)
    atheris.Fuzz()
