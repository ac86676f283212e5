"""The control channel (fastgw.control) over a real socketpair, both ends on the test's loop:
answers (sync and async handlers), errors, unasked events, time-outs, the end of the channel."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fastgw import control


async def pair(handlers=None, on_event=None, on_lost=None):
    a, b = socket.socketpair()
    sup = await control.connect(a, on_event=on_event, on_lost=on_lost)
    worker = await control.connect(b, handlers=handlers)
    return sup, worker


async def test_ask_sync_and_async_handlers():
    async def slow(x):
        await asyncio.sleep(0.01)
        return {"twice": [x, x]}

    sup, worker = await pair({"echo": lambda x=None: x, "slow": slow, "none": lambda: None})
    try:
        assert await sup.ask("echo", x={"a": [1, 2.5, "b", None, b"\x00"]}) == {"a": [1, 2.5, "b", None, b"\x00"]}
        assert await sup.ask("slow", x=3) == {"twice": [3, 3]}
        assert await sup.ask("none") is None
        # Concurrent asks get their own answers, whatever the order they finish in.
        got = await asyncio.gather(sup.ask("slow", x=1), sup.ask("echo", x=2))
        assert got == [{"twice": [1, 1]}, 2]
        # A large answer crosses in several reads.
        big = "x" * 3_000_000
        assert await sup.ask("echo", x=big) == big
    finally:
        sup.close()
        worker.close()


async def test_errors_and_unknown_ops():
    def boom():
        raise ValueError("no such thing")

    sup, worker = await pair({"boom": boom})
    try:
        with pytest.raises(control.ControlError, match="ValueError: no such thing"):
            await sup.ask("boom")
        with pytest.raises(control.ControlError, match="unknown op 'nope'"):
            await sup.ask("nope")
        with pytest.raises(control.ControlError, match="TypeError"):
            await sup.ask("boom", extra=1)
    finally:
        sup.close()
        worker.close()


async def test_events_timeout_and_end():
    events: list = []
    lost = asyncio.Event()
    never = asyncio.Event()

    async def hang():
        await never.wait()

    sup, worker = await pair({"hang": hang}, on_event=events.append, on_lost=lost.set)
    worker.event("ready")
    worker.event("final", snapshot={"active": 0})
    with pytest.raises(TimeoutError):
        await sup.ask("hang", timeout=0.05)
    assert events == [{"event": "ready"}, {"event": "final", "snapshot": {"active": 0}}]
    pending = asyncio.ensure_future(sup.ask("hang", timeout=5))
    await asyncio.sleep(0.01)
    worker.close()                       # the worker is gone: pending asks fail at once
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(pending, 1)
    await asyncio.wait_for(lost.wait(), 1)
    with pytest.raises(ConnectionError):
        await sup.ask("hang")
    never.set()
    await asyncio.sleep(0)
