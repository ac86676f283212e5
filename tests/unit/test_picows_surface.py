"""picows is pinned to one exact version (it runs the bundled echo backend and the load generator)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_picows() -> str:
    data = tomllib.loads(PYPROJECT.read_text())
    run = [r for r in data["project"]["dependencies"] if r.startswith("picows")]
    assert len(run) == 1
    return run[0]


def test_picows_pinned_exactly():
    run = pinned_picows()
    assert re.fullmatch(r"picows==\d+\.\d+\.\d+", run), run


def test_installed_picows_is_the_pinned_one():
    run = pinned_picows()
    assert metadata.version("picows") == run.split("==")[1]
