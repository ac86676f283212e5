"""Fuzz target: the configuration loader, `fastgw.config.loads(text, fmt, name)`.

The first byte picks a mode: arbitrary text as YAML, TOML or JSON; or a
structure-aware mutation of a valid configuration (a value replaced by one of
another type or a fuzzed one, a key added or removed, a list item repeated),
written in one of the three formats. Only `ConfigError` may escape, with a
one-line message of bounded length.

    python tests/fuzz/fuzz_config.py [libFuzzer args]     (or tests/fuzz/run_fuzz.py config)
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

# fastgw and the pure-Python TOML parser; PyYAML's C loader and json's C scanner are native.
INSTRUMENT = ["fastgw", "tomllib"]

FORMATS = ("yaml", "toml", "json")
MAX_MESSAGE = 600

config = msgspec = None
BASE_DIR = None

VALID = {
    "listeners": [{"host": "127.0.0.1", "port": 8080}],
    "max-header-size": "16KiB",
    "handshake-timeout": "5s",
    "trusted-proxies": ["10.0.0.0/8"],
    "limits": {"max-keys": 1000},
    "clients": [
        {"id": "alice", "plan": "gold", "keys": ["alice-key-1"]},
        {"id": "bob", "keys": ["bob-key-1"], "apis": ["chat"]},
    ],
    "plans": ["gold"],
    "apis": [
        {
            "name": "chat",
            "path": "/chat",
            "host": "chat.example",
            "origins": ["https://app.example"],
            "assembly": [
                {"policy": "api-key", "header": "X-API-Key", "query": "api_key"},
                {"policy": "count-limit", "key": "client-id", "max": {"default": 2, "gold": 10}},
                {"policy": "rate-limit", "key": "client-ip", "rate": "10/s", "burst": 5},
                {
                    "policy": "websocket-upgrade",
                    "target-url": "ws://127.0.0.1:9000/ws",
                    "timeout": "2s",
                    "idle-timeout": "60s",
                    "max-message-size": "1MiB",
                    "subprotocols": ["chat.v1"],
                    "request": [
                        {"policy": "message-rate-limit", "name": "msgs", "messages": "100/s",
                         "action": "delay"},
                        {"policy": "message-size-limit", "max": "64KiB"},
                    ],
                },
            ],
        },
        {
            "name": "jwt",
            "path": "/jwt",
            "assembly": [
                {"policy": "jwt", "algorithms": ["HS256"], "secret-env": "FUZZ_JWT_SECRET",
                 "issuer": "me", "leeway": "30s"},
                {"policy": "websocket-upgrade", "target-url": "wss://backend.example/x"},
            ],
        },
    ],
}

# Values a mutation may put anywhere.
ODD_VALUES = [None, True, False, 0, -1, 1, 2**63, -2**63, 1e300, -0.0, 0.5, float("inf"),
              "", " ", "0", "1e300s", "-5s", "0s", "1KiB", "10/s", "0/s", "1/0s", "nan",
              "ws://", "wss://[::1]:0/", "http://x:99999/", "/", "//", "policy", "api-key",
              "é" * 40, "x" * 5000, "\x00", "\n", "$.apis", "[", "{", [], {}, [None], {"": None},
              {"policy": "websocket-upgrade"}, ["a", "a"], "/dev/null", "/etc/hostname",
              "/nonexistent/file.pem", "127.0.0.1", "::1", "0.0.0.0/0"]
KEYS = ["listeners", "apis", "assembly", "policy", "name", "path", "host", "port", "tls",
        "cert", "key", "clients", "clients-file", "keys", "plan", "plans", "limits", "admin",
        "events", "histogram-log", "tls-profiles", "ca", "server-name", "jwks-file",
        "public-key", "secret-file", "secret-env", "algorithms", "target-url", "tls-profile",
        "max-frame-size", "max-message-size", "request", "response", "messages", "bytes",
        "burst", "action", "scope", "max", "rate", "origins", "subprotocols", "unknown-key",
        "max-connections", "max-keys", "metrics", "trusted-proxies", "close-on-expiry"]


VALID_JSON = json.dumps(VALID)


def setup() -> None:
    global config, msgspec, BASE_DIR
    from fastgw import config as c
    import msgspec as m
    config, msgspec = c, m
    # Relative file names resolve here: an empty directory, so no file is found by chance.
    BASE_DIR = tempfile.mkdtemp(prefix="fastgw-fuzz-config-")
    os.environ.setdefault("FUZZ_JWT_SECRET", "0123456789abcdef0123456789abcdef")


def _paths(node, prefix=()):
    """Every (container, key) place in a document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield node, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield node, i
            yield from _paths(v, prefix + (i,))


def _mutate(fdp):
    doc = json.loads(VALID_JSON)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        places = list(_paths(doc))
        container, key = places[fdp.ConsumeIntInRange(0, len(places) - 1)]
        how = fdp.ConsumeIntInRange(0, 6)
        if how == 0:
            container[key] = copy.deepcopy(fdp.PickValueInList(ODD_VALUES))
        elif how == 1:
            container[key] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        elif how == 2:
            container[key] = fdp.ConsumeIntInRange(-2**40, 2**40)
        elif how == 3:
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
        elif how == 4 and isinstance(container, dict):
            container[fdp.PickValueInList(KEYS)] = copy.deepcopy(fdp.PickValueInList(ODD_VALUES))
        elif how == 5 and isinstance(container, list):
            container.append(copy.deepcopy(container[key]))
        else:
            container[key] = fdp.ConsumeRegularFloat()
    return doc


def _encode(doc, fmt):
    if fmt != "toml":
        return json.dumps(doc)      # JSON is YAML's flow style too (raw mode covers the rest)
    try:
        return msgspec.toml.encode(doc).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        return None           # TOML has no null, no heterogeneous arrays in old writers


def test_one_input(data: bytes) -> None:
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 5)
    fmt = FORMATS[mode % 3]
    if mode < 3:
        text = fdp.ConsumeBytes(fdp.remaining_bytes())    # bytes: loads decodes UTF-8 itself
    else:
        text = _encode(_mutate(fdp), fmt)
        if text is None:
            return
    try:
        config.loads(text, fmt, "fuzz." + fmt, base_dir=BASE_DIR)
    except config.ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, repr(message)
        assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:200]!r}..."
        assert exc.message and exc.file == "fuzz." + fmt, exc
        assert exc.line is None or (isinstance(exc.line, int) and exc.line >= 1), exc.line


if __name__ == "__main__":
    import fuzzlib
    fuzzlib.main("config", sys.modules[__name__])
