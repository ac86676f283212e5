"""Configurations that cannot work are refused by the loader (and so by `fastgw check`), with
``file:line: message - at `$.path` `` in every format; enum errors list the allowed values."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastgw.config import ConfigError, load, loads
from fastgw.config.values import MAX_DURATION, parse_duration

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

# The same configuration with an api-key policy (line 7) and clients (from line 10).
API_KEY_YAML = """\
listeners:
  - port: 8080
apis:
  - name: echo
    path: /echo
    assembly:
      - policy: api-key
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9000/echo
"""


def error_of(text: str, fmt: str = "yaml", name: str = "gw.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, fmt, name)
    return info.value


# ---------------------------------------------------------------------------------------------
# Settings no client could work with
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "512", "1023", "1000B"])
def test_max_header_size_too_small(value: str) -> None:
    error = error_of(MINIMAL_YAML + f"max-header-size: {value}\n")
    assert str(error) == (
        "gw.yaml:9: max-header-size must be at least 1KiB (1024 bytes): a smaller one cannot"
        " hold a WebSocket upgrade request - at `$.max-header-size`"
    )
    assert error.path == "$.max-header-size"


def test_max_header_size_of_1kib_is_fine() -> None:
    assert loads(MINIMAL_YAML + "max-header-size: 1KiB\n", "yaml").max_header_size == 1024


@pytest.mark.parametrize("value", ["0", "0ms", "0.0"])
def test_handshake_timeout_zero(value: str) -> None:
    error = error_of(MINIMAL_YAML + f"handshake-timeout: {value}\n")
    assert str(error) == (
        "gw.yaml:9: handshake-timeout must be greater than 0 - at `$.handshake-timeout`"
    )


def test_histogram_interval_zero() -> None:
    error = error_of(MINIMAL_YAML + "histogram-log: {path: h.hlog, interval: 0}\n")
    assert str(error) == (
        "gw.yaml:9: interval must be greater than 0 - at `$.histogram-log.interval`"
    )


def test_zero_where_it_means_something() -> None:
    """drain-time 0 (close at once), reload-grace 0 (close a removed API's connections at
    once) and jwt leeway 0 (no clock skew) are meaningful."""
    config = loads(MINIMAL_YAML + "drain-time: 0\nreload-grace: 0s\n", "yaml")
    assert (config.drain_time, config.reload_grace) == (0.0, 0.0)


# Every Duration field, as a line to append to MINIMAL_YAML (with its $.path).
DURATION_FIELDS = [
    ("handshake-timeout: {}\n", "$.handshake-timeout", 9),
    ("drain-time: {}\n", "$.drain-time", 9),
    ("reload-grace: {}\n", "$.reload-grace", 9),
    ("histogram-log: {{path: h.hlog, interval: {}}}\n", "$.histogram-log.interval", 9),
    ("        timeout: {}\n", "$.apis[0].assembly[0].timeout", 9),
    ("        idle-timeout: {}\n", "$.apis[0].assembly[0].idle-timeout", 9),
    ("        max-lifetime: {}\n", "$.apis[0].assembly[0].max-lifetime", 9),
]


@pytest.mark.parametrize(("line", "path", "line_number"), DURATION_FIELDS)
@pytest.mark.parametrize("value", ["1e300", "'1e300'", "1e300s", "8761h", "31536001", ".inf"])
def test_durations_are_bounded(line: str, path: str, line_number: int, value: str) -> None:
    error = error_of(MINIMAL_YAML + line.format(value))
    assert error.path == path
    assert error.line == line_number
    assert "must be finite and at most 365 days: 8760h" in error.message


@pytest.mark.parametrize("value", [".nan", "-.inf"])
def test_durations_are_finite(value: str) -> None:
    error = error_of(MINIMAL_YAML + f"drain-time: {value}\n")
    assert error.path == "$.drain-time"
    assert error.message.startswith("Invalid duration")


def test_jwt_leeway_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTGW_TEST_SECRET", "s3cret")
    text = MINIMAL_YAML.replace(
        "      - policy: websocket-upgrade\n",
        "      - {policy: jwt, algorithms: [HS256], secret-env: FASTGW_TEST_SECRET,"
        " leeway: 1e300}\n      - policy: websocket-upgrade\n",
    )
    error = error_of(text)
    assert error.path == "$.apis[0].assembly[0].leeway"
    assert error.line == 7


def test_the_longest_duration() -> None:
    assert MAX_DURATION == 365 * 86400
    assert parse_duration("8760h") == MAX_DURATION
    config = loads(MINIMAL_YAML + "        idle-timeout: 8760h\n", "yaml")
    assert config.apis[0].assembly[0].idle_timeout == MAX_DURATION


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("json", '{"drain-time": NaN, "listeners": [{"port": 1}]}'),
        ("json", '{"drain-time": Infinity, "listeners": [{"port": 1}]}'),
        ("json", '{"drain-time": 1e300, "listeners": [{"port": 1}]}'),
        ("toml", "drain-time = nan\n"),
        ("toml", "drain-time = inf\n"),
        ("toml", "drain-time = 1e300\n"),
    ],
)
def test_durations_bounded_in_json_and_toml(fmt: str, text: str) -> None:
    error = error_of(text, fmt, f"gw.{fmt}")
    assert (error.line, error.path) == (1, "$.drain-time")
    assert error.message.startswith("Invalid duration")


# ---------------------------------------------------------------------------------------------
# api-key policies without clients
# ---------------------------------------------------------------------------------------------


def test_api_key_without_clients() -> None:
    error = error_of(API_KEY_YAML)
    assert str(error) == (
        "gw.yaml:7: An api-key policy needs clients, and there are none (give clients, or a"
        " clients-file that holds some) - at `$.apis[0].assembly[0]`"
    )


def test_api_key_with_an_empty_clients_file(tmp_path: Path) -> None:
    (tmp_path / "clients.yaml").write_text("# nobody yet\n")
    (tmp_path / "gw.yaml").write_text(API_KEY_YAML + "clients-file: clients.yaml\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "gw.yaml")
    assert (info.value.line, info.value.path) == (7, "$.apis[0].assembly[0]")
    assert "An api-key policy needs clients" in info.value.message


def test_api_key_clients_from_the_clients_file_count(tmp_path: Path) -> None:
    (tmp_path / "clients.yaml").write_text("- {id: alice, key: alice-key}\n")
    (tmp_path / "gw.yaml").write_text(API_KEY_YAML + "clients-file: clients.yaml\n")
    assert [client.id for client in load(tmp_path / "gw.yaml").clients] == ["alice"]


def test_api_key_no_client_may_use_the_api() -> None:
    text = API_KEY_YAML + (
        "  - name: other\n"
        "    path: /other\n"
        "    assembly:\n"
        "      - policy: websocket-upgrade\n"
        "        target-url: ws://127.0.0.1:9000/other\n"
        "clients:\n"
        "  - {id: alice, key: a, apis: [other]}\n"
        "  - {id: bob, key: b, apis: [other]}\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:7: No client may use the API 'echo': the apis of every client name other APIs"
        " (add 'echo' to a client's apis) - at `$.apis[0].assembly[0]`"
    )
    # One client that may use it is enough.
    text = text.replace("{id: bob, key: b, apis: [other]}", "{id: bob, key: b, apis: [echo]}")
    assert len(loads(text, "yaml").clients) == 2


# ---------------------------------------------------------------------------------------------
# Listeners and the admin API on one address
# ---------------------------------------------------------------------------------------------


def listeners_yaml(*addresses: tuple[str, int], admin: str | None = None) -> str:
    text = "listeners:\n" + "".join(
        f"  - {{host: '{host}', port: {port}}}\n" for host, port in addresses
    )
    text += MINIMAL_YAML[MINIMAL_YAML.index("apis:") :]
    if admin is not None:
        text += f"admin: {admin}\n"
    return text


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("::", "::1"),
        ("[::]", "::1"),
        ("0.0.0.0", "gateway.example"),
        ("localhost", "127.0.0.1"),
        ("::", "localhost"),
    ],
)
def test_listeners_that_overlap(first: str, second: str) -> None:
    error = error_of(listeners_yaml((first, 8080), (second, 8080)))
    assert str(error) == (
        f"gw.yaml:3: Listener {second}:8080 overlaps {first}:8080 (`$.listeners[0]`):"
        " a wildcard address takes the port on every address - at `$.listeners[1]`"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("::", "0:0::0"),
        ("LocalHost", "localhost"),
    ],
)
def test_listeners_on_the_same_address(first: str, second: str) -> None:
    error = error_of(listeners_yaml(("127.0.0.2", 8080), (first, 8081), (second, 8081)))
    assert str(error) == (
        f"gw.yaml:4: Duplicate listener {second}:8081 (same as `$.listeners[1]`)"
        " - at `$.listeners[2]`"
    )


@pytest.mark.parametrize(
    "addresses",
    [
        (("0.0.0.0", 8080), ("::", 8080)),  # dual stack: IPv6 sockets are IPv6-only
        (("127.0.0.1", 8080), ("127.0.0.2", 8080)),
        (("::", 8080), ("127.0.0.1", 8080)),
        (("0.0.0.0", 0), ("127.0.0.1", 0)),  # port 0 picks a free port
        (("127.0.0.1", 0), ("127.0.0.1", 0)),
        (("0.0.0.0", 8080), ("0.0.0.0", 8081)),
    ],
)
def test_listeners_that_do_not_overlap(addresses: tuple[tuple[str, int], ...]) -> None:
    assert len(loads(listeners_yaml(*addresses), "yaml").listeners) == len(addresses)


@pytest.mark.parametrize(
    ("listener", "admin"),
    [
        ("127.0.0.1", "{port: 8080}"),
        ("0.0.0.0", "{host: 127.0.0.1, port: 8080}"),
        ("127.0.0.1", "{host: 0.0.0.0, port: 8080, token-env: FASTGW_TEST_ADMIN_TOKEN}"),
        ("::1", "{host: localhost, port: 8080}"),
    ],
)
def test_admin_on_a_listener_port(
    listener: str, admin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTGW_TEST_ADMIN_TOKEN", "t0ken")
    error = error_of(listeners_yaml(("127.0.0.2", 8081), (listener, 8080), admin=admin))
    assert error.path == "$.admin.port"
    assert error.line == 10
    assert error.message.startswith("The admin API ")
    assert f"and the listener {listener}:8080 (`$.listeners[1]`) cannot share a port" in (
        error.message
    )


def test_admin_default_port_on_a_listener() -> None:
    error = error_of(listeners_yaml(("127.0.0.1", 9901), admin="{}"))
    assert str(error) == (
        "gw.yaml:9: The admin API 127.0.0.1:9901 and the listener 127.0.0.1:9901"
        " (`$.listeners[0]`) cannot share a port - at `$.admin.port`"
    )


@pytest.mark.parametrize(
    ("listener", "admin"),
    [
        (("127.0.0.1", 8080), "{port: 9901}"),
        (("127.0.0.2", 8080), "{host: 127.0.0.1, port: 8080}"),
        (("0.0.0.0", 0), "{port: 0}"),
        (("::", 8080), "{host: 127.0.0.1, port: 8080}"),
    ],
)
def test_admin_apart_from_listeners(listener: tuple[str, int], admin: str) -> None:
    assert loads(listeners_yaml(listener, admin=admin), "yaml").admin is not None


# ---------------------------------------------------------------------------------------------
# Enum errors list the allowed values
# ---------------------------------------------------------------------------------------------


def test_unknown_policy_lists_the_pre_upgrade_policies() -> None:
    error = error_of(MINIMAL_YAML.replace("policy: websocket-upgrade", "policy: count-limt"))
    assert str(error) == (
        "gw.yaml:7: Invalid value 'count-limt' - expected one of: api-key, jwt, count-limit,"
        " rate-limit, websocket-upgrade - at `$.apis[0].assembly[0].policy`"
    )


def test_unknown_message_policy_lists_the_message_policies() -> None:
    text = MINIMAL_YAML + "        response:\n          - {policy: rate-limt}\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:10: Invalid value 'rate-limt' - expected one of: message-rate-limit,"
        " message-size-limit - at `$.apis[0].assembly[0].response[0].policy`"
    )


def test_misplaced_policies_still_say_where_they_belong() -> None:
    text = MINIMAL_YAML + "        request:\n          - {policy: count-limit, key: api, max: 1}\n"
    assert "runs before the upgrade" in error_of(text).message


@pytest.mark.parametrize(
    ("policy", "path", "choices"),
    [
        ("{policy: count-limit, key: ip, max: 1}", "key", "client-ip, client-id, api, global"),
        ("{policy: rate-limit, key: 7, rate: 1/s}", "key", "client-ip, client-id, api, global"),
        (
            "{policy: jwt, algorithms: [RS256, HS512], public-key: k.pem}",
            "algorithms[1]",
            "HS256, RS256, ES256",
        ),
    ],
)
def test_enum_errors_in_the_assembly(policy: str, path: str, choices: str) -> None:
    text = MINIMAL_YAML.replace(
        "      - policy: websocket-upgrade\n",
        f"      - {policy}\n      - policy: websocket-upgrade\n",
    )
    error = error_of(text)
    assert error.path == f"$.apis[0].assembly[0].{path}"
    assert error.message.endswith(f" - expected one of: {choices} - at `{error.path}`")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("action", "close", "Invalid value 'close' - expected one of: reject, delay, drop"),
        ("action", "5", "Expected `str`, got `int` - expected one of: reject, delay, drop"),
        ("scope", "global", "Invalid value 'global' - expected one of: connection, client, api"),
    ],
)
def test_enum_errors_in_a_flow(field: str, value: str, message: str) -> None:
    text = MINIMAL_YAML + (
        "        request:\n"
        f"          - {{policy: message-rate-limit, messages: 1/s, {field}: {value}}}\n"
    )
    error = error_of(text)
    assert str(error) == f"gw.yaml:10: {message} - at `$.apis[0].assembly[0].request[0].{field}`"


def test_enum_errors_in_toml_and_json() -> None:
    toml = (
        "[[listeners]]\nport = 8080\n\n[[apis]]\nname = 'echo'\npath = '/echo'\n\n"
        "[[apis.assembly]]\npolicy = 'count-limt'\n"
    )
    error = error_of(toml, "toml", "gw.toml")
    assert str(error) == (
        "gw.toml:9: Invalid value 'count-limt' - expected one of: api-key, jwt, count-limit,"
        " rate-limit, websocket-upgrade - at `$.apis[0].assembly[0].policy`"
    )
    data = {
        "listeners": [{"port": 8080}],
        "apis": [
            {
                "name": "echo",
                "path": "/echo",
                "assembly": [{"policy": "count-limit", "key": "user", "max": 1}],
            }
        ],
    }
    error = error_of(json.dumps(data, indent=2), "json", "gw.json")
    assert str(error) == (
        "gw.json:14: Invalid value 'user' - expected one of: client-ip, client-id, api, global"
        " - at `$.apis[0].assembly[0].key`"
    )


# ---------------------------------------------------------------------------------------------
# Lines of TOML and JSON errors
# ---------------------------------------------------------------------------------------------

TOML = """\
# A gateway
[[listeners]]
port = 8080

[[apis]]
name = "first"
path = "/first"

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "ws://127.0.0.1:9000"

[[apis]]
name = "second"
path = "/second"
origins = [
  "https://a.example",
  "https://b.example",
]

[[apis.assembly]]
policy = "count-limit"
key = "api"
max = 1

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "ws://127.0.0.1:9000"
request = [
  { policy = "message-size-limit", max = "1KiB" },
  { policy = "message-rate-limit", messages = "1/s" },
]

[tls-profiles."my backend"]
verify = false
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "path"),
    [
        ('port = 8080', 'port = "8080"', 3, "$.listeners[0].port"),
        ('path = "/first"', 'path = "first"', 7, "$.apis[0].path"),
        ('target-url = "ws://127.0.0.1:9000"\n\n', 'target-url = "ftp://x"\n\n', 11,
         "$.apis[0].assembly[0].target-url"),
        ('"https://b.example"', '"https://b.example/x"', 18, "$.apis[1].origins[1]"),
        ('max = 1\n', 'max = 0\n', 24, "$.apis[1].assembly[0].max"),
        ('key = "api"', 'key = "api"\nburst = 3', 24, "$.apis[1].assembly[0]"),
        ('max = "1KiB"', 'max = "1KiBs"', 30, "$.apis[1].assembly[1].request[0].max"),
        ('messages = "1/s"', 'messages = "1/s", burst = 0', 31,
         "$.apis[1].assembly[1].request[1].burst"),
        ("verify = false", "verify = 1", 35, "$.tls-profiles.my backend.verify"),
        ("verify = false", "verify = false\n'cert' = 'c.pem'", 34, "$.tls-profiles.my backend"),
    ],
)
def test_toml_errors_carry_the_line(old: str, new: str, line: int, path: str) -> None:
    assert loads(TOML, "toml", "gw.toml").apis[1].name == "second"
    assert TOML.count(old) == 1
    error = error_of(TOML.replace(old, new), "toml", "gw.toml")
    assert (error.line, error.path) == (line, path), str(error)
    assert str(error).startswith(f"gw.toml:{line}: ")


def test_toml_unknown_key_points_at_the_key() -> None:
    text = TOML.replace('name = "second"', 'name = "second"\nhots = "x"')
    error = error_of(text, "toml", "gw.toml")
    assert str(error) == "gw.toml:15: Object contains unknown field `hots` - at `$.apis[1]`"


def test_toml_inline_table_keys_have_their_line() -> None:
    text = "plans = ['gold']\n" + TOML.replace("max = 1\n", "max = { default = 1, gold = 0 }\n")
    error = error_of(text, "toml", "gw.toml")
    assert (error.line, error.path) == (25, "$.apis[1].assembly[0].max.gold")


def test_unmapped_paths_fall_back_to_the_nearest_parent() -> None:
    from fastgw.config.parsers import PARSERS

    _, line_of = PARSERS["toml"](TOML, "gw.toml")
    assert line_of(("apis", 1, "assembly", 0, "no-such-key", 3)) == 21  # its [[header]]
    assert line_of(("apis", 7)) == 5
    assert line_of(("nothing",)) == 2  # the first line after the comment
    _, line_of = PARSERS["json"](JSON_TEXT, "gw.json")
    assert line_of(("apis", 0, "assembly", 1, "request", 5)) == 12
    assert line_of(("tls-profiles", "other", "ca")) == 17


JSON_TEXT = """\
{
  "listeners": [{"port": 8080}, {"port": 8081}],
  "apis": [
    {
      "name": "echo",
      "path": "/echo",
      "assembly": [
        {"policy": "count-limit", "key": "api", "max": 1},
        {
          "policy": "websocket-upgrade",
          "target-url": "ws://127.0.0.1:9000",
          "request": [{"policy": "message-size-limit", "max": "1KiB"}]
        }
      ]
    }
  ],
  "tls-profiles": {"a \\"b\\"": {"verify": false}}
}
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "path"),
    [
        ('{"port": 8081}', '{"port": -1}', 2, "$.listeners[1].port"),
        ('"path": "/echo"', '"path": "echo"', 6, "$.apis[0].path"),
        ('"max": 1}', '"max": 0}', 8, "$.apis[0].assembly[0].max"),
        ('"max": "1KiB"', '"max": "1 KiBs"', 12, "$.apis[0].assembly[1].request[0].max"),
        ('"max": "1KiB"', '"max": "1KiB", "x": 1', 12, "$.apis[0].assembly[1].request[0]"),
        ('{"verify": false}', '{"verify": 0}', 17, '$.tls-profiles.a "b".verify'),
        ('"name": "echo",\n', '', 4, "$.apis[0]"),
        ('"listeners"', '"listener"', 2, "$"),
    ],
)
def test_json_errors_carry_the_line(old: str, new: str, line: int, path: str) -> None:
    assert loads(JSON_TEXT, "json", "gw.json").apis[0].name == "echo"
    assert JSON_TEXT.count(old) == 1
    error = error_of(JSON_TEXT.replace(old, new), "json", "gw.json")
    assert (error.line, error.path) == (line, path), str(error)
    assert str(error).startswith(f"gw.json:{line}: ")


def test_json_missing_top_level_field_is_at_line_1() -> None:
    error = error_of('\n\n{"listeners": [{"port": 1}]}', "json", "gw.json")
    assert str(error) == "gw.json:3: Object missing required field `apis` - at `$`"


def test_clients_file_in_json_carries_the_line(tmp_path: Path) -> None:
    (tmp_path / "clients.json").write_text('[\n  {"id": "a", "key": "k"},\n  {"id": "b"}\n]\n')
    (tmp_path / "gw.yaml").write_text(API_KEY_YAML + "clients-file: clients.json\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "gw.yaml")
    assert str(info.value) == (
        f"{tmp_path / 'clients.json'}:3: A client needs exactly one of key or keys (got neither)"
        " - at `$[1]`"
    )


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
        ("toml", "a = " + "[" * 5000 + "]" * 5000 + "\n"),
        ("yaml", "a:\n" + "".join(" " * i + "- \n" for i in range(990))),
    ],
)
def test_deep_nesting_is_an_error_not_a_crash(fmt: str, text: str) -> None:
    error = error_of(text, fmt, f"gw.{fmt}")
    assert error.message.startswith("Invalid ")


# ---------------------------------------------------------------------------------------------
# fastgw check
# ---------------------------------------------------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastgw", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "gw.yaml",
            MINIMAL_YAML + "max-header-size: 0\n",
            ":9: max-header-size must be at least 1KiB (1024 bytes): a smaller one cannot hold a"
            " WebSocket upgrade request - at `$.max-header-size`",
        ),
        (
            "gw.yaml",
            MINIMAL_YAML + "handshake-timeout: 0\n",
            ":9: handshake-timeout must be greater than 0 - at `$.handshake-timeout`",
        ),
        (
            "gw.yaml",
            MINIMAL_YAML + "drain-time: 1e300\n",
            ":9: Invalid duration '1e300' (must be finite and at most 365 days: 8760h)"
            " - at `$.drain-time`",
        ),
        (
            "gw.yaml",
            API_KEY_YAML,
            ":7: An api-key policy needs clients, and there are none (give clients, or a"
            " clients-file that holds some) - at `$.apis[0].assembly[0]`",
        ),
        (
            "gw.yaml",
            MINIMAL_YAML + "admin: {port: 8080}\n",
            ":9: The admin API 127.0.0.1:8080 and the listener 127.0.0.1:8080"
            " (`$.listeners[0]`) cannot share a port - at `$.admin.port`",
        ),
        (
            "gw.yaml",
            MINIMAL_YAML.replace(
                "  - port: 8080\n", "  - {host: 0.0.0.0, port: 8080}\n  - port: 8080\n"
            ),
            ":3: Listener 127.0.0.1:8080 overlaps 0.0.0.0:8080 (`$.listeners[0]`): a wildcard"
            " address takes the port on every address - at `$.listeners[1]`",
        ),
        (
            "gw.toml",
            TOML.replace('policy = "count-limit"', 'policy = "count-limt"'),
            ":22: Invalid value 'count-limt' - expected one of: api-key, jwt, count-limit,"
            " rate-limit, websocket-upgrade - at `$.apis[1].assembly[0].policy`",
        ),
        (
            "gw.json",
            JSON_TEXT.replace('"max": 1}', '"max": 0}'),
            ":8: Expected `int` >= 1 - at `$.apis[0].assembly[0].max`",
        ),
    ],
)
def test_fastgw_check_refuses(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = check(path)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == f"fastgw: {path}{message}"


def test_fastgw_check_accepts_the_fixed_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(MINIMAL_YAML + "max-header-size: 1KiB\nhandshake-timeout: 1ms\n")
    result = check(path)
    assert result.returncode == 0, result


# ---------------------------------------------------------------------------------------------
# The line scans, on documents written by other tools (hypothesis)
# ---------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastgw.config.parsers import JsonLines, TomlLines  # noqa: E402

SCALARS = st.one_of(
    st.integers(-10, 10),
    st.booleans(),
    st.text(alphabet="ab #[]{}=,.'\"\\\n\t", max_size=8),
)


def documents() -> st.SearchStrategy[dict]:
    """Nested mappings whose keys are unique in the whole document (k0, k1, ... plus a suffix
    that may need quoting), so that the line of a key can be told by its text."""
    values = st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from(["x", "y z", "w.v", "u-1"]), inner, max_size=3),
            st.lists(st.dictionaries(st.sampled_from(["p", "q r"]), inner, min_size=1, max_size=2),
                     min_size=1, max_size=3),
        ),
        max_leaves=12,
    )
    return st.dictionaries(st.sampled_from(["a", "b c", "d.e", "f"]), values, max_size=4)


def uniquely_keyed(data: object, counter: list[int]) -> object:
    """``data`` with each key prefixed by an id of its own: "k7_" + key."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            counter[0] += 1
            out[f"k{counter[0]}_{key}"] = uniquely_keyed(value, counter)
        return out
    if isinstance(data, list):
        return [uniquely_keyed(item, counter) for item in data]
    return data


def paths_of(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every path of ``data``, in the order of the document."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found += paths_of(item, (*prefix, index))
    return found


def check_scan(text: str, lines: dict, data: dict) -> None:
    """Every path has a line; the line of a key holds the key's id."""
    text_lines = text.split("\n")
    for path in paths_of(data):
        assert path in lines, (path, text)
        if path and isinstance(path[-1], str):
            key_id = path[-1].split("_")[0] + "_"
            assert key_id in text_lines[lines[path] - 1], (path, lines[path], text)


@settings(max_examples=200, deadline=None)
@given(documents(), st.sampled_from([0, 1, 2, 4]))
def test_json_scan_finds_every_key(data: dict, indent: int) -> None:
    data = uniquely_keyed(data, [0])
    text = json.dumps(data, indent=indent)
    lines = JsonLines(text).scan()
    check_scan(text, lines, data)
    in_order = [lines[path] for path in paths_of(data)]
    assert in_order == sorted(in_order)


@settings(max_examples=200, deadline=None)
@given(documents(), st.booleans())
def test_toml_scan_finds_every_key(data: dict, multiline: bool) -> None:
    tomli_w = pytest.importorskip("tomli_w")
    data = uniquely_keyed(data, [0])
    try:
        text = tomli_w.dumps(data, multiline_strings=multiline)
    except TypeError:  # a list mixing tables and values: no TOML form
        return
    import tomllib

    assert tomllib.loads(text) == data
    check_scan(text, TomlLines(text).scan(), data)


# ---------------------------------------------------------------------------------------------
# Routing in normal form; API schemes; http(s) target URLs (IBM API Connect)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, hint", [
    ("/a/../b", "write '/b'"), ("/a//b", "write '/a/b'"), ("/%7Eme", "write '/~me'"),
    ("/a/./b", "write '/a/b'"), ("/..", "climbs above the root"), ("/a%2Fb", "encoded '/'"),
])
def test_api_path_must_be_in_normal_form(path: str, hint: str) -> None:
    error = error_of(MINIMAL_YAML.replace("path: /echo", f"path: {path!r}"))
    assert error.path == "$.apis[0].path" and error.line == 5
    assert hint in error.message


@pytest.mark.parametrize("host", ["secret.example.", "secret.example:8080", "a b"])
def test_api_host_without_port_or_trailing_dot(host: str) -> None:
    text = MINIMAL_YAML.replace("    path: /echo\n", f"    path: /echo\n    host: {host!r}\n")
    assert error_of(text).path == "$.apis[0].host"


def test_api_host_in_any_case_is_fine() -> None:
    text = MINIMAL_YAML.replace("    path: /echo\n", "    path: /echo\n    host: Secret.Example\n")
    assert loads(text, "yaml").apis[0].host == "secret.example"


@pytest.mark.parametrize("schemes, message", [
    ("[]", "at least one of ws, wss"),
    ("[wss, wss]", "Duplicate scheme"),
    ("[https]", "expected one of: ws, wss"),
])
def test_api_schemes(schemes: str, message: str) -> None:
    text = MINIMAL_YAML.replace("    path: /echo\n", f"    path: /echo\n    schemes: {schemes}\n")
    error = error_of(text)
    assert message in error.message and error.path.startswith("$.apis[0].schemes")


def test_api_schemes_default_both() -> None:
    assert loads(MINIMAL_YAML, "yaml").apis[0].schemes == ("ws", "wss")
    text = MINIMAL_YAML.replace("    path: /echo\n", "    path: /echo\n    schemes: [wss]\n")
    assert loads(text, "yaml").apis[0].schemes == ("wss",)


@pytest.mark.parametrize("url, scheme, port", [
    ("http://10.0.0.1/x", "ws", 80), ("https://10.0.0.1/x", "wss", 443),
    ("https://10.0.0.1:8443/", "wss", 8443),
])
def test_http_and_https_target_urls_mean_ws_and_wss(url: str, scheme: str, port: int) -> None:
    from fastgw.config import parse_target
    t = parse_target(url)
    assert (t.scheme, t.port, t.secure) == (scheme, port, scheme == "wss")


def test_other_target_schemes_refused() -> None:
    error = error_of(MINIMAL_YAML.replace("ws://127.0.0.1:9000/echo", "ftp://127.0.0.1/"))
    assert "scheme must be ws or wss" in error.message


# ---------------------------------------------------------------------------------------------
# Liveness: ping-interval / ping-timeout, one duration or per side
# ---------------------------------------------------------------------------------------------

UPGRADE_AT = "        target-url: ws://127.0.0.1:9000/echo\n"


def _upgrade(extra: str):
    return loads(MINIMAL_YAML.replace(UPGRADE_AT, UPGRADE_AT + extra), "yaml").apis[0].assembly[-1]


def test_ping_settings_per_side() -> None:
    from fastgw.config import PerSide
    both = _upgrade("        ping-interval: 30s\n")
    assert both.ping_interval == PerSide(30.0, 30.0) and both.ping_timeout is None
    one = _upgrade("        ping-interval: {backend: 10s}\n        ping-timeout: {backend: 2s}\n")
    assert one.ping_interval == PerSide(None, 10.0) and one.ping_timeout == PerSide(None, 2.0)


@pytest.mark.parametrize("extra, message, path", [
    ("ping-interval: 0", "ping-interval must be greater than 0", "$.apis[0].assembly[0].ping-interval"),
    ("ping-interval: {client: 0s}", "ping-interval must be greater than 0",
     "$.apis[0].assembly[0].ping-interval.client"),
    ("ping-interval: {front: 1s}", "Unknown side 'front' - expected one of: client, backend", None),
    ("ping-interval: 1e300", "must be finite", "$.apis[0].assembly[0].ping-interval"),
    ("ping-timeout: 5s", "ping-timeout needs a ping-interval", "$.apis[0].assembly[0].ping-timeout"),
])
def test_ping_settings_refused(extra: str, message: str, path: str | None) -> None:
    error = error_of(MINIMAL_YAML.replace(UPGRADE_AT, UPGRADE_AT + "        " + extra + "\n"))
    assert message in error.message
    if path is not None:
        assert error.path == path
    assert error.line == 9
