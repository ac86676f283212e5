"""The headers of the backend's upgrade request (sans-I/O).

The client's end-to-end headers go on; hop-by-hop ones, the handshake's own and those
the gateway sets itself (`NOT_FORWARDED`) do not. X-Forwarded-For/-Proto/-Host, X-Real-IP
and Forwarded say who the client is, and admission adds the identity the gateway vouches
for. The headers are put together in the core (head.pxi: backend_headers).
"""

from __future__ import annotations

from fastgw import _core
from fastgw.identity import forwarded_node

NOT_FORWARDED = _core.NOT_FORWARDED


def backend_headers(req, peer_ip: str, secure: bool, offered: list[str],
                    admission=None, extensions: str | None = None) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus the forwarding headers, for the backend handshake.

    `req` is an http.head.Request. `admission` (admission.Admission) says what the client
    is: its address (X-Real-IP), whether the peer is a trusted proxy (whose Forwarded is
    kept, with the gateway's element appended; from any other peer it is replaced), the
    headers to remove (a hidden credential, a client's own identity headers) and those to
    add (the identity). `extensions`: the Sec-WebSocket-Extensions to offer (the client's
    own is never copied; http.extensions picks its permessage-deflate offers)."""
    return _core.backend_headers(req, peer_ip, forwarded_node(peer_ip), secure, offered,
                                 admission, extensions)
