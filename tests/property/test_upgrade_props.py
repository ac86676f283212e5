"""The core's upgrade checks and backend request (head.pxi: check_request, check_websocket,
backend_headers, upgrade_request) against the plain-Python code they replaced (hypothesis):
for any parsed request, the same refusal (status, reason, headers) or the same subprotocols,
and the same headers and bytes for the backend."""

from __future__ import annotations

import base64
import binascii
import re
from types import SimpleNamespace

from hypothesis import example, given, settings, strategies as st

from fastgw import _core
from fastgw.http.forwarding import backend_headers
from fastgw.identity import forwarded_node

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SINGLE = {"host": "Host", "content-length": "Content-Length",
           "sec-websocket-key": "Sec-WebSocket-Key", "sec-websocket-version": "Sec-WebSocket-Version"}
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
    "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
})


def oracle_request(req):
    """http.head.check_upgrade's checks before routing, as they were in Python."""
    if req.method != "GET":
        return 405, "only GET can be upgraded to a WebSocket", [("Allow", "GET")]
    if req.version != "HTTP/1.1":
        return 400, "HTTP/1.1 is required for a WebSocket upgrade", []
    host = req.get("host")
    if req.count("host") != 1 or not host:
        return 400, "exactly one Host header is required", []
    for name in _SINGLE:
        if req.count(name) > 1:
            return 400, f"duplicate {_SINGLE[name]} header", []
    if req.get("transfer-encoding") is not None or req.get("content-length") not in (None, "0"):
        return 400, "an upgrade request has no body", []
    return None


def oracle_websocket(req, allowed):
    """http.head._check_websocket and http.subprotocols.offered_subprotocols, as they were."""
    if "websocket" not in req.tokens("upgrade") or "upgrade" not in req.tokens("connection"):
        return 426, "this endpoint speaks WebSocket only", [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if req.get_all("sec-websocket-version") != ["13"]:
        return 426, "unsupported Sec-WebSocket-Version", [("Sec-WebSocket-Version", "13")]
    keys = req.get_all("sec-websocket-key")
    try:
        if len(keys) != 1 or len(base64.b64decode(keys[0], validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        return 400, "missing or malformed Sec-WebSocket-Key", []
    offered = []
    for value in req.get_all("sec-websocket-protocol"):
        for p in value.split(","):
            p = p.strip(" \t")
            if not p:
                continue
            if not _TOKEN.fullmatch(p):
                return 400, "malformed Sec-WebSocket-Protocol", []
            offered.append(p)
    if allowed is not None:
        offered = [p for p in offered if p in allowed]
    return offered


def _forwarded_value(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def oracle_headers(req, peer_ip, secure, offered, admission=None, extensions=None):
    """http.forwarding.backend_headers as it was in Python."""
    dropped = set(_NOT_FORWARDED)
    dropped.update(req.tokens("connection"))
    client_ip, trusted = peer_ip, False
    if admission is not None:
        dropped.update(admission.strip_headers)
        client_ip, trusted = admission.client_ip, admission.peer_trusted
    out, xff, forwarded = [], [], []
    for name, value in req.headers:
        if name == "x-forwarded-for":
            xff.append(value)
        elif name == "forwarded":
            forwarded.append(value)
        elif name not in dropped:
            out.append((name, value))
    proto = "https" if secure else "http"
    host = req.get("host") or ""
    xff.append(peer_ip)
    out.append(("X-Forwarded-For", ", ".join(xff)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Real-IP", client_ip))
    element = f"for={forwarded_node(peer_ip)};host={_forwarded_value(host)};proto={proto}"
    out.append(("Forwarded", ", ".join([*forwarded, element] if trusted else [element])))
    if admission is not None:
        out.extend(admission.add_headers)
    if offered:
        out.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
    if extensions:
        out.append(("Sec-WebSocket-Extensions", extensions))
    return out


NAMES = st.sampled_from(["host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                         "sec-websocket-protocol", "content-length", "transfer-encoding",
                         "x-forwarded-for", "forwarded", "x-custom", "keep-alive", "cookie"])
VALUES = st.one_of(
    st.sampled_from(["websocket", "Upgrade", "keep-alive, Upgrade", "13", "0", "12", "",
                     "dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=", "dGhlIHNhbXBsZSBub25jZR==",
                     "AAAAAAAAAAAAAAAAAAAAAA==", "AAAAAAAAAAAAAAAAAAAAAAA=", "chat, superchat",
                     " a ,, b\t", "a b", "example.com", "example.com:8080", 'x"y\\z', "x-custom",
                     "cookie, x-custom"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=30))


@st.composite
def requests(draw):
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=12))
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    return _core.Request(method, "/x?q=1", version, headers)


BASE = [("host", "example.com"), ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]


@settings(max_examples=600, deadline=None)
@given(requests(), st.one_of(st.none(), st.frozensets(st.sampled_from(["chat", "superchat", "a", "b"]))))
@example(_core.Request("GET", "/", "HTTP/1.1", BASE), None)
@example(_core.Request("GET", "/", "HTTP/1.1", BASE + [("sec-websocket-protocol", "chat, b")]),
         frozenset({"chat"}))
def test_checks_are_the_python_ones(req, allowed):
    assert _core.check_request(req) == oracle_request(req)
    assert _core.check_websocket(req, allowed) == oracle_websocket(req, allowed)


@settings(max_examples=300, deadline=None)
@given(requests(), st.booleans(), st.sampled_from(["127.0.0.1", "::1", "not-an-ip"]),
       st.lists(st.sampled_from(["chat", "b"]), max_size=2), st.booleans(),
       st.sampled_from([None, "", "permessage-deflate"]))
def test_backend_headers_and_request_are_the_python_ones(req, secure, peer, offered, admitted, ext):
    admission = None
    if admitted:
        admission = SimpleNamespace(strip_headers=frozenset({"cookie"}), client_ip="10.1.1.1",
                                    peer_trusted=secure, add_headers=(("X-Client-Id", "c1"),))
    want = oracle_headers(req, peer, secure, offered, admission, ext)
    got = backend_headers(req, peer, secure, offered, admission, ext)
    assert got == want
    start = "GET /x HTTP/1.1\r\nHost: b"
    lines = [start, "Sec-WebSocket-Key: k"] + [f"{n}: {v}" for n, v in want]
    assert _core.upgrade_request(start, "k", got) == ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_upgrade_request_refuses_what_latin_1_cannot_carry():
    try:
        _core.upgrade_request("GET / HTTP/1.1", "k", [("X-Client-Id", "\u20ac")])
    except UnicodeEncodeError:
        return
    raise AssertionError("a header beyond latin-1 went out")
