"""Dialling backends: TLS profiles, timeouts, and errors tagged as upstream's.

The dial happens before the client gets its 101: the backend must accept the
WebSocket upgrade first, and its chosen subprotocol is what the client gets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from picows import WSUpgradeResponse, ws_connect
from picows.common import WSHandshakeError

log = logging.getLogger("fastgw.upstream")

# picows logs every connection at INFO and builds a child Logger per
# connection when handed a Logger; an adapter avoids both costs.
_PICOWS_LOG = logging.LoggerAdapter(logging.getLogger("fastgw.picows"), {})

RCVBUF = 256 * 1024


class UpstreamError(Exception):
    """The backend could not be used: `status` is what the client gets (502 or 504)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def make_ssl_context(profile) -> ssl.SSLContext:
    """An SSLContext for dialling wss:// backends from a TlsProfile (None: system trust)."""
    if profile is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=profile.ca)
    if not profile.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if profile.cert:
        ctx.load_cert_chain(profile.cert, profile.key)
    return ctx


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"backend certificate rejected: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error with backend: {exc.reason or exc}"
    if isinstance(exc, WSHandshakeError):
        resp = getattr(exc, "response", None)
        if resp is not None and getattr(resp, "status", None) is not None:
            return f"backend refused the upgrade with HTTP {int(resp.status)}"
        return f"backend handshake failed: {exc}"
    if isinstance(exc, OSError):
        return f"backend unreachable: {exc.strerror or exc}"
    return f"backend error: {exc!r}"


async def dial(upgrade, url: str, headers: list[tuple[str, str]], offered: list[str],
               listener, *, max_frame_size: int):
    """Open the backend leg. Returns the subprotocol the backend chose (or None).

    `upgrade` is the compiled websocket-upgrade policy (timeout, ssl context,
    server name). Raises UpstreamError(502|504, reason).
    """
    kwargs = {}
    if upgrade.ssl_context is not None:
        kwargs["ssl_context"] = upgrade.ssl_context
        if upgrade.server_name:
            kwargs["server_hostname"] = upgrade.server_name
    try:
        async with asyncio.timeout(upgrade.timeout):
            transport, got = await ws_connect(
                lambda: listener, url,
                # picows cuts a backend that never answers, even once our
                # timeout has given up on it (see Leg.on_ws_connected).
                websocket_handshake_timeout=upgrade.timeout,
                logger_name=_PICOWS_LOG,
                enable_auto_pong=False,
                max_frame_size=max_frame_size,
                extra_headers=headers,
                max_redirects=0,
                read_buffer_init_size=2048,
                use_aiofastnet=False,
                **kwargs,
            )
    except TimeoutError:
        raise UpstreamError(504, f"backend did not answer within {upgrade.timeout:g}s") from None
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure of the dial is the backend's
        raise UpstreamError(502, _describe(exc)) from None

    if got is None or transport.is_disconnected:
        raise UpstreamError(502, "backend closed the connection during the upgrade")
    sock = transport.underlying_transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
    response: WSUpgradeResponse = transport.response
    chosen = response.headers.get("Sec-WebSocket-Protocol") if response is not None else None
    if chosen is not None and chosen not in offered:
        transport.send_close(1001, b"subprotocol not offered")
        transport.disconnect()
        raise UpstreamError(502, f"backend chose subprotocol {chosen!r}, which the client did not offer")
    if response is not None and response.headers.get("Sec-WebSocket-Extensions"):
        transport.send_close(1001, b"extension not offered")
        transport.disconnect()
        raise UpstreamError(502, "backend answered with an extension that was not offered")
    return chosen
