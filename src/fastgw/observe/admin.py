"""The admin API: a small HTTP control endpoint next to the gateway.

It serves health and readiness, the Prometheus metrics, the HDR histograms, the
table of live connections (and closing them), configuration reload and drain.
It is built on ``aiohttp.web`` and knows nothing of the gateway itself: it talks
to an object implementing :class:`AdminBackend` (the Gateway provides one), so
it can be tested with a fake.

Routes (every answer is JSON unless noted; errors are ``{"error": "..."}``):

======  ===============================  =============================================
GET     /                                the status page (HTML, never needs a token; it holds
                                         no data: its script reads the routes below)
GET     /healthz                         200 ``{"status": "alive"}`` (never needs a token)
GET     /readyz                          200 ``{"ready": true}`` / 503 ``{"ready": false}``
GET     /metrics                         Prometheus text exposition
GET     /histograms                      the histogram names
GET     /histograms/{name}               JSON; ``?format=hdr``: the compressed encoding;
                                         ``?format=percentiles``: the percentile table
GET     /connections?api=&client=        the live connections
DELETE  /connections/{id}                close one connection (1001)
DELETE  /connections?client=KEY          close every connection of one client
POST    /reload                          reload the configuration file (422: not applied)
POST    /drain?grace=SECONDS&exit=BOOL   start draining (default grace 10 s); exit=true:
                                         the process exits once the drain is over
GET     /targets                         every pool's targets: ``{"targets": [...]}``
POST    /targets/drain?api=&target=      drain one target: 1001 to its connections spread
        &grace=SECONDS                   over the grace (default: drain-time); 404: unknown
POST    /targets/enable?api=&target=     bring a drained (or ejected) target back
GET     /workers                         the worker processes (a supervisor's backend only)
POST    /workers/restart                 202: a rolling restart started; 409: one is under
                                         way (a supervisor's backend only)
======  ===============================  =============================================

A backend's methods may return their value or an awaitable of it (the supervisor of worker
processes asks its workers). The /workers routes exist when the backend has ``workers``
and ``restart_workers`` (:class:`fastgw.observe.aggregate.SupervisorBackend`).

When a token is configured, every route but ``/healthz`` and ``GET /`` needs
``Authorization: Bearer <token>``.

By default the admin API listens on loopback only; :func:`check_admin_exposure`
is the rule the configuration checker applies to anything else.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.resources
import inspect
import io
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fastgw.config.web import is_loopback
from fastgw.observe.logs import Throttle, clean

from fastgw.accept import Acceptor, listen

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram

__all__ = [
    "AdminBackend",
    "AdminServer",
    "WorkersBackend",
    "METRICS_CONTENT_TYPE",
    "PERCENTILES",
    "check_admin_exposure",
    "create_app",
    "histogram_unit",
    "start_admin",
]

log = logging.getLogger("fastgw.admin")

#: The content type of the Prometheus text exposition format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The percentiles reported in a histogram's JSON form.
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99, 100.0)

#: The realm named in ``WWW-Authenticate`` when a token is missing or wrong.
REALM = "fastgw-admin"

#: Grace period of ``POST /drain`` when the request does not give one.
DEFAULT_DRAIN_GRACE = 10.0

_DIGITS = re.compile(r"[0-9]+")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class AdminBackend(Protocol):
    """What the admin API needs from the gateway."""

    def ready(self) -> bool:
        """True while listening and not draining."""
        ...

    def metrics_text(self) -> "str | Awaitable[str]":
        """The Prometheus text exposition, already formatted (or an awaitable of it,
        so that a backend can format it away from the event loop)."""
        ...

    def histogram_names(self) -> list[str]:
        """The names of the histograms that :meth:`histogram` knows."""
        ...

    def histogram(self, name: str) -> HdrHistogram | None:
        """A snapshot of one histogram (the caller may keep it), or None if unknown."""
        ...

    def connections(self, api: str | None, client: str | None) -> list[dict]:
        """The live connections (JSON-able dicts), filtered by API name and client key."""
        ...

    def close_connection(self, conn_id: int) -> bool:
        """Close one connection with 1001 "closed by administrator"; False if unknown."""
        ...

    def close_client(self, client: str) -> int:
        """Close every connection of one client key; returns how many were closed."""
        ...

    async def reload(self) -> str | None:
        """Reload the configuration: None once applied, else the error text."""
        ...

    async def drain(self, grace: float, exit: bool = False) -> None:
        """Start draining (returns once it has started, not when it ends); with `exit`, the
        process exits once the drain is over."""
        ...


    def targets(self) -> "list[dict] | Awaitable[list[dict]]":
        """Every pool's targets: [{"api", "target", "balance", "weight", "state", "up",
        "connections", "dial_failures", "ejected_for", "health_check"}]."""
        ...

    def drain_target(self, api: str, target: str,
                     grace: float | None) -> "dict | Awaitable[dict]":
        """Drain one target (grace None: the configuration's drain-time); its view.
        KeyError (fastgw.gateway.UnknownTarget) for an unknown API or target."""
        ...

    def enable_target(self, api: str, target: str) -> "dict | Awaitable[dict]":
        """Bring one target back; its view. KeyError for an unknown API or target."""
        ...


    def cluster_status(self) -> "dict | None | Awaitable[dict | None]":
        """GET /cluster: {"member", "down", "rounds", "failed", "renewals", "keys", "nodes",
        "errors", "shares"} (fastgw.cluster.node.ClusterNode.status); None without a cluster.
        Over workers: {"workers": [one per worker process]}."""
        ...


class WorkersBackend(AdminBackend, Protocol):
    """A backend over worker processes (the supervisor's): two more routes."""

    def workers(self) -> "list[dict] | Awaitable[list[dict]]":
        """The worker processes: [{"index", "pid", "started", "connections", "restarts"}]."""
        ...

    def restart_workers(self) -> bool:
        """Start a rolling restart; False when one is under way already."""
        ...


# --- helpers -------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error answer."""
    return web.json_response({"error": message}, status=status, headers=headers)


def _query_value(request: web.Request, key: str) -> str | None:
    """A query parameter, with an empty value counted as absent."""
    value = request.query.get(key)
    return value if value else None


# Units named by the end of a histogram's name, in the Prometheus naming style
# ("upgrade_latency_us", "message_size_bytes"). Longer suffixes come first.
_UNIT_SUFFIXES = (
    ("_nanoseconds", "nanoseconds"),
    ("_microseconds", "microseconds"),
    ("_milliseconds", "milliseconds"),
    ("_seconds", "seconds"),
    ("_bytes", "bytes"),
    ("_ns", "nanoseconds"),
    ("_us", "microseconds"),
    ("_ms", "milliseconds"),
    ("_s", "seconds"),
)


def histogram_unit(name: str) -> str:
    """The unit of a histogram's values, read from the end of its name.

    ``"upgrade_latency_us"`` -> ``"microseconds"``, ``"message_bytes"`` -> ``"bytes"``;
    a name without a known suffix gives ``"unknown"``.
    """
    for suffix, unit in _UNIT_SUFFIXES:
        if name.endswith(suffix):
            return unit
    return "unknown"


def _percentile_table(histogram: HdrHistogram) -> str:
    """The classic HdrHistogram percentile distribution, values unscaled."""
    out = io.BytesIO()
    histogram.output_percentile_distribution(out, 1.0)
    return out.getvalue().decode("ascii")


def _histogram_json(name: str, histogram: HdrHistogram) -> dict[str, Any]:
    """The JSON form of a histogram: counts, selected percentiles and the encoding."""
    return {
        "name": name,
        "total_count": histogram.get_total_count(),
        "encoded": histogram.encode().decode("ascii"),
        "percentiles": {
            str(p): histogram.get_value_at_percentile(p) for p in PERCENTILES
        },
        "unit": histogram_unit(name),
    }


# --- the application -----------------------------------------------------------------

_BACKEND = web.AppKey("backend", object)
# Lines a request can cause: one per key and interval (see logs.Throttle).
_THROTTLE = web.AppKey("log_throttle", Throttle)
# The status page and its Content-Security-Policy (see status_page).
_PAGE = web.AppKey("status_page", tuple)


def _backend(request: web.Request) -> AdminBackend:
    return request.app[_BACKEND]  # type: ignore[return-value]


async def _value(result):
    """A backend method's value, awaited if it is an awaitable."""
    if inspect.isawaitable(result):
        return await result
    return result


def status_page() -> tuple[bytes, str]:
    """The status page (status.html, package data) and the Content-Security-Policy it is
    served with: nothing may load from elsewhere (the gateway may have no internet), only
    its own inline script (by its hash) may run, and it may fetch only from this origin."""
    page = importlib.resources.files("fastgw.observe").joinpath("status.html").read_bytes()
    script = page.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode("ascii")
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'; "
              "base-uri 'none'")
    return page, policy


async def _status_page(request: web.Request) -> web.Response:
    page, policy = request.app[_PAGE]
    return web.Response(body=page, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    ready = bool(_backend(request).ready())
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    text = await _value(_backend(request).metrics_text())
    body = text.encode("utf-8")
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _histogram_names(request: web.Request) -> web.Response:
    return web.json_response(list(await _value(_backend(request).histogram_names())))


async def _histogram(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "hdr", "percentiles"):
        return _error(400, f"unknown format {fmt!r}: use json, hdr or percentiles")
    histogram = await _value(_backend(request).histogram(name))
    if histogram is None:
        return _error(404, f"no histogram named {name!r}")
    if fmt == "hdr":
        return web.Response(text=histogram.encode().decode("ascii"), content_type="text/plain")
    if fmt == "percentiles":
        return web.Response(text=_percentile_table(histogram), content_type="text/plain")
    return web.json_response(_histogram_json(name, histogram))


async def _list_connections(request: web.Request) -> web.Response:
    rows = await _value(_backend(request).connections(_query_value(request, "api"),
                                                      _query_value(request, "client")))
    return web.json_response(list(rows))


async def _close_connection(request: web.Request) -> web.Response:
    text = request.match_info["conn_id"]
    if not _DIGITS.fullmatch(text):
        return _error(400, f"connection id must be a non-negative integer, not {text!r}")
    conn_id = int(text)
    if not await _value(_backend(request).close_connection(conn_id)):
        return _error(404, f"no connection with id {conn_id}")
    return web.json_response({"closed": 1})


async def _close_client(request: web.Request) -> web.Response:
    client = _query_value(request, "client")
    if client is None:
        # Never close every connection because a parameter was forgotten.
        return _error(400, "give the client whose connections to close: ?client=KEY")
    return web.json_response({"closed": await _value(_backend(request).close_client(client))})


async def _reload(request: web.Request) -> web.Response:
    problem = await _backend(request).reload()
    if problem is None:
        return web.json_response({"reloaded": True})
    return web.json_response({"reloaded": False, "error": problem}, status=422)


async def _drain(request: web.Request) -> web.Response:
    text = request.query.get("grace")
    if text is None:
        grace = DEFAULT_DRAIN_GRACE
    else:
        try:
            grace = float(text)
        except ValueError:
            grace = math.nan
        if not math.isfinite(grace) or grace < 0:
            return _error(400, f"grace must be a number of seconds >= 0, not {text!r}")
    text = request.query.get("exit", "false")
    exit_ = _BOOLEANS.get(text.lower())
    if exit_ is None:
        return _error(400, f"exit must be true or false, not {text!r}")
    await _backend(request).drain(grace, exit=exit_)
    return web.json_response({"draining": True, "exit": exit_}, status=202)


def _grace(text: str | None) -> float | None:
    """?grace=SECONDS: None when absent; ValueError unless a finite number >= 0."""
    if text is None:
        return None
    try:
        grace = float(text)
    except ValueError:
        grace = math.nan
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace must be a number of seconds >= 0, not {clean(text)!r}")
    return grace


def _api_target(request: web.Request) -> tuple[str, str]:
    """?api=&target=, both needed (ValueError)."""
    api, target = _query_value(request, "api"), _query_value(request, "target")
    if api is None or target is None:
        raise ValueError("give the API and the target: ?api=NAME&target=URL")
    return api, target


async def _cluster(request: web.Request) -> web.Response:
    status = await _value(_backend(request).cluster_status())
    if status is None:
        return _error(404, "no cluster section in the configuration")
    return web.json_response(status)


async def _targets(request: web.Request) -> web.Response:
    return web.json_response({"targets": list(await _value(_backend(request).targets()))})


async def _drain_target(request: web.Request) -> web.Response:
    try:
        api, target = _api_target(request)
        grace = _grace(request.query.get("grace"))
    except ValueError as exc:
        return _error(400, str(exc))
    try:
        view = await _value(_backend(request).drain_target(api, target, grace))
    except KeyError as exc:
        return _error(404, str(exc))
    except ConnectionError as exc:            # workers > 1: no worker answered
        return _error(503, str(exc))
    return web.json_response(view)


async def _enable_target(request: web.Request) -> web.Response:
    try:
        api, target = _api_target(request)
    except ValueError as exc:
        return _error(400, str(exc))
    try:
        view = await _value(_backend(request).enable_target(api, target))
    except KeyError as exc:
        return _error(404, str(exc))
    except ConnectionError as exc:            # workers > 1: no worker answered
        return _error(503, str(exc))
    return web.json_response(view)


async def _workers(request: web.Request) -> web.Response:
    return web.json_response(list(await _value(_backend(request).workers())))


async def _restart_workers(request: web.Request) -> web.Response:
    if not _backend(request).restart_workers():
        return _error(409, "a rolling restart is under way")
    return web.json_response({"restarting": True}, status=202)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Headers of an aiohttp HTTP exception worth keeping when it becomes a JSON answer.
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn aiohttp's own errors (404, 405, ...) and crashes into JSON answers."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
        return _error(exc.status, exc.reason, headers)
    except Exception:
        request.app[_THROTTLE].log(logging.ERROR, "failed", "admin: %s %s failed",
                                   clean(request.method), clean(request.path), exc_info=True)
        return _error(500, "internal error")


def _token_middleware(token: str) -> Any:
    """A middleware that requires ``Authorization: Bearer <token>`` except on /healthz and
    on GET / (the status page: static, it asks the user for the token its requests carry)."""
    expected = token.encode("utf-8")

    @web.middleware
    async def require_token(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path == "/healthz" or (request.path == "/"
                                          and request.method in ("GET", "HEAD")):
            return await handler(request)
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        given = credentials.strip().encode("utf-8", "surrogateescape")
        # The scheme name is case-insensitive (RFC 7235); the token is compared in
        # constant time so that its content cannot be guessed from response times.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            return _error(401, "missing or invalid bearer token",
                          {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        return await handler(request)

    return require_token


def create_app(backend: AdminBackend, token: str | None) -> web.Application:
    """The admin application around ``backend``; with a token, routes need it.

    An empty token is refused (ValueError): it would look configured and protect nothing.
    """
    middlewares = [_json_errors]
    if token is not None:
        if not token:
            raise ValueError("the admin token must not be empty")
        # Outermost, so that an unknown path answers 401, not 404, without a token.
        middlewares.insert(0, _token_middleware(token))
    app = web.Application(middlewares=middlewares)
    app[_BACKEND] = backend
    app[_THROTTLE] = Throttle(log)
    app[_PAGE] = status_page()
    app.router.add_get("/", _status_page)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/histograms", _histogram_names)
    # Names may hold slashes ("quotes/handshake_us"): the name is the rest of the path.
    app.router.add_get("/histograms/{name:.+}", _histogram)
    app.router.add_get("/connections", _list_connections)
    app.router.add_delete("/connections", _close_client)
    app.router.add_delete("/connections/{conn_id}", _close_connection)
    app.router.add_post("/reload", _reload)
    app.router.add_post("/drain", _drain)
    app.router.add_get("/targets", _targets)
    app.router.add_get("/cluster", _cluster)
    app.router.add_post("/targets/drain", _drain_target)
    app.router.add_post("/targets/enable", _enable_target)
    if hasattr(backend, "workers") and hasattr(backend, "restart_workers"):
        app.router.add_get("/workers", _workers)
        app.router.add_post("/workers/restart", _restart_workers)
    return app


# --- running it ----------------------------------------------------------------------


def _url_host(host: str) -> str:
    """A host as it is written in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger for the admin API. A request aiohttp cannot parse (a
    200 KB header, a bad request line) is answered 400 by aiohttp and logged here as one
    short, throttled warning, not an ERROR with a traceback (whose text would hold the
    offending bytes: a header may be a credential). Everything else passes on."""

    def __init__(self, logger: logging.Logger, throttle: Throttle):
        super().__init__(logger, {})
        self.throttle = throttle

    def log(self, level, msg, *args, exc_info=None, **kwargs):
        if isinstance(exc_info, HttpProcessingError):
            self.throttle.warning(("bad-request", type(exc_info).__name__),
                                 "admin: malformed request answered %d (%s)",
                                 exc_info.code, type(exc_info).__name__)
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


class AdminServer:
    """A running admin API (see :func:`start_admin`)."""

    def __init__(self, runner: web.AppRunner, acceptor: Acceptor):
        self.runner = runner
        self.acceptor = acceptor
        # A host name may be bound on several addresses; with port 0 each gets its own
        # port, so the URL names the first socket actually bound.
        host, self.port = acceptor.sockets[0].getsockname()[:2]
        self.url = f"http://{_url_host(host)}:{self.port}"

    async def close(self) -> None:
        """Stop listening and close open admin connections (idempotent)."""
        self.acceptor.close()
        await self.runner.cleanup()


async def start_admin(backend: AdminBackend, host: str, port: int,
                      token: str | None, on_short=None) -> AdminServer:
    """Start the admin API on ``host:port`` (port 0: any free port) in the running loop.

    No access log and no signal handlers: the gateway owns both. It accepts its clients
    itself (:mod:`fastgw.accept`): when accept() finds no descriptor, ``on_short(exc)`` (the
    gateway's ``accept_error``) may free some, else it retries 100 ms later; its listener
    is never closed for it, as uvloop's servers are.
    """
    app = create_app(backend, token)
    # A short shutdown timeout: an admin request in flight must not hold up the
    # gateway's own shutdown.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           logger=_ServerLog(logging.getLogger("aiohttp.server"), app[_THROTTLE]))
    await runner.setup()
    try:
        loop = asyncio.get_running_loop()
        sockets = await listen(loop, host, port, backlog=128)
        return AdminServer(runner, Acceptor(loop, sockets, runner.server, on_short))
    except BaseException:
        await runner.cleanup()
        raise


def check_admin_exposure(host: str, token_env: str | None) -> str | None:
    """An error message if the admin API would listen beyond loopback without a token.

    Loopback is 127.0.0.0/8, ::1 (also written ``[::1]`` or as ``::ffff:127.x.x.x``)
    and the name ``localhost``. Any other host, a host name included, is exposed and
    needs ``token-env``. Returns None when the setting is acceptable.
    """
    if token_env:
        return None
    if is_loopback(host):
        return None
    where = host if host else "all interfaces"
    return f"admin listens on {where} without token-env: set token-env"
