"""The pool keys of websocket-upgrade (targets, balance, hash-key, retries, health-check,
outlier, extensions): what loads, with its defaults, and what is refused, with the message
``fastgw check`` prints (``file:line: problem - at `$.path` ``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastgw.config import ConfigError, loads
from fastgw.routing import compile_config

# The policy starts at line 7; its keys follow from line 8.
HEAD = """\
listeners:
  - port: 8080
apis:
  - name: echo
    path: /echo
    assembly:
      - policy: websocket-upgrade
"""
AT = "$.apis[0].assembly[0]"

TWO = """\
        targets:
          - url: ws://10.0.0.1:9000/
          - url: ws://10.0.0.2:9000/
"""

# The issue's example, as written there.
EXAMPLE = """\
        targets:
          - url: ws://10.0.0.11:9000/
            weight: 2                 # default 1
          - url: ws://10.0.0.12:9000/
        balance: least-connections
        hash-key: client-id
        retries: 2
        health-check:
          interval: 5s
          timeout: 2s
          path: /health
          unhealthy-after: 2
          healthy-after: 2
        outlier:
          failures: 5
          eject: 30s
"""


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(HEAD + body, "yaml", "gw.yaml")
    return str(info.value)


def upgrade_of(body: str):
    return compile_config(loads(HEAD + body, "yaml", "gw.yaml")).apis[0].upgrade


# ---- what loads -----------------------------------------------------------------------------


def test_target_url_is_a_pool_of_one():
    up = upgrade_of("        target-url: ws://10.0.0.1:9000/chat?v=2\n")
    (entry,) = up.targets
    assert (entry.url, entry.weight) == ("ws://10.0.0.1:9000/chat?v=2", 1)
    assert entry.endpoint is up.target and up.target.path == "/chat?v=2"
    assert (up.balance, up.hash_key, up.retries, up.health, up.outlier, up.extensions) == (
        "least-connections", None, 2, None, None, "pass")


def test_targets_with_their_defaults():
    up = upgrade_of(TWO)
    assert [(e.url, e.weight, e.endpoint.host) for e in up.targets] == [
        ("ws://10.0.0.1:9000/", 1, "10.0.0.1"), ("ws://10.0.0.2:9000/", 1, "10.0.0.2")]
    assert up.target is up.targets[0].endpoint
    assert (up.balance, up.hash_key, up.retries, up.health, up.outlier) == (
        "least-connections", None, 2, None, None)


def test_the_issues_example_loads():
    # As written: hash-key with least-connections is checked, and used by consistent-hash only.
    up = upgrade_of(EXAMPLE)
    assert (up.balance, up.hash_key) == ("least-connections", None)
    with pytest.raises(ConfigError, match="Invalid hash-key"):
        loads(HEAD + EXAMPLE.replace("client-id", "cookie:x"), "yaml", "gw.yaml")
    up = upgrade_of(EXAMPLE.replace("least-connections", "consistent-hash"))
    assert [e.weight for e in up.targets] == [2, 1]
    assert (up.balance, up.hash_key, up.retries) == ("consistent-hash", "client-id", 2)
    hc = up.health
    assert (float(hc.interval), float(hc.timeout), hc.path, hc.tcp, hc.unhealthy_after,
            hc.healthy_after) == (5.0, 2.0, "/health", False, 2, 2)
    assert (up.outlier.failures, float(up.outlier.eject)) == (5, 30.0)


def test_health_check_and_outlier_defaults():
    up = upgrade_of(TWO + "        health-check: {tcp: true}\n        outlier: {}\n")
    hc = up.health
    assert (float(hc.interval), float(hc.timeout), hc.path, hc.tcp, hc.unhealthy_after,
            hc.healthy_after) == (5.0, 2.0, "/", True, 2, 2)
    assert (up.outlier.failures, float(up.outlier.eject)) == (5, 30.0)


@pytest.mark.parametrize("balance", ["round-robin", "least-connections", "consistent-hash",
                                     "random"])
def test_every_balance_mode(balance):
    up = upgrade_of(TWO + f"        balance: {balance}\n")
    assert up.balance == balance
    assert up.hash_key == ("client-id" if balance == "consistent-hash" else None)


@pytest.mark.parametrize("key", ["client-id", "client-ip", "header:X-User-Id", "query:room"])
def test_every_hash_key(key):
    assert upgrade_of(TWO + f"        balance: consistent-hash\n        hash-key: {key}\n"
                      ).hash_key == key


@pytest.mark.parametrize("url", ["ws://backend.internal:9000/", "wss://localhost/",
                                 "http://[::1]:9000/x", "ws://10.0.0.1:9000/?token=t"])
def test_target_urls(url):
    up = upgrade_of(f"        targets: [{{url: '{url}', weight: 1000}}]\n        retries: 0\n")
    assert up.targets[0].url == url and up.targets[0].weight == 1000 and up.retries == 0


def test_retries_up_to_ten_and_extensions():
    up = upgrade_of(TWO + "        retries: 10\n        extensions: none\n")
    assert (up.retries, up.extensions) == (10, "none")


# ---- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ("        target-url: ws://10.0.0.1:9000/\n" + TWO,
     f"gw.yaml:7: websocket-upgrade needs either target-url or targets (not both) - at `{AT}`"),
    ("        retries: 1\n",
     f"gw.yaml:7: websocket-upgrade needs target-url or targets - at `{AT}`"),
    ("        targets: []\n",
     f"gw.yaml:8: targets must list at least one target - at `{AT}.targets`"),
    (TWO + "          - url: ws://10.0.0.1:9000/\n",
     "gw.yaml:11: Duplicate target 'ws://10.0.0.1:9000/' (same as"
     f" `{AT}.targets[0].url`) - at `{AT}.targets[2].url`"),
    # the same instance written another way
    (TWO + "          - url: http://10.0.0.2:9000\n",
     "gw.yaml:11: Duplicate target 'http://10.0.0.2:9000' (same as"
     f" `{AT}.targets[1].url`) - at `{AT}.targets[2].url`"),
    ("        targets:\n          - url: ws://10.0.0.1:80/\n          - url: WS://10.0.0.1/\n",
     "gw.yaml:10: Duplicate target 'WS://10.0.0.1/' (same as"
     f" `{AT}.targets[0].url`) - at `{AT}.targets[1].url`"),
    (TWO + "          - url: ftp://10.0.0.3/\n",
     "gw.yaml:11: Invalid target URL 'ftp://10.0.0.3/' (scheme must be ws or wss (http and https"
     f" mean ws and wss)) - at `{AT}.targets[2].url`"),
    ("        targets:\n          - url: ws://:9000/\n",
     f"gw.yaml:9: Invalid target URL 'ws://:9000/' (missing host) - at `{AT}.targets[0].url`"),
    ("        targets:\n          - url: ws://10.0.0.1:9000/#x\n",
     "gw.yaml:9: Invalid target URL 'ws://10.0.0.1:9000/#x' (fragments are not allowed)"
     f" - at `{AT}.targets[0].url`"),
    ("        targets:\n          - url: ''\n",
     f"gw.yaml:9: Expected `str` of length >= 1 - at `{AT}.targets[0].url`"),
    ("        targets:\n          - weight: 2\n",
     f"gw.yaml:9: Object missing required field `url` - at `{AT}.targets[0]`"),
    ("        targets:\n          - url: ws://10.0.0.1:9000/\n            wieght: 2\n",
     f"gw.yaml:10: Object contains unknown field `wieght` - at `{AT}.targets[0]`"),
    ("        targets:\n          - url: ws://10.0.0.1:9000/\n            weight: 0\n",
     f"gw.yaml:10: Expected `int` >= 1 - at `{AT}.targets[0].weight`"),
    ("        targets:\n          - url: ws://10.0.0.1:9000/\n            weight: 1001\n",
     f"gw.yaml:10: Expected `int` <= 1000 - at `{AT}.targets[0].weight`"),
    ("        targets: ws://10.0.0.1:9000/\n",
     f"gw.yaml:8: Expected `array | null`, got `str` - at `{AT}.targets`"),
    (TWO + "        balance: fastest\n",
     "gw.yaml:11: Invalid value 'fastest' - expected one of: round-robin, least-connections,"
     f" consistent-hash, random - at `{AT}.balance`"),
    (TWO + "        balance: consistent-hash\n        hash-key: cookie:session\n",
     "gw.yaml:12: Invalid hash-key 'cookie:session' (client-id, client-ip, header:NAME or"
     f" query:NAME) - at `{AT}.hash-key`"),
    (TWO + "        balance: consistent-hash\n        hash-key: 'header:'\n",
     "gw.yaml:12: Invalid hash-key 'header:' (client-id, client-ip, header:NAME or"
     f" query:NAME) - at `{AT}.hash-key`"),
    (TWO + "        balance: consistent-hash\n        hash-key: 'header:X User'\n",
     "gw.yaml:12: Invalid hash-key 'header:X User' (client-id, client-ip, header:NAME or"
     f" query:NAME) - at `{AT}.hash-key`"),
    (TWO + "        retries: 11\n", f"gw.yaml:11: Expected `int` <= 10 - at `{AT}.retries`"),
    (TWO + "        retries: -1\n", f"gw.yaml:11: Expected `int` >= 0 - at `{AT}.retries`"),
    (TWO + "        health-check: {interval: 0s}\n",
     f"gw.yaml:11: interval must be greater than 0 - at `{AT}.health-check.interval`"),
    (TWO + "        health-check:\n          path: /health\n          timeout: 0ms\n",
     f"gw.yaml:13: timeout must be greater than 0 - at `{AT}.health-check.timeout`"),
    (TWO + "        health-check: {path: health}\n",
     "gw.yaml:11: Invalid health-check path 'health' (it must start with '/')"
     f" - at `{AT}.health-check.path`"),
    (TWO + "        health-check: {path: '/he alth'}\n",
     "gw.yaml:11: Invalid health-check path '/he alth' (no spaces or control characters)"
     f" - at `{AT}.health-check.path`"),
    (TWO + "        health-check: {unhealthy-after: 0}\n",
     f"gw.yaml:11: Expected `int` >= 1 - at `{AT}.health-check.unhealthy-after`"),
    (TWO + "        health-check: {healthy-after: 0}\n",
     f"gw.yaml:11: Expected `int` >= 1 - at `{AT}.health-check.healthy-after`"),
    (TWO + "        health-check: {interval: 5s, grace: 1s}\n",
     f"gw.yaml:11: Object contains unknown field `grace` - at `{AT}.health-check`"),
    (TWO + "        outlier: {eject: 0s}\n",
     f"gw.yaml:11: eject must be greater than 0 - at `{AT}.outlier.eject`"),
    (TWO + "        outlier: {failures: 0}\n",
     f"gw.yaml:11: Expected `int` >= 1 - at `{AT}.outlier.failures`"),
    (TWO + "        extensions: deflate\n",
     f"gw.yaml:11: Invalid value 'deflate' - expected one of: pass, none - at `{AT}.extensions`"),
    (TWO + "        tls-profile: strict\n",
     f"gw.yaml:11: Unknown tls-profile 'strict' (known: none) - at `{AT}.tls-profile`"),
])
def test_refused(body, message):
    assert error_of(body) == message


def test_tls_profile_needs_a_wss_target():
    text = ("tls-profiles:\n  strict: {verify: true}\n" + HEAD + TWO
            + "        tls-profile: strict\n")
    with pytest.raises(ConfigError) as info:
        loads(text, "yaml", "gw.yaml")
    assert str(info.value) == (
        "gw.yaml:13: tls-profile 'strict' needs a wss:// target-url (or a wss:// target)"
        f" - at `{AT}.tls-profile`")
    up = compile_config(loads(text.replace("ws://10.0.0.2", "wss://10.0.0.2"), "yaml",
                              "gw.yaml")).apis[0].upgrade
    assert up.ssl_context is not None


# ---- as `fastgw check` prints them ------------------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("body", "message"), [
    (TWO + "          - url: ws://10.0.0.1:9000/\n",
     ":11: Duplicate target 'ws://10.0.0.1:9000/' (same as `$.apis[0].assembly[0].targets[0].url`)"
     " - at `$.apis[0].assembly[0].targets[2].url`"),
    ("        targets:\n          - url: ws://10.0.0.1:9000/\n            weight: 0\n",
     ":10: Expected `int` >= 1 - at `$.apis[0].assembly[0].targets[0].weight`"),
    (TWO + "        balance: consistent-hash\n        hash-key: header\n",
     ":12: Invalid hash-key 'header' (client-id, client-ip, header:NAME or query:NAME)"
     " - at `$.apis[0].assembly[0].hash-key`"),
    ("        target-url: ws://10.0.0.1:9000/\n" + TWO,
     ":7: websocket-upgrade needs either target-url or targets (not both)"
     " - at `$.apis[0].assembly[0]`"),
])
def test_fastgw_check_refuses(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(HEAD + body)
    result = check(path)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == f"fastgw: {path}{message}"


def test_fastgw_check_accepts_the_example(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(HEAD + EXAMPLE)
    result = check(path)
    assert result.returncode == 0, result
