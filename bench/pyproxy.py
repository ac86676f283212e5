#!/usr/bin/env python3
"""pyproxy: a plain Python WebSocket reverse proxy, the benchmark's "ordinary Python" baseline.

Written with the ``websockets`` library on the standard asyncio event loop (no uvloop), the way
one would write a small gateway in Python without caring for speed:

* accepts WebSocket connections on ``127.0.0.1:--listen-port``;
* for each client, opens a ``websockets`` client connection to ``--backend`` + the client's
  request path (query string included);
* pumps messages both ways with two tasks, one per direction, a whole message at a time
  (TEXT stays TEXT, BINARY stays BINARY; fragmented messages are reassembled);
* when one side closes, closes the other with the same close code and reason (a CLOSE without
  a code is passed on without a code; a connection lost without a CLOSE is aborted on the
  other side too);
* ``max_size`` 16 MiB, no compression, no keepalive pings; subprotocols and other headers are
  not passed on.

Usage: ``python bench/pyproxy.py --listen-port 9100 --backend ws://127.0.0.1:9000``.
Prints ``pyproxy: listening on ws://127.0.0.1:PORT`` on stderr once it accepts connections
(``--listen-port 0`` picks a free port). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import signal
import sys

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

MAX_SIZE = 16 * 1024 * 1024
CONNECTION_OPTIONS = {"max_size": MAX_SIZE, "compression": None, "ping_interval": None}

NO_STATUS_RCVD = 1005  # a CLOSE that carried no code
ABNORMAL_CLOSURE = 1006  # no CLOSE at all


def _connect_options() -> dict:
    options = dict(CONNECTION_OPTIONS, open_timeout=10)
    # websockets >= 15 would otherwise honour HTTP(S)_PROXY from the environment.
    if "proxy" in inspect.signature(connect.__init__).parameters:
        options["proxy"] = None
    return options


async def forward_close(src, dst) -> None:
    """Closes dst the way src was closed."""
    code, reason = src.close_code, src.close_reason
    if code is None or code == ABNORMAL_CLOSURE:
        dst.transport.abort()
    elif code == NO_STATUS_RCVD:
        await dst.close(None)  # a CLOSE frame without a code
    else:
        await dst.close(code, reason)


async def pump(src, dst) -> None:
    """Sends every message received on src to dst, then passes src's close on to dst."""
    while True:
        try:
            message = await src.recv()
        except ConnectionClosed:
            break
        try:
            await dst.send(message)
        except ConnectionClosed:
            return  # dst is gone: the pump of the other direction passes its close on to src
    await forward_close(src, dst)


class Proxy:
    def __init__(self, backend: str):
        self.backend = backend.rstrip("/")
        self.connect_options = _connect_options()

    async def handle(self, client: ServerConnection) -> None:
        url = self.backend + client.request.path
        try:
            upstream: ClientConnection = await connect(url, **self.connect_options)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the backend
            print(f"pyproxy: cannot connect to {url}: {exc!r}", file=sys.stderr)
            await client.close(1011, "backend unavailable")
            return
        try:
            await asyncio.gather(pump(client, upstream), pump(upstream, client))
        finally:
            if upstream.close_code is None:  # cancelled while still open
                upstream.transport.abort()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--backend", required=True, help="ws://HOST:PORT of the backend")
    args = parser.parse_args(argv)

    proxy = Proxy(args.backend)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async with serve(proxy.handle, args.listen_host, args.listen_port, backlog=1024,
                     **CONNECTION_OPTIONS) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"pyproxy: listening on ws://{args.listen_host}:{port}", file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
