"""Active health checks of the targets of the pools (`health-check` of websocket-upgrade).

Each target of a pool whose websocket-upgrade has a `health-check` gets one loop: every
`interval` it checks the target, the first time after a random part of the interval (so
that the targets of a large pool, and the pools, are not all checked at once). A check is
a WebSocket upgrade to `path` on the target's host and port, with the Host header the
gateway's own dials send and a fresh Sec-WebSocket-Key (TLS with the API's context and
server name for wss://): it passes when a valid 101 (the right Sec-WebSocket-Accept)
comes within `timeout`, after which the gateway sends a masked CLOSE 1000 and closes.
With `tcp: true` a check is a bare TCP connect. Checks are neither dials nor connections:
they count in no connection count, no dial failure and no outlier detection.

`unhealthy-after` failed checks in a row mark a healthy target down (`healthy` False: it
is chosen again only when every target of its pool is down, fail open), `healthy-after`
passed checks in a row bring it back; each change is logged and emitted as a
target_down / target_up event with reason "health-check".

`HealthChecks.update()` runs after the start and after every reload: targets that are no
longer in a pool, or whose pool no longer has checks, lose their loop (and, without
checks, count as healthy again); a kept target whose check configuration is unchanged
keeps its loop. Every timer is on the gateway's clock (fastgw.clock).
"""

from __future__ import annotations

import asyncio
import logging
import random

from fastgw.observe import events as ev
from fastgw.observe.logs import clean
from fastgw.upstream import _close_frame, _endpoint, _failure, _parse_response, _Upgrade, accept_key, new_key

log = logging.getLogger("fastgw")

__all__ = ["HealthChecks", "check"]


def _origin(endpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{'wss' if endpoint.secure else 'ws'}://{host}:{endpoint.port}"


async def _probe(endpoint, hc, ssl_context, server_name) -> str | None:
    """One check without its time-out: None if healthy, else why not."""
    host, port, secure, fixed = _endpoint(_origin(endpoint))
    loop = asyncio.get_running_loop()
    if hc.tcp:
        transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
        transport.close()
        return None
    key = new_key()
    request = f"GET {hc.path} HTTP/1.1\r\n{fixed}\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    kwargs = {}
    if secure:
        kwargs["ssl"] = ssl_context if ssl_context is not None else True   # system trust
        if server_name:
            kwargs["server_hostname"] = server_name
    done = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: _Upgrade(request.encode("latin-1"), done), host, port, **kwargs)
    try:
        status, headers = _parse_response(await done)
        if status != 101:
            return f"answered HTTP {status} instead of 101"
        if ("websocket" not in headers.get("upgrade", "").lower()
                or "upgrade" not in headers.get("connection", "").lower()):
            return "101 without Upgrade: websocket"
        if headers.get("sec-websocket-accept") != accept_key(key):
            return "101 with a wrong Sec-WebSocket-Accept"
        transport.write(_close_frame(1000, b""))
        return None
    finally:
        transport.close()


async def check(endpoint, hc, clock, ssl_context=None, server_name=None) -> str | None:
    """Check one target (a config.Target) as `hc` (a config.HealthCheck) says, within
    `hc.timeout` s of `clock`: None if it is healthy, else why not (one clean line)."""
    timeout = float(hc.timeout)
    task = asyncio.current_task()
    cancelling = task.cancelling()
    expired = []

    def expire() -> None:
        expired.append(True)
        task.cancel()

    timer = clock.call_later(timeout, expire)
    try:
        return await _probe(endpoint, hc, ssl_context, server_name)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:    # our time-out, no cancel from outside
            return f"no answer within {timeout:g}s"
        raise
    except Exception as exc:        # refused, reset, TLS, a bad answer: the target's trouble
        return clean(_failure(exc, endpoint.secure and not hc.tcp)[0])
    finally:
        timer.cancel()


class _Loop:
    """The checks of one target, as one task."""

    def __init__(self, owner: "HealthChecks", target, hc):
        self.owner, self.target, self.hc = owner, target, hc
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        timer = self.owner.gw.clock.call_later(
            seconds, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()

    async def _run(self) -> None:
        gw, t, hc = self.owner.gw, self.target, self.hc
        interval = float(hc.interval)
        await self._sleep(random.uniform(0.0, interval))
        while True:
            began = gw.clock.now()
            pool = gw.pools.get(t.api)
            upgrade = pool.upgrade if pool is not None else None
            try:
                detail = await check(t.endpoint, hc, gw.clock,
                                     getattr(upgrade, "ssl_context", None),
                                     getattr(upgrade, "server_name", None))
                self.owner.record(t, hc, detail)
            except asyncio.CancelledError:
                raise
            except Exception as exc:      # a bug here must not end the checks
                gw.log_throttle.log(logging.ERROR, ("health", t.api, type(exc).__name__),
                                    "api %s: internal error in a health check of %s",
                                    t.api, t.label, exc_info=exc)
            await self._sleep(max(0.0, interval - (gw.clock.now() - began)))

    def stop(self) -> None:
        self.task.cancel()


class HealthChecks:
    """The check loops of one gateway (Gateway.health)."""

    def __init__(self, gw):
        self.gw = gw
        self.loops: dict = {}           # TargetState -> _Loop
        self.closed = False

    def update(self) -> None:
        """Start, keep or stop the loops for the pools now configured (after the start and
        after each reload)."""
        if self.closed:
            return
        wanted = {}
        for pool in self.gw.pools.values():
            hc = pool.upgrade.health
            if hc is not None:
                for t in pool.targets:
                    wanted[t] = hc
        for t, loop in list(self.loops.items()):
            hc = wanted.get(t)
            if hc == loop.hc:
                continue
            loop.stop()
            del self.loops[t]
            if hc is None:
                self._unchecked(t)
        for t, hc in wanted.items():
            if t not in self.loops:
                self.loops[t] = _Loop(self, t, hc)

    def _unchecked(self, t) -> None:
        """A target no longer checked counts as healthy (if still in a pool)."""
        t.check_streak = 0
        if t.healthy:
            return
        t.healthy = True
        pool = self.gw.pools.get(t.api)
        if pool is not None and pool.find(t.url) is t:
            log.warning("api %s: target %s is no longer health-checked: up", t.api, t.label)
            self._emit(ev.TargetUpEvent(api=t.api, target=t.label, reason="health-check"))

    def record(self, t, hc, detail: str | None) -> None:
        """The result of one check of `t`: counted, kept as its last check, and, after
        enough results in a row that disagree with its state, the state changes."""
        ok = detail is None
        result = "success" if ok else "failure"
        t.health_checks[result] = t.health_checks.get(result, 0) + 1
        t.last_check = {"result": result, "at": self.gw.clock.wall(), "detail": detail or ""}
        if ok == t.healthy:
            t.check_streak = 0
            return
        t.check_streak += 1
        if t.check_streak < (hc.healthy_after if ok else hc.unhealthy_after):
            return
        t.check_streak = 0
        t.healthy = ok
        if ok:
            log.warning("api %s: target %s up: %d health checks passed in a row",
                        t.api, t.label, hc.healthy_after)
            self._emit(ev.TargetUpEvent(api=t.api, target=t.label, reason="health-check"))
        else:
            log.warning("api %s: target %s down: %d health checks failed in a row (%s)",
                        t.api, t.label, hc.unhealthy_after, detail)
            self._emit(ev.TargetDownEvent(api=t.api, target=t.label, reason="health-check",
                                          detail=detail))

    def _emit(self, event) -> None:
        if self.gw.events is not None:
            self.gw.events.emit(event)

    def close(self) -> None:
        """Stop every loop (the gateway closes, or its drain is over)."""
        self.closed = True
        for loop in self.loops.values():
            loop.stop()
        self.loops.clear()
