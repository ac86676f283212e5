"""The control channel between the supervisor and one worker process (workers > 1).

One socketpair per worker process, made by the supervisor before the fork. Each message is
one frame: a 4-byte big-endian length, then a msgspec msgpack map. Three kinds:

    {"ask": id, "op": str, "args": {...}}      a request (supervisor -> worker)
    {"re": id, "value": v} / {"re": id, "error": str}    its answer
    {"event": str, ...}                        unasked (worker -> supervisor):
                                               "ready" once listening, "final" (with the
                                               worker's last "snapshot") before a graceful exit

The same `Peer` protocol serves both ends: the worker's has `handlers` (op -> a callable,
sync or async, called with the request's args on the worker's loop), the supervisor's has
`on_event`. `ask` waits for the answer at most ASK_TIMEOUT s (TimeoutError), and raises
ConnectionError once the other end is gone, ControlError for an error answer. Nothing here
is on the frame path: a few messages per second per worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket

import msgspec

log = logging.getLogger("fastgw")

__all__ = ["ASK_TIMEOUT", "ControlError", "Peer", "connect"]

ASK_TIMEOUT = 2.0
# A frame larger than this is a bug (or not our peer): the channel is closed.
MAX_FRAME = 256 << 20

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class ControlError(Exception):
    """The other end answered a request with an error (its text)."""


class Peer(asyncio.Protocol):
    """One end of a control channel (see the module's docstring)."""

    def __init__(self, handlers: dict | None = None, on_event=None, on_lost=None):
        self.handlers = handlers or {}
        self.on_event = on_event             # on_event(message: dict)
        self.on_lost = on_lost               # on_lost(), once, when the channel ends
        self.transport = None
        self.closed = False
        self._buf = bytearray()
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: set = set()

    # ---- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if n > MAX_FRAME:
                log.error("control channel: a frame of %d bytes: closing the channel", n)
                self.transport.abort()
                return
            if len(buf) < 4 + n:
                break
            try:
                message = _decode(buf[4:4 + n])
            except msgspec.DecodeError as exc:
                log.error("control channel: undecodable frame (%s): closing the channel", exc)
                self.transport.abort()
                return
            del buf[:4 + n]
            self._message(message)

    def connection_lost(self, exc) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the control channel is closed"))
        self._pending.clear()
        if self.on_lost is not None:
            self.on_lost()

    # ---- messages ------------------------------------------------------------

    def _message(self, message: dict) -> None:
        if "re" in message:
            fut = self._pending.pop(message["re"], None)
            if fut is None or fut.done():
                return                       # answered after its time-out
            if "error" in message:
                fut.set_exception(ControlError(message["error"]))
            else:
                fut.set_result(message.get("value"))
        elif "ask" in message:
            self._serve(message["ask"], message.get("op"), message.get("args") or {})
        elif "event" in message and self.on_event is not None:
            self.on_event(message)

    def _serve(self, ask_id: int, op, args: dict) -> None:
        handler = self.handlers.get(op)
        if handler is None:
            self._answer(ask_id, error=f"unknown op {op!r}")
            return
        try:
            result = handler(**args)
        except Exception as exc:
            log.exception("control channel: op %r failed", op)
            self._answer(ask_id, error=f"{type(exc).__name__}: {exc}")
            return
        if not inspect.isawaitable(result):
            self._answer(ask_id, value=result)
            return
        task = asyncio.ensure_future(result)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._answered(ask_id, op, t))

    def _answered(self, ask_id: int, op, task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._answer(ask_id, error="cancelled")
        elif task.exception() is not None:
            exc = task.exception()
            log.error("control channel: op %r failed: %r", op, exc)
            self._answer(ask_id, error=f"{type(exc).__name__}: {exc}")
        else:
            self._answer(ask_id, value=task.result())

    def _answer(self, ask_id: int, value=None, error: str | None = None) -> None:
        if error is not None:
            self.send({"re": ask_id, "error": error})
        else:
            self.send({"re": ask_id, "value": value})

    def send(self, message: dict) -> None:
        """Send one message (dropped once the channel is closed)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        payload = _encode(message)
        self.transport.write(len(payload).to_bytes(4, "big") + payload)

    def event(self, name: str, **fields) -> None:
        """An unasked message: {"event": name, **fields}."""
        self.send({"event": name, **fields})

    async def ask(self, op: str, timeout: float = ASK_TIMEOUT, **args):
        """Ask the other end for `op(**args)`; its answer."""
        if self.closed:
            raise ConnectionError("the control channel is closed")
        self._ids += 1
        ask_id = self._ids
        fut = asyncio.get_running_loop().create_future()
        self._pending[ask_id] = fut
        self.send({"ask": ask_id, "op": op, "args": args})
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(ask_id, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(sock: socket.socket, **peer_args) -> Peer:
    """A Peer on one end of a socketpair, on the running loop."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    _, peer = await loop.connect_accepted_socket(lambda: Peer(**peer_args), sock)
    return peer
