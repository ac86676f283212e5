"""Replay every fuzzing corpus input through its target, as part of the normal test run.

A target raises on a broken invariant (an undocumented exception, a malformed
frame, a leaked relay...), so each corpus file is a regression test: the
inputs that found the bugs fixed so far are in the corpus (see docs/fuzzing.md).
The code under test is the normal build here (no coverage instrumentation).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzzlib  # noqa: E402
from fuzzlib import TARGETS  # noqa: E402  (not from run: bench/run.py is on sys.path too)

pytest.importorskip("atheris", reason="the targets read their input with atheris' FuzzedDataProvider")


@pytest.fixture(scope="module", params=TARGETS)
def target(request):
    module = importlib.import_module(f"fuzz_{request.param}")
    module.setup()
    return request.param, module


def test_corpus_replays(target):
    name, module = target
    files = sorted(p for p in (fuzzlib.CORPUS / name).iterdir() if p.is_file())
    assert files, f"no corpus for {name}"
    failures = []
    for path in files:
        try:
            module.test_one_input(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - every failure is reported, with its file
            failures.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, f"{len(failures)} of {len(files)} {name} inputs fail:\n" + "\n".join(failures)


def test_corpus_is_small():
    for name in TARGETS:
        files = [p for p in (fuzzlib.CORPUS / name).iterdir() if p.is_file()]
        assert len(files) <= 500, f"{name}: {len(files)} files: minimise it (run_fuzz.py --update-corpus)"
        assert sum(p.stat().st_size for p in files) <= 1 << 20, f"{name}: over 1 MiB"
