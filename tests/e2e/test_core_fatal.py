"""The core's fatal path over real sockets: a timer callback of the core that raises
ends its connection with 1011 on both sides, the tables end empty, and the gateway
keeps serving."""

from __future__ import annotations

import asyncio
import logging

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml
from fastgw.clock import Clock

DELAY_RULE = """\
request:
  - {policy: message-rate-limit, messages: 5/1s, burst: 1, action: delay}
"""


class BreakingClock(Clock):
    """Real time, except that now() raises inside the core's hold-release timer once armed."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.inside = False
        self.fired = 0

    def now(self):
        if self.inside:
            raise RuntimeError("injected: the clock failed inside the release timer")
        return super().now()

    def call_later(self, delay, callback, *args):
        if self.armed and getattr(callback, "__name__", "") == "_release_held":
            def release():
                self.inside = True
                self.fired += 1
                try:
                    callback(*args)
                finally:
                    self.inside = False
            return super().call_later(delay, release)
        return super().call_later(delay, callback, *args)


@pytest.fixture
async def recording_backend():
    """A websockets echo backend that records the close code each connection received."""
    codes: list[int | None] = []

    async def handler(ws):
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            codes.append(ws.close_code)

    async with websockets.serve(handler, "127.0.0.1", 0) as srv:
        yield srv.sockets[0].getsockname()[1], codes


async def test_a_core_timer_that_raises_ends_the_connection_with_1011(
        gateway_factory, recording_backend, caplog):
    port, backend_codes = recording_backend
    clock = BreakingClock()
    loop_errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/", extra_upgrade=DELAY_RULE))
    gw.gw.clock = clock                  # the gateway's clock, which it gives each of its relays

    with caplog.at_level(logging.ERROR, logger="fastgw"):
        async with websockets.connect(gw.url()) as ws:
            await ws.send("one")
            assert await ws.recv() == "one"
            clock.armed = True
            await ws.send("two")                 # no token: held 0.2 s; the release timer raises
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1011
        await gw.wait_idle()
    assert clock.fired == 1
    for _ in range(100):
        if backend_codes:
            break
        await asyncio.sleep(0.02)
    assert backend_codes == [1011]
    assert len([r for r in caplog.records if "internal error" in r.getMessage()]) == 1
    assert not gw.gw.live and gw.gw.zone.counts_used() == 0 and gw.gw.zone.lease_leaks == 0
    assert not loop_errors

    # The gateway keeps serving.
    clock.armed = False
    async with websockets.connect(gw.url()) as ws:
        await ws.send("three")
        assert await ws.recv() == "three"
        await ws.send("four")                    # held, then released by a working timer
        assert await asyncio.wait_for(ws.recv(), 5) == "four"
    await gw.wait_idle()
    assert not gw.gw.live and gw.gw.zone.lease_leaks == 0
