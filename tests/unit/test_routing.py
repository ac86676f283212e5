"""Routing and request checks without sockets."""

from __future__ import annotations

import pytest

from fastgw import config as cfgmod
from fastgw.http.forwarding import backend_headers
from fastgw.http.head import check_upgrade, parse_head
from fastgw.routing import compile_config
from fastgw.verdicts import Refusal

YAML = """
listeners: [{port: 0}]
apis:
  - name: root
    path: /
    assembly: [{policy: websocket-upgrade, target-url: "ws://root:81/"}]
  - name: quotes
    path: /quotes
    assembly: [{policy: websocket-upgrade, target-url: "ws://q:82/feed?v=1"}]
  - name: quotes-live
    path: /quotes/live/
    assembly: [{policy: websocket-upgrade, target-url: "ws://live:83/"}]
  - name: admin-host
    path: /quotes
    host: Admin.Example
    assembly:
      - {policy: websocket-upgrade, target-url: "wss://a:84/x", subprotocols: [v2]}
"""


@pytest.fixture(scope="module")
def router():
    return compile_config(cfgmod.loads(YAML, "yaml"))


@pytest.mark.parametrize("target, host, api, url", [
    ("/", "gw", "root", "ws://root:81/"),
    ("/other/x?y=2", "gw", "root", "ws://root:81/other/x?y=2"),
    ("/quotes", "gw", "quotes", "ws://q:82/feed?v=1"),
    ("/quotes?sym=IBM", "gw", "quotes", "ws://q:82/feed?v=1&sym=IBM"),
    ("/quotes/ibm", "gw", "quotes", "ws://q:82/feed/ibm?v=1"),
    ("/quotesx", "gw", "root", "ws://root:81/quotesx"),
    ("/quotes/live", "gw", "quotes-live", "ws://live:83/"),
    ("/quotes/live/eur", "gw", "quotes-live", "ws://live:83/eur"),
    ("/quotes/ibm", "admin.example", "admin-host", "wss://a:84/x/ibm"),
])
def test_longest_prefix_and_host(router, target, host, api, url):
    found, rest = router.route(target, host)
    assert found.name == api
    assert found.upgrade.backend_url(rest) == url


def head(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode()


BASE = ["GET /quotes HTTP/1.1", "Host: gw:8080", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]


def test_firefox_style_connection_header_is_accepted(router):
    lines = BASE[:3] + ["Connection: keep-alive, Upgrade"] + BASE[4:]
    api, rest, offered = check_upgrade(parse_head(head(lines)), router)
    assert api.name == "quotes" and rest == "" and offered == []


def test_subprotocol_allowlist(router):
    lines = ["GET /quotes/x HTTP/1.1", "Host: Admin.Example:443"] + BASE[2:] + [
        "Sec-WebSocket-Protocol: v1, v2", "Sec-WebSocket-Protocol: v3"]
    api, _, offered = check_upgrade(parse_head(head(lines)), router)
    assert api.name == "admin-host"
    assert offered == ["v2"]


@pytest.mark.parametrize("change, status", [
    (lambda l: ["POST /quotes HTTP/1.1"] + l[1:], 405),
    (lambda l: [x for x in l if not x.startswith("Upgrade")], 426),
    (lambda l: [x for x in l if not x.startswith("Connection")], 426),
    (lambda l: [x.replace("13", "12") if x.startswith("Sec-WebSocket-Version") else x for x in l], 426),
    (lambda l: [x for x in l if not x.startswith("Sec-WebSocket-Key")], 400),
    (lambda l: [x for x in l if not x.startswith("Host")], 400),
    (lambda l: l + ["Host: again"], 400),
    (lambda l: l + ["Transfer-Encoding: chunked"], 400),
    (lambda l: ["GET /quotes HTTP/1.0"] + l[1:], 400),
])
def test_refusals(router, change, status):
    refusal = check_upgrade(parse_head(head(change(list(BASE)))), router)
    assert isinstance(refusal, Refusal)
    assert refusal.status == status


def test_backend_headers():
    req = parse_head(head(BASE + ["X-Forwarded-For: 1.2.3.4", "Cookie: a=b", "Keep-Alive: 5",
                                  "Sec-WebSocket-Extensions: permessage-deflate", "Connection: X-Secret",
                                  "X-Secret: s"]))
    out = backend_headers(req, "10.0.0.1", True, ["a", "b"])
    names = [k.lower() for k, _ in out]
    assert ("cookie", "a=b") in out
    assert ("X-Forwarded-For", "1.2.3.4, 10.0.0.1") in out
    assert ("X-Forwarded-Proto", "https") in out
    assert ("X-Forwarded-Host", "gw:8080") in out
    assert ("Sec-WebSocket-Protocol", "a, b") in out
    for dropped in ("keep-alive", "sec-websocket-extensions", "x-secret", "sec-websocket-key", "host",
                    "upgrade", "connection"):
        assert dropped not in names
