"""Worker processes under load: a count limit stays exact while workers are SIGKILLed and
restarted 50 times (counted at the backend), a rolling restart refuses no upgrade, and the
kernel's reuseport hash spreads 1,000 connections over 2 workers.

Real `fastgw run -c FILE` supervisors, the counting echo backend in its own process
(tests/countecho.py), raw clients (tests/wire.py), the admin API over HTTP on loopback.
A stuck (SIGSTOPped) worker keeps its share of new connections until it is replaced; its queue
is then served. Each test prints its figures (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import threading
import time

from conftest import value
from fastgw.workers import FAST_DEATH
from wire import CLOSE, TEXT, close_payload, connect, frame, new_key, read_frame, read_head, status_of, upgrade_request
from workerlib import (KEYS, alive, attempts_at_once, backend, gateway_config, start_gateway,  # noqa: F401
                       statuses)


DRAINED = "101, then 1001 before the echo"


class Refusal(int):
    """A refused upgrade's status, with its answer's head (shown in a failure)."""

    def __new__(cls, status: int, head: bytes):
        self = super().__new__(cls, status)
        self.head = head
        return self

    def __repr__(self) -> str:
        return f"{int(self)} {self.head!r}"


async def session(port: int, key: str | None, hold: float = 0.0, timeout: float = 5.0) -> int:
    """One client's whole life: upgrade, one echoed message, (hold,) close 1000 answered.
    Returns the upgrade's status (101 when all of it went through; DRAINED when the gateway
    closed it with 1001 "gateway shutting down" instead of the echo or of the answer to its
    close); raises what broke it."""
    reader, writer = await connect(port)
    try:
        ws_key = new_key()
        extra = f"X-API-Key: {key}\r\n" if key else ""
        writer.write(upgrade_request("/", key=ws_key, extra=extra))
        head = await read_head(reader, timeout)
        status = status_of(head)
        if status != 101:
            try:
                head += await asyncio.wait_for(reader.read(300), 1)
            except (OSError, TimeoutError):
                pass
            return Refusal(status, head)
        writer.write(frame(TEXT, b"ping"))
        f = await read_frame(reader, timeout)
        if f.opcode == CLOSE and f.close == (1001, b"gateway shutting down"):
            writer.write(frame(CLOSE, f.payload))
            return DRAINED
        assert (f.opcode, f.payload) == (TEXT, b"ping"), f
        if hold:
            await asyncio.sleep(hold)
        writer.write(frame(CLOSE, close_payload(1000)))
        f = await read_frame(reader, timeout)
        if f.opcode == CLOSE and f.close == (1001, b"gateway shutting down"):
            return DRAINED                   # the gateway's close crossed ours
        assert f.opcode == CLOSE and f.close[0] == 1000, f
        return 101
    finally:
        writer.close()


# ---- the stress: SIGKILL 50 times under load ---------------------------------------------

MONOTONIC = ("fastgw_connections_total", "fastgw_messages_total", "fastgw_upgrades_rejected_total",
             "fastgw_closes_total", "fastgw_bytes_total")


async def test_count_limit_never_exceeded_at_the_backend_while_workers_are_killed_50_times(
        start_gateway, backend):
    mx, kills, loopers = 8, 50, 24
    gw = start_gateway(gateway_config(
        backend.port, 4,
        pre=[{"policy": "count-limit", "key": "client-id", "max": mx},
             {"policy": "rate-limit", "key": "client-id", "rate": "100000/1s", "burst": 100000}],
        request=[{"policy": "message-rate-limit", "name": "roomy", "messages": "1000000/1s",
                  "burst": 1000000, "scope": "client", "action": "reject"}]), 4)
    backend.reset_peak()
    stop = asyncio.Event()
    tally = {"admitted": 0, "refused": 0, "broken": 0}
    other: dict[str, int] = {}

    async def looper() -> None:
        while not stop.is_set():
            try:
                status = await session(gw.port, KEYS["alice"], hold=random.uniform(0, 0.03), timeout=3)
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, AssertionError):
                tally["broken"] += 1         # its worker was killed under it
                continue
            if status in (101, DRAINED):
                tally["admitted"] += 1
            elif status == 429:
                tally["refused"] += 1
                await asyncio.sleep(random.uniform(0.002, 0.01))
            else:
                other[repr(status)] = other.get(repr(status), 0) + 1

    restart_times: list[float] = []
    killer_error: list[BaseException] = []

    def killer() -> None:
        try:
            deadline = time.monotonic() + 45
            while len(restart_times) < kills:
                assert time.monotonic() < deadline, f"only {len(restart_times)} kills in 45 s"
                pids = gw.wait_workers(4, timeout=5)
                # A worker that has lived FAST_DEATH (2 s) at least: the supervisor restarts
                # one that dies sooner with a back-off (it keeps dying at its start).
                now = time.time()
                old = [r["index"] for r in gw.workers() if now - r["started"] > FAST_DEATH + 0.05]
                if not old:
                    time.sleep(0.02)
                    continue
                index = random.choice(old)
                t0 = time.monotonic()
                os.kill(pids[index], signal.SIGKILL)
                gw.wait_workers(4, timeout=5, changed_from={index: pids[index]})
                restart_times.append(time.monotonic() - t0)
        except BaseException as exc:        # noqa: BLE001 - reported by the test
            killer_error.append(exc)

    t_start = time.monotonic()
    tasks = [asyncio.create_task(looper()) for _ in range(loopers)]
    thread = threading.Thread(target=killer)
    thread.start()
    peaks = []
    scrapes: list[dict] = []                 # /metrics about once a second, meanwhile
    next_scrape = time.monotonic()
    while thread.is_alive():                 # the backend's count seen from here, meanwhile
        s = backend.stats()
        peaks.append(s["live"])
        if time.monotonic() >= next_scrape:
            next_scrape += 1.0
            m = await asyncio.to_thread(gw.metrics)
            scrapes.append({k: v for k, v in m.items() if k[0] in MONOTONIC})
        await asyncio.sleep(0.05)
    thread.join()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    t_stress = time.monotonic() - t_start
    s = await backend.wait_live(0)
    print(f"stress: {kills} SIGKILLs in {t_stress:.1f} s; restarts (kill -> new pid listed): "
          f"mean {statistics.mean(restart_times) * 1e3:.0f} ms, max {max(restart_times) * 1e3:.0f} ms; "
          f"sessions {tally}, other statuses {other}; backend peak {s['peak']} (max {mx}), "
          f"sampled max {max(peaks)}, backend total {s['total']}; {len(scrapes)} scrapes of /metrics")
    assert not killer_error, killer_error[0]
    for earlier, later in zip(scrapes, scrapes[1:]):     # no counter went down across the kills
        for k, v in earlier.items():
            assert later.get(k, 0.0) >= v, f"{k[0]}{dict(k[1])}: {v} -> {later.get(k)}"
    assert len(restart_times) == kills
    assert s["peak"] <= mx, f"the backend held {s['peak']} connections of a key limited to {mx}"
    assert s["live"] == 0
    assert not other, f"unexpected statuses: {other}"
    assert tally["admitted"] > 5 * kills, tally       # it was hammered throughout
    assert max(restart_times) < 1.5, restart_times

    # Every slot came back: no stuck key. A new round admits exactly max.
    deadline = time.monotonic() + 5
    while await gw.aget("/connections"):
        assert time.monotonic() < deadline, "connections left in the workers' tables"
        await asyncio.sleep(0.05)
    attempts = await attempts_at_once(gw.port, 3 * mx, KEYS["alice"])
    try:
        assert statuses(attempts) == {101: mx, 429: 2 * mx}
        assert (await backend.wait_live(mx))["live"] == mx
    finally:
        for a in attempts:
            a.close()
    assert (await backend.wait_live(0))["live"] == 0
    m = gw.metrics()
    counted = value(m, "fastgw_connections_total", api="chat")
    reached = backend.stats()["total"]
    print(f"fastgw_connections_total {counted:.0f}, connections that reached the backend {reached} "
          f"(the difference: counts of killed workers since their last snapshot)")
    assert value(m, "fastgw_worker_restarts_total", reason="signal") == kills
    assert value(m, "fastgw_workers") == 4


# ---- rolling restart -----------------------------------------------------------------------


async def test_rolling_restart_under_200_upgrades_per_second_refuses_none(start_gateway, backend):
    gw = start_gateway(gateway_config(backend.port, 2), 2)
    before = gw.pids()
    outcomes: list[object] = []
    stop = asyncio.Event()
    pending: set[asyncio.Task] = set()

    async def one() -> None:
        try:
            outcomes.append(await session(gw.port, KEYS["alice"]))
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    async def pace() -> None:                # 200 sessions per second, started on time
        t0, i = time.monotonic(), 0
        while not stop.is_set():
            i += 1
            await asyncio.sleep(max(0.0, t0 + i * 0.005 - time.monotonic()))
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)

    pacer = asyncio.create_task(pace())
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    status, body = await asyncio.to_thread(gw.request, "POST", "/workers/restart")
    assert status == 202, (status, body)
    again, _ = await asyncio.to_thread(gw.request, "POST", "/workers/restart")
    after = await asyncio.to_thread(gw.wait_workers, 2, 20, before)
    t_rolled = time.monotonic() - t0
    await asyncio.sleep(0.5)
    stop.set()
    await pacer
    if pending:
        await asyncio.wait_for(asyncio.gather(*pending), 10)
    t_load = time.monotonic() - t0 + 0.5
    # A client whose handshake the old worker had begun when it was retired gets its 101,
    # then 1001 with the old worker's other live connections (retire: finish handshakes,
    # 1001 the live ones): drained, not refused nor reset.
    failed = [o for o in outcomes if o not in (101, DRAINED)]
    drained = outcomes.count(DRAINED)
    print(f"rolling restart {before} -> {after} in {t_rolled:.2f} s; {len(outcomes)} sessions "
          f"over {t_load:.1f} s ({len(outcomes) / t_load:.0f}/s), {drained} closed 1001 just after "
          f"their 101 by a retiring worker, {len(failed)} failed: {failed[:5]}")
    print(gw.stderr())
    assert again == 409, "a second POST /workers/restart while one runs"
    assert not failed, f"{len(failed)} of {len(outcomes)} upgrades failed: {failed[:10]}"
    assert len(outcomes) >= 150 * t_load, "the client did not keep up 200/s"
    assert all(after[i] != before[i] for i in before)
    deadline = time.monotonic() + 3               # the retired ones have exited (drain-time 2s)
    while (left := [pid for pid in before.values() if alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not left, f"retired workers still running: {left}"
    m = gw.metrics()
    assert value(m, "fastgw_worker_restarts_total", reason="rolling") == 2


# ---- balance ---------------------------------------------------------------------------------


async def test_1000_connections_spread_over_2_workers_within_35_to_65_percent(start_gateway, backend):
    total = 1000
    gw = start_gateway(gateway_config(backend.port, 2), 2)
    held = []

    async def hold() -> None:
        reader, writer = await connect(gw.port)
        ws_key = new_key()
        writer.write(upgrade_request("/", key=ws_key, extra=f"X-API-Key: {KEYS['alice']}\r\n"))
        status = status_of(await read_head(reader))
        held.append(writer)
        assert status == 101

    try:
        for _ in range(total // 100):
            await asyncio.gather(*(hold() for _ in range(100)))
        assert (await backend.wait_live(total))["live"] == total
        rows = await gw.aget("/workers")
        split = {r["index"]: r["connections"] for r in rows}
        by_conn: dict[int, int] = {}
        for r in await gw.aget("/connections"):
            by_conn[r["worker"]] = by_conn.get(r["worker"], 0) + 1
        print(f"balance: {total} connections over 2 workers: {split} (/workers), "
              f"{dict(sorted(by_conn.items()))} (/connections): "
              + ", ".join(f"worker {i} {n / total:.1%}" for i, n in sorted(split.items())))
        assert sum(split.values()) == total
        assert by_conn == split
        for n in split.values():
            assert 0.35 * total <= n <= 0.65 * total, split
    finally:
        for w in held:
            w.close()
    assert (await backend.wait_live(0, timeout=10))["live"] == 0


async def test_a_stuck_worker_keeps_its_share_until_replaced_and_its_queue_is_served_not_reset(
        start_gateway, backend):
    """The known reuseport imbalance: a worker whose loop is stuck (SIGSTOP) keeps receiving
    its share of new connections. They wait in its socket's queue (the supervisor holds the
    socket) until the worker is killed for its missing heartbeat and replaced; then they are
    served, none reset."""
    timeout = 1.0
    gw = start_gateway(gateway_config(backend.port, 2, top={"worker-heartbeat-timeout": f"{timeout}s"}), 2)
    pids = gw.pids()

    async def timed() -> tuple[object, float]:
        t = time.monotonic()
        try:
            outcome = await session(gw.port, KEYS["alice"], timeout=3 * timeout + 2)
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        return outcome, time.monotonic() - t

    os.kill(pids[0], signal.SIGSTOP)
    try:
        results = await asyncio.gather(*(timed() for _ in range(100)))
    finally:
        if alive(pids[0]):
            os.kill(pids[0], signal.SIGKILL)
    waited = sorted(d for o, d in results if o == 101 and d >= timeout / 2)
    failed = [o for o, _ in results if o != 101]
    print(f"worker 0 stopped: of 100 upgrades {100 - len(waited) - len(failed)} served at once, "
          f"{len(waited)} waited {waited[0] if waited else 0:.2f}-{waited[-1] if waited else 0:.2f} s "
          f"for its replacement (worker-heartbeat-timeout {timeout:g}s), {len(failed)} failed")
    assert not failed, failed[:5]
    assert 0 < len(waited) < 100, "the stopped worker's share"
    assert waited[-1] < timeout + 2.0
    assert gw.pids()[0] != pids[0]
    assert value(gw.metrics(), "fastgw_worker_restarts_total", reason="heartbeat") == 1
