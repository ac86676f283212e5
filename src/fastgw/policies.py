"""The one place that turns configuration into runtime objects.

A configuration is compiled once into a Router holding one CompiledApi per API.
Nothing on the connection path reads a configuration struct afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastgw import config as cfgmod
from fastgw.upstream import make_ssl_context


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A compiled websocket-upgrade policy."""

    target: object                 # config.Target
    ssl_context: object            # ssl.SSLContext or None (ws://)
    server_name: str | None
    timeout: float
    idle_timeout: float | None
    max_lifetime: float | None
    max_frame_size: int
    max_message_size: int
    subprotocols: frozenset[str] | None

    def backend_url(self, rest: str) -> str:
        """The backend URL for the part of the request path after the API's prefix."""
        t = self.target
        path, _, query = t.path.partition("?")
        rest_path, sep, rest_query = rest.partition("?")
        if rest_path:
            path = path.rstrip("/") + rest_path
        if sep:
            query = f"{query}&{rest_query}" if query else rest_query
        scheme = "wss" if t.secure else "ws"
        host = f"[{t.host}]" if ":" in t.host else t.host
        url = f"{scheme}://{host}:{t.port}{path or '/'}"
        return f"{url}?{query}" if query else url


@dataclass(frozen=True, slots=True)
class CompiledApi:
    name: str
    prefix: str                    # without trailing slash; "" for "/"
    host: str | None               # lower-case, or None for any host
    upgrade: Upgrade


def compile_upgrade(policy, profiles) -> Upgrade:
    target = cfgmod.parse_target(policy.target_url)
    ctx = None
    server_name = None
    if target.secure:
        profile = profiles.get(policy.tls_profile) if policy.tls_profile else None
        ctx = make_ssl_context(profile)
        if profile is not None:
            server_name = profile.server_name
    return Upgrade(
        target=target,
        ssl_context=ctx,
        server_name=server_name,
        timeout=float(policy.timeout),
        idle_timeout=policy.idle_timeout,
        max_lifetime=policy.max_lifetime,
        max_frame_size=int(policy.max_frame_size),
        max_message_size=int(policy.max_message_size),
        subprotocols=frozenset(policy.subprotocols) if policy.subprotocols is not None else None,
    )


class Router:
    """Longest-prefix routing on path segments, optionally by Host."""

    def __init__(self, apis: list[CompiledApi]):
        # Longest prefix first; an API bound to a host before one for any host.
        self.apis = sorted(apis, key=lambda a: (len(a.prefix), a.host is not None), reverse=True)

    def route(self, path: str, host: str | None) -> tuple[CompiledApi, str] | None:
        """The API for a request target, and the rest of the target after its prefix."""
        only_path, sep, query = path.partition("?")
        host = host.lower() if host else None
        for api in self.apis:
            if api.host is not None and api.host != host:
                continue
            p = api.prefix
            if only_path == p or only_path.startswith(p + "/") or (p == "" and only_path.startswith("/")):
                rest = only_path[len(p):]
                return api, rest + (sep + query if sep else "")
        return None


def compile_config(config) -> Router:
    apis = []
    for api in config.apis:
        upgrade = api.assembly[-1]
        prefix = api.path.rstrip("/")
        apis.append(CompiledApi(
            name=api.name,
            prefix=prefix,
            host=api.host.lower() if api.host else None,
            upgrade=compile_upgrade(upgrade, config.tls_profiles),
        ))
    return Router(apis)
