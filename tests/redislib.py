"""A real redis-server for the tests (the Debian package), on a loopback port.

    with RedisServer() as server:        # started, answering PING
        server.url                       # redis://127.0.0.1:PORT/0
        server.stop(); server.start()    # a restart (empty: no persistence)

`redis_server` is the pytest fixture. Each server runs in its own temporary folder, with no
persistence (a restart is empty, as the cluster issue's fault tests need), bound to
127.0.0.1 only, and is stopped by its pid. `redis-server` missing is a failure naming the
package (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
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
