"""The backend's answer to the upgrade, parsed in the core (head.pxi: parse_response_head)
and turned into the handshake's errors (upstream._parse_response)."""

from __future__ import annotations

import pytest

from fastgw._core import parse_response_head
from fastgw.upstream import HandshakeError, _parse_response


def test_status_and_headers():
    head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nCONNECTION:  Upgrade \t\r\n"
            b"Sec-WebSocket-Extensions: a\r\nsec-websocket-extensions: b\r\nX-Empty:\r\n"
            b"X-Latin: caf\xe9")
    assert parse_response_head(head) == (101, {
        "upgrade": "websocket", "connection": "Upgrade", "sec-websocket-extensions": "a, b",
        "x-empty": "", "x-latin": "caf\u00e9"})


@pytest.mark.parametrize("head, status", [
    (b"HTTP/1.1 101", 101),
    (b"HTTP/1.0 503 Service Unavailable", 503),
    (b"HTTP/1.1 200 OK", 200),
    (b"HTTP/1.1 999999999 x", 999999999),
])
def test_status_line(head, status):
    assert parse_response_head(head) == (status, {})
    assert _parse_response(head) == (status, {})


@pytest.mark.parametrize("head", [
    b"", b"HTTP/1.1", b"HTTP/1.1 ", b"HTTP/1.1  101", b"HTTP/2 101", b"http/1.1 101",
    b"HTTP/1.1 10a", b"HTTP/1.1 1234567890", b"HTTP/1.1 \xb2\xb3", b"ICY 200 OK",
    b"HTTP/1.1 -1",
])
def test_malformed_status_line(head):
    assert parse_response_head(head) == "status line"
    with pytest.raises(HandshakeError, match="malformed status line"):
        _parse_response(head)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 101\r\n", b"HTTP/1.1 101\r\nUpgrade websocket", b"HTTP/1.1 101\r\nA: b\r\n\r\nC: d",
])
def test_malformed_header_line(head):
    assert parse_response_head(head) == "header line"
    with pytest.raises(HandshakeError, match="malformed header line"):
        _parse_response(head)


def test_status_line_in_the_error_is_cut():
    with pytest.raises(HandshakeError) as info:
        _parse_response(b"HTTP/1.1 x" + b"y" * 500 + b"\r\nA: b")
    assert len(str(info.value)) < 140 and "yyyy" in str(info.value)
