"""`fastgw client URL`: a small interactive WebSocket client (the ``wscat`` habit).

Every line read from standard input goes out as one TEXT message (the line ending removed);
every message received is printed on standard output, one per line: TEXT as it is (control
characters shown as ``\\xNN`` escapes so that a peer cannot drive the terminal), BINARY as
``[binary N bytes] <hex>``. Diagnostics go to standard error: ``connected: URL`` (with the
subprotocol the server chose, if any), then ``closed: CODE REASON`` when the connection ends.

End of input sends a normal close (1000) and waits for the server's answer. Exit status: 0 after
a close with code 1000, 1 after any other close, a lost connection, a refused upgrade
(``fastgw client: upgrade refused: HTTP 401 Unauthorized: ...``, the status and the first line
of the body the server sent) or a failed connection; 2 for bad arguments; 130/143 after
Ctrl-C/SIGTERM (which also close with 1000 first).

It runs on ``picows.websockets`` (picows' implementation of the ``websockets`` API), which is a
run-time dependency of fastgw already.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

import picows
from multidict import CIMultiDict
from picows import websockets as pws
from picows.url import WSInvalidURL, parse_url

from fastgw import __version__
from fastgw.config.web import HTTP_TOKEN
from fastgw.loops import loop_runner

PROG = "fastgw client"
MAX_MESSAGE = 64 * 1024 * 1024       # bytes; a larger message closes the connection with 1009
OPEN_TIMEOUT = 10.0                  # seconds for TCP, TLS and the upgrade together
CLOSE_TIMEOUT = 5.0                  # seconds to wait for the server's answer to our close
HEX_SHOWN = 1024                     # bytes of a binary message shown as hex

# C0 controls but tab and newline, DEL and C1 controls: shown escaped.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class UsageError(ValueError):
    """A bad argument: reported on one line, exit status 2."""


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` -> ``("Name", "value")``; the name must be an HTTP token."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HTTP_TOKEN.fullmatch(name):
        raise UsageError(f"-H {text!r}: expected 'Name: value' with a header name of letters, "
                         "digits and !#$%&'*+-.^_`|~")
    if any(c in value for c in "\r\n\0"):
        raise UsageError(f"-H {name}: the value may not contain CR, LF or NUL")
    return name, value


def check_subprotocol(name: str) -> str:
    if not HTTP_TOKEN.fullmatch(name):
        raise UsageError(f"--subprotocol {name!r}: a subprotocol is an HTTP token "
                         "(letters, digits and !#$%&'*+-.^_`|~)")
    return name


def check_url(url: str) -> None:
    try:
        parse_url(url)
    except WSInvalidURL as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:           # urllib: a port that is not a number or out of range
        raise UsageError(f"{url}: {exc}") from None


def tls_context(insecure: bool, ca: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca {ca}: {getattr(exc, 'strerror', None) or exc}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def show(message: str | bytes) -> str:
    """One received message as text that is safe to print on a terminal."""
    if isinstance(message, str):
        return _escape(message)
    shown = message[:HEX_SHOWN].hex()
    more = len(message) - HEX_SHOWN
    return f"[binary {len(message)} bytes] {shown}" + (f" ... ({more} more bytes)" if more > 0 else "")


def _body_line(exc: BaseException) -> str:
    """The first line of the body of a refused upgrade: picows keeps the bytes that came in the
    same read as the head (fastgw writes its refusals, head and body, in one write)."""
    cause = exc.__cause__
    body = getattr(cause, "raw_body", None) or b""
    line = body.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    return _escape(line)[:300]


def _refusal(exc: pws.InvalidStatus) -> str:
    status = exc.response.status_code
    phrase = exc.response.reason_phrase
    line = _body_line(exc)
    if line.startswith(f"{status} "):           # fastgw's bodies start with "401 Unauthorized: "
        return f"upgrade refused: HTTP {line}"
    return f"upgrade refused: HTTP {status} {phrase}" + (f": {line}" if line else "")


def _closed_line(exc: pws.ConnectionClosed) -> tuple[str, int]:
    """The ``closed: ...`` line and the exit status it means."""
    rcvd = exc.rcvd
    if rcvd is None:
        return "closed: 1006 (the connection was lost without a close frame)", 1
    code = int(rcvd.code) if rcvd.code is not None else 1005
    reason = rcvd.reason or ""
    text = f"closed: {code} {reason}".rstrip()
    return text, 0 if code == 1000 else 1


class _StdinLines:
    """Lines of a file descriptor, read by a daemon thread (pipes, terminals and plain files
    alike) and handed to the event loop; ``None`` at end of input. The thread waits while
    ``QUEUED`` lines are not sent yet, so a large file is not read into memory at once."""

    QUEUED = 256

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int):
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.room = threading.Semaphore(self.QUEUED)
        self.loop, self.fd = loop, fd
        threading.Thread(target=self._run, name="fastgw-client-stdin", daemon=True).start()

    async def get(self) -> bytes | None:
        item = await self.queue.get()
        self.room.release()
        return item

    def _put(self, item: bytes | None) -> bool:
        self.room.acquire()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:        # the loop is closed: we are exiting
            return False
        return True

    def _run(self) -> None:
        pending = bytearray()
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                if pending:
                    self._put(bytes(pending))
                self._put(None)
                return
            pending += chunk
            if b"\n" not in chunk:
                continue
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                if not self._put(bytes(line)):
                    return


async def session(url: str, headers: Sequence[tuple[str, str]] = (),
                  subprotocols: Sequence[str] = (), tls: ssl.SSLContext | None = None,
                  stdin_fd: int = 0, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one connection; return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr

    def say(text: str) -> None:
        print(text, file=err, flush=True)

    loop = asyncio.get_running_loop()
    extra = CIMultiDict(headers)
    kwargs = {"ssl": tls} if tls is not None and url.lower().startswith("wss:") else {}
    try:
        ws = await pws.connect(
            url, additional_headers=extra, subprotocols=list(subprotocols) or None,
            compression=None, proxy=None, ping_interval=None, open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT, max_size=MAX_MESSAGE,
            user_agent_header=None if "user-agent" in extra else f"fastgw-client/{__version__}",
            logger="fastgw.client", **kwargs)
    except pws.InvalidStatus as exc:
        say(f"{PROG}: {_refusal(exc)}")
        return 1
    except pws.InvalidHandshake as exc:
        say(f"{PROG}: the upgrade failed: {exc or type(exc).__name__}")
        return 1
    except ssl.SSLCertVerificationError as exc:
        say(f"{PROG}: TLS: the server's certificate was not accepted: {exc.verify_message} "
            "(--ca FILE trusts a CA, --insecure skips the check)")
        return 1
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        hint = " (is it a plain ws:// server?)" if exc.reason == "WRONG_VERSION_NUMBER" else ""
        say(f"{PROG}: TLS handshake failed: {reason}{hint}")
        return 1
    except (asyncio.TimeoutError, picows.WSError) as exc:
        detail = str(exc) or f"no answer within {OPEN_TIMEOUT:g} s"
        say(f"{PROG}: cannot connect to {url}: {detail}")
        return 1
    except socket.gaierror as exc:
        say(f"{PROG}: cannot connect to {url}: {exc.strerror or exc}")
        return 1
    except OSError as exc:
        say(f"{PROG}: cannot connect to {url}: {os.strerror(exc.errno) if exc.errno else exc}")
        return 1

    say(f"connected: {url}" + (f" (subprotocol: {ws.subprotocol})" if ws.subprotocol else ""))
    lines = _StdinLines(loop, stdin_fd)
    interrupted: list[int] = []         # the signal(s) received
    reader_gone: list[bool] = []        # stdout's reader went away
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if interrupted:                 # a second Ctrl-C: give up on the close handshake
            assert main_task is not None
            main_task.cancel()
            return
        interrupted.append(signum)
        lines.queue.put_nowait(None)        # wakes send() if it waits for a line

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    async def receive() -> pws.ConnectionClosed:
        printing = True
        while True:
            try:
                message = await ws.recv()
            except pws.ConnectionClosed as exc:
                return exc
            if not printing:
                continue
            try:
                print(show(message), file=out, flush=True)
            except BrokenPipeError:     # `fastgw client URL | head -1`: nobody reads any more
                printing = False
                _silence(out)
                reader_gone.append(True)
                lines.queue.put_nowait(None)

    async def send() -> None:
        warned = False
        while True:
            line = await lines.get()
            if line is None or interrupted or reader_gone:   # end of input, Ctrl-C, or no reader
                await ws.close(1000)
                return
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", "replace")
                if not warned:
                    say(f"{PROG}: input is not UTF-8; invalid bytes are sent as U+FFFD")
                    warned = True
            try:
                await ws.send(text)
            except pws.ConnectionClosed:
                return

    receiver = asyncio.ensure_future(receive())
    sender = asyncio.ensure_future(send())
    try:
        await asyncio.wait([receiver, sender], return_when=asyncio.FIRST_COMPLETED)
        if not sender.done():           # the server closed first
            sender.cancel()
        closed = await receiver
    except asyncio.CancelledError:
        receiver.cancel()
        sender.cancel()
        say("closed: interrupted")
        return 128 + (interrupted[0] if interrupted else signal.SIGINT)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    text, status = _closed_line(closed)
    say(text)
    if interrupted:
        return 128 + interrupted[0]
    return 1 if reader_gone else status


def _silence(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null (no error again at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(args) -> int:
    """`fastgw client` from parsed arguments (see cli.py)."""
    try:
        check_url(args.url)
        headers = [parse_header(h) for h in args.header]
        subprotocols = [check_subprotocol(p) for p in args.subprotocol]
        tls = tls_context(args.insecure, args.ca) if (args.insecure or args.ca) else None
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    run = loop_runner(prog=PROG, option=None)
    try:
        return run(session(args.url, headers, subprotocols, tls))
    except KeyboardInterrupt:           # Ctrl-C before the handlers were installed
        return 130
