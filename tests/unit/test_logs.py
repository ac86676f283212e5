"""Safe log lines (fastgw.observe.logs), the query and header helpers behind hide-credentials and
identity propagation, and the configuration keys that turn them on. No sockets; the
throttle runs on synthetic time."""

from __future__ import annotations

import logging

import pytest

from fastgw import config as cfgmod
from fastgw.clock import SimClock
from fastgw.identity import ApiKeyAuth, Client, clients_by_key, header_value, remove_query_params
from fastgw.observe.logs import MAX_FIELD, Throttle, clean, url_without_query
from fastgw.routing import compile_config
from fastgw.http.forwarding import backend_headers
from fastgw.http.head import parse_head


# ------------------------------------------------------------------ clean, url_without_query

def test_clean_escapes_controls_and_bounds_length():
    assert clean("plain /path") == "plain /path"
    assert clean("a\r\nX-Injected: 1\x1b[31m\x00\x85\u2028") == \
        "a\\r\\nX-Injected: 1\\x1b[31m\\x00\\x85\\u2028"
    long = clean("x" * 15000)
    assert long.startswith("x" * MAX_FIELD) and long.endswith("...(15000 chars)")
    assert len(long) < MAX_FIELD + 20
    # escapes cannot make a value longer than the bound either
    assert len(clean("\x00" * 150)) < MAX_FIELD + 20
    assert "\n" not in clean("\n" * 1000)


def test_url_without_query_drops_the_query():
    assert url_without_query("/z?api_key=alice-secret") == "/z"
    assert url_without_query("ws://h:1/a/b?x=1#f") == "ws://h:1/a/b"
    assert url_without_query("/" + "a" * 500 + "?k=v").endswith("...(501 chars)")


# ------------------------------------------------------------------ Throttle

def at(clock: SimClock, t: float) -> None:
    clock.advance(t - clock.now())


@pytest.fixture
def throttled(caplog):
    clock = SimClock(start=0.0)
    logger = logging.getLogger("fastgw.test-throttle")
    caplog.set_level(logging.INFO, logger=logger.name)
    return Throttle(logger, interval=10.0, clock=clock, max_keys=3), clock, caplog


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastgw.test-throttle"]


def test_throttle_one_line_per_key_and_interval(throttled):
    t, clock, caplog = throttled
    assert t.warning("a", "backend %s failed", "x")
    for _ in range(99):
        assert not t.warning("a", "backend %s failed", "x")
    assert t.warning("b", "other")                    # another key is not held back
    at(clock, 9.99)
    assert not t.warning("a", "backend %s failed", "x")
    at(clock, 10.0)
    assert clock.now() == 10.0
    assert t.warning("a", "backend %s failed", "y")
    at(clock, 25.0)
    assert t.warning("a", "backend %s failed", "z")
    assert lines(caplog) == ["backend x failed", "other", "backend y failed (100 similar suppressed)",
                             "backend z failed"]


def test_throttle_remembers_few_keys_and_reports_what_it_forgets(throttled):
    t, clock, caplog = throttled
    t.info("k0", "line zero")
    t.info("k0", "line zero")                          # suppressed once
    for i in range(1, 4):                              # k3 pushes k0 out
        t.info(f"k{i}", "line %d", i)
    assert len(t._keys) == 3
    assert lines(caplog) == ["line zero", "line 1", "line 2", "suppressed 1 line(s) like 'line zero'",
                             "line 3"]


def test_throttle_counts_nothing_below_the_level(throttled):
    t, clock, caplog = throttled
    assert not t.log(logging.DEBUG, "d", "debug line")
    assert "d" not in t._keys and lines(caplog) == []


# ------------------------------------------------------------------ queries and headers

@pytest.mark.parametrize("query, names, out", [
    ("a=1&api_key=s&b=2&b=3", {"api_key"}, "a=1&b=2&b=3"),
    ("api_key=s", {"api_key"}, ""),
    ("api%5Fkey=s&x=1&api_key=&api_key", {"api_key"}, "x=1"),     # every spelling parse_qs reads
    ("a=1&api_key_2=k", {"api_key"}, "a=1&api_key_2=k"),
    ("x=%20y&&z", {"api_key"}, "x=%20y&&z"),                       # the rest byte for byte
    ("", {"api_key"}, ""),
])
def test_remove_query_params(query, names, out):
    assert remove_query_params(query, frozenset(names)) == out


def test_header_value_keeps_ascii_and_encodes_the_rest():
    assert header_value("alice.smith@example-1_2~3") == "alice.smith@example-1_2~3"
    assert header_value("a b\r\nX: 1") == "a%20b%0D%0AX:%201"
    assert header_value("100%é") == "100%25%C3%A9"


def test_api_key_auth_says_where_the_key_was_read():
    auth = ApiKeyAuth(clients_by_key([(Client("alice"), ["k1"])]), header="x-api-key", query="api_key")
    assert auth.authenticate([("x-api-key", "k1")], "", "api").credential == ("header", "x-api-key")
    assert auth.authenticate([("x-api-key", "")], "api_key=k1", "api").credential == ("query", "api_key")


YAML = """
listeners: [{port: 0}]
clients: [{id: alice, key: alice-key}]
apis:
  - name: hidden
    path: /h
    assembly:
      - {policy: api-key, query: api_key, hide-credentials: true}
      - {policy: websocket-upgrade, target-url: "ws://b:81/feed?api_key=configured"}
  - name: default
    path: /d
    assembly:
      - {policy: api-key, query: api_key}
      - {policy: websocket-upgrade, target-url: "ws://b:81/"}
"""


def test_backend_url_drops_the_clients_parameter_only():
    router = compile_config(cfgmod.loads(YAML, "yaml"))
    hidden = next(a for a in router.apis if a.name == "hidden")
    default = next(a for a in router.apis if a.name == "default")
    assert hidden.propagation.hide_credentials and not default.propagation.hide_credentials
    url = hidden.upgrade.backend_url("/x?a=1&api_key=alice-key&b=2", frozenset({"api_key"}))
    assert url == "ws://b:81/feed/x?api_key=configured&a=1&b=2"
    assert default.upgrade.backend_url("/x?api_key=k") == "ws://b:81/x?api_key=k"


def test_forwarded_element_for_an_ipv6_peer():
    head = "\r\n".join(["GET / HTTP/1.1", "Host: [::1]:8080", "Forwarded: for=evil"]).encode()
    out = dict(backend_headers(parse_head(head), "::1", True, []))
    assert out["Forwarded"] == 'for="[::1]";host="[::1]:8080";proto=https'
    assert out["X-Real-IP"] == "::1"


# ------------------------------------------------------------------ configuration

def with_identity(policy: str) -> str:
    return f"""
listeners: [{{port: 0}}]
clients: [{{id: alice, key: alice-key}}]
apis:
  - name: a
    path: /
    assembly:
      - {policy}
      - {{policy: websocket-upgrade, target-url: "ws://b:81/"}}
"""


def error_of(text: str) -> str:
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.loads(text, "yaml", "gw.yaml")
    return str(info.value)


def test_identity_keys_are_accepted_and_default_off():
    config = cfgmod.loads(with_identity(
        "{policy: api-key, hide-credentials: true, client-id-header: X-Client-Id, plan-header: X-Plan}"),
        "yaml")
    policy = config.apis[0].assembly[0]
    assert (policy.hide_credentials, policy.client_id_header, policy.plan_header) == \
        (True, "X-Client-Id", "X-Plan")
    default = cfgmod.loads(with_identity("{policy: api-key}"), "yaml").apis[0].assembly[0]
    assert (default.hide_credentials, default.client_id_header, default.plan_header) == (False, None, None)


@pytest.mark.parametrize("policy, message", [
    ("{policy: api-key, client-id-header: 'X Id'}",
     "Invalid header name 'X Id' (must be an HTTP token) - at `$.apis[0].assembly[0].client-id-header`"),
    ("{policy: api-key, plan-header: X-Forwarded-For}",
     "plan-header cannot be 'X-Forwarded-For': the gateway sets that header itself"
     " - at `$.apis[0].assembly[0].plan-header`"),
    ("{policy: api-key, client-id-header: Sec-WebSocket-Key}",
     "client-id-header cannot be 'Sec-WebSocket-Key': the gateway sets that header itself"
     " - at `$.apis[0].assembly[0].client-id-header`"),
    ("{policy: api-key, client-id-header: x-api-key}",
     "client-id-header cannot be 'x-api-key': the credential is read from it"
     " - at `$.apis[0].assembly[0].client-id-header`"),
    ("{policy: jwt, algorithms: [HS256], secret-file: /dev/null, client-id-header: authorization}",
     "client-id-header cannot be 'authorization': the credential is read from it"
     " - at `$.apis[0].assembly[0].client-id-header`"),
    ("{policy: api-key, client-id-header: X-Who, plan-header: x-who}",
     "plan-header and client-id-header name the same header 'x-who'"
     " - at `$.apis[0].assembly[0].plan-header`"),
    ("{policy: api-key, hide-credentials: yes please}",
     "Expected `bool`, got `str` - at `$.apis[0].assembly[0].hide-credentials`"),
])
def test_identity_key_errors(policy, message):
    assert error_of(with_identity(policy)).endswith(message)
