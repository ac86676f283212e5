"""Other WebSocket reverse proxies ("peers") that the benchmark compares fastgw with.

The orchestrator (``bench/run.py``) puts each peer between the load generator and the same echo
backend that ``direct`` and ``fastgw`` use. Every peer is set up the same way:

* one process, one worker, one thread (or ``GOMAXPROCS=1``): a per-core comparison, as fastgw
  runs one event loop;
* run in the foreground, so that the orchestrator starts it and stops it by pid;
* listens on ``127.0.0.1:<listen_port>`` and proxies every path to ``127.0.0.1:<backend_port>``,
  passing the WebSocket upgrade through;
* no access log; errors and warnings only, on stderr;
* idle timeouts of an hour, so that idle connections of a long run are not cut;
* room for about 10,000 proxied connections: a proxied WebSocket holds two sockets, so the
  peers are set up for ``FD_LIMIT`` = 20,000 descriptors (the orchestrator raises its soft
  RLIMIT_NOFILE to the hard limit before starting them; on a machine whose hard limit is
  20,000 that is a little under 10,000 proxied connections for every peer, fastgw included).

The peers
---------
``nginx``
    nginx with its default proxy buffers. ``daemon off; master_process off;`` makes it a single
    process; the pid file, lock file and temp paths are in the work directory and it is started
    with ``-p <workdir>/`` (and ``-e stderr`` where supported, 1.19.5+) so that it never touches
    /var/log/nginx or /var/lib/nginx and runs as any user. ``worker_rlimit_nofile 20000;`` and
    ``worker_connections 21334;`` (connections count both sides of a proxied WebSocket). Not
    20000: nginx closes connections still waiting for their request, new clients included, as
    soon as fewer than 1/16 of worker_connections are free, and with 20000 it held only 9,375
    proxied connections; just above 20000 x 16/15 the descriptors run out first, as with the
    other peers (nginx then warns once at start that worker_connections exceed the limit).
    ``proxy_http_version 1.1`` and the Upgrade / Connection headers pass the upgrade on;
    ``proxy_read_timeout`` / ``proxy_send_timeout 1h``; ``tcp_nodelay on``.

``nginx-64k``
    The same configuration with ``proxy_buffer_size 64k`` (and ``proxy_buffers 4 64k``, which
    nginx requires to be consistent with it). Once a connection is upgraded, nginx copies bytes
    through two buffers of ``proxy_buffer_size`` each: the one it read the backend's response
    header into (backend -> client) and one allocated on the first client read
    (client -> backend). The default is one memory page (4 KiB), so a 64 KiB message takes 16
    read/write rounds in each direction; with 64k it takes one. On the client side, the only
    other buffer in the tunnel is the request-header buffer (``client_header_buffer_size``,
    1 KiB), which is only used to pass on bytes that arrived together with the handshake; it is
    left at its default, since raising it would cost memory on every connection for nothing.

``haproxy``
    ``haproxy -db -f <cfg>``: foreground, ``nbthread 1``, ``mode http`` (HAProxy sees the
    Upgrade and switches the connection to a tunnel), ``timeout client/server/tunnel 1h``, no
    ``log`` lines. The frontend has ``maxconn 20000``. The global section has
    ``fd-hard-limit 20000`` instead of ``maxconn 20000``: a global maxconn of 20,000 makes
    HAProxy want 2 x 20,000 + a few descriptors, and since ``strict-limits`` is on by default it
    refuses to start when the hard limit is 20,000 ("Cannot raise FD limit to 40014, limit is
    20000"). With ``fd-hard-limit`` it derives the global maxconn from the descriptors it can
    really have: about 9,990 proxied connections at 20,000 (``fd-hard-limit`` needs
    HAProxy 2.6 or later: Debian 12 has 2.6).

``caddy``
    ``caddy run --config <Caddyfile> --adapter caddyfile`` with ``GOMAXPROCS=1``;
    ``reverse_proxy`` handles WebSocket upgrades by itself. Admin endpoint off, automatic HTTPS
    off, no access log (a site logs nothing without a ``log`` directive), Caddy's own log at
    WARN on stderr (one INFO line about the configuration file comes before the config is
    loaded). HOME and the XDG directories point into the work directory. Its descriptor limit is
    the one it inherits; it cannot set a listen backlog (Go uses net.core.somaxconn).

``pyproxy``
    ``bench/pyproxy.py``: a plain Python WebSocket proxy on the ``websockets`` library and the
    standard asyncio event loop: a baseline for "a gateway written in ordinary Python".
    For each client it opens a connection to the backend with the same path and pumps messages
    both ways, passing close codes on.

Starting and stopping: add ``extra_env`` to the inherited environment; give each peer process
its own work directory. nginx, HAProxy and pyproxy listen with a backlog of 1024, as fastgw
does. SIGTERM stops every peer (HAProxy dies by the signal; the others exit with status 0;
pyproxy first closes its connections, waiting at most 10 s for the backend's answers).

Templates are in ``bench/peers/``: ``nginx.conf`` (both nginx peers), ``haproxy.cfg``,
``Caddyfile``, with ``@{name}`` placeholders (``string.Template`` with ``@`` as delimiter, since
nginx and Caddy use ``$`` and braces themselves).

API
---
``PEERS``, ``DEBIAN_PACKAGES``, ``ensure_installed(names)``, ``peer_command(...)``,
``check_command(...)`` (how to validate the written configuration), ``free_port()``,
``wait_listening(port, timeout, proc)``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "PEERS",
    "DEBIAN_PACKAGES",
    "PEER_BINARY",
    "FD_LIMIT",
    "ensure_installed",
    "find_binary",
    "peer_command",
    "check_command",
    "free_port",
    "wait_listening",
]

PEERS: tuple[str, ...] = ("nginx", "nginx-64k", "haproxy", "caddy", "pyproxy")

# Which Debian package provides which binary. On Debian 12 "nginx" is the package with the
# binary (nginx-light is a transitional package that depends on it plus a module).
DEBIAN_PACKAGES: dict[str, str] = {"nginx": "nginx", "haproxy": "haproxy", "caddy": "caddy"}

# Which binary each peer runs (None: the Python interpreter given to peer_command).
PEER_BINARY: dict[str, str | None] = {
    "nginx": "nginx",
    "nginx-64k": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "pyproxy": None,
}

# Descriptors each peer is configured for: two per proxied WebSocket.
FD_LIMIT = 20_000

# nginx closes connections that wait for their request (new clients, too) as soon as fewer than
# 1/16 of worker_connections are free ("worker_connections are not enough, reusing
# connections"): with worker_connections = FD_LIMIT = 20000 it held only 9,375 proxied
# connections. Just above FD_LIMIT * 16/15, the descriptors run out first, as for the others.
NGINX_WORKER_CONNECTIONS = FD_LIMIT * 16 // 15 + 1

BENCH_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = BENCH_DIR / "peers"
PYPROXY = BENCH_DIR / "pyproxy.py"

# Where system binaries live even when PATH (of a non-root user) leaves the sbin folders out.
_EXTRA_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

_NGINX_BUFFERS = {
    "nginx": "            # proxy buffers: nginx defaults (proxy_buffer_size = one memory page)",
    "nginx-64k": (
        "            # upgraded connections copy through two proxy_buffer_size buffers\n"
        "            proxy_buffer_size 64k;\n"
        "            proxy_buffers 4 64k;"
    ),
}


class _Template(string.Template):
    delimiter = "@"


# ---------------------------------------------------------------------------------------------
# binaries and installation


def find_binary(binary: str) -> str | None:
    """The absolute path of ``binary``, looking in PATH and then in the usual sbin/bin folders."""
    found = shutil.which(binary)
    if found:
        return found
    return shutil.which(binary, path=os.pathsep.join(_EXTRA_BIN_DIRS))


def _check_name(name: str) -> None:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")


def _run_quiet(argv: list[str], env: dict[str, str], timeout: float,
               keep_all: bool = False) -> tuple[int, str]:
    """Runs argv; returns (exit status, its output: the last lines joined on one line, or all
    of it with keep_all)."""
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace",
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"
    except OSError as exc:
        return 127, str(exc)
    if keep_all:
        return done.returncode, done.stdout
    lines = [line.strip() for line in done.stdout.strip().splitlines() if line.strip()]
    picked = [line for line in lines if line.startswith("E:")] or lines[-3:]
    return done.returncode, " | ".join(picked)


def _apt_prefix() -> tuple[list[str] | None, str]:
    """(command prefix to run apt-get as root, or None; reason when None)."""
    if shutil.which("apt-get", path=os.pathsep.join(_EXTRA_BIN_DIRS)) is None:
        return None, "apt-get not found (not a Debian-like system)"
    if os.geteuid() == 0:
        return [], ""
    sudo = shutil.which("sudo")
    if sudo is None:
        return None, "not root and sudo not found"
    code, out = _run_quiet([sudo, "-n", "true"], dict(os.environ), 30)
    if code != 0:
        return None, f"not root and sudo -n is refused ({out or f'status {code}'})"
    return [sudo, "-n"], ""


def _install_packages(packages: list[str], log: Callable[[str], object]) -> str | None:
    """Installs Debian packages; None on success, else a one-line reason."""
    prefix, why = _apt_prefix()
    if prefix is None:
        return why
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = prefix + ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"peers: installing {' '.join(packages)}: {' '.join(install)}")
    code, out = _run_quiet(install, env, 900)
    if code == 0:
        return None
    log(f"peers: apt-get install failed ({out or f'status {code}'}); running apt-get update")
    code, out = _run_quiet(prefix + ["apt-get", "update"], env, 600)
    if code != 0:
        return f"apt-get update failed: {out or f'status {code}'}"
    code, out = _run_quiet(install, env, 900)
    if code != 0:
        return f"apt-get install {' '.join(packages)} failed: {out or f'status {code}'}"
    return None


def _python_has_websockets(python: str | None) -> str | None:
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        if importlib.util.find_spec("websockets") is None:
            return "the Python package 'websockets' is not installed (pip install websockets)"
        return None
    code, out = _run_quiet([python, "-c", "import websockets.asyncio.server"], dict(os.environ), 60)
    if code != 0:
        return f"{python} cannot import websockets.asyncio ({out or f'status {code}'})"
    return None


def ensure_installed(names: Iterable[str], log: Callable[[str], object] = print,
                     *, python: str | None = None) -> dict[str, str | None]:
    """For each peer name: None when it can run, else a one-line reason why it cannot.

    Missing binaries are installed from Debian's packages (``apt-get install -y`` with
    DEBIAN_FRONTEND=noninteractive, and ``apt-get update`` first only if that install fails),
    as root or through ``sudo -n``. ``pyproxy`` needs the ``websockets`` package in ``python``
    (default: this interpreter); it is not installed here.
    """
    names = list(names)
    for name in names:
        _check_name(name)
    result: dict[str, str | None] = {}
    missing: dict[str, list[str]] = {}  # binary -> peers that need it
    for name in names:
        binary = PEER_BINARY[name]
        if binary is None:
            result[name] = _python_has_websockets(python)
        elif find_binary(binary) is None:
            missing.setdefault(binary, []).append(name)
        else:
            result[name] = None
    if missing:
        packages = sorted({DEBIAN_PACKAGES[b] for b in missing})
        failure = _install_packages(packages, log)
        for binary, peers in missing.items():
            if find_binary(binary) is not None:
                reason = None
            elif failure is not None:
                reason = f"{binary} is not installed and could not be installed: {failure}"
            else:
                reason = (f"{binary} is still missing after installing Debian package "
                          f"{DEBIAN_PACKAGES[binary]}")
            for peer in peers:
                result[peer] = reason
    return {name: result[name] for name in names}


# ---------------------------------------------------------------------------------------------
# configuration and command lines

_nginx_e_cache: dict[str, bool] = {}


def _nginx_supports_e(nginx: str) -> bool:
    """Whether this nginx has the -e option (1.19.5+)."""
    if nginx not in _nginx_e_cache:
        _code, out = _run_quiet([nginx, "-h"], dict(os.environ), 30, keep_all=True)
        _nginx_e_cache[nginx] = "-e filename" in out
    return _nginx_e_cache[nginx]


def _render(template: str, out: Path, **values: object) -> Path:
    text = _Template((TEMPLATE_DIR / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    out.write_text(text)
    return out


def _binary_or_raise(name: str) -> str:
    binary = PEER_BINARY[name]
    assert binary is not None
    path = find_binary(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found (see ensure_installed)")
    return path


def _config_path(name: str, workdir: Path) -> Path:
    return {
        "nginx": workdir / "nginx.conf",
        "nginx-64k": workdir / "nginx.conf",
        "haproxy": workdir / "haproxy.cfg",
        "caddy": workdir / "Caddyfile",
    }[name]


def _nginx_argv(nginx: str, workdir: Path) -> list[str]:
    argv = [nginx]
    if _nginx_supports_e(nginx):
        argv += ["-e", "stderr"]
    # The prefix ends with "/": nginx joins it with relative paths as they are.
    return argv + ["-p", f"{workdir}/", "-c", str(_config_path("nginx", workdir))]


def _caddy_env(workdir: Path) -> dict[str, str]:
    return {
        "GOMAXPROCS": "1",
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "XDG_CACHE_HOME": str(workdir / "cache"),
    }


def tls_block(name: str, tls: dict[str, Any] | None) -> str:
    """The lines that add a TLS 1.3 listener on 127.0.0.1:tls["port"] (same proxying) to a
    peer's configuration; tls has "port", "cert", "key" (PEM files) and "pem" (both in one
    file, for HAProxy). Empty without tls. Session tickets: each peer's default (on)."""
    if not tls:
        return ""
    port, cert, key = int(tls["port"]), tls["cert"], tls["key"]
    if name in ("nginx", "nginx-64k"):
        return (f"        listen 127.0.0.1:{port} ssl backlog=1024;\n"
                f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                f"        ssl_protocols TLSv1.3;")
    if name == "haproxy":
        return f"    bind 127.0.0.1:{port} ssl crt {tls['pem']} ssl-min-ver TLSv1.3"
    if name == "caddy":
        return ("https://127.0.0.1:" + str(port) + " {\n\tbind 127.0.0.1\n"
                f"\ttls {cert} {key} {{\n\t\tprotocols tls1.3\n\t}}\n"
                f"\treverse_proxy 127.0.0.1:@{{backend_port}}\n}}")
    return ""


def peer_command(name: str, listen_port: int, backend_port: int, workdir: Path,
                 python: str = sys.executable,
                 tls: dict[str, Any] | None = None) -> tuple[list[str], dict[str, str]]:
    """Writes the peer's configuration into ``workdir`` and returns ``(argv, extra_env)``.

    ``argv`` starts the peer in the foreground, listening on 127.0.0.1:listen_port and proxying
    to 127.0.0.1:backend_port; ``extra_env`` is to be added to the environment it inherits.
    ``python`` runs pyproxy. One work directory per peer process (the files have fixed names).
    """
    _check_name(name)
    workdir = Path(workdir).resolve()
    if any(c.isspace() for c in str(workdir)) or "@" in str(workdir):
        raise ValueError(f"work directory must not contain whitespace or '@': {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"listen_port": int(listen_port), "backend_port": int(backend_port)}
    block = tls_block(name, tls).replace("@{backend_port}", str(int(backend_port)))

    if name in ("nginx", "nginx-64k"):
        nginx = _binary_or_raise(name)
        (workdir / "tmp").mkdir(exist_ok=True)
        _render("nginx.conf", _config_path(name, workdir), workdir=workdir, fd_limit=FD_LIMIT,
                worker_connections=NGINX_WORKER_CONNECTIONS, buffers=_NGINX_BUFFERS[name],
                tls=block, **ports)
        return _nginx_argv(nginx, workdir), {}

    if name == "haproxy":
        haproxy = _binary_or_raise(name)
        cfg = _render("haproxy.cfg", _config_path(name, workdir), fd_limit=FD_LIMIT, tls=block, **ports)
        return [haproxy, "-db", "-f", str(cfg)], {}

    if name == "caddy":
        caddy = _binary_or_raise(name)
        for sub in ("data", "config", "cache"):
            (workdir / sub).mkdir(exist_ok=True)
        cfg = _render("Caddyfile", _config_path(name, workdir), workdir=workdir, tls=block, **ports)
        return [caddy, "run", "--config", str(cfg), "--adapter", "caddyfile"], _caddy_env(workdir)

    # pyproxy
    return ([python, str(PYPROXY), "--listen-port", str(int(listen_port)),
             "--backend", f"ws://127.0.0.1:{int(backend_port)}"], {})


def check_command(name: str, workdir: Path) -> tuple[list[str], dict[str, str]] | None:
    """``(argv, extra_env)`` that validates the configuration peer_command wrote into
    ``workdir`` (exit status 0 when valid), or None for pyproxy, which has none."""
    _check_name(name)
    workdir = Path(workdir).resolve()
    if name in ("nginx", "nginx-64k"):
        argv = _nginx_argv(_binary_or_raise(name), workdir)
        return [argv[0], "-t", "-q", *argv[1:]], {}
    if name == "haproxy":
        return [_binary_or_raise(name), "-c", "-q", "-f", str(_config_path(name, workdir))], {}
    if name == "caddy":
        return ([_binary_or_raise(name), "validate", "--config", str(_config_path(name, workdir)),
                 "--adapter", "caddyfile"], _caddy_env(workdir))
    return None


# ---------------------------------------------------------------------------------------------
# ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_status(proc) -> int | None:
    if proc is None:
        return None
    poll = getattr(proc, "poll", None)  # subprocess.Popen
    return poll() if poll is not None else getattr(proc, "returncode", None)


def wait_listening(port: int, timeout: float, proc=None, host: str = "127.0.0.1") -> None:
    """Returns once a TCP connection to host:port succeeds.

    Raises RuntimeError when ``proc`` (a subprocess.Popen, or anything with ``returncode``)
    exits first, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        status = _exit_status(proc)
        if status is not None:
            raise RuntimeError(f"process exited with status {status} before listening on "
                               f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise RuntimeError(f"nothing listening on {host}:{port} after {timeout:g} s "
                               f"({last_error})")
        time.sleep(0.05)
