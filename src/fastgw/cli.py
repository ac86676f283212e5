"""`fastgw run | check | demo | client`, `fastgw --version`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
from importlib import resources

from fastgw import __version__
from fastgw.loops import LOOPS, loop_runner


def _load(path: str):
    from fastgw import config as cfgmod
    config = cfgmod.load(path)
    return config


def cmd_check(args) -> int:
    from fastgw.config import ConfigError
    try:
        config = _load(args.config)
        from fastgw.routing import compile_config
        compile_config(config)      # builds TLS contexts: catches unreadable keys too
    except ConfigError as exc:
        print(f"fastgw: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fastgw: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(config.apis)} APIs, {len(config.listeners)} listeners)")
    return 0


async def _serve(config, drain_time: float | None, config_path: str | None, stop=None,
                 ready=None, listen_error=None) -> int:
    """Run the gateway until SIGTERM/SIGINT, `POST /drain?exit=true`, or until the future
    ``stop`` is done (``fastgw demo`` ends it when its backend dies). ``ready(addresses)`` is
    called once listening; ``listen_error(exc)`` formats the message when a listener cannot
    be opened. ``drain_time`` None: the file's (as last reloaded)."""
    from fastgw.observe.admin import start_admin
    from fastgw.gateway import Gateway
    from fastgw.observe.events import EventSink
    gw = Gateway(config, config_path)
    loop = asyncio.get_running_loop()
    admin = None
    if config.events is not None:
        try:
            gw.events = EventSink(config.events.target, max_queue=config.events.max_queue)
        except OSError as exc:
            print(f"fastgw: events: {exc}", file=sys.stderr)
            return 1
        gw.metrics.events_dropped = lambda: gw.events.dropped
    try:
        addresses = await gw.start()
        if config.admin is not None:
            token = os.environ.get(config.admin.token_env) if config.admin.token_env else None
            admin = await start_admin(gw, config.admin.host, config.admin.port, token,
                                      on_short=gw.accept_error)
    except OSError as exc:
        message = listen_error(exc) if listen_error is not None else f"fastgw: cannot listen: {exc}"
        print(message, file=sys.stderr, flush=True)
        return 1
    for scheme, host, port in addresses:
        shown = f"[{host}]" if ":" in host else host
        print(f"fastgw: listening on {scheme}://{shown}:{port}", file=sys.stderr, flush=True)
    if admin is not None:
        print(f"fastgw: admin on {admin.url}", file=sys.stderr, flush=True)
    print(f"fastgw: {gw.capacity_note()}", file=sys.stderr, flush=True)
    if ready is not None:
        ready(addresses)
    interval_log = log_task = None
    if config.histogram_log is not None:
        from fastgw.observe.histograms import IntervalLog
        try:
            interval_log = IntervalLog(gw.metrics, config.histogram_log.path,
                                       float(config.histogram_log.interval))
        except OSError as exc:
            print(f"fastgw: histogram log: {exc}", file=sys.stderr)
            await gw.shutdown(0)
            return 1
        log_task = loop.create_task(interval_log.run())
    if stop is None:
        stop = loop.create_future()

    def on_hup():
        async def reload():
            error = await gw.reload()
            print("fastgw: reloaded" if error is None else f"fastgw: reload refused: {error}",
                  file=sys.stderr, flush=True)
        loop.create_task(reload())

    def on_signal(signame):
        if not stop.done():
            print(f"fastgw: {signame}: draining {len(gw.live)} connections", file=sys.stderr, flush=True)
            stop.set_result(signame)

    def on_drained():                   # POST /drain?exit=true, once the drain is over
        if not stop.done():
            print("fastgw: drained, exiting", file=sys.stderr, flush=True)
            stop.set_result("drain")

    gw.on_exit = on_drained

    def on_status():
        print("fastgw: status " + json.dumps(gw.status()), file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, on_status)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop
    await gw.shutdown(drain_time if drain_time is not None else float(gw.config.drain_time))
    if admin is not None:
        await admin.close()
    if gw.events is not None:
        await gw.events.aclose()
    if interval_log is not None:
        log_task.cancel()
        interval_log.close()
    print("fastgw: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_run(args) -> int:
    from fastgw.config import ConfigError
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"fastgw: {exc}", file=sys.stderr)
        return 2
    workers = len(os.sched_getaffinity(0)) if config.workers == "auto" else int(config.workers)
    run = loop_runner(args.loop) if workers == 1 else None
    if workers == 1 and run is None:
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="fastgw: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastgw.picows").setLevel(logging.ERROR)
    # The file's drain-time is read when the drain begins (a reload may change it).
    drain = float(args.drain_time) if args.drain_time is not None else None
    # A thread (the event writer) gives the GIL back to the relay's loop within
    # 0.5 ms instead of the default 5 ms.
    sys.setswitchinterval(0.0005)
    if workers > 1:
        from fastgw.workers import supervise
        return supervise(config, args.config, drain, args.loop)
    try:
        return run(_serve(config, drain, args.config))
    except KeyboardInterrupt:       # a second Ctrl-C during the drain
        return 130


DEMO_HOST = "127.0.0.1"
BACKEND_START_TIMEOUT = 20.0    # seconds for `python -m fastgw.echo` to say it is listening


def _port_in_use(port: int) -> OSError | None:
    """The error binding DEMO_HOST:port gives (as the listeners bind: SO_REUSEADDR), or None."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((DEMO_HOST, port))
        except OSError as exc:
            return exc
    return None


def _port_message(port: int, exc: BaseException | str, role: str) -> str:
    """One line for a port that cannot be had; role is "gateway" or "backend"."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    in_use = (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE) or (
        isinstance(exc, str) and os.strerror(errno.EADDRINUSE).lower() in exc.lower())
    what = ("the gateway's port; choose another with --port" if role == "gateway" else
            "the echo backend's port; choose another with --backend-port")
    if in_use:
        return f"fastgw demo: port {port} is in use ({what})"
    return f"fastgw demo: cannot listen on port {port}: {detail} ({what})"


def demo_config(port: int, backend_port: int):
    """The bundled example (examples/demo.yaml) with its listener on ``port`` and its target on
    ``backend_port``."""
    import msgspec
    from fastgw import config as cfgmod
    text = (resources.files("fastgw") / "examples" / "demo.yaml").read_text()
    data = msgspec.yaml.decode(text)
    for listener in data["listeners"]:
        listener["port"] = port
    for api in data["apis"]:
        for policy in api["assembly"]:
            if policy.get("policy") == "websocket-upgrade":
                policy["target-url"] = f"ws://{DEMO_HOST}:{backend_port}/"
    return cfgmod.loads(msgspec.json.encode(data).decode(), "json", "examples/demo.yaml")


def _client_command() -> str:
    """How this fastgw was started, for the "try" line."""
    if os.path.basename(sys.argv[0]) in ("__main__.py", "-m", "") or not sys.argv[0]:
        return f"{sys.executable} -m fastgw"
    return sys.argv[0]


async def _start_backend(port: int):
    """Start `python -m fastgw.echo` on port; return (process, port) once it says it listens,
    or (None, message) when it cannot."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastgw.echo", "--host", DEMO_HOST, "--port", str(port),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Its own session: Ctrl-C in the terminal reaches the demo alone, which then stops it.
        start_new_session=True)
    pattern = re.compile(rb"echo: listening on ws://[^ ]*:(\d+)")
    try:
        async with asyncio.timeout(BACKEND_START_TIMEOUT):
            while True:
                line = await proc.stdout.readline()
                if not line:            # it exited
                    break
                m = pattern.match(line)
                if m:
                    return proc, int(m.group(1))
    except TimeoutError:
        await _stop_backend(proc)
        return None, f"fastgw demo: the echo backend did not start within {BACKEND_START_TIMEOUT:g} s"
    except BaseException:               # interrupted (SIGINT/SIGTERM cancel the demo)
        await _stop_backend(proc)
        raise
    err = (await proc.stderr.read()).decode("utf-8", "replace").strip()
    await _stop_backend(proc)
    last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
    last = last.removeprefix("echo: ")
    if os.strerror(errno.EADDRINUSE).lower() in last.lower():
        return None, _port_message(port, last, "backend")
    return None, f"fastgw demo: the echo backend did not start: {last}"


async def _stop_backend(proc) -> None:
    if proc.returncode is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _forward_stderr(proc) -> None:
    """The backend's own warnings, prefixed, on our stderr."""
    while line := await proc.stderr.readline():
        text = line.decode("utf-8", "replace").rstrip()
        print(f"fastgw demo: echo backend: {text}", file=sys.stderr, flush=True)


async def _demo(args) -> int:
    if args.port != 0 and args.port == args.backend_port:
        print(f"fastgw demo: --port and --backend-port are both {args.port}", file=sys.stderr)
        return 2
    # Refuse at once, before starting anything, when a port is taken; the real binds below
    # report a port taken in the meantime the same way.
    for port, role in ((args.port, "gateway"), (args.backend_port, "backend")):
        exc = _port_in_use(port)
        if exc is not None:
            print(_port_message(port, exc, role), file=sys.stderr, flush=True)
            return 1
    # Until the gateway installs its own handlers, SIGINT/SIGTERM abort the start (and the
    # backend started so far is stopped).
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    interrupted: list[int] = []

    def on_early_signal(signum):
        interrupted.append(signum)
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_early_signal, sig)
    try:
        return await _demo_run(args, loop)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print(f"fastgw demo: {signal.Signals(interrupted[0]).name} before the gateway was up; stopped",
              file=sys.stderr, flush=True)
        return 128 + interrupted[0]


async def _demo_run(args, loop) -> int:
    proc, result = await _start_backend(args.backend_port)
    if proc is None:
        print(result, file=sys.stderr, flush=True)
        return 1
    backend_port = result
    # From here the backend is our child and it listens on backend_port: the gateway can never
    # be pointed at another process holding that port.
    print(f"fastgw demo: echo backend on ws://{DEMO_HOST}:{backend_port} (pid {proc.pid})",
          file=sys.stderr, flush=True)
    stop = loop.create_future()
    backend_died = False

    async def watch_backend():
        nonlocal backend_died
        await proc.wait()
        if not stop.done():
            backend_died = True
            rc = proc.returncode
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            print(f"fastgw demo: the echo backend {how}; stopping", file=sys.stderr, flush=True)
            stop.set_result("backend exited")

    def ready(addresses):
        scheme, host, port = addresses[0]
        print(f"fastgw demo: try   {_client_command()} client {scheme}://{host}:{port}/echo",
              file=sys.stderr, flush=True)

    watcher = loop.create_task(watch_backend())
    forwarder = loop.create_task(_forward_stderr(proc))
    try:
        config = demo_config(args.port, backend_port)
        drain = float(args.drain_time if args.drain_time is not None else config.drain_time)
        status = await _serve(config, drain, None, stop=stop, ready=ready,
                              listen_error=lambda exc: _port_message(args.port, exc, "gateway"))
    finally:
        watcher.cancel()
        await _stop_backend(proc)
        await forwarder
    return 1 if backend_died else status


def cmd_demo(args) -> int:
    """Run the bundled echo backend and the gateway on the bundled example."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="fastgw: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastgw.picows").setLevel(logging.ERROR)
    run = loop_runner(None)
    sys.setswitchinterval(0.0005)
    try:
        return run(_demo(args))
    except KeyboardInterrupt:       # a second Ctrl-C during the drain
        return 130


def cmd_client(args) -> int:
    from fastgw.client import main as client_main
    return client_main(args)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgw", description="A WebSocket API gateway.")
    p.add_argument("--version", action="version", version=f"fastgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", required=True, help="configuration file (.yaml, .toml, .json)")
    run.add_argument("--log-level", default=os.environ.get("FASTGW_LOG_LEVEL", "warning"),
                     choices=["debug", "info", "warning", "error"])
    run.add_argument("--drain-time", type=float, default=None,
                     help="seconds given to live connections on SIGTERM/SIGINT (default: drain-time of the file)")
    run.add_argument("--loop", choices=LOOPS, default=None,
                     help="the event loop: uvloop (the default) or the standard library's asyncio "
                          "(slower; chosen with a warning when uvloop is not installed)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="run the bundled echo backend behind the gateway")
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo.add_argument("--drain-time", type=float, default=None)
    demo.add_argument("--port", type=_port, default=8080, help="the gateway's port (default 8080)")
    demo.add_argument("--backend-port", type=_port, default=9000,
                      help="the echo backend's port (default 9000)")
    demo.set_defaults(func=cmd_demo)
    client = sub.add_parser(
        "client", help="an interactive WebSocket client: lines from stdin out, messages to stdout",
        description="Lines from stdin go out as text messages; messages received are printed "
                    "on stdout. End of input closes with 1000.")
    client.add_argument("url", help="ws://HOST:PORT/PATH or wss://...")
    client.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="add a request header (repeatable)")
    client.add_argument("--subprotocol", action="append", default=[], metavar="P",
                        help="offer a subprotocol (repeatable, in order of preference)")
    client.add_argument("--insecure", action="store_true",
                        help="wss: do not check the server's certificate")
    client.add_argument("--ca", metavar="FILE", help="wss: trust the CA certificate(s) in FILE (PEM)")
    client.set_defaults(func=cmd_client)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
