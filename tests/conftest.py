"""Shared fixtures: the event loop of every async test (uvloop; uvloop and asyncio's own
for the tests marked both_loops), the loop fixture that fails a test during which the loop's
exception handler was called, a real echo backend, and the gateway itself, either in this
process on the test's loop (to look at its connection table) or as a `fastgw run` subprocess
(for signals and memory). The raw WebSocket wire the tests speak is tests/wire.py."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytest_asyncio

try:
    import uvloop
except ImportError:             # a Python that uvloop does not support yet: asyncio's loop only
    uvloop = None

# The benchmark scripts (bench/loadgen.py, bench/peers.py) are tested as modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fastgw import config as cfgmod  # noqa: E402
from fastgw.echo import serve as echo_serve, server_port
from fastgw.gateway import Gateway


LOOPS = {"uvloop": uvloop.new_event_loop} if uvloop is not None else {}
LOOPS["asyncio"] = asyncio.new_event_loop


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "both_loops: run each async test on uvloop and on the standard library's "
                   "asyncio loop (`fastgw run --loop asyncio`), not on uvloop only")


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on uvloop, as the gateway does by default; those marked
    `both_loops` run on asyncio's own loop as well (test ids end in [uvloop] / [asyncio]).
    Without uvloop, every one runs on asyncio's."""
    if item.get_closest_marker("both_loops") is not None or uvloop is None:
        return LOOPS
    return {"uvloop": LOOPS["uvloop"]}


@pytest.fixture(autouse=True)
def _loop_exceptions(request):
    """Fail an async test during which its event loop's exception handler was called (a
    callback or a task that raised with nobody to tell, a transport's fatal error); see
    loop_exceptions. Autouse, so that it is set up first and torn down last, after every
    other fixture of the test (the gateway's shutdown included)."""
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("loop_exceptions")


@pytest.fixture
async def loop_exceptions():
    """The contexts the running loop's exception handler was given during the test: recorded
    (and logged as the default handler does); the test fails at teardown with their messages.
    A test that provokes one on purpose empties the list."""
    loop = asyncio.get_running_loop()
    seen: list[dict] = []

    def record(loop, context):
        seen.append(context)
        loop.default_exception_handler(context)

    previous = loop.get_exception_handler()
    loop.set_exception_handler(record)
    yield seen
    # Callbacks already scheduled (a connection_lost, a done task's callbacks) run first.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    if seen:
        pytest.fail("the event loop's exception handler was called during the test:\n  "
                    + "\n  ".join(map(_describe, seen)), pytrace=False)


def _describe(context: dict) -> str:
    text = context.get("message", "")
    exc = context.get("exception")
    if exc is not None:
        text += f": {type(exc).__name__}: {exc}"
    for key in ("handle", "task", "future", "protocol", "transport"):
        if key in context:
            text += f" ({key} {context[key]!r:.200})"
    return text


@pytest.fixture
async def echo_backend():
    """The bundled picows echo backend on a free loopback port; yields its port."""
    server = await echo_serve("127.0.0.1", 0, subprotocols=["chat.v2", "chat.v1"])
    yield server_port(server)
    server.close()


def gateway_yaml(target: str, *, path: str = "/", extra_upgrade: str = "", extra_top: str = "",
                 tls_profiles: str = "", name: str = "test") -> str:
    """A one-API configuration; the extra_* texts are YAML lines added at that level."""
    def indent(text: str, n: int) -> str:
        return "".join(" " * n + line + "\n" for line in textwrap.dedent(text).strip().splitlines())

    return (
        "listeners:\n  - host: 127.0.0.1\n    port: 0\n"
        + indent(tls_profiles, 0) + indent(extra_top, 0)
        + f"apis:\n  - name: {name}\n    path: {path}\n    assembly:\n"
        + f"      - policy: websocket-upgrade\n        target-url: {target}\n"
        + indent(extra_upgrade, 8)
    )


class RunningGateway:
    def __init__(self, gw: Gateway):
        self.gw = gw
        scheme, host, port = gw.addresses[0]
        self.scheme, self.host, self.port = scheme, host, port

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is live or being upgraded."""
        deadline = time.monotonic() + timeout
        while (self.gw.live or self.gw.handshakes) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


@pytest.fixture
async def gateway_factory():
    """Start in-process gateways from YAML text; each must end with an empty table."""
    started: list[RunningGateway] = []

    async def start(yaml_text: str) -> RunningGateway:
        config = cfgmod.loads(yaml_text, "yaml", "test.yaml")
        gw = Gateway(config)
        await gw.start()
        rg = RunningGateway(gw)
        started.append(rg)
        return rg

    yield start
    for rg in started:
        await rg.wait_idle()
        live = [c.describe() for c in rg.gw.live.values()]
        handshakes = len(rg.gw.handshakes)
        slots = rg.gw.zone.counts_used()
        await rg.gw.shutdown(1.0)
        gc.collect()
        # What survives a full collection here is alive: freeze it, so that the next
        # test's collection walks only the objects created since (a full walk of every
        # test's survivors cost ~25 ms per gateway and grew with the suite).
        gc.freeze()
        assert not live, f"connections left in the table: {live}"
        assert not handshakes, f"{handshakes} handshakes left open"
        assert slots == 0, f"{slots} connection-limit slots still held"
        # A slot given back by a lease's deallocator, not by the end of life, is a bug
        # that a later client would have paid for (429) until the garbage collector ran.
        assert rg.gw.zone.lease_leaks == 0, f"{rg.gw.zone.lease_leaks} slots released by a deallocator"


@pytest.fixture
async def gateway(gateway_factory, echo_backend):
    """A gateway routing / to the echo backend."""
    return await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"))


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen, port: int, stderr_path: Path):
        self.proc, self.port, self.stderr_path = proc, port, stderr_path

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def socket_count(self) -> int:
        n = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
        return n

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def status(self, timeout: float = 5.0) -> dict:
        """Ask the process for its status line (SIGUSR1) and parse it."""
        import json
        before = self.stderr().count("fastgw: status ")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [l for l in self.stderr().splitlines() if l.startswith("fastgw: status ")]
            if len(lines) > before:
                return json.loads(lines[-1][len("fastgw: status "):])
            time.sleep(0.02)
        raise TimeoutError("no status line")


FASTGW = (sys.executable, "-m", "fastgw")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the gateway drains and exits), SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_gateway_process(tmp_path: Path, yaml_text: str, *args: str, command=FASTGW) -> GatewayProcess:
    """`fastgw run -c FILE ARGS` (`command` instead of `python -m fastgw`), once it listens."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml_text)
    err = tmp_path / "gateway.stderr"
    proc = subprocess.Popen([*command, "run", "-c", str(cfg), *args],
                            stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", err.read_text())
        if m:
            return GatewayProcess(proc, int(m.group(1)), err)
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {err.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gateway did not start: {err.read_text()}")


@pytest.fixture
def gateway_process(tmp_path):
    procs: list[GatewayProcess] = []

    def start(yaml_text: str, *args: str, command=FASTGW) -> GatewayProcess:
        gp = start_gateway_process(tmp_path, yaml_text, *args, command=command)
        procs.append(gp)
        return gp

    yield start
    leaks = 0
    for gp in procs:
        if gp.proc.poll() is None:
            try:
                leaks += gp.status()["lease_leaks"]
            except (TimeoutError, ProcessLookupError, KeyError):
                pass                    # gone or stopped by the test itself
            stop_process(gp.proc)
    assert leaks == 0, f"{leaks} slots released by a deallocator in a gateway process"


# ---- `fastgw run` with its admin API --------------------------------------------------------------

ADMIN = "admin: {host: 127.0.0.1, port: 0}\n"


class AdminGatewayProcess(GatewayProcess):
    admin_url: str = ""
    config_path: Path

    def write_config(self, yaml_text: str) -> None:
        """Rewrite the configuration file (with the same admin section), for a reload."""
        self.config_path.write_text(yaml_text + ADMIN)


@pytest.fixture
def gateway_with_admin(tmp_path):
    """`fastgw run` with its admin API on a free port; with soft/hard, under that RLIMIT_NOFILE."""
    procs: list[AdminGatewayProcess] = []

    def start(yaml_text: str, soft: int | None = None, hard: int | None = None) -> AdminGatewayProcess:
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml_text + ADMIN)
        err = tmp_path / "gateway.stderr"

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err.open("w"),
                                preexec_fn=limit if soft is not None else None)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = err.read_text()
            port = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text)
            admin = re.search(r"admin on (http://\S+)", text)
            if port and admin:
                for _ in range(40):      # the line after "admin on" (this version prints it)
                    if "max-connections" in err.read_text():
                        break
                    time.sleep(0.05)
                gp = AdminGatewayProcess(proc, int(port.group(1)), err)
                gp.admin_url = admin.group(1)
                gp.config_path = cfg
                procs.append(gp)
                return gp
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {text}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"gateway did not start: {err.read_text()}")

    yield start
    for gp in procs:
        if gp.proc.poll() is None:
            stop_process(gp.proc)


# ---- the admin API's metrics ------------------------------------------------------------------

def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def admin_for():
    """Start the admin API of an in-process gateway (`admin_for(rg, token=None)`)."""
    from fastgw.observe.admin import start_admin
    servers = []

    async def start(rg, token=None):
        srv = await start_admin(rg.gw, "127.0.0.1", 0, token)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.close()


async def get_metrics(admin) -> dict:
    """The admin API's /metrics as samples()."""
    import aiohttp
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin.url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return samples(await r.text())
