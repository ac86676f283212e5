#!/usr/bin/env python3
"""Write the hand-written seed inputs (tests/fuzz/corpus/<target>/seed-*).

    python tests/fuzz/make_seeds.py

The head seeds are request heads; the config seeds are texts followed by the
mode byte the target reads last (atheris' FuzzedDataProvider takes integers
from the end of the input). The frames and identity targets read structured
scripts: their corpus comes from fuzzing runs (run_fuzz.py --update-corpus).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head(target="/public/x", host="example.com", extra=(), method="GET", version="HTTP/1.1",
         upgrade=True) -> bytes:
    lines = [f"{method} {target} {version}", f"Host: {host}"] if host is not None \
        else [f"{method} {target} {version}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
                  "Sec-WebSocket-Version: 13"]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HEAD = {
    "upgrade": head(),
    "upgrade-query": head("/public/x?api_key=k&a=%20"),
    "root": head("/"),
    "private": head("/private/x", "secret.example"),
    "private-case": head("/private", "Secret.EXAMPLE"),
    "private-trailing-dot": head("/private", "secret.example."),
    "private-port": head("/private", "secret.example:8443"),
    "ipv6-host": head("/x", "[::1]:80"),
    "chat-subprotocols": head("/chat/v1/room", "chat.example",
                              ["Sec-WebSocket-Protocol: chat.v2, bogus , chat.v1", "Origin: https://a"]),
    "dot-dot": head("/public/../private"),
    "dot-dot-encoded": head("/public/%2e%2e/private"),
    "dot-dot-mixed": head("/public/.%2E/private"),
    "encoded-slash": head("/public/..%2fprivate"),
    "encoded-backslash": head("/public/..%5Cprivate"),
    "dot-then-dot-dot": head("/public/./../private"),
    "double-slash": head("//x"),
    "double-slash-inner": head("/public//x"),
    "climb-above-root": head("/../../etc"),
    "encoded-nul": head("/public/%00"),
    "percent-unreserved": head("/%70ublic/%7Euser"),
    "bad-percent": head("/public/%zz%"),
    "no-host": head(host=None),
    "two-hosts": head(extra=["Host: other.example"]),
    "empty-host": head(host=""),
    "duplicate-content-length": head(extra=["Content-Length: 0", "Content-Length: 5"]),
    "content-length": head(extra=["Content-Length: 5"]),
    "transfer-encoding": head(extra=["Transfer-Encoding: chunked"]),
    "two-keys": head(extra=[f"Sec-WebSocket-Key: {KEY}"]),
    "two-versions": head(extra=["Sec-WebSocket-Version: 13"]),
    "bad-key": head(extra=[]).replace(KEY.encode(), b"not base64!!"),
    "short-key": head().replace(KEY.encode(), b"AAAA"),
    "version-8": head().replace(b"Version: 13", b"Version: 8"),
    "no-upgrade": head(upgrade=False),
    "upgrade-list": head().replace(b"Upgrade: websocket", b"Upgrade: h2c, WebSocket"),
    "connection-list": head().replace(b"Connection: Upgrade", b"Connection: keep-alive, upgrade"),
    "post": head(method="POST"),
    "http10": head(version="HTTP/1.0"),
    "http2": head(version="HTTP/2.0"),
    "absolute-uri": head("http://example.com/public"),
    "asterisk": head("*"),
    "obs-fold": head(extra=["X-A: a", " continued"]),
    "space-before-colon": head(extra=["X-A : a"]),
    "no-colon": head(extra=["X-A"]),
    "nul-in-value": head(extra=["X-A: a\x00b"]),
    "tab-in-value": head(extra=["X-A: a\tb"]),
    "high-bytes": head(extra=["X-A: \xe9\xff"]),
    "lf-only": head().replace(b"\r\n", b"\n"),
    "xff-forwarded": head(extra=["X-Forwarded-For: 1.2.3.4, [::1]:80", "Forwarded: for=1.2.3.4",
                                 "X-Real-IP: 9.9.9.9"]),
    "hop-by-hop": head(extra=["Connection: x-secret", "X-Secret: 1", "Keep-Alive: 5", "TE: trailers"]),
    "long-header": head(extra=["X-Long: " + "a" * 3000]),
    "control-in-target": head("/public/a\x01b"),
    "extra-space-request-line": b"GET  /public HTTP/1.1\r\nHost: a\r\n\r\n",
    "empty": b"",
    "only-crlf": b"\r\n\r\n",
}

DEMO = {
    "listeners": [{"host": "127.0.0.1", "port": 8080}],
    "apis": [{"name": "echo", "path": "/echo", "assembly": [
        {"policy": "rate-limit", "key": "client-ip", "rate": "10/s", "burst": 20},
        {"policy": "websocket-upgrade", "target-url": "ws://127.0.0.1:9000/"}]}],
}

CONFIG_TEXT = {
    # mode byte: 0 YAML, 1 TOML, 2 JSON, 3-5 the structured mutator in those formats
    "yaml-demo": ((HERE.parents[1] / "src" / "fastgw" / "examples" / "demo.yaml").read_text(), 0),
    "json-demo": (json.dumps(DEMO), 2),
    "toml-demo": ('[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n[[apis]]\nname = "echo"\n'
                  'path = "/echo"\n[[apis.assembly]]\npolicy = "websocket-upgrade"\n'
                  'target-url = "ws://127.0.0.1:9000/"\n', 1),
    "yaml-deep-flow": ("a: " + "[" * 1200, 0),
    "yaml-deep-block": ("".join(" " * i + "- \n" for i in range(600)), 0),
    "json-deep": ("[" * 1200, 2),
    "json-deep-object": ('{"a":' * 1200, 2),
    "toml-deep": ("a = " + "[" * 1200, 1),
    "toml-deep-inline": ("a = " + "{b = " * 600, 1),
    "yaml-control-char": ("a: b\x0bc\n", 0),
    "yaml-tab-indent": ("listeners:\n\t- host: x\n", 0),
    "yaml-duplicate-key": ("listeners: []\nlisteners: []\n", 0),
    "yaml-alias-loop": ("a: &x [*x]\n", 0),
    "yaml-laughs": ("plans: " + "".join(f"&a{n} [" for n in range(9)) + "lol" + "]" * 9 + "\n", 0),
    "yaml-long-key": ("x" * 5000 + ": 1\n", 0),
    "yaml-newline-key": ('"a\\nb": 1\n', 0),
    "yaml-huge-duration": ("listeners: [{host: 127.0.0.1, port: 1}]\nhandshake-timeout: 1e300\n", 0),
    "yaml-bad-enum": ("listeners: [{host: 127.0.0.1, port: 1}]\napis: [{name: a, path: /, assembly: "
                      "[{policy: count-limt}]}]\n", 0),
    "yaml-dev-null-file": ("clients-file: /dev/null\n", 0),
    "yaml-binary-tag": ("a: !!binary AAAA\nb: !!python/object:os.system {}\n", 0),
    "json-duplicate": ('{"listeners": [], "listeners": []}', 2),
    "json-nan": ('{"max-header-size": NaN, "handshake-timeout": 1e999}', 2),
    "toml-bad": ("a = \n", 1),
    "toml-dates": ("handshake-timeout = 1979-05-27T07:32:00Z\n", 1),
    "utf8-bom": ("\ufefflisteners: []\n", 0),
    "mutate-yaml": ("", 3),
    "mutate-toml": ("", 4),
    "mutate-json": ("", 5),
}


def write(target: str, name: str, data: bytes) -> None:
    path = CORPUS / target / f"seed-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main() -> int:
    for name, data in HEAD.items():
        write("head", name, data)
    for name, (text, mode) in CONFIG_TEXT.items():
        write("config", name, text.encode("utf-8") + bytes([mode]))
    write("config", "not-utf8", b"a: \xff\xfe\n" + bytes([0]))
    print(f"seeds written under {CORPUS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
