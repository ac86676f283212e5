"""The core's request-head parser (head.pxi) against the plain-Python parser it replaced
(hypothesis): for any bytes, the same Request (method, target, version, headers and their
look-ups) or the same 400 reason."""

from __future__ import annotations

import re

from hypothesis import example, given, settings, strategies as st

from fastgw._core import Request, parse_request_head

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def oracle(head: bytes) -> tuple | str:
    """fastgw.http.head.parse_head as it was in Python: (method, target, version, headers),
    or the reason of its 400."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return "malformed request line"
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        return "unsupported HTTP version"
    if not _TOKEN.fullmatch(method):
        return "malformed method"
    if not target.startswith("/"):
        return "request target must be an absolute path"
    if _BAD_TARGET.search(target):
        return "malformed request target"
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name:
            return "malformed header line"
        if not _TOKEN.fullmatch(name):
            return "malformed header name"
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            return "malformed header value"
        headers.append((name.lower(), value))
    return method, target, version, headers


def same(head: bytes) -> None:
    want = oracle(head)
    got = parse_request_head(head)
    if isinstance(want, str):
        assert got == want, head
        return
    assert isinstance(got, Request), (head, got)
    assert (got.method, got.target, got.version, got.headers) == want
    for name in {n for n, _ in want[3]} | {"host", "absent"}:
        values = [v for n, v in want[3] if n == name]
        assert got.get_all(name) == values
        assert got.get(name) == (values[0] if values else None)
        assert got.count(name) == len(values)
        tokens = [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
        assert got.tokens(name) == tokens
    # a Request built from its parts reads the same
    built = Request(*want)
    assert built.headers == got.headers and built.get_all("host") == got.get_all("host")


# Bytes that steer the parser: separators, controls, case, latin-1 beyond ASCII.
_PIECES = [b"GET", b"get", b" ", b"  ", b"/", b"/a?b=c", b"HTTP/1.1", b"HTTP/1.", b"HTTP/2",
           b"\r\n", b"\r", b"\n", b":", b": ", b"\t", b"Host", b"HOST", b"Upgrade",
           b"websocket, Upgrade", b"x", b"\x00", b"\x7f", b"\x80", b"\xff", b"(", b",",
           b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join))
@example(b"")
@example(b"GET / HTTP/1.1")
@example(b"GET / HTTP/1.1\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\n")
@example(b"GET / HTTP/1.1\r\n:x")
@example(b"GET / HTTP/1.1\r\nHost:\t a \t\r\nhost: b,, C ")
@example(b"GET  / HTTP/1.1")
@example(b"GET / HTTP/1.1 ")
@example(b"GET /\r HTTP/1.1")
@example(b"GET / HTTP/1.1\r\r\nA: b")
@example(b"GET / HTTP/1.1\r\nA: b\rc")
@example(b"GET / HTTP/1.1\r\nA: b\nc")
@example(b"GET / HTTP/1.1\r\n" + b"X-Long" * 60 + b": v")   # a name past the 128-byte fast path
def test_pieces(head: bytes) -> None:
    same(head)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(head: bytes) -> None:
    same(head)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="AbZz09-_!~" + "\x80é", min_size=1, max_size=200),
                          st.binary(max_size=40)), max_size=8))
def test_header_lines(lines: list[tuple[str, bytes]]) -> None:
    head = b"GET /p HTTP/1.1" + b"".join(b"\r\n" + n.encode("latin-1") + b":" + v for n, v in lines)
    same(head)
