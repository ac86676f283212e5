"""`fastgw run | check | demo`, `fastgw --version`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from importlib import resources

from fastgw import __version__


def _load(path: str):
    from fastgw import config as cfgmod
    return cfgmod.load(path)


def cmd_check(args) -> int:
    from fastgw.config import ConfigError
    try:
        config = _load(args.config)
        from fastgw.policies import compile_config
        compile_config(config)      # builds TLS contexts: catches unreadable keys too
    except ConfigError as exc:
        print(f"fastgw: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fastgw: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(config.apis)} APIs, {len(config.listeners)} listeners)")
    return 0


async def _serve(config, drain_time: float | None, config_path: str) -> int:
    """Run until SIGTERM/SIGINT or `POST /drain?exit=true`; drain_time None: the file's."""
    from fastgw.admin import start_admin
    from fastgw.server import Gateway
    from fastgw.events import EventSink
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
        print(f"fastgw: cannot listen: {exc}", file=sys.stderr)
        return 1
    for scheme, host, port in addresses:
        shown = f"[{host}]" if ":" in host else host
        print(f"fastgw: listening on {scheme}://{shown}:{port}", file=sys.stderr, flush=True)
    if admin is not None:
        print(f"fastgw: admin on {admin.url}", file=sys.stderr, flush=True)
    print(f"fastgw: {gw.capacity_note()}", file=sys.stderr, flush=True)
    interval_log = log_task = None
    if config.histogram_log is not None:
        from fastgw.metrics import IntervalLog
        try:
            interval_log = IntervalLog(gw.metrics, config.histogram_log.path,
                                       float(config.histogram_log.interval))
        except OSError as exc:
            print(f"fastgw: histogram log: {exc}", file=sys.stderr)
            await gw.shutdown(0)
            return 1
        log_task = loop.create_task(interval_log.run())
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
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="fastgw: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastgw.picows").setLevel(logging.ERROR)
    # The file's drain-time is read when the drain begins (a reload may change it).
    drain = float(args.drain_time) if args.drain_time is not None else None
    import uvloop
    # A thread (the event writer) gives the GIL back to the relay's loop within
    # 0.5 ms instead of the default 5 ms.
    sys.setswitchinterval(0.0005)
    try:
        return uvloop.run(_serve(config, drain, args.config))
    except KeyboardInterrupt:       # a second Ctrl-C during the drain
        return 130


def cmd_demo(args) -> int:
    """Run the bundled echo backend and the gateway on the bundled example."""
    example = resources.files("fastgw") / "examples" / "demo.yaml"
    with resources.as_file(example) as path:
        backend = subprocess.Popen([sys.executable, "-m", "fastgw.echo", "--port", "9000"],
                                   stdout=subprocess.DEVNULL)
        print("fastgw demo: echo backend on ws://127.0.0.1:9000 (pid %d)" % backend.pid, file=sys.stderr)
        print("fastgw demo: try   python -m websockets ws://127.0.0.1:8080/echo", file=sys.stderr, flush=True)
        try:
            args.config = str(path)
            return cmd_run(args)
        finally:
            backend.terminate()
            try:
                backend.wait(5)
            except subprocess.TimeoutExpired:
                backend.kill()


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
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="run the bundled echo backend behind the gateway")
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo.add_argument("--drain-time", type=float, default=None)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
