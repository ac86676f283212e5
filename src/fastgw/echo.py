"""A fast WebSocket echo backend: the bundled demo and benchmark target.

Run it with ``python -m fastgw.echo --port 9000`` or, from tests, ``await serve("127.0.0.1", 0)``.

Behaviour:

* TEXT, BINARY and CONTINUATION frames come back unchanged: same opcode, same fin bit, same
  payload, so a fragmented message comes back fragmented the same way.
* PING is answered with a PONG carrying the same payload (picows' auto-pong is switched off so
  that the PONG joins the coalesced write below, in order with the echoes).
* CLOSE is answered with the same close code and reason (1000 if the client's CLOSE carried no
  code), then the connection is closed.
* All frames parsed from one socket read are encoded into one buffer and written with one
  ``transport.write()`` when picows marks the frame ``last_in_buffer``: one system call per read
  instead of one per frame.
* A request path containing ``/headers`` makes the first message after the 101 a TEXT JSON object
  ``{"method", "path", "headers": {lowercased name: value}, "raw_headers": [[name, value], ...]}``
  so that gateway tests can see which headers and which path reached the backend.
* ``--subprotocols a,b``: the first subprotocol offered by the client that is in this list is
  chosen and answered in the 101.

It uses uvloop's own transports (``use_aiofastnet=False``): see DESIGN.md. Where uvloop cannot
be imported, ``main()`` runs on the standard library's loop after one warning line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import struct
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fastgw.loops import loop_runner

__all__ = ["EchoListener", "serve", "server_port", "close_connections", "live_listeners", "main"]

log = logging.getLogger("fastgw.echo")

# Opcodes as plain ints: comparing picows' enum objects is slower than comparing ints, and
# ``frame.msg_type`` already costs an enum construction per access (read it once per frame).
_CONT = int(WSMsgType.CONTINUATION)
_TEXT = int(WSMsgType.TEXT)
_BINARY = int(WSMsgType.BINARY)
_CLOSE = int(WSMsgType.CLOSE)
_PING = int(WSMsgType.PING)
_PONG = int(WSMsgType.PONG)

_FIN = 0x80
_HDR16 = struct.Struct("!BBH")
_HDR64 = struct.Struct("!BBQ")
# Two-byte headers for payloads < 126 bytes, indexed by (byte0 << 7) | length: avoids building a
# header object per small frame. byte0 is at most 0x8F, so 0x90 * 128 entries.
_HDR_SMALL = [bytes((i >> 7, i & 0x7F)) for i in range(0x90 << 7)]

# Payloads above this size are copied out of picows' read buffer through a memoryview (one copy
# into the output buffer); smaller ones through bytes (cheaper to create than a memoryview).
_MV_THRESHOLD = 2048

# Live listeners per server started by serve() (uvloop's Server takes no attributes).
_LIVE: weakref.WeakKeyDictionary[asyncio.Server, set[EchoListener]] = weakref.WeakKeyDictionary()

_NO_STATUS = 1005  # RFC 6455: "no status code was present"; never sent on the wire


def _header(byte0: int, n: int) -> bytes:
    """Unmasked (server to client) frame header for a payload of n bytes."""
    if n < 126:
        return _HDR_SMALL[(byte0 << 7) | n]
    if n < 65536:
        return _HDR16.pack(byte0, 126, n)
    return _HDR64.pack(byte0, 127, n)


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A whole unmasked frame (server side), for messages the server originates."""
    return _header((_FIN if fin else 0) | opcode, len(payload)) + payload


def _offered_subprotocols(headers: Any) -> list[str]:
    offered: list[str] = []
    for value in headers.getall("Sec-WebSocket-Protocol", ()):
        for item in value.split(","):
            item = item.strip()
            if item:
                offered.append(item)
    return offered


def _headers_report(request: Any) -> bytes:
    raw = [[str(k).lower(), str(v)] for k, v in request.headers.items()]
    merged: dict[str, str] = {}
    for k, v in raw:
        merged[k] = f"{merged[k]}, {v}" if k in merged else v
    report = {
        "method": request.method.decode("latin-1"),
        "path": request.path.decode("latin-1"),
        "headers": merged,
        "raw_headers": raw,
    }
    return json.dumps(report).encode()


class EchoListener(WSListener):  # type: ignore[misc]
    """Echoes every data frame; one write per socket read."""

    def __init__(self, hello: bytes | None = None, registry: set[EchoListener] | None = None):
        super().__init__()
        self.hello = hello
        self.registry = registry
        self.transport: WSTransport | None = None
        self.write: Any = None
        self.out = bytearray()
        self.closing = False

    # -- connection lifecycle -------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write
        if self.registry is not None:
            self.registry.add(self)
        if self.hello is not None:
            try:
                self.write(encode_frame(_TEXT, self.hello))
            except Exception:  # pragma: no cover - transport already gone
                log.exception("echo: could not send the /headers report")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.registry is not None:
            self.registry.discard(self)

    # Flow control: when our writes back up, stop reading until the peer catches up. (The
    # default implementations log a warning on every call.)
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.underlying_transport.resume_reading()

    # -- frames ---------------------------------------------------------------------------
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # Must never raise: picows would answer with close 1011 and log a traceback.
        # The data path is written out inline: a function call costs ~0.15 µs here.
        try:
            mt = frame.msg_type
            if mt <= _BINARY and not self.closing:  # CONTINUATION, TEXT, BINARY
                n = frame.payload_size
                byte0 = (mt | _FIN) if frame.fin else mt
                out = self.out
                if n < 126:
                    out += _HDR_SMALL[(byte0 << 7) | n]
                    out += frame.get_payload_as_bytes()
                else:
                    out += _HDR16.pack(byte0, 126, n) if n < 65536 else _HDR64.pack(byte0, 127, n)
                    if n > _MV_THRESHOLD:
                        out += frame.get_payload_as_memoryview()
                    else:
                        out += frame.get_payload_as_bytes()
                if frame.last_in_buffer:
                    # Hand the buffer over and start a new one: uvloop keeps a memoryview of
                    # what it could not send at once, so the old buffer must not be reused.
                    self.out = bytearray()
                    self.write(out)
                return
            if self.closing:
                return
            if mt == _PING:
                payload = frame.get_payload_as_bytes()
                self.out += _header(_FIN | _PONG, len(payload))
                self.out += payload
            elif mt == _CLOSE:
                self._on_close(frame)
                return
            # PONG and anything else: ignored.
            if frame.last_in_buffer:
                self._flush()
        except Exception:
            log.exception("echo: error while handling a frame; closing the connection")
            self._abort()

    def _flush(self) -> None:
        out = self.out
        if out:
            self.out = bytearray()  # see on_ws_frame
            self.write(out)

    def _on_close(self, frame: WSFrame) -> None:
        self.closing = True
        if frame.payload_size >= 2:
            code = int(frame.get_close_code())
            reason = frame.get_close_message() or b""
        else:
            code = 1000
            reason = b""
        if code == _NO_STATUS:
            code = 1000
        payload = struct.pack("!H", code) + reason
        self.out += _header(_FIN | _CLOSE, len(payload))
        self.out += payload
        self._flush()
        assert self.transport is not None
        self.transport.disconnect(graceful=True)

    def _abort(self) -> None:
        self.closing = True
        self.out = bytearray()
        try:
            if self.transport is not None:
                self.transport.send_close(WSCloseCode.INTERNAL_ERROR)
                self.transport.disconnect(graceful=True)
        except Exception:  # pragma: no cover
            pass

    def shutdown(self) -> None:
        """Server going away: close 1001 and disconnect."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        try:
            self._flush()
            self.transport.send_close(WSCloseCode.GOING_AWAY, b"server shutdown")
            self.transport.disconnect(graceful=True)
        except Exception:  # pragma: no cover
            pass


def _normalise_subprotocols(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(s.strip() for s in value if s and s.strip())


async def serve(host: str = "127.0.0.1", port: int = 0, **opts: Any) -> asyncio.Server:
    """Start the echo server on the running loop and return the ``asyncio.Server``.

    Options: ``subprotocols`` (list or "a,b"), ``max_frame_size`` (bytes), ``backlog``,
    ``websocket_handshake_timeout``. ``close_connections(server)`` closes the live connections
    (``server.close()`` only stops accepting).
    """
    subprotocols = _normalise_subprotocols(opts.pop("subprotocols", None))
    max_frame_size = int(opts.pop("max_frame_size", None) or 10 * 1024 * 1024)
    backlog = int(opts.pop("backlog", 1024))
    handshake_timeout = opts.pop("websocket_handshake_timeout", 5)
    if opts:
        raise TypeError(f"serve(): unknown options {sorted(opts)}")

    live: set[EchoListener] = set()

    def listener_factory(request: Any) -> Any:
        # An exception here would become an HTTP 500 carrying the exception text.
        try:
            hello = _headers_report(request) if b"/headers" in request.path else None
            listener = EchoListener(hello, live)
            if subprotocols:
                for offered in _offered_subprotocols(request.headers):
                    if offered in subprotocols:
                        response = WSUpgradeResponse.create_101_response(
                            {"Sec-WebSocket-Protocol": offered}
                        )
                        return WSUpgradeResponseWithListener(response, listener)
            return listener
        except Exception:
            log.exception("echo: listener factory failed")
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(500, b"echo: internal error"), None
            )

    server = await ws_create_server(
        listener_factory,
        host,
        port,
        use_aiofastnet=False,
        enable_auto_pong=False,  # we answer PING ourselves, inside the coalesced write
        max_frame_size=max_frame_size,
        websocket_handshake_timeout=handshake_timeout,
        backlog=backlog,
        logger_name="fastgw.echo",
    )
    _LIVE[server] = live
    return server


def live_listeners(server: asyncio.Server) -> set[EchoListener]:
    """The live connections of a server started by :func:`serve`."""
    return _LIVE.get(server, set())


def close_connections(server: asyncio.Server) -> None:
    """Send close 1001 to every live connection of ``server`` and disconnect it."""
    for listener in list(live_listeners(server)):
        listener.shutdown()


def server_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgw.echo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed)")
    p.add_argument("--subprotocols", default=None, help="comma-separated list, e.g. a,b")
    p.add_argument("--max-frame-size", type=int, default=10 * 1024 * 1024, help="bytes")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    server = await serve(
        args.host,
        args.port,
        subprotocols=args.subprotocols,
        max_frame_size=args.max_frame_size,
    )
    host = args.host if ":" not in args.host else f"[{args.host}]"
    print(f"echo: listening on ws://{host}:{server_port(server)}", flush=True)
    await stop.wait()
    server.close()
    close_connections(server)
    # uvloop's wait_closed() does not wait for live connections: give their CLOSE frames a
    # moment to go out and the peers a moment to hang up.
    deadline = loop.time() + 2.0
    while live_listeners(server) and loop.time() < deadline:
        await asyncio.sleep(0.02)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    run = loop_runner(prog="echo", option=None)
    try:
        run(_run(args))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        pass
    except OSError as exc:
        print(f"echo: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
