"""The subprotocols a client offers, and the API's allowlist (sans-I/O).

The backend is offered only those the API allows (`websocket-upgrade.subprotocols`),
in the client's order; the client gets the one the backend chose (see upstream.dial).
"""

from __future__ import annotations

from fastgw.config.web import HTTP_TOKEN
from fastgw.verdicts import Refusal


def offered_subprotocols(values: list[str], allowed: frozenset[str] | None) -> list[str] | Refusal:
    """The subprotocols of the Sec-WebSocket-Protocol header values that `allowed` (None:
    any) lets through, or a Refusal (400) for a value that is not a token."""
    offered = []
    for value in values:
        for p in value.split(","):
            p = p.strip(" \t")
            if not p:
                continue            # empty list elements are ignored (RFC 9110 5.6.1)
            if not HTTP_TOKEN.fullmatch(p):
                return Refusal(400, "malformed Sec-WebSocket-Protocol")
            offered.append(p)
    if allowed is not None:
        offered = [p for p in offered if p in allowed]
    return offered
