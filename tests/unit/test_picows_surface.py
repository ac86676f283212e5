"""The private picows surface the gateway relies on (acceptable only because picows is pinned)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_picows() -> tuple[str, str]:
    data = tomllib.loads(PYPROJECT.read_text())
    build = [r for r in data["build-system"]["requires"] if r.startswith("picows")]
    run = [r for r in data["project"]["dependencies"] if r.startswith("picows")]
    assert len(build) == len(run) == 1
    return build[0], run[0]


def test_picows_pinned_exactly_and_identically():
    build, run = pinned_picows()
    assert re.fullmatch(r"picows==\d+\.\d+\.\d+", build), build
    assert build == run


def test_installed_picows_is_the_pinned_one():
    _, run = pinned_picows()
    assert metadata.version("picows") == run.split("==")[1]


def test_wsprotocol_constructor_takes_what_the_handover_passes():
    # server.Handshake._hand_over builds WSProtocol positionally with these 15 arguments,
    # the same that picows' api.ws_create_server passes.
    import asyncio
    import logging

    from picows import WSAutoPingStrategy
    from picows.picows import WSProtocol

    async def build():
        return WSProtocol(None, None, False, lambda request: None,
                          logging.LoggerAdapter(logging.getLogger("t"), {}), True, None,
                          False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, False,
                          1024, None, 4096)

    proto = asyncio.run(build())
    assert proto.transport is None and proto.listener is None
