"""Fuzz target: the request head parser and the upgrade checks (routing included).

The input is the bytes a client sends before CRLF CRLF, as `Handshake`
passes them to `parse_head`; a parsed request goes through `check_upgrade`
with a Router compiled from a configuration with host-bound and any-host APIs,
then through what the upgrade does next with a routed request (the backend's
headers and URL). Nothing may escape: a refused head is a returned `Refusal`,
with a documented status, a one-line reason and headers that can be written in
an HTTP answer.

    python tests/fuzz/fuzz_head.py [libFuzzer args]      (or tests/fuzz/run_fuzz.py head)
"""

from __future__ import annotations

import re
import sys

INSTRUMENT = ["fastgw"]

# The statuses README documents for a refused upgrade decided from the head.
STATUSES = {400, 403, 404, 405, 426, 431}

CONFIG = """
listeners:
  - host: 127.0.0.1
    port: 0
apis:
  - name: root
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9/base
  - name: public
    path: /public
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9/
  - name: private
    path: /private
    host: secret.example
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9/p?x=1
  - name: chat
    path: /chat/v1/
    host: chat.example
    assembly:
      - policy: websocket-upgrade
        target-url: ws://[::1]:9/chat
        subprotocols: [chat.v1, chat.v2]
"""

head = forwarding = router = None
_ENCODED_SEP = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")


def setup() -> None:
    global head, forwarding, router
    from fastgw import config, routing
    from fastgw.http import forwarding as f, head as h
    head, forwarding = h, f
    router = routing.compile_config(config.loads(CONFIG, "yaml", "fuzz-head.yaml"))


def _check_refusal(refusal) -> None:
    assert isinstance(refusal, head.Refusal), refusal
    assert refusal.status in STATUSES, (refusal.status, refusal.reason)
    assert isinstance(refusal.reason, str) and refusal.reason, refusal
    assert "\n" not in refusal.reason and "\r" not in refusal.reason, refusal.reason
    assert len(refusal.reason) <= 200, refusal.reason
    for name, value in refusal.headers:
        assert not _BAD_CHARS.search(name) and "\r" not in value and "\n" not in value
    # What Handshake.refuse writes must be encodable.
    answer = head.http_response(refusal.status, refusal.reason, refusal.headers)
    assert answer.startswith(b"HTTP/1.1 %d " % refusal.status)


def _check_routed(req, api, rest, offered) -> None:
    assert api in router.apis
    path, _, query = req.target.partition("?")
    rest_path, sep, rest_query = rest.partition("?")
    assert rest_path == "" or rest_path.startswith("/"), rest
    routed = api.prefix + rest_path
    host = req.get("host")
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    hostname = hostname.strip("[]").lower()
    if api.host is not None:
        assert hostname.rstrip(".") == api.host, (host, api.host)
    # Path and Host normalisation (issue 9, defect 2): what is routed (and sent
    # to the backend) has no dot segments, no empty segments, no encoded '/',
    # '\' or NUL, and its query is the client's.
    segments = routed.split("/")[1:]
    assert "." not in segments and ".." not in segments, routed
    assert "//" not in routed and "\\" not in routed, routed
    assert not _ENCODED_SEP.search(routed), routed
    assert sep == ("?" if "?" in req.target else "") and rest_query == query, (rest, req.target)
    assert path == routed or "%" in path or "/." in path or "//" in path, (path, routed)
    # A Host naming a host-bound API (any case, a port, a trailing dot) is routed
    # to it whenever its prefix fits the path.
    for other in router.apis:
        if other.host is not None and other.host == hostname.rstrip(".") and (
                routed == other.prefix or routed.startswith(other.prefix + "/")):
            assert api.host is not None, (host, routed, api.name)
            break
    allowed = api.upgrade.subprotocols
    for p in offered:
        assert p and "," not in p and p == p.strip()
        assert allowed is None or p in allowed
    # The next steps of the upgrade with a routed request.
    url = api.upgrade.backend_url(rest)
    assert url.startswith("ws://") and not _BAD_CHARS.search(url), url
    for name, value in forwarding.backend_headers(req, "192.0.2.1", False, offered):
        assert name and not _BAD_CHARS.search(name), name
        assert "\r" not in value and "\n" not in value, value


def test_one_input(data: bytes) -> None:
    # Handshake hands parse_head what precedes the first CRLF CRLF.
    req = head.parse_head(data.split(b"\r\n\r\n", 1)[0])
    if not isinstance(req, head.Request):
        _check_refusal(req)
        return
    assert req.target.startswith("/") and not _BAD_CHARS.search(req.target)
    for name, value in req.headers:
        assert name == name.lower() and name and ":" not in name
        assert "\r" not in value and "\n" not in value
    routed = head.check_upgrade(req, router)
    if not isinstance(routed, tuple):
        _check_refusal(routed)
        return
    _check_routed(req, *routed)


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    import fuzzlib
    fuzzlib.main("head", sys.modules[__name__])
