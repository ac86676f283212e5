"""Tests for fastgw.config: decoding, value types, semantic checks and error messages."""

import json
import os
from pathlib import Path

import pytest

from fastgw.config import (
    Api,
    Config,
    ConfigError,
    Listener,
    ListenerTls,
    Target,
    TlsProfile,
    WebsocketUpgrade,
    load,
    loads,
    parse_target,
)
from fastgw.config.values import parse_duration, parse_size

# The example from the design brief. Line numbers below refer to this text.
EXAMPLE_YAML = """\
listeners:
  - host: 127.0.0.1
    port: 8080
  - host: 0.0.0.0
    port: 8443
    tls: {cert: certs/gateway.pem, key: certs/gateway.key}
tls-profiles:
  backend:
    ca: certs/backend-ca.pem
    server-name: api.internal
    cert: certs/client.pem
    key: certs/client.key
apis:
  - name: quotes
    path: /quotes
    assembly:
      - policy: websocket-upgrade
        target-url: wss://api.internal:9443/quotes
        tls-profile: backend
        timeout: 10s
"""

EXAMPLE_TOML = """\
[[listeners]]
host = "127.0.0.1"
port = 8080

[[listeners]]
host = "0.0.0.0"
port = 8443
tls = { cert = "certs/gateway.pem", key = "certs/gateway.key" }

[tls-profiles.backend]
ca = "certs/backend-ca.pem"
server-name = "api.internal"
cert = "certs/client.pem"
key = "certs/client.key"

[[apis]]
name = "quotes"
path = "/quotes"

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "wss://api.internal:9443/quotes"
tls-profile = "backend"
timeout = "10s"
"""

EXAMPLE_JSON = json.dumps(
    {
        "listeners": [
            {"host": "127.0.0.1", "port": 8080},
            {
                "host": "0.0.0.0",
                "port": 8443,
                "tls": {"cert": "certs/gateway.pem", "key": "certs/gateway.key"},
            },
        ],
        "tls-profiles": {
            "backend": {
                "ca": "certs/backend-ca.pem",
                "server-name": "api.internal",
                "cert": "certs/client.pem",
                "key": "certs/client.key",
            }
        },
        "apis": [
            {
                "name": "quotes",
                "path": "/quotes",
                "assembly": [
                    {
                        "policy": "websocket-upgrade",
                        "target-url": "wss://api.internal:9443/quotes",
                        "tls-profile": "backend",
                        "timeout": 10,
                    }
                ],
            }
        ],
    },
    indent=2,
)

PEM_FILES = [
    "certs/gateway.pem",
    "certs/gateway.key",
    "certs/backend-ca.pem",
    "certs/client.pem",
    "certs/client.key",
]

# A small valid config without files, for tests that change one thing.
MINIMAL_YAML = """\
listeners:
  - port: 8080
apis:
  - name: echo
    path: /echo
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9000/echo
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A directory holding empty placeholder PEM files under certs/."""
    for name in PEM_FILES:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def error_of(text: str, fmt: str = "yaml", name: str = "gw.yaml") -> ConfigError:
    """Decode ``text`` and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        loads(text, fmt, name)
    return info.value


# ---------------------------------------------------------------------------------------------
# Valid configurations
# ---------------------------------------------------------------------------------------------


def test_example_yaml_loads(confdir: Path) -> None:
    config = load(write(confdir, "gateway.yaml", EXAMPLE_YAML))
    certs = str(confdir / "certs")
    assert config == Config(
        listeners=[
            Listener(host="127.0.0.1", port=8080),
            Listener(
                host="0.0.0.0",
                port=8443,
                tls=ListenerTls(cert=f"{certs}/gateway.pem", key=f"{certs}/gateway.key"),
            ),
        ],
        tls_profiles={
            "backend": TlsProfile(
                ca=f"{certs}/backend-ca.pem",
                server_name="api.internal",
                cert=f"{certs}/client.pem",
                key=f"{certs}/client.key",
            )
        },
        apis=[
            Api(
                name="quotes",
                path="/quotes",
                assembly=[
                    WebsocketUpgrade(
                        target_url="wss://api.internal:9443/quotes",
                        tls_profile="backend",
                        timeout=10.0,
                    )
                ],
            )
        ],
    )
    # Defaults.
    assert config.handshake_timeout == 10.0
    assert config.max_header_size == 16384
    assert config.drain_time == 10.0
    assert config.backlog == 1024
    upgrade = config.apis[0].assembly[0]
    assert upgrade.max_frame_size == 4 * 1024 * 1024
    assert upgrade.max_message_size == 16 * 1024 * 1024
    assert upgrade.idle_timeout is None
    assert upgrade.max_lifetime is None
    assert upgrade.subprotocols is None
    assert config.tls_profiles["backend"].verify is True
    assert isinstance(upgrade.timeout, float)
    assert isinstance(upgrade.max_frame_size, int)


def test_same_config_in_yaml_toml_json(confdir: Path) -> None:
    from_yaml = load(write(confdir, "gateway.yml", EXAMPLE_YAML))
    from_toml = load(write(confdir, "gateway.toml", EXAMPLE_TOML))
    from_json = load(write(confdir, "gateway.json", EXAMPLE_JSON))
    assert from_yaml == from_toml
    assert from_yaml == from_json
    assert from_yaml.listeners[1].tls is not None
    assert from_yaml.listeners[1].tls.cert == str(confdir / "certs" / "gateway.pem")


def test_all_options(tmp_path: Path) -> None:
    text = """\
listeners:
  - port: 0
  - port: 0
handshake-timeout: 2.5
max-header-size: 8KiB
drain-time: 1m
backlog: 16
tls-profiles:
  insecure: {verify: false}
apis:
  - name: a
    path: /a
    host: Example.COM
    assembly:
      - policy: websocket-upgrade
        target-url: wss://backend/a
        tls-profile: insecure
        timeout: 250ms
        idle-timeout: 1h
        max-lifetime: 1e3
        max-frame-size: 64KiB
        max-message-size: 1MB
        subprotocols: [graphql-ws, v2.chat]
"""
    config = loads(text, "yaml")
    assert [listener.host for listener in config.listeners] == ["127.0.0.1", "127.0.0.1"]
    assert config.handshake_timeout == 2.5
    assert config.max_header_size == 8192
    assert config.drain_time == 60.0
    assert config.backlog == 16
    assert config.tls_profiles == {"insecure": TlsProfile(verify=False)}
    api = config.apis[0]
    assert api.host == "example.com"  # stored in lower case
    assert api.assembly == [
        WebsocketUpgrade(
            target_url="wss://backend/a",
            tls_profile="insecure",
            timeout=0.25,
            idle_timeout=3600.0,
            max_lifetime=1000.0,
            max_frame_size=65536,
            max_message_size=1_000_000,
            subprotocols=["graphql-ws", "v2.chat"],
        )
    ]


def test_same_path_on_different_hosts_is_fine() -> None:
    text = MINIMAL_YAML + (
        "  - name: echo2\n"
        "    path: /echo\n"
        "    host: a.example\n"
        "    assembly:\n"
        "      - {policy: websocket-upgrade, target-url: 'ws://b:1'}\n"
    )
    config = loads(text, "yaml")
    assert [(api.host, api.path) for api in config.apis] == [(None, "/echo"), ("a.example", "/echo")]


def test_config_is_frozen() -> None:
    config = loads(MINIMAL_YAML, "yaml")
    with pytest.raises(AttributeError):
        config.backlog = 5  # type: ignore[misc]


def test_loads_accepts_bytes() -> None:
    assert loads(MINIMAL_YAML.encode(), "yaml") == loads(MINIMAL_YAML, "yaml")


# ---------------------------------------------------------------------------------------------
# Durations and sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (10, 10.0),
        (1.5, 1.5),
        ("10", 10.0),
        ("1e3", 1000.0),
        ("0.5", 0.5),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("  3 s ", 3.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["ten", "", "-1s", -1, -0.5, True, None, "10 sec", "1d", "inf", float("nan"), [1]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="Invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("512B", 512),
        ("64KiB", 65536),
        ("1MiB", 1048576),
        ("1GiB", 1073741824),
        ("10KB", 10000),
        ("1MB", 1000000),
        ("1GB", 1000000000),
        ("1.5KiB", 1536),
        ("2 MiB", 2097152),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["big", "", "-1", -1, 1.5, True, None, "0.5B", "1kb", "1TiB", "1 MiB/s"]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="Invalid size"):
        parse_size(value)


def test_bad_duration_names_the_field() -> None:
    error = error_of(MINIMAL_YAML + "        timeout: ten\n")
    assert str(error) == (
        "gw.yaml:9: Invalid duration 'ten' (use a number of seconds, or 250ms, 10s, 2m, 1h)"
        " - at `$.apis[0].assembly[0].timeout`"
    )
    assert error.file == "gw.yaml"
    assert error.line == 9
    assert error.path == "$.apis[0].assembly[0].timeout"


def test_bad_size_names_the_field() -> None:
    error = error_of(MINIMAL_YAML + "max-header-size: 16 KiBs\n")
    assert str(error) == (
        "gw.yaml:9: Invalid size '16 KiBs' (use a number of bytes, or 512B, 64KiB, 1MiB, 1GiB,"
        " 10KB, 1MB) - at `$.max-header-size`"
    )


def test_bad_duration_in_toml_has_its_line() -> None:
    text = '[[listeners]]\nport = 1\n\n[histogram-log]\npath = "h"\ninterval = "soon"\n'
    error = error_of(text, "toml", "gw.toml")
    assert str(error) == (
        "gw.toml:6: Invalid duration 'soon' (use a number of seconds, or 250ms, 10s, 2m, 1h)"
        " - at `$.histogram-log.interval`"
    )


# ---------------------------------------------------------------------------------------------
# Errors found by msgspec, with their YAML lines
# ---------------------------------------------------------------------------------------------


def test_unknown_key_points_at_the_key() -> None:
    text = MINIMAL_YAML.replace("  - port: 8080\n", "  - port: 8080\n    bind: all\n")
    error = error_of(text)
    assert str(error) == "gw.yaml:3: Object contains unknown field `bind` - at `$.listeners[0]`"


def test_unknown_key_in_policy() -> None:
    error = error_of(MINIMAL_YAML + "        time-out: 5\n")
    assert str(error) == (
        "gw.yaml:9: Object contains unknown field `time-out` - at `$.apis[0].assembly[0]`"
    )


def test_unknown_top_level_key() -> None:
    error = error_of(MINIMAL_YAML + "worker: 4\n")
    assert str(error) == "gw.yaml:9: Object contains unknown field `worker` - at `$`"


def test_workers_key() -> None:
    assert loads(MINIMAL_YAML, "yaml", "gw.yaml").workers == 1
    assert loads(MINIMAL_YAML + "workers: 4\n", "yaml", "gw.yaml").workers == 4
    assert loads(MINIMAL_YAML + "workers: auto\n", "yaml", "gw.yaml").workers == "auto"
    assert float(loads(MINIMAL_YAML + "worker-heartbeat-timeout: 3s\n", "yaml", "gw.yaml").worker_heartbeat_timeout) == 3.0
    error = error_of(MINIMAL_YAML + "workers: 0\n")
    assert "Expected `int` >= 1" in str(error) and "$.workers" in str(error)
    error = error_of(MINIMAL_YAML + "workers: many\n")
    assert "$.workers" in str(error)


def test_snake_case_key_is_unknown() -> None:
    error = error_of(MINIMAL_YAML + "drain_time: 5\n")
    assert str(error) == "gw.yaml:9: Object contains unknown field `drain_time` - at `$`"


def test_wrong_type() -> None:
    error = error_of(MINIMAL_YAML.replace("port: 8080", "port: '8080'"))
    assert str(error) == "gw.yaml:2: Expected `int`, got `str` - at `$.listeners[0].port`"


def test_value_out_of_range() -> None:
    error = error_of(MINIMAL_YAML.replace("port: 8080", "port: 70000"))
    assert str(error) == "gw.yaml:2: Expected `int` <= 65535 - at `$.listeners[0].port`"
    error = error_of(MINIMAL_YAML + "backlog: 0\n")
    assert str(error) == "gw.yaml:9: Expected `int` >= 1 - at `$.backlog`"


def test_missing_required_field_points_at_the_object() -> None:
    error = error_of(MINIMAL_YAML.replace("    path: /echo\n", ""))
    assert str(error) == "gw.yaml:4: Object missing required field `path` - at `$.apis[0]`"


def test_empty_lists_are_refused() -> None:
    error = error_of(MINIMAL_YAML.replace("listeners:\n  - port: 8080\n", "listeners: []\n"))
    assert str(error) == "gw.yaml:1: Expected `array` of length >= 1 - at `$.listeners`"


def test_policy_key_is_required() -> None:
    text = MINIMAL_YAML.replace(
        "      - policy: websocket-upgrade\n        target-url", "      - target-url"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:7: Object missing required field `policy` - at `$.apis[0].assembly[0]`"
    )


def test_unknown_policy() -> None:
    error = error_of(MINIMAL_YAML.replace("policy: websocket-upgrade", "policy: rate-limitt"))
    assert str(error) == (
        "gw.yaml:7: Invalid value 'rate-limitt' - expected one of: api-key, jwt, count-limit,"
        " rate-limit, websocket-upgrade - at `$.apis[0].assembly[0].policy`"
    )


def test_error_inside_a_tls_profile_names_the_profile() -> None:
    text = MINIMAL_YAML + (
        "tls-profiles:\n"
        "  first: {verify: false}\n"
        "  second:\n"
        "    verify: false\n"
        "    server-name: 42\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:13: Expected `str | null`, got `int` - at `$.tls-profiles.second.server-name`"
    )


def test_non_string_mapping_key() -> None:
    error = error_of(MINIMAL_YAML + "tls-profiles:\n  1: {verify: false}\n")
    assert str(error) == "gw.yaml:9: Expected `str`, got `int` - at `key` in `$.tls-profiles`"


def test_duplicate_yaml_key() -> None:
    text = MINIMAL_YAML.replace("  - port: 8080\n", "  - port: 8080\n    port: 8081\n")
    error = error_of(text)
    assert str(error) == "gw.yaml:3: Duplicate key 'port' - at `$.listeners[0]`"


def test_duplicate_json_key() -> None:
    error = error_of('{"backlog": 1, "backlog": 2}', "json", "gw.json")
    assert str(error) == "gw.json:1: Duplicate key 'backlog' - at `$`"
    error = error_of('{\n "listeners": [\n  {"port": 1,\n   "port": 2}]}', "json", "gw.json")
    assert str(error) == "gw.json:4: Duplicate key 'port' - at `$.listeners[0]`"
    assert error.path == "$.listeners[0]"


def test_json_error_has_path_and_line() -> None:
    data = {
        "listeners": [{"port": 8080}],
        "apis": [{"name": "", "path": "/", "assembly": []}],
    }
    error = error_of(json.dumps(data, indent=2), "json", "gw.json")
    assert str(error) == "gw.json:9: Expected `str` of length >= 1 - at `$.apis[0].name`"
    assert error.line == 9


# ---------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://x", "scheme must be ws or wss (http and https mean ws and wss)"),
        ("x:9000", "scheme must be ws or wss (http and https mean ws and wss)"),
        ("ws://", "missing host"),
        ("ws://:9000/a", "missing host"),
        ("ws://h:99999", "Port out of range 0-65535"),
        ("ws://h:0", "port 0"),
        ("ws://u:p@h", "user names and passwords are not supported"),
        ("ws://h/a#frag", "fragments are not allowed"),
        ("ws://h/a b", "contains whitespace or control characters"),
    ],
)
def test_bad_target_url(url: str, reason: str) -> None:
    error = error_of(MINIMAL_YAML.replace("ws://127.0.0.1:9000/echo", f"'{url}'"))
    assert str(error) == (
        f"gw.yaml:8: Invalid target URL {url!r} ({reason})"
        " - at `$.apis[0].assembly[0].target-url`"
    )


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("ws://h", Target("ws", "h", 80, "/", False)),
        ("wss://h", Target("wss", "h", 443, "/", True)),
        ("wss://API.Internal:9443/quotes", Target("wss", "api.internal", 9443, "/quotes", True)),
        ("ws://h:81/a/b?x=1&y=2", Target("ws", "h", 81, "/a/b?x=1&y=2", False)),
        ("ws://h?x=1", Target("ws", "h", 80, "/?x=1", False)),
        ("WS://h/", Target("ws", "h", 80, "/", False)),
        ("ws://[::1]:9000/", Target("ws", "::1", 9000, "/", False)),
    ],
)
def test_parse_target(url: str, target: Target) -> None:
    assert parse_target(url) == target


def test_unknown_tls_profile() -> None:
    text = (
        MINIMAL_YAML.replace("ws://127.0.0.1", "wss://127.0.0.1")
        + "        tls-profile: foo\n"
        + "tls-profiles:\n  backend: {}\n  other: {}\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:9: Unknown tls-profile 'foo' (known: backend, other)"
        " - at `$.apis[0].assembly[0].tls-profile`"
    )


def test_tls_profile_without_any_profiles() -> None:
    text = MINIMAL_YAML.replace("ws://127.0.0.1", "wss://127.0.0.1") + "        tls-profile: foo\n"
    assert "Unknown tls-profile 'foo' (known: none)" in str(error_of(text))


def test_tls_profile_on_plain_ws_target() -> None:
    text = MINIMAL_YAML + "        tls-profile: backend\n" + "tls-profiles:\n  backend: {}\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:9: tls-profile 'backend' needs a wss:// target-url"
        " - at `$.apis[0].assembly[0].tls-profile`"
    )


def test_tls_profile_needs_cert_and_key_together() -> None:
    text = MINIMAL_YAML + "tls-profiles:\n  mtls:\n    cert: client.pem\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:10: A TLS profile needs both cert and key, or neither (key is missing)"
        " - at `$.tls-profiles.mtls`"
    )


def test_websocket_upgrade_must_be_last() -> None:
    text = MINIMAL_YAML + "      - {policy: websocket-upgrade, target-url: 'ws://other'}\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:7: websocket-upgrade must be the last policy of the assembly"
        " - at `$.apis[0].assembly[0]`"
    )


def test_websocket_upgrade_missing() -> None:
    text = MINIMAL_YAML.split("      - policy")[0].replace("    assembly:\n", "    assembly: []\n")
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:6: The assembly must end with a websocket-upgrade policy"
        " - at `$.apis[0].assembly`"
    )


def test_duplicate_api_name() -> None:
    text = MINIMAL_YAML + (
        "  - name: echo\n"
        "    path: /other\n"
        "    assembly: [{policy: websocket-upgrade, target-url: 'ws://b'}]\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:9: Duplicate API name 'echo' (same as `$.apis[0]`) - at `$.apis[1].name`"
    )


def test_duplicate_route() -> None:
    text = MINIMAL_YAML.replace("    path: /echo\n", "    path: /echo\n    host: A.example\n") + (
        "  - name: echo2\n"
        "    host: a.EXAMPLE\n"
        "    path: /echo\n"
        "    assembly: [{policy: websocket-upgrade, target-url: 'ws://b'}]\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:12: Duplicate route (host 'a.example', path '/echo') (same as `$.apis[0]`)"
        " - at `$.apis[1].path`"
    )


def test_path_must_start_with_slash() -> None:
    error = error_of(MINIMAL_YAML.replace("path: /echo", "path: echo"))
    assert str(error) == "gw.yaml:5: Invalid path 'echo' (must start with '/') - at `$.apis[0].path`"


def test_duplicate_listener() -> None:
    text = MINIMAL_YAML.replace(
        "  - port: 8080\n", "  - port: 8080\n  - {port: 0}\n  - {port: 0}\n  - host: 127.0.0.1\n    port: 8080\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:5: Duplicate listener 127.0.0.1:8080 (same as `$.listeners[0]`)"
        " - at `$.listeners[3]`"
    )


def test_same_port_on_other_host_is_fine() -> None:
    text = MINIMAL_YAML.replace("  - port: 8080\n", "  - port: 8080\n  - {host: 10.0.0.1, port: 8080}\n")
    assert len(loads(text, "yaml").listeners) == 2


def test_bad_subprotocol() -> None:
    error = error_of(MINIMAL_YAML + "        subprotocols: [chat, 'bad name']\n")
    assert str(error) == (
        "gw.yaml:9: Invalid subprotocol 'bad name' (must be an HTTP token)"
        " - at `$.apis[0].assembly[0].subprotocols[1]`"
    )


# ---------------------------------------------------------------------------------------------
# Files referenced by the configuration
# ---------------------------------------------------------------------------------------------


def test_missing_certificate_file(confdir: Path) -> None:
    (confdir / "certs" / "gateway.key").unlink()
    path = write(confdir, "gateway.yaml", EXAMPLE_YAML)
    with pytest.raises(ConfigError) as info:
        load(path)
    resolved = confdir / "certs" / "gateway.key"
    assert str(info.value) == (
        f"{path}:6: Cannot read file 'certs/gateway.key' ({resolved}): No such file or directory"
        " - at `$.listeners[1].tls.key`"
    )


def test_missing_tls_profile_file(confdir: Path) -> None:
    (confdir / "certs" / "backend-ca.pem").unlink()
    path = write(confdir, "gateway.yaml", EXAMPLE_YAML)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == 9
    assert info.value.path == "$.tls-profiles.backend.ca"
    assert "Cannot read file 'certs/backend-ca.pem'" in info.value.message


@pytest.mark.parametrize("text, path", [
    ('{"listeners": [], "listeners": []}\x02ners": []}', "$"),   # found by fuzz_config.py
    ('[{"a": 1, "a": 2}], ]', "$[0]"),
    ('{"a": {"b": 1, "b": 2}, abc: 1}', "$.a"),
    ('{"a": {"b": 1, "b": 2}, "\\q": 1}', "$.a"),
])
def test_json_duplicate_key_before_text_that_is_not_json(text: str, path: str) -> None:
    # json.loads stops at the duplicate; the scan for its line must not read on into the rest.
    with pytest.raises(ConfigError) as info:
        loads(text, "json", "x.json")
    assert info.value.message.startswith("Duplicate key") and info.value.path == path


def test_nul_in_a_file_name_is_a_config_error(tmp_path: Path) -> None:
    # Found by tests/fuzz/fuzz_config.py: open() raised ValueError ("embedded null byte").
    text = MINIMAL_YAML + 'clients-file: "clients\\0.yaml"\n'
    with pytest.raises(ConfigError) as info:
        loads(text, "yaml", "x.yaml", base_dir=str(tmp_path))
    assert "NUL in the file name" in info.value.message
    assert info.value.path == "$.clients-file"


def test_directory_is_not_a_readable_file(confdir: Path) -> None:
    path = write(confdir, "gateway.yaml", EXAMPLE_YAML.replace("certs/backend-ca.pem", "certs"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == 9
    assert "Is a directory" in info.value.message


def test_relative_paths_resolve_against_the_config_file(confdir: Path, tmp_path_factory) -> None:
    # Load from another working directory, through a relative and a nested path.
    (confdir / "etc").mkdir()
    text = EXAMPLE_YAML.replace("certs/", "../certs/").replace(
        "key: ../certs/client.key", f"key: {confdir / 'certs' / 'client.key'}"
    )
    path = write(confdir / "etc", "gateway.yaml", text)
    elsewhere = tmp_path_factory.mktemp("cwd")
    old_cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        config = load(os.path.relpath(path, elsewhere))
    finally:
        os.chdir(old_cwd)
    certs = str(confdir / "certs")
    assert config.listeners[1].tls == ListenerTls(
        cert=f"{certs}/gateway.pem", key=f"{certs}/gateway.key"
    )
    profile = config.tls_profiles["backend"]
    assert (profile.ca, profile.cert, profile.key) == (
        f"{certs}/backend-ca.pem",
        f"{certs}/client.pem",
        f"{certs}/client.key",  # absolute in the file, kept as is
    )


def test_loads_resolves_against_cwd(confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(confdir)
    config = loads(EXAMPLE_YAML, "yaml")
    assert config.tls_profiles["backend"].ca == str(confdir / "certs" / "backend-ca.pem")


def test_loads_base_dir(confdir: Path) -> None:
    config = loads(EXAMPLE_TOML, "toml", base_dir=str(confdir))
    assert config.listeners[1].tls is not None
    assert config.listeners[1].tls.cert == str(confdir / "certs" / "gateway.pem")


# ---------------------------------------------------------------------------------------------
# Problems with the file itself
# ---------------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: Cannot read the configuration: No such file or directory"


def test_unknown_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.ini", MINIMAL_YAML)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"{path}: Unknown configuration file type ('.ini'; use .yaml, .yml, .toml or .json)"
    )


def test_unknown_format_in_loads() -> None:
    assert str(error_of("", "ini", "x")) == (
        "x: Unknown configuration format 'ini' (use yaml, toml or json)"
    )


@pytest.mark.parametrize(
    ("fmt", "text"), [("yaml", ""), ("yaml", "# only a comment\n"), ("yaml", "---\n"), ("toml", "\n"), ("json", " ")]
)
def test_empty_file(fmt: str, text: str) -> None:
    assert str(error_of(text, fmt, "gw")) == "gw: The configuration is empty"


def test_top_level_must_be_a_mapping() -> None:
    error = error_of("\n- port: 1\n")
    assert str(error) == "gw.yaml:2: The top level must be a mapping of settings, not a list"
    error = error_of('"hello"', "json", "gw.json")
    assert str(error) == "gw.json:1: The top level must be a mapping of settings, not a str"


def test_yaml_syntax_error() -> None:
    text = MINIMAL_YAML.replace("    path: /echo\n", "    path: /echo\n   oops: [\n")
    error = error_of(text)
    assert error.line == 6
    assert str(error).startswith("gw.yaml:6: Invalid YAML: ")


def test_yaml_syntax_error_message() -> None:
    error = error_of("listeners:\n  - port: 1\n    host: a: b\n")
    # libyaml ends the sentence with "in this context", PyYAML with "here".
    assert str(error).startswith("gw.yaml:3: Invalid YAML: mapping values are not allowed ")


def test_toml_syntax_error() -> None:
    error = error_of("backlog = 1\nlisteners = ]\n", "toml", "gw.toml")
    assert str(error) == "gw.toml:2: Invalid TOML: Invalid value (column 13)"
    error = error_of("backlog = 1\nlisteners = [\n", "toml", "gw.toml")
    assert str(error) == "gw.toml:2: Invalid TOML: Invalid value (at end of document)"


def test_json_syntax_error() -> None:
    error = error_of('{\n  "backlog": 1,\n  "apis": ]\n}', "json", "gw.json")
    assert str(error) == "gw.json:3: Invalid JSON: Expecting value (column 11)"


def test_invalid_utf8() -> None:
    error = error_of(b"backlog: 1\n\xff\n", "yaml", "gw.yaml")
    assert str(error) == "gw.yaml:2: Not valid UTF-8 (byte 11)"


def test_config_error_pickles() -> None:
    import pickle

    error = error_of(MINIMAL_YAML + "backlog: 0\n")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.file, copy.line, copy.path) == ("gw.yaml", 9, "$.backlog")
