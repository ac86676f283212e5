"""A real redis-server for the tests (the Debian package), on a loopback port.

    with RedisServer() as server:        # started, answering PING
        server.url                       # redis://127.0.0.1:PORT/0
        server.stop(); server.start()    # a restart (empty: no persistence)

`redis_server` is the pytest fixture. Each server runs in its own temporary folder, with no
persistence (a restart is empty, as the cluster issue's fault tests need), bound to
127.0.0.1 only, and is stopped by its pid. `redis-server` missing is a failure naming the
package (.ci/run installs it).

`RedisCluster` (fixture `redis_cluster`, one per session) is three masters joined with
`redis-cli --cluster create`; `DelayProxy` (fixture `delay_proxy`) is a TCP proxy that makes
Redis slow (a delay each way) or cuts its connections.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from wire import free_port

START_TIMEOUT = 10.0


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install redis-server)")
    return path


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `args` are extra `--name value` options."""

    def __init__(self, port: int | None = None, *args: str):
        self.port = port or free_port()
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="fastgw-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


# --- A 3-master Redis Cluster -------------------------------------------------------------

CLUSTER_TIMEOUT = 20.0


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A loopback port P such that P and its cluster bus port P + 10000 are both free (the
    kernel's ephemeral ports are too high for P + 10000 to exist) and not in `taken` (the
    ports already given to the other nodes, not listening yet); both are added to it."""
    taken = set() if taken is None else taken
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = 20000 + probe.getsockname()[1] % 20000
        if port in taken or port + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            taken.update((port, port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One command's raw reply (the first read of it: for small replies such as CLUSTER INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("*%d\r\n" % len(args)
                   + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        data = s.recv(65536)
        return data


class RedisCluster:
    """Three masters (`cluster-enabled yes`, no replicas), each a RedisServer on its own
    loopback port and folder, joined with `redis-cli --cluster create`; ready when every node
    says cluster_state:ok. `nodes` are the RedisServer objects, `urls` their redis:// URLs."""

    def __init__(self, masters: int = 3, tls: dict[str, str] | None = None):
        """`tls`: {"cert": path, "key": path, "ca": path} adds a TLS port to every node (its
        plain port stays, for the readiness checks), TLS on the cluster bus, and makes
        `urls` rediss:// URLs of the TLS ports."""
        self.tls = tls
        self.tls_ports: list[int] = []
        self.nodes = []
        taken: set[int] = set()
        for _ in range(masters):
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000"]
            if tls is not None:
                self.tls_ports.append(free_cluster_port(taken))     # (its +10000 unused)
                args += ["--tls-port", str(self.tls_ports[-1]), "--tls-cluster", "yes",
                         "--tls-cert-file", tls["cert"], "--tls-key-file", tls["key"],
                         "--tls-ca-cert-file", tls["ca"], "--tls-auth-clients", "no"]
            self.nodes.append(RedisServer(free_cluster_port(taken), *args))

    @property
    def urls(self) -> list[str]:
        if self.tls is not None:
            return [f"rediss://127.0.0.1:{port}" for port in self.tls_ports]
        return [f"redis://127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            tls = [] if self.tls is None else ["--tls", "--cacert", self.tls["ca"]]
            ports = self.tls_ports if self.tls is not None else [node.port for node in self.nodes]
            subprocess.run(
                [redis_binary("redis-cli"), *tls, "--cluster", "create",
                 *(f"127.0.0.1:{port}" for port in ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, timeout=CLUSTER_TIMEOUT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + CLUSTER_TIMEOUT
            while not all(b"cluster_state:ok" in command(node.port, "CLUSTER", "INFO")
                          for node in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        for node in self.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster():
    """One 3-master cluster for the session (creating one takes a second or two); tests
    keep their keys apart (their own hash tags)."""
    with RedisCluster() as cluster:
        yield cluster


# --- A delaying TCP proxy -----------------------------------------------------------------

class DelayProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port` that delays every chunk by `delay`
    seconds in each direction (order kept), in a thread with its own event loop (so that the
    loop under test is never the one that waits). `delay` may be changed at any time (it
    applies to the chunks read after); `cut()` aborts every open connection; `accepted`
    counts the connections made to it (connect attempts of the client under test).

        with DelayProxy(server.port, delay=0.2) as proxy:
            proxy.url                    # redis://127.0.0.1:PROXY_PORT/0
    """

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.accepted = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._transports: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "DelayProxy":
        self._thread = threading.Thread(target=self._main, name="DelayProxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or not self.port:
            raise RuntimeError("the delay proxy did not start")
        return self

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            self._abort_all()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    async def _client(self, reader, writer) -> None:
        self.accepted += 1
        self._transports.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._transports.discard(writer)
            writer.transport.abort()
            return
        self._transports.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._transports.discard(w)
            w.transport.abort()

    async def _pipe(self, reader, writer) -> None:
        """Read chunks, and write each `delay` after it was read, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
            writer.transport.abort()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((loop.time() + self.delay, None))
            await sender

    def _abort_all(self, done: threading.Event | None = None) -> None:
        for w in list(self._transports):
            w.transport.abort()
        self._transports.clear()
        if done is not None:                # after the sockets' close, which abort() schedules
            self._loop.call_soon(done.set)

    def cut(self) -> None:
        """Abort every connection open through the proxy (new ones are still accepted); returns
        once their sockets are closed."""
        done = threading.Event()
        self._loop.call_soon_threadsafe(self._abort_all, done)
        assert done.wait(5), "the proxy's loop did not cut its connections"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def delay_proxy(redis_server):
    """A DelayProxy (no delay to start with) in front of the test's redis_server."""
    with DelayProxy(redis_server.port) as proxy:
        yield proxy
