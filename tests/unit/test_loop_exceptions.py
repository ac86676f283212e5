"""The loop fixture (tests/conftest.py): what reaches the event loop's exception handler
during a test is recorded, and would fail the test at teardown."""

from __future__ import annotations

import asyncio
import gc


async def test_a_callback_that_raises_is_recorded(loop_exceptions):
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    await asyncio.sleep(0.01)
    assert [type(c.get("exception")) for c in loop_exceptions] == [ZeroDivisionError]
    assert loop_exceptions[0]["message"].startswith("Exception in callback")
    loop_exceptions.clear()         # provoked on purpose: the test passes


async def test_a_task_exception_never_retrieved_is_recorded(loop_exceptions):
    async def boom():
        raise ValueError("nobody asks")

    task = asyncio.create_task(boom())
    await asyncio.sleep(0.01)
    del task
    gc.collect()
    assert [c["message"] for c in loop_exceptions] == ["Task exception was never retrieved"]
    loop_exceptions.clear()


async def test_the_handler_is_the_fixture_s(loop_exceptions):
    handler = asyncio.get_running_loop().get_exception_handler()
    assert handler is not None and handler.__name__ == "record"
