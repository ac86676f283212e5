"""The headers of the backend's upgrade request (sans-I/O).

The client's end-to-end headers go on; hop-by-hop ones, the handshake's own and those
the gateway sets itself do not. X-Forwarded-For/-Proto/-Host, X-Real-IP and Forwarded
say who the client is, and admission adds the identity the gateway vouches for.
"""

from __future__ import annotations

from fastgw.config.web import HTTP_TOKEN
from fastgw.identity import forwarded_node

# Headers never copied to the backend: hop-by-hop (RFC 9110 7.6.1), the
# WebSocket handshake's own (the gateway makes its own handshake), and those
# the gateway sets itself.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
    "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
})


def _forwarded_value(value: str) -> str:
    """A Forwarded parameter value: a token as it is, else a quoted-string."""
    if HTTP_TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def backend_headers(req, peer_ip: str, secure: bool, offered: list[str],
                    admission=None, extensions: str | None = None) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus the forwarding headers, for the backend handshake.

    `req` is an http.head.Request. `admission` (admission.Admission) says what the client
    is: its address (X-Real-IP), whether the peer is a trusted proxy (whose Forwarded is
    kept, with the gateway's element appended; from any other peer it is replaced), the
    headers to remove (a hidden credential, a client's own identity headers) and those to
    add (the identity). `extensions`: the Sec-WebSocket-Extensions to offer (the client's
    own is never copied; http.extensions picks its permessage-deflate offers)."""
    dropped = set(_NOT_FORWARDED)
    dropped.update(req.tokens("connection"))
    client_ip, trusted = peer_ip, False
    if admission is not None:
        dropped.update(admission.strip_headers)
        client_ip, trusted = admission.client_ip, admission.peer_trusted
    out = []
    xff = []
    forwarded = []
    for name, value in req.headers:
        if name == "x-forwarded-for":
            xff.append(value)
        elif name == "forwarded":
            forwarded.append(value)
        elif name not in dropped:
            out.append((name, value))
    proto = "https" if secure else "http"
    host = req.get("host") or ""
    xff.append(peer_ip)
    out.append(("X-Forwarded-For", ", ".join(xff)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Real-IP", client_ip))
    element = f"for={forwarded_node(peer_ip)};host={_forwarded_value(host)};proto={proto}"
    out.append(("Forwarded", ", ".join([*forwarded, element] if trusted else [element])))
    if admission is not None:
        out.extend(admission.add_headers)
    if offered:
        out.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
    if extensions:
        out.append(("Sec-WebSocket-Extensions", extensions))
    return out
