"""What the worker-process tests share: `fastgw run` with `workers: N` and its admin API, the
counting echo backend (tests/countecho.py) in its own process, and raw upgrade attempts made
all at once.

The admin API is read over HTTP on loopback, synchronously (urllib: usable from a thread), or
from a coroutine through `await gw.aget(...)` (the same call in a thread, so that the test's
loop goes on serving its clients meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from conftest import samples, stop_process
from wire import connect, new_key, read_head, status_of, upgrade_request

HERE = Path(__file__).resolve().parent
KEYS = {name: f"{name}-secret" for name in ("alice", "bob", "carol", "dave", "erin")}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# ---- the counting backend ---------------------------------------------------------------


class CountingBackend:
    """tests/countecho.py: the bundled echo, counting its live WebSocket connections."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "countecho.py")],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"countecho: ws (\d+) stats (\d+)\n", line)
        if m is None:
            self.proc.kill()
            raise RuntimeError(f"countecho did not start: {line!r}")
        self.port, stats_port = int(m[1]), int(m[2])
        self.stats_sock = socket.create_connection(("127.0.0.1", stats_port))
        self.stats_file = self.stats_sock.makefile("rwb")

    def _ask(self, line: bytes) -> dict:
        self.stats_file.write(line)
        self.stats_file.flush()
        return json.loads(self.stats_file.readline())

    def stats(self) -> dict:
        """{"live", "peak", "total"} now (a round trip to the backend process)."""
        return self._ask(b"stats\n")

    def reset_peak(self) -> dict:
        return self._ask(b"reset\n")

    async def wait_live(self, n: int, timeout: float = 5.0) -> dict:
        """Wait until exactly n connections are live at the backend; the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["live"] == n or time.monotonic() > deadline:
                return s
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self.stats_sock.close()
        stop_process(self.proc)


# ---- `fastgw run` with workers --------------------------------------------------------------


def gateway_config(backend_port: int, workers: int, *, pre: list | None = None,
                   request: list | None = None, top: dict | None = None) -> str:
    """One API at / behind an api-key policy (clients alice and bob), then the `pre`
    policies, routed to the backend; `request` is the upgrade's request-flow policies; `top`
    top-level keys (over the defaults: no per-address handshake cap, drain-time 2s)."""
    upgrade = {"policy": "websocket-upgrade", "target-url": f"ws://127.0.0.1:{backend_port}/"}
    if request:
        upgrade["request"] = request
    doc = {"workers": workers,
           "listeners": [{"host": "127.0.0.1", "port": 0}],
           "admin": {"host": "127.0.0.1", "port": 0},
           "drain-time": "2s",
           "clients": [{"id": cid, "key": key} for cid, key in KEYS.items()],
           "limits": {"max-handshakes-per-ip": 0},
           "apis": [{"name": "chat", "path": "/",
                     "assembly": [{"policy": "api-key", "header": "X-API-Key"}, *(pre or []), upgrade]}]}
    doc.update(top or {})
    return yaml.safe_dump(doc, sort_keys=False)


class WorkersGateway:
    """A `fastgw run -c FILE` supervisor and its workers."""

    def __init__(self, tmp_path: Path, yaml_text: str, workers: int):
        self.n = workers
        self.config_path = tmp_path / "gateway.yaml"
        self.config_path.write_text(yaml_text)
        self.stderr_path = tmp_path / "gateway.stderr"
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"))
        self.pids_seen: set[int] = set()
        deadline = time.monotonic() + 20
        while True:
            text = self.stderr()
            port = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text)
            admin = re.search(r"admin on (http://\S+)", text)
            if port and admin:
                self.port, self.admin_url = int(port[1]), admin[1]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the gateway did not start:\n{text}")
            time.sleep(0.05)
        self.wait_workers(workers, timeout=max(0.0, deadline - time.monotonic()))

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
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    async def aget(self, path: str):
        return await asyncio.to_thread(self.get, path)

    def workers(self) -> list[dict]:
        rows = self.get("/workers")
        self.pids_seen.update(r["pid"] for r in rows if r.get("pid"))
        return rows

    def pids(self) -> dict[int, int]:
        """{index: pid} of the current workers."""
        return {r["index"]: r["pid"] for r in self.workers()}

    def connections(self, client: str | None = None) -> list[dict]:
        return self.get("/connections" + (f"?client={client}" if client else ""))

    def metrics(self) -> dict:
        return samples(self.get("/metrics"))

    def wait_workers(self, n: int, timeout: float = 10.0, changed_from: dict[int, int] | None = None) -> dict[int, int]:
        """Wait until /workers lists n live worker processes (each index's pid other than
        in `changed_from`, when given); their {index: pid}."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pids = self.pids()
            except (OSError, AssertionError):
                pids = {}
            ok = (len(pids) == n and all(pid and alive(pid) for pid in pids.values())
                  and (changed_from is None or all(pids.get(i) != p for i, p in changed_from.items())))
            if ok:
                return pids
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"/workers did not list {n} live workers"
                                     f"{' with new pids' if changed_from else ''} within {timeout}s: "
                                     f"{pids}\n{self.stderr()[-3000:]}")
            time.sleep(0.01)

    def stop(self) -> list[str]:
        """SIGTERM the supervisor (it drains its workers and exits); the problems seen."""
        problems = []
        try:
            self.workers()
        except (OSError, AssertionError):
            pass
        stop_process(self.proc)
        if self.proc.returncode != 0:
            problems.append(f"the supervisor exited {self.proc.returncode}")
        deadline = time.monotonic() + 5
        left = [pid for pid in self.pids_seen if alive(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in left if alive(pid)]
        for pid in left:                 # workers that outlived their supervisor
            os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"workers {left} outlived the supervisor")
        if "Traceback" in self.stderr():
            problems.append("a traceback in the gateway's log:\n" + self.stderr()[-4000:])
        return problems


def worker_of(rows: list[dict]) -> dict[str, int]:
    """{remote address: worker index} of /connections rows."""
    return {r["remote"]: r["worker"] for r in rows}


# ---- raw upgrade attempts ---------------------------------------------------------------------


class Attempt:
    """One raw upgrade attempt: the TCP connection, then (all at once with the others) the
    request; `status` once answered (None: the connection ended or failed first)."""

    def __init__(self, reader, writer, key: str | None, path: str = "/"):
        self.reader, self.writer = reader, writer
        self.ws_key = new_key()
        extra = f"X-API-Key: {key}\r\n" if key else ""
        self.request = upgrade_request(path, key=self.ws_key, extra=extra)
        self.status: int | None = None
        self.error: str | None = None

    def send(self) -> None:
        self.writer.write(self.request)

    async def answer(self, timeout: float = 10.0) -> int | None:
        try:
            self.status = status_of(await read_head(self.reader, timeout))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return self.status

    def close(self) -> None:
        self.writer.close()


async def attempts_at_once(port: int, n: int, key: str | None, *,
                           local_host: str = "127.0.0.1") -> list[Attempt]:
    """n TCP connections first, then every upgrade request written in one go (no await in
    between), then every answer read: as simultaneous as one process makes them."""
    conns = await asyncio.gather(*(connect(port, local_addr=(local_host, 0)) for _ in range(n)))
    attempts = [Attempt(r, w, key) for r, w in conns]
    for a in attempts:
        a.send()
    await asyncio.gather(*(a.answer() for a in attempts))
    return attempts


def statuses(attempts: list[Attempt]) -> dict:
    out: dict = {}
    for a in attempts:
        k = a.status if a.status is not None else a.error
        out[k] = out.get(k, 0) + 1
    return out


# ---- fixtures (imported by the test modules) ------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    """The counting echo backend, one process for the module; each test leaves it with no
    connection."""
    b = CountingBackend()
    yield b
    b.stop()


@pytest.fixture
def start_gateway(tmp_path, backend):
    """start_gateway(yaml_text, n): a `fastgw run` supervisor with n workers, listed by
    /workers. At the end: SIGTERM, exit 0, no worker left behind, no traceback logged, and
    no connection left at the backend."""
    gws: list[WorkersGateway] = []

    def start(yaml_text: str, n: int) -> WorkersGateway:
        gw = WorkersGateway(tmp_path, yaml_text, n)
        gws.append(gw)
        return gw

    yield start
    problems = []
    for gw in gws:
        problems += gw.stop()
    deadline = time.monotonic() + 5
    while (s := backend.stats())["live"] and time.monotonic() < deadline:
        time.sleep(0.02)
    if s["live"]:
        problems.append(f"{s['live']} connections left at the backend")
    assert not problems, "\n".join(problems)


class Events:
    """An event sink keeping the events emitted (gw.events)."""

    def __init__(self):
        self.seen = []

    def emit(self, event) -> None:
        self.seen.append(event)

    def of(self, kind) -> list:
        return [e for e in self.seen if isinstance(e, kind)]
