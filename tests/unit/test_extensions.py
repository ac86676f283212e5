"""permessage-deflate negotiation, sans-I/O (fastgw.http.extensions): the client's offers
the backend gets, the checks of the backend's answer, the client's 101, and which flows
have a drop policy (policies.MessageRules.drops)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from fastgw import config as cfgmod
from fastgw.http.extensions import (check_answer, client_answer, deflate_offers, format_deflate,
                                    parse_extensions)
from fastgw.http.forwarding import backend_headers
from fastgw.http.head import parse_head, switching_protocols
from fastgw.routing import compile_config

PMD = "permessage-deflate"


# ---- the header's grammar --------------------------------------------------------------------

@pytest.mark.parametrize("value, parsed", [
    ("permessage-deflate", [(PMD, [])]),
    ("permessage-deflate;client_max_window_bits", [(PMD, [("client_max_window_bits", None)])]),
    ("  permessage-deflate ; server_max_window_bits = 10 ,, x-foo; a=b; c  ",
     [(PMD, [("server_max_window_bits", "10")]), ("x-foo", [("a", "b"), ("c", None)])]),
    ('permessage-deflate; client_max_window_bits="1\\2"', [(PMD, [("client_max_window_bits", "12")])]),
    ('x; a="b, c; d"', [("x", [("a", "b, c; d")])]),
])
def test_parse(value, parsed):
    assert parse_extensions(value) == parsed


@pytest.mark.parametrize("value", [
    "", " , ", "permessage-deflate;", "permessage-deflate; =1", "permessage-deflate; a=",
    "permessage-deflate x", 'x; a="unterminated', "per message", "x; a=b c", "é", "x;a=\"\x01\"",
])
def test_parse_malformed(value):
    assert parse_extensions(value) is None


@given(st.text(alphabet='permsagdflt_-;,= "\\\t=x0189', max_size=60))
def test_hostile_headers_never_raise(value):
    """Whatever the header, parsing returns a list or None and the checks a verdict."""
    assert parse_extensions(value) is None or isinstance(parse_extensions(value), list)
    offers = deflate_offers([value], server_no_context_takeover=True)
    assert all(format_deflate(o).startswith(PMD) for o in offers)
    assert isinstance(check_answer(value, offers or OFFER), (dict, str))


# ---- the offers forwarded ----------------------------------------------------------------------

def test_offers_keep_only_valid_permessage_deflate():
    values = ["x-webkit-deflate-frame, permessage-deflate; client_max_window_bits; server_max_window_bits=10",
              "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=16, "
              "permessage-deflate; client_max_window_bits=08, permessage-deflate; server_max_window_bits, "
              "permessage-deflate; server_no_context_takeover=1, "
              "permessage-deflate; client_no_context_takeover; client_no_context_takeover, "
              "PerMessage-Deflate, permessage-deflate; client_max_window_bits=9"]
    offers = deflate_offers(values)
    assert [format_deflate(o) for o in offers] == [
        "permessage-deflate; client_max_window_bits; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits=9"]


def test_malformed_header_forwards_nothing():
    assert deflate_offers(["permessage-deflate", "permessage-deflate; ;"]) == []
    assert deflate_offers([]) == []
    assert deflate_offers(["x-foo"]) == []


def test_drop_in_response_flow_asks_server_no_context_takeover():
    offers = deflate_offers(["permessage-deflate; client_max_window_bits, "
                             "permessage-deflate; server_no_context_takeover"],
                            server_no_context_takeover=True)
    assert [format_deflate(o) for o in offers] == [
        "permessage-deflate; client_max_window_bits; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover"]


def test_backend_headers_carry_the_offers_only():
    req = parse_head(b"GET / HTTP/1.1\r\nHost: gw\r\nSec-WebSocket-Extensions: x-foo, permessage-deflate\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade")
    with_offer = backend_headers(req, "127.0.0.1", False, [], extensions="permessage-deflate")
    assert [v for k, v in with_offer if k.lower() == "sec-websocket-extensions"] == ["permessage-deflate"]
    without = backend_headers(req, "127.0.0.1", False, [])
    assert not [k for k, _ in without if k.lower() == "sec-websocket-extensions"]


# ---- the backend's answer ----------------------------------------------------------------------

OFFER = deflate_offers(["permessage-deflate; client_max_window_bits"])
NO_BITS = deflate_offers(["permessage-deflate"])
SERVER_BITS_12 = deflate_offers(["permessage-deflate; server_max_window_bits=12"])
CLIENT_BITS_10 = deflate_offers(["permessage-deflate; client_max_window_bits=10"])
NO_CONTEXT = deflate_offers(["permessage-deflate"], server_no_context_takeover=True)


@pytest.mark.parametrize("answer, offers, params", [
    ("permessage-deflate", OFFER, {}),
    ("permessage-deflate; server_max_window_bits=10", OFFER, {"server_max_window_bits": "10"}),
    ("permessage-deflate;client_max_window_bits=8; server_no_context_takeover; client_no_context_takeover",
     OFFER, {"client_max_window_bits": "8", "server_no_context_takeover": None,
             "client_no_context_takeover": None}),
    ('permessage-deflate; server_max_window_bits="15"', NO_BITS, {"server_max_window_bits": "15"}),
    ("permessage-deflate; server_max_window_bits=12", SERVER_BITS_12, {"server_max_window_bits": "12"}),
    ("permessage-deflate; server_max_window_bits=9", SERVER_BITS_12, {"server_max_window_bits": "9"}),
    ("permessage-deflate; client_max_window_bits=10", CLIENT_BITS_10, {"client_max_window_bits": "10"}),
    ("permessage-deflate; server_no_context_takeover", NO_CONTEXT, {"server_no_context_takeover": None}),
    # Either offer may be the one accepted.
    ("permessage-deflate; client_max_window_bits=12", NO_BITS + OFFER, {"client_max_window_bits": "12"}),
])
def test_good_answers(answer, offers, params):
    assert check_answer(answer, offers) == params


@pytest.mark.parametrize("answer, offers, why", [
    ("permessage-deflate", [], "not offered"),
    ("permessage-deflate; server_max_window_bits=16", OFFER, "not in 8..15"),
    ("permessage-deflate; server_max_window_bits=7", OFFER, "not in 8..15"),
    ("permessage-deflate; server_max_window_bits=010", OFFER, "not in 8..15"),
    ("permessage-deflate; server_max_window_bits", OFFER, "without a value"),
    ("permessage-deflate; client_max_window_bits", OFFER, "without a value"),
    ("permessage-deflate; client_max_window_bits=10", NO_BITS, "client_max_window_bits, which was not"),
    ("permessage-deflate; client_max_window_bits=11", CLIENT_BITS_10, "accept none"),
    ("permessage-deflate; server_max_window_bits=13", SERVER_BITS_12, "accept none"),
    ("permessage-deflate", SERVER_BITS_12, "accept none"),
    ("permessage-deflate", NO_CONTEXT, "accept none"),
    ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", OFFER, "duplicate"),
    ("permessage-deflate; client_no_context_takeover=1", OFFER, "with a value"),
    ("permessage-deflate; x=1", OFFER, "unknown parameter"),
    ("permessage-deflate, permessage-deflate", OFFER, "not offered"),
    ("permessage-deflate, x-foo", OFFER, "not offered"),
    ("x-foo", OFFER, "not offered"),
    ("permessage-deflate;", OFFER, "malformed"),
])
def test_bad_answers(answer, offers, why):
    reason = check_answer(answer, offers)
    assert isinstance(reason, str) and why in reason, reason


def test_client_answer():
    params = check_answer("permessage-deflate; server_max_window_bits=10", OFFER)
    assert client_answer(params) == "permessage-deflate; server_max_window_bits=10"
    # A drop in the request flow: the client must not keep its compression context.
    assert client_answer(params, True) == ("permessage-deflate; server_max_window_bits=10; "
                                           "client_no_context_takeover")
    both = check_answer("permessage-deflate; client_no_context_takeover", OFFER)
    assert client_answer(both, True) == "permessage-deflate; client_no_context_takeover"
    assert params == {"server_max_window_bits": "10"}        # not changed in place


def test_switching_protocols_carries_the_answer():
    head = switching_protocols("acc", None, "permessage-deflate; server_max_window_bits=10")
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n" in head
    assert b"Sec-WebSocket-Extensions" not in switching_protocols("acc", None)


# ---- which flows drop -------------------------------------------------------------------------

def compiled(flows: str, extensions: str = ""):
    text = ("listeners:\n  - host: 127.0.0.1\n    port: 0\napis:\n  - name: a\n    path: /\n    assembly:\n"
            "      - policy: websocket-upgrade\n        target-url: ws://127.0.0.1:9/\n"
            + extensions + flows)
    (api,) = compile_config(cfgmod.loads(text, "yaml", "t.yaml")).apis
    return api


def test_drops_per_flow():
    api = compiled("        request:\n"
                   "          - {policy: message-rate-limit, messages: 10/1s}\n"
                   "          - {policy: message-rate-limit, bytes: 1MiB/1s, action: drop}\n"
                   "        response:\n"
                   "          - {policy: message-rate-limit, messages: 10/1s, action: delay}\n"
                   "          - {policy: message-size-limit, max: 1KiB}\n")
    assert api.request.drops and not api.response.drops
    api = compiled("        response:\n          - {policy: message-rate-limit, messages: 1/1s, action: drop}\n")
    assert api.request is None and api.response.drops


def test_extensions_key_compiled():
    assert compiled("").upgrade.extensions == "pass"
    assert compiled("", "        extensions: none\n").upgrade.extensions == "none"
