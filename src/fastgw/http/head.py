"""The request head and the upgrade checks, sans-I/O: bytes in, a verdict out.

`parse_head` turns the bytes before CRLF CRLF into a `Request` or a Refusal (400)
(the parsing itself is in the core, head.pxi); `check_upgrade` routes it and checks that it is a WebSocket upgrade the API accepts
(400, 404, 405, 426). Nothing here opens sockets, reads a clock or raises on hostile
input (tests/fuzz/fuzz_head.py).
"""

from __future__ import annotations

from http import HTTPStatus

from fastgw import _core
from fastgw.config.web import BadTarget, normalize_host, normalize_target
from fastgw.verdicts import Refusal

# The request head is parsed in the core (head.pxi) in one pass over its bytes;
# tests/property/test_head_props.py holds it to a plain-Python parser, input for input.
Request = _core.Request


def parse_head(head: bytes) -> Request | Refusal:
    """Parse a request head (without the final CRLF CRLF): the Request, or a Refusal (400)."""
    req = _core.parse_request_head(head)
    if type(req) is str:
        return Refusal(400, req)
    return req


def check_upgrade(req: Request, router) -> tuple | Refusal:
    """Validate and route an upgrade request: (api, rest, offered subprotocols), or a
    Refusal (its `api` set once the request is routed). `router` is a routing.Router.
    The checks of the headers are in the core (head.pxi: check_request, check_websocket)."""
    verdict = _core.check_request(req)
    if verdict is not None:
        return Refusal(*verdict)
    try:
        target = normalize_target(req.target)
        hostname = normalize_host(req.get("host"))
    except BadTarget as exc:
        return Refusal(400, str(exc))
    found = router.route(target, hostname)
    if found is None:
        return Refusal(404, "no API at this path")
    api, rest = found
    verdict = _core.check_websocket(req, api.upgrade.subprotocols)
    if type(verdict) is tuple:
        refusal = Refusal(*verdict)
        refusal.api = api.name
        return refusal
    return api, rest, verdict


def http_response(status: int, reason: str, headers: list[tuple[str, str]] = ()) -> bytes:
    """A refusal's answer: the status, its headers and one line of text saying why."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode()
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: ")


def switching_protocols(accept: str, subprotocol: str | None, extensions: str | None = None) -> bytes:
    """The client's 101, with its Sec-WebSocket-Accept, the backend's subprotocol and
    the extension it accepted (permessage-deflate, http.extensions)."""
    if not subprotocol and not extensions:
        return _101 + accept.encode("latin-1") + b"\r\n\r\n"
    head = [accept]
    if subprotocol:
        head.append("Sec-WebSocket-Protocol: " + subprotocol)
    if extensions:
        head.append("Sec-WebSocket-Extensions: " + extensions)
    return _101 + ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
