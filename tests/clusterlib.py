"""What the cluster end-to-end tests share (issue 13): gateway nodes as separate `fastgw run -c
FILE` processes (workers: 1, each its own listener and admin port) with a `cluster` section
pointing at a real redis-server (tests/redislib.py), the counting echo backend in its own
process (tests/countecho.py: live connections and their peak, counted from outside), and the
clients' side: upgrade attempts spread over nodes all at once, single timed upgrades, sliding
windows over timestamps.

    nodes = start_nodes(3, cluster=cluster_section(redis.url), pre=[count_limit(10)])
    nodes[0].cluster()          # GET /cluster (JSON)
    nodes[1].metrics()          # GET /metrics as conftest.samples()
    nodes[2].kill()             # SIGKILL by pid
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json
from pathlib import Path

import pytest

from conftest import samples, stop_process
from redislib import command
from wire import connect, new_key, read_head, status_of, upgrade_request
from workerlib import KEYS, CountingBackend, backend, gateway_config  # noqa: F401


# ---- configuration ------------------------------------------------------------------------


def cluster_section(url: str | None = None, *, cluster_nodes: list[str] | None = None,
                    lease: str = "2s", refresh: str = "500ms", timeout: str = "50ms",
                    on_unreachable: str = "hold") -> dict:
    """The `cluster` section (node-id added per node by node_config)."""
    redis: dict = {"timeout": timeout}
    if url is not None:
        redis["url"] = url
    else:
        redis["cluster-nodes"] = list(cluster_nodes)
    return {"redis": redis, "lease": lease, "refresh": refresh, "on-unreachable": on_unreachable}


def count_limit(mx: int, **extra) -> dict:
    return {"policy": "count-limit", "key": "client-id", "max": mx, **extra}


def node_config(backend_port: int, node_id: str, *, cluster: dict | None = None,
                pre: list | None = None, request: list | None = None,
                top: dict | None = None) -> str:
    """workerlib.gateway_config (api-key clients alice, bob, ...; one API at /) for one node
    (workers: 1), with `cluster` (its node-id set to `node_id`) when given."""
    extra = dict(top or {})
    if cluster is not None:
        extra["cluster"] = {**cluster, "node-id": node_id}
    return gateway_config(backend_port, 1, pre=pre, request=request, top=extra)


# ---- one node -----------------------------------------------------------------------------


class Node:
    """One `fastgw run -c FILE` process (workers: 1) with its admin API. Created started (the
    process runs); `wait_started()` waits for its listener and admin lines."""

    def __init__(self, folder: Path, name: str, yaml_text: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = folder / f"{name}.yaml"
        self.config_path.write_text(yaml_text)
        self.stderr_path = folder / f"{name}.stderr"
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"))
        self.pid = self.proc.pid
        self.port = 0
        self.admin_url = ""
        self.killed = False

    def wait_started(self, timeout: float = 20.0) -> "Node":
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr()
            port = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text)
            admin = re.search(r"admin on (http://\S+)", text)
            if port and admin:
                self.port, self.admin_url = int(port[1]), admin[1]
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"node {self.name} did not start:\n{text}")
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    # -- the admin API --
    def request(self, method: str, path: str, timeout: float = 5.0) -> tuple[int, object]:
        req = urllib.request.Request(self.admin_url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, body = r.status, r.read()
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, (json.loads(body) if "json" in ctype else body.decode())

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, f"{self.name}: GET {path}: {status} {body}"
        return body

    async def aget(self, path: str):
        return await asyncio.to_thread(self.get, path)

    def metrics(self) -> dict:
        return samples(self.get("/metrics"))

    def cluster(self) -> dict:
        """GET /cluster."""
        return self.get("/cluster")

    def connections(self, client: str | None = None) -> list[dict]:
        return self.get("/connections" + (f"?client={client}" if client else ""))

    # -- its end --
    def kill(self) -> None:
        """SIGKILL, by pid; returns once the process is reaped."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.killed = True

    def stop(self) -> list[str]:
        """SIGTERM (drain, exit); the problems seen."""
        problems = []
        if self.proc.poll() is None:
            stop_process(self.proc)
            if self.proc.returncode != 0:
                problems.append(f"node {self.name} exited {self.proc.returncode}")
        elif not self.killed:
            problems.append(f"node {self.name} had exited {self.proc.returncode}")
        if "Traceback" in self.stderr():
            problems.append(f"a traceback in node {self.name}'s log:\n" + self.stderr()[-4000:])
        return problems


def start_all(folder: Path, texts: list[str], names: list[str] | None = None) -> list[Node]:
    """Start every node's process at once, then wait for each."""
    names = names or [f"edge-{chr(ord('a') + i)}" for i in range(len(texts))]
    nodes = [Node(folder, name, text) for name, text in zip(names, texts)]
    try:
        for node in nodes:
            node.wait_started()
    except BaseException:
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        raise
    return nodes


@pytest.fixture
def start_nodes(tmp_path, backend):
    """start_nodes(n, *, cluster=None, pre=None, request=None, top=None, texts=None): n nodes
    routed to the module's counting backend (`texts`: their YAML instead). At the end: SIGTERM
    to each one still running, exit 0, no traceback logged, no connection left at the backend."""
    started: list[Node] = []
    counter = [0]

    def start(n: int, *, cluster: dict | None = None, pre: list | None = None,
              request: list | None = None, top: dict | None = None,
              texts: list[str] | None = None) -> list[Node]:
        base = counter[0]
        counter[0] += n
        names = [f"edge-{chr(ord('a') + base + i)}" for i in range(n)]
        if texts is None:
            texts = [node_config(backend.port, name, cluster=cluster, pre=pre, request=request, top=top)
                     for name in names]
        nodes = start_all(tmp_path, texts, names)
        started.extend(nodes)
        return nodes

    yield start
    problems: list[str] = []
    for node in started:
        problems += node.stop()
    deadline = time.monotonic() + 5
    while (s := backend.stats())["live"] and time.monotonic() < deadline:
        time.sleep(0.02)
    if s["live"]:
        problems.append(f"{s['live']} connections left at the backend")
    assert not problems, "\n".join(problems)


# ---- Redis ----------------------------------------------------------------------------------


def redis_uptime(port: int) -> int:
    """INFO server's uptime_in_seconds."""
    m = re.search(rb"uptime_in_seconds:(\d+)", command(port, "INFO", "server"))
    assert m, f"no uptime from redis on {port}"
    return int(m[1])


async def wait_learned(ports: list[int], lease: float, timeout: float = 15.0) -> float:
    """Wait until every Redis (by port) has run longer than its learning period after a start
    (one lease; INFO's uptime is the difference of truncated whole seconds, so up to two
    seconds longer, fastgw.cluster.lease S5: wait for uptime > lease + 2). Returns the time
    waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not all(redis_uptime(p) > lease + 2 for p in ports):
        assert time.monotonic() < deadline, "redis did not get past its learning period"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


# ---- upgrades -------------------------------------------------------------------------------


class Upgrade:
    """One raw upgrade attempt: status (None: no answer, `error` says why), the head, the
    time from the request written to the answer read, and the open streams (a 101 stays open
    until close())."""

    def __init__(self, reader, writer, key: str | None, node: int = 0):
        self.reader, self.writer = reader, writer
        self.node = node
        extra = f"X-API-Key: {key}\r\n" if key else ""
        self.request = upgrade_request("/", key=new_key(), extra=extra)
        self.status: int | None = None
        self.head = b""
        self.body = b""
        self.error: str | None = None
        self.sent = 0.0
        self.latency = math.nan

    def send(self) -> None:
        self.sent = time.perf_counter()
        self.writer.write(self.request)

    async def answer(self, timeout: float = 10.0) -> int | None:
        try:
            self.head = await read_head(self.reader, timeout)
            self.latency = time.perf_counter() - self.sent
            self.status = status_of(self.head)
            if self.status != 101:
                m = re.search(rb"content-length: *(\d+)", self.head, re.I)
                if m and int(m[1]):
                    self.body = await asyncio.wait_for(self.reader.readexactly(int(m[1])), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return self.status

    def close(self) -> None:
        self.writer.close()


async def upgrade(port: int, key: str | None, node: int = 0, timeout: float = 10.0) -> Upgrade:
    """One upgrade attempt, timed; open (if 101) until its close()."""
    reader, writer = await connect(port)
    u = Upgrade(reader, writer, key, node)
    u.send()
    await u.answer(timeout)
    if u.status != 101:
        u.close()
    return u


async def attempts_spread(ports: list[int], n: int, key: str | None) -> list[Upgrade]:
    """n attempts spread round-robin over the ports: every TCP connection first, then every
    request written in one go (no await in between), then every answer read."""
    conns = await asyncio.gather(*(connect(ports[i % len(ports)]) for i in range(n)))
    attempts = [Upgrade(r, w, key, i % len(ports)) for i, (r, w) in enumerate(conns)]
    for a in attempts:
        a.send()
    await asyncio.gather(*(a.answer() for a in attempts))
    return attempts


def statuses(attempts: list[Upgrade]) -> dict:
    out: dict = {}
    for a in attempts:
        k = a.status if a.status is not None else a.error
        out[k] = out.get(k, 0) + 1
    return out


REFUSED_WHILE_OPENING: list[tuple[int, int]] = []
"""(connection number, 429s) of hold_open's connections that were refused before their 101."""


async def hold_open(port: int, key: str, n: int, node: int = 0, timeout: float = 2.0) -> list[Upgrade]:
    """n connections opened one after the other, each a 101 (asserted): one refused with 429
    (a node beyond its share of a count asks for more at most once per refresh / 10: a second
    upgrade sooner is refused) or 503 (the store did not answer in time) is tried again every
    20 ms, for at most `timeout` s; those refusals are noted in REFUSED_WHILE_OPENING."""
    out = []
    try:
        for i in range(n):
            u = await upgrade(port, key, node)
            if u.status in (429, 503):
                u, refused, _ = await retry_until_admitted(port, key, timeout, node=node)
                REFUSED_WHILE_OPENING.append((i, refused + 1))
                assert u is not None, f"connection {i + 1} of {n}: {refused + 1} refusals in {timeout} s"
            assert u.status == 101, (u.status, u.head, u.body, u.error)
            out.append(u)
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(upgrades) -> None:
    for u in upgrades:
        if u.status == 101:
            u.close()


async def retry_until_admitted(port: int, key: str, timeout: float, every: float = 0.02,
                               node: int = 0) -> tuple[Upgrade | None, int, float]:
    """Try an upgrade every `every` seconds until a 101 or `timeout`: (the 101 or None, the
    attempts refused, the time from the call to the 101's answer)."""
    t0 = time.monotonic()
    refused = 0
    while True:
        started = time.monotonic()
        u = await upgrade(port, key, node)
        if u.status == 101:
            return u, refused, time.monotonic() - t0
        refused += 1
        if time.monotonic() - t0 > timeout:
            return None, refused, time.monotonic() - t0
        await asyncio.sleep(max(0.0, started + every - time.monotonic()))


# ---- figures --------------------------------------------------------------------------------


def max_window(times: list[float], width: float) -> tuple[int, float]:
    """The most events in any window [t, t + width) of the sorted `times`, and where it starts
    (the maximum is reached at a window starting at an event)."""
    best, at, j = 0, math.nan, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + width:
            j += 1
        if j - i > best:
            best, at = j - i, t
    return best, at


def window_counts(times: list[float], starts: list[float], width: float) -> list[int]:
    """Events in [s, s + width) for each start (times sorted)."""
    import bisect
    return [bisect.bisect_left(times, s + width) - bisect.bisect_left(times, s) for s in starts]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    v = sorted(values)
    if not v:
        return math.nan
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


# ---- latency probes -------------------------------------------------------------------------


class UpgradeProbe:
    """An already-known client's upgrades, one at a time round-robin over the nodes (open,
    answered, closed at once, then `every` s): each answer's (phase, node, status, seconds).
    `phase` is set by the test; `paused` stops it between attempts (nothing of it open)."""

    def __init__(self, nodes, key: str, every: float = 0.005):
        self.nodes, self.key, self.every = nodes, key, every
        self.phase = "before"
        self.samples: list[tuple[str, int, int | None, float]] = []
        self.paused = asyncio.Event()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> "UpgradeProbe":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if self.paused.is_set():
                self._idle.set()
                await asyncio.sleep(0.01)
                continue
            self._idle.clear()
            n = i % len(self.nodes)
            i += 1
            if self.nodes[n].proc.poll() is not None:
                continue
            u = await upgrade(self.nodes[n].port, self.key, n, timeout=5.0)
            self.samples.append((self.phase, n, u.status, u.latency))
            if u.status == 101:
                u.close()
            await asyncio.sleep(self.every)

    async def pause(self) -> None:
        """Stop between attempts; returns once none of its connections is open."""
        self.paused.set()
        self._idle.clear()
        await asyncio.wait_for(self._idle.wait(), 10)

    def resume(self) -> None:
        self.paused.clear()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def of(self, phase: str) -> list[tuple[str, int, int | None, float]]:
        return [s for s in self.samples if s[0] == phase]

    def latencies(self, phase: str) -> list[float]:
        return [s[3] for s in self.of(phase) if s[2] is not None]

    def statuses(self, phase: str) -> dict:
        out: dict = {}
        for s in self.of(phase):
            out[s[2]] = out.get(s[2], 0) + 1
        return out


async def ws_connect(node, key: str, timeout: float = 2.0, **kw):
    """A `websockets` client connection through `node` as the client of `key`; a 429 or 503 is
    tried again every 20 ms for at most `timeout` s (as hold_open, noted in
    REFUSED_WHILE_OPENING)."""
    import websockets
    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        try:
            ws = await websockets.connect(node.url(), additional_headers={"X-API-Key": key},
                                          compression=None, **kw)
            if refused:
                REFUSED_WHILE_OPENING.append((-1, refused))
            return ws
        except websockets.InvalidStatus as exc:
            if exc.response.status_code not in (429, 503) or time.monotonic() > deadline:
                raise
            refused += 1
            await asyncio.sleep(0.02)


class EchoProbe:
    """One `websockets` connection per node of an already-known client: a message, its echo,
    timed, round-robin over them (`every` s apart): the (phase, seconds) of each round trip."""

    def __init__(self, nodes, key: str, every: float = 0.005):
        self.nodes, self.key, self.every = nodes, key, every
        self.phase = "before"
        self.samples: list[tuple[str, float]] = []
        self.lost = 0
        self.lost_at: list[tuple[str, int, float]] = []    # (phase, node, when) of each
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.conns: list = []

    async def start(self) -> "EchoProbe":
        self.conns = [await ws_connect(n, self.key) for n in self.nodes]
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            ws = self.conns[i % len(self.conns)]
            i += 1
            t0 = time.perf_counter()
            await ws.send(b"p" * 16)
            try:
                await asyncio.wait_for(ws.recv(), 1.0)
                self.samples.append((self.phase, time.perf_counter() - t0))
            except TimeoutError:
                self.lost += 1
                self.lost_at.append((self.phase, i % len(self.conns), time.monotonic()))
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        for ws in self.conns:
            await ws.close()

    def latencies(self, phase: str) -> list[float]:
        return [s for p, s in self.samples if p == phase]


def unchanged(before: list[float], after: list[float], absolute: float) -> tuple[bool, str]:
    """The issue's "p99 unchanged within 20%", with an absolute floor for tiny p99s: p99(after)
    <= max(1.2 p99(before), p99(before) + absolute); and the text of the comparison."""
    b, a = percentile(before, 99), percentile(after, 99)
    bound = max(1.2 * b, b + absolute)
    return a <= bound, (f"p99 {b * 1e3:.2f} ms -> {a * 1e3:.2f} ms (bound {bound * 1e3:.2f} ms; "
                        f"p50 {percentile(before, 50) * 1e3:.2f} -> {percentile(after, 50) * 1e3:.2f} ms, "
                        f"max {max(before) * 1e3:.1f} -> {max(after) * 1e3:.1f} ms; "
                        f"{len(before)} and {len(after)} samples)")


def errors_total(node) -> float:
    """fastgw_cluster_errors_total summed over its kinds."""
    return sum(v for (name, _), v in node.metrics().items() if name == "fastgw_cluster_errors_total")


def errors_by_kind(node) -> dict[str, float]:
    """fastgw_cluster_errors_total by its `kind` label."""
    return {dict(labels).get("kind", ""): v for (name, labels), v in node.metrics().items()
            if name == "fastgw_cluster_errors_total"}
