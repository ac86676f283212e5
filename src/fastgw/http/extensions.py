"""permessage-deflate (RFC 7692) passed through: the offers and the answer (sans-I/O).

With `extensions: pass` the backend is offered the client's permessage-deflate offers (every
element of Sec-WebSocket-Extensions named permessage-deflate whose parameters are valid; any
other extension is left out, and so is all of a malformed header), and the client gets the
backend's answer once it is checked against what was offered (upstream.Dial: a bad one is a
502). The gateway never inflates: frames are relayed as they came, RSV1 set (Leg.set_compression).

A flow with a `drop` message policy must not share a compression context across messages
(a dropped message would break the receiver's inflater): the backend is then offered
`server_no_context_takeover` (response flow), the client is told `client_no_context_takeover`
(request flow; see `deflate_offers` and `client_answer`).

An offer or an answer is a dict of its parameters, in order: name -> value (None: no value).
"""

from __future__ import annotations

import re

PERMESSAGE_DEFLATE = "permessage-deflate"

SERVER_NO_CONTEXT_TAKEOVER = "server_no_context_takeover"
CLIENT_NO_CONTEXT_TAKEOVER = "client_no_context_takeover"
SERVER_MAX_WINDOW_BITS = "server_max_window_bits"
CLIENT_MAX_WINDOW_BITS = "client_max_window_bits"
_PARAMS = (SERVER_NO_CONTEXT_TAKEOVER, CLIENT_NO_CONTEXT_TAKEOVER, SERVER_MAX_WINDOW_BITS,
           CLIENT_MAX_WINDOW_BITS)

# RFC 6455 9.1: extension-list = 1#extension; extension = token *( ";" extension-param );
# extension-param = token [ "=" (token | quoted-string) ]; whitespace around the separators.
_OWS = re.compile(r"[ \t]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*)"')
_WINDOW_BITS = re.compile(r"[89]|1[0-5]")       # RFC 7692 7.1.2.1: 8..15, no leading zero


def parse_extensions(value: str) -> list[tuple[str, list[tuple[str, str | None]]]] | None:
    """The elements of a Sec-WebSocket-Extensions value, each (name, [(param, value)]) with
    quoted values unquoted; None if it is malformed or holds no element."""
    out = []
    pos, end = 0, len(value)
    while True:
        pos = _OWS.match(value, pos).end()
        if pos < end and value[pos] == ",":         # empty list elements are ignored
            pos += 1
            continue
        if pos >= end:
            break
        m = _TOKEN.match(value, pos)
        if m is None:
            return None
        name, params = m.group(), []
        pos = _OWS.match(value, m.end()).end()
        while pos < end and value[pos] == ";":
            pos = _OWS.match(value, pos + 1).end()
            m = _TOKEN.match(value, pos)
            if m is None:
                return None
            param, arg = m.group(), None
            pos = _OWS.match(value, m.end()).end()
            if pos < end and value[pos] == "=":
                pos = _OWS.match(value, pos + 1).end()
                m = _TOKEN.match(value, pos) or _QUOTED.match(value, pos)
                if m is None:
                    return None
                arg = m.group() if m.re is _TOKEN else re.sub(r"\\(.)", r"\1", m.group(1))
                pos = _OWS.match(value, m.end()).end()
            params.append((param, arg))
        out.append((name, params))
        if pos < end and value[pos] != ",":
            return None
    return out or None


def _deflate_params(params: list[tuple[str, str | None]], answer: bool) -> dict | str:
    """The parameters of a permessage-deflate element as a dict, or why they are invalid
    (RFC 7692 7.1: known names only, each once, window bits 8..15; in an answer
    client_max_window_bits has a value)."""
    out: dict[str, str | None] = {}
    for name, arg in params:
        if name not in _PARAMS:
            return f"unknown parameter {name!r}"
        if name in out:
            return f"duplicate parameter {name}"
        if name.endswith("_no_context_takeover"):
            if arg is not None:
                return f"{name} with a value"
        elif arg is None:
            if name == SERVER_MAX_WINDOW_BITS or answer:
                return f"{name} without a value"
        elif not _WINDOW_BITS.fullmatch(arg):
            return f"{name} not in 8..15"
        out[name] = arg
    return out


def format_deflate(params: dict) -> str:
    """One permessage-deflate element, as a header value."""
    return PERMESSAGE_DEFLATE + "".join(
        f"; {name}" if arg is None else f"; {name}={arg}" for name, arg in params.items())


def deflate_offers(values: list[str], server_no_context_takeover: bool = False) -> list[dict]:
    """The client's valid permessage-deflate offers in its Sec-WebSocket-Extensions header
    lines (`values`), in its order; nothing at all if the header is malformed. With
    `server_no_context_takeover` (a drop policy in the response flow) every offer asks the
    backend for it."""
    if not values:
        return []
    elements = parse_extensions(", ".join(values))
    if elements is None:
        return []
    offers = []
    for name, params in elements:
        if name != PERMESSAGE_DEFLATE:
            continue
        offer = _deflate_params(params, answer=False)
        if isinstance(offer, str):
            continue
        if server_no_context_takeover:
            offer.setdefault(SERVER_NO_CONTEXT_TAKEOVER, None)
        offers.append(offer)
    return offers


def _accepts(answer: dict, offer: dict) -> bool:
    """Whether `answer` is a valid acceptance of `offer` (RFC 7692 7.1.1, 7.1.2)."""
    if CLIENT_MAX_WINDOW_BITS in answer:
        if CLIENT_MAX_WINDOW_BITS not in offer:
            return False
        limit = offer[CLIENT_MAX_WINDOW_BITS]
        if limit is not None and int(answer[CLIENT_MAX_WINDOW_BITS]) > int(limit):
            return False
    if SERVER_NO_CONTEXT_TAKEOVER in offer and SERVER_NO_CONTEXT_TAKEOVER not in answer:
        return False
    if offer.get(SERVER_MAX_WINDOW_BITS) is not None:
        bits = answer.get(SERVER_MAX_WINDOW_BITS)
        if bits is None or int(bits) > int(offer[SERVER_MAX_WINDOW_BITS]):
            return False
    return True


def check_answer(value: str, offers: list[dict]) -> dict | str:
    """The backend's Sec-WebSocket-Extensions answer: the parameters it chose, or why the
    gateway turns it down (the client would fail the connection on it): exactly one
    element, permessage-deflate, valid parameters that accept one of the `offers`."""
    if not offers:
        return "backend answered with an extension that was not offered"
    elements = parse_extensions(value)
    if elements is None:
        return "backend answered with a malformed Sec-WebSocket-Extensions"
    if len(elements) != 1 or elements[0][0] != PERMESSAGE_DEFLATE:
        names = ", ".join(name for name, _ in elements)
        return f"backend answered with extensions that were not offered: {names[:80]}"
    answer = _deflate_params(elements[0][1], answer=True)
    if isinstance(answer, str):
        return f"backend answered with an invalid permessage-deflate: {answer}"
    if CLIENT_MAX_WINDOW_BITS in answer and not any(CLIENT_MAX_WINDOW_BITS in o for o in offers):
        return "backend answered with client_max_window_bits, which was not offered"
    if not any(_accepts(answer, offer) for offer in offers):
        return "backend's permessage-deflate parameters accept none of the offers"
    return answer


def client_answer(answer: dict, client_no_context_takeover: bool = False) -> str:
    """The Sec-WebSocket-Extensions of the client's 101: what the backend chose, with
    client_no_context_takeover added under `client_no_context_takeover` (a drop policy in
    the request flow; RFC 7692 7.1.1.2 lets a server add it, and the backend's inflater
    does not need the context)."""
    if client_no_context_takeover and CLIENT_NO_CONTEXT_TAKEOVER not in answer:
        answer = {**answer, CLIENT_NO_CONTEXT_TAKEOVER: None}
    return format_deflate(answer)
