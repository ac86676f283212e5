"""The request head and the upgrade checks, sans-I/O: bytes in, a verdict out.

`parse_head` turns the bytes before CRLF CRLF into a `Request` or a Refusal (400);
`check_upgrade` routes it and checks that it is a WebSocket upgrade the API accepts
(400, 404, 405, 426). Nothing here opens sockets, reads a clock or raises on hostile
input (tests/fuzz/fuzz_head.py): a later step can move both into Cython as they are.
"""

from __future__ import annotations

import base64
import binascii
import re
from http import HTTPStatus

from fastgw.config.web import HTTP_TOKEN, BadTarget, normalize_host, normalize_target
from fastgw.http.subprotocols import offered_subprotocols
from fastgw.verdicts import Refusal

# Headers that a request may carry once at most (400 otherwise), by lower-case name.
_SINGLE = {"host": "Host", "content-length": "Content-Length",
           "sec-websocket-key": "Sec-WebSocket-Key", "sec-websocket-version": "Sec-WebSocket-Version"}

# Control characters in a target or a field value.
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Request:
    """A parsed HTTP request head."""

    __slots__ = ("method", "target", "version", "headers", "_by_name")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers          # (lower-case name, value), in order
        by_name: dict[str, list[str]] = {}
        for name, value in headers:
            values = by_name.get(name)
            if values is None:
                by_name[name] = [value]
            else:
                values.append(value)
        self._by_name = by_name         # name -> its values, in order (one pass, not one per look-up)

    def get_all(self, name: str) -> list[str]:
        """The values of every header of that (lower-case) name, in order (a new list)."""
        values = self._by_name.get(name)
        return values[:] if values is not None else []

    def get(self, name: str) -> str | None:
        values = self._by_name.get(name)
        return values[0] if values else None

    def count(self, name: str) -> int:
        values = self._by_name.get(name)
        return len(values) if values is not None else 0

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every header of that name, lower-cased."""
        out = []
        for value in self._by_name.get(name, ()):
            out.extend(t.strip().lower() for t in value.split(",") if t.strip())
        return out


def parse_head(head: bytes) -> Request | Refusal:
    """Parse a request head (without the final CRLF CRLF): the Request, or a Refusal (400)."""
    text = head.decode("latin-1")       # decodes any byte
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        return Refusal(400, "unsupported HTTP version")
    if not HTTP_TOKEN.fullmatch(method):
        return Refusal(400, "malformed method")
    if not target.startswith("/"):
        return Refusal(400, "request target must be an absolute path")
    if _BAD_TARGET.search(target):
        return Refusal(400, "malformed request target")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name:
            return Refusal(400, "malformed header line")
        if not HTTP_TOKEN.fullmatch(name):
            return Refusal(400, "malformed header name")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            return Refusal(400, "malformed header value")
        headers.append((name.lower(), value))
    return Request(method, target, version, headers)


def check_upgrade(req: Request, router) -> tuple | Refusal:
    """Validate and route an upgrade request: (api, rest, offered subprotocols), or a
    Refusal (its `api` set once the request is routed). `router` is a routing.Router."""
    if req.method != "GET":
        return Refusal(405, "only GET can be upgraded to a WebSocket", [("Allow", "GET")])
    if req.version != "HTTP/1.1":
        return Refusal(400, "HTTP/1.1 is required for a WebSocket upgrade")
    host = req.get("host")
    if req.count("host") != 1 or not host:
        return Refusal(400, "exactly one Host header is required")
    for name in _SINGLE:
        if req.count(name) > 1:
            return Refusal(400, f"duplicate {_SINGLE[name]} header")
    if req.get("transfer-encoding") is not None or req.get("content-length") not in (None, "0"):
        return Refusal(400, "an upgrade request has no body")
    try:
        target = normalize_target(req.target)
        hostname = normalize_host(host)
    except BadTarget as exc:
        return Refusal(400, str(exc))
    found = router.route(target, hostname)
    if found is None:
        return Refusal(404, "no API at this path")
    api, rest = found
    verdict = _check_websocket(req, api.upgrade.subprotocols)
    if isinstance(verdict, Refusal):
        verdict.api = api.name
        return verdict
    return api, rest, verdict


def _check_websocket(req: Request, allowed: frozenset[str] | None) -> list[str] | Refusal:
    """The WebSocket headers of a routed request: the offered subprotocols it may use."""
    if "websocket" not in req.tokens("upgrade") or "upgrade" not in req.tokens("connection"):
        return Refusal(426, "this endpoint speaks WebSocket only",
                       [("Upgrade", "websocket"), ("Connection", "Upgrade")])
    if req.get_all("sec-websocket-version") != ["13"]:
        return Refusal(426, "unsupported Sec-WebSocket-Version", [("Sec-WebSocket-Version", "13")])
    keys = req.get_all("sec-websocket-key")
    try:
        if len(keys) != 1 or len(base64.b64decode(keys[0], validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        return Refusal(400, "missing or malformed Sec-WebSocket-Key")
    return offered_subprotocols(req.get_all("sec-websocket-protocol"), allowed)


def http_response(status: int, reason: str, headers: list[tuple[str, str]] = ()) -> bytes:
    """A refusal's answer: the status, its headers and one line of text saying why."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode()
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def switching_protocols(accept: str, subprotocol: str | None, extensions: str | None = None) -> bytes:
    """The client's 101, with its Sec-WebSocket-Accept, the backend's subprotocol and
    the extension it accepted (permessage-deflate, http.extensions)."""
    head = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
            "Sec-WebSocket-Accept: " + accept]
    if subprotocol:
        head.append("Sec-WebSocket-Protocol: " + subprotocol)
    if extensions:
        head.append("Sec-WebSocket-Extensions: " + extensions)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
