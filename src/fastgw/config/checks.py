"""Checks that span several fields of a decoded configuration.

References between sections, uniqueness, the order and place of policies, target URLs,
listener addresses that cannot all bind. ``check`` also returns the configuration in its
normal form: API hosts in lower case, origins in the form of ``web.normalize_origin``,
trusted-proxies as networks. Environment variables and files are looked at by ``resolve``.
"""

import ipaddress
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import msgspec

from fastgw.config.errors import Invalid, Segments, format_path
from fastgw.config.schema import (
    IDENTITY_POLICY_TYPES,
    MESSAGE_POLICY_TYPES,
    MIN_HEADER_SIZE,
    Api,
    ApiKey,
    Client,
    Config,
    CountLimit,
    Jwt,
    MessageRateLimit,
    RateLimit,
    WebsocketUpgrade,
    policy_tag,
)
from fastgw.config.values import DEFAULT_PLAN, PerPlan, PerSide
from fastgw.config.web import (
    HTTP_TOKEN,
    BadTarget,
    is_loopback,
    normalize_host,
    normalize_origin,
    normalize_path,
    parse_target,
    redact_url,
)

__all__ = ["ClientChecker", "check", "check_api_key_clients", "encoded_fields"]


def check(config: Config, name: str) -> Config:
    """Checks spanning several fields. Returns the config with api hosts in lower case, origins
    in their normal form (``web.normalize_origin``) and trusted-proxies in canonical form.
    ``name`` is the configuration's file name."""
    _check_settings(config)
    for index, listener in enumerate(config.listeners):
        for other_index, other in enumerate(config.listeners[:index]):
            if _same_socket(listener.host, listener.port, other.host, other.port):
                raise Invalid(
                    f"Duplicate listener {listener.host}:{listener.port}"
                    f" (same as `{format_path(('listeners', other_index))}`)",
                    ("listeners", index),
                )
            if _sockets_overlap(listener.host, listener.port, other.host, other.port):
                raise Invalid(
                    f"Listener {listener.host}:{listener.port} overlaps"
                    f" {other.host}:{other.port} (`{format_path(('listeners', other_index))}`):"
                    " a wildcard address takes the port on every address",
                    ("listeners", index),
                )

    admin = config.admin
    if admin is not None:
        for index, listener in enumerate(config.listeners):
            if _sockets_overlap(admin.host, admin.port, listener.host, listener.port):
                raise Invalid(
                    f"The admin API {admin.host}:{admin.port} and the listener"
                    f" {listener.host}:{listener.port}"
                    f" (`{format_path(('listeners', index))}`) cannot share a port",
                    ("admin", "port"),
                )
        if not is_loopback(admin.host) and admin.token_env is None:
            raise Invalid(
                f"the admin API would listen beyond loopback ({admin.host}) without a token:"
                " set token-env", ("admin",))

    for profile_name, profile in config.tls_profiles.items():
        if (profile.cert is None) != (profile.key is None):
            missing = "key" if profile.key is None else "cert"
            raise Invalid(
                f"A TLS profile needs both cert and key, or neither ({missing} is missing)",
                ("tls-profiles", profile_name),
            )

    plans_seen: dict[str, int] = {}
    for index, plan in enumerate(config.plans):
        if plan in plans_seen:
            raise Invalid(
                f"Duplicate plan {plan!r} (same as `{format_path(('plans', plans_seen[plan]))}`)",
                ("plans", index),
            )
        plans_seen[plan] = index

    trusted = [
        _canonical_network(network, ("trusted-proxies", index))
        for index, network in enumerate(config.trusted_proxies)
    ]

    apis: list[Api] = []
    names_seen: dict[str, int] = {}
    routes_seen: dict[tuple[str | None, str], int] = {}
    for index, api in enumerate(config.apis):
        here: Segments = ("apis", index)
        if api.name in names_seen:
            raise Invalid(
                f"Duplicate API name {api.name!r}"
                f" (same as `{format_path(('apis', names_seen[api.name]))}`)",
                (*here, "name"),
            )
        names_seen[api.name] = index
        if not api.path.startswith("/"):
            raise Invalid(f"Invalid path {api.path!r} (must start with '/')", (*here, "path"))
        try:
            canonical = normalize_path(api.path)
        except BadTarget as exc:
            raise Invalid(f"Invalid path {api.path!r} ({exc})", (*here, "path")) from None
        if canonical != api.path:
            raise Invalid(f"Invalid path {api.path!r} (requests are routed on their normal"
                          f" form, write {canonical!r})", (*here, "path"))
        host = None
        if api.host is not None:
            try:
                host = normalize_host(api.host)
            except BadTarget:
                raise Invalid(f"Invalid host {api.host!r}", (*here, "host")) from None
            if host not in (api.host.lower(), api.host.lower().strip("[]")):
                raise Invalid(f"Invalid host {api.host!r} (a host name without port or"
                              f" trailing dot: {host!r})", (*here, "host"))
        if not api.schemes:
            raise Invalid("Invalid schemes (at least one of ws, wss)", (*here, "schemes"))
        if len(set(api.schemes)) != len(api.schemes):
            raise Invalid(f"Duplicate scheme in {list(api.schemes)}", (*here, "schemes"))
        route = (host, api.path)
        if route in routes_seen:
            where = "" if host is None else f"host {host!r}, "
            raise Invalid(
                f"Duplicate route ({where}path {api.path!r})"
                f" (same as `{format_path(('apis', routes_seen[route]))}`)",
                (*here, "path"),
            )
        routes_seen[route] = index
        origins = None
        if api.origins is not None:
            origins = [
                _canonical_origin(origin, (*here, "origins", i))
                for i, origin in enumerate(api.origins)
            ]
        _check_assembly(config, api, here)
        if host != api.host or origins != api.origins:
            api = msgspec.structs.replace(api, host=host, origins=origins)
        apis.append(api)

    config = msgspec.structs.replace(config, apis=apis, trusted_proxies=trusted)
    ClientChecker(config).check(config.clients, ("clients",), name)
    return config


def _check_settings(config: Config) -> None:
    """Values of the top-level settings that no client could work with."""
    if config.handshake_timeout <= 0:
        raise Invalid("handshake-timeout must be greater than 0", ("handshake-timeout",))
    if config.max_header_size < MIN_HEADER_SIZE:
        raise Invalid(
            f"max-header-size must be at least 1KiB ({MIN_HEADER_SIZE} bytes):"
            " a smaller one cannot hold a WebSocket upgrade request",
            ("max-header-size",),
        )
    if config.histogram_log is not None and config.histogram_log.interval <= 0:
        raise Invalid("interval must be greater than 0", ("histogram-log", "interval"))
    if config.cluster is not None:
        _check_cluster(config)


REDIS_SCHEMES = ("redis", "rediss")


def _check_redis_url(url: str, here: Segments) -> bool:
    """A redis:// or rediss:// URL with a host; returns whether it is rediss://."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        raise Invalid(f"Invalid Redis URL {redact_url(url)!r} ({exc})", here) from None
    if parts.scheme not in REDIS_SCHEMES:
        raise Invalid(f"Invalid Redis URL {redact_url(url)!r} (the scheme must be redis or rediss)",
                      here)
    if not parts.hostname:
        raise Invalid(f"Invalid Redis URL {redact_url(url)!r} (missing host)", here)
    return parts.scheme == "rediss"


def _check_cluster(config: Config) -> None:
    """The cluster section: one store, and times that a lease can work with."""
    cl = config.cluster
    here: Segments = ("cluster",)
    r = cl.redis
    at: Segments = (*here, "redis")
    if (r.url is None) == (r.cluster_nodes is None):
        raise Invalid("cluster.redis needs either url or cluster-nodes (not both)"
                      if r.url is not None else "cluster.redis needs url or cluster-nodes", at)
    if r.url is not None:
        secure = {_check_redis_url(r.url, (*at, "url"))}
    else:
        if not r.cluster_nodes:
            raise Invalid("cluster-nodes must list at least one node", (*at, "cluster-nodes"))
        secure = {_check_redis_url(u, (*at, "cluster-nodes", i))
                  for i, u in enumerate(r.cluster_nodes)}
        if len(secure) > 1:
            raise Invalid("cluster-nodes must all be redis:// or all rediss://",
                          (*at, "cluster-nodes"))
    if r.tls_profile is not None:
        if r.tls_profile not in config.tls_profiles:
            known = ", ".join(sorted(config.tls_profiles)) or "none"
            raise Invalid(f"Unknown tls-profile {r.tls_profile!r} (known: {known})",
                          (*at, "tls-profile"))
        if secure != {True}:
            raise Invalid(f"tls-profile {r.tls_profile!r} needs rediss://", (*at, "tls-profile"))
    for key, value, where in (("timeout", r.timeout, at), ("lease", cl.lease, here),
                              ("refresh", cl.refresh, here)):
        if value <= 0:
            raise Invalid(f"{key} must be greater than 0", (*where, key))
    if cl.refresh * 2 > cl.lease:
        raise Invalid(f"refresh ({float(cl.refresh):g}s) must be at most half of lease"
                      f" ({float(cl.lease):g}s): a share must survive a lost renewal",
                      (*here, "refresh"))
    if r.timeout >= cl.refresh:
        raise Invalid(f"cluster.redis.timeout ({float(r.timeout):g}s) must be less than refresh"
                      f" ({float(cl.refresh):g}s)", (*at, "timeout"))


_WILDCARDS = {"0.0.0.0": 4, "::": 6}


def _bind_addresses(host: str) -> set[tuple[int, str]]:
    """What binding ``host`` takes: (IP version, address) pairs, "*" for every address of that
    version, version 0 for a host name that resolves to either ("localhost": both loopbacks)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return {(4, "127.0.0.1"), (6, "::1")}
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return {(0, name)}
    text = str(address)
    if text in _WILDCARDS:
        return {(_WILDCARDS[text], "*")}
    return {(address.version, text)}


def _same_socket(host: str, port: int, other_host: str, other_port: int) -> bool:
    return port != 0 and port == other_port and (
        _bind_addresses(host) == _bind_addresses(other_host)
    )


def _sockets_overlap(host: str, port: int, other_host: str, other_port: int) -> bool:
    """Whether two sockets cannot both bind: the same port (0 picks a free one, never the
    same) on the same address, or a wildcard address (0.0.0.0, ::) and an address of its IP
    version or a host name. (0.0.0.0 and :: do not overlap: IPv6 sockets are IPv6-only.)"""
    if port == 0 or port != other_port:
        return False
    for version, address in _bind_addresses(host):
        for other_version, other_address in _bind_addresses(other_host):
            if (version, address) == (other_version, other_address):
                return True
            if "*" in (address, other_address) and (
                version == other_version or 0 in (version, other_version)
            ):
                return True
    return False


def _canonical_network(value: str, segments: Segments) -> str:
    """ "10.0.0.0/8", "127.0.0.1", "::1" -> canonical network text ("127.0.0.1/32")."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        reason = str(exc)
        if "host bits" not in reason:
            reason = "use an address or a network, e.g. 10.0.0.0/8"
        raise Invalid(f"Invalid network {value!r} ({reason})", segments) from None


def _canonical_origin(value: str, segments: Segments) -> str:
    """An origin to allow ("https://App.example.com:8443") in its normal form."""
    if value.strip() == "*":
        raise Invalid(
            "Origin '*' is not allowed (leave out origins to accept any origin)", segments
        )
    try:
        return normalize_origin(value)
    except ValueError:
        raise Invalid(
            f"Invalid origin {value!r} (use scheme://host[:port], e.g. https://app.example.com)",
            segments,
        ) from None


def _unknown_plan(plan: str, config: Config, segments: Segments) -> Invalid:
    known = ", ".join((DEFAULT_PLAN, *sorted(set(config.plans) - {DEFAULT_PLAN})))
    return Invalid(f"Unknown plan {plan!r} (known: {known})", segments)


def encoded_fields(policy: msgspec.Struct) -> Iterator[tuple[str, str, Any]]:
    """(attribute, name in files, value) of each field of a struct."""
    for attr, encoded in zip(policy.__struct_fields__, policy.__struct_encode_fields__):
        yield attr, encoded, getattr(policy, attr)


def _check_plans(config: Config, policy: msgspec.Struct, here: Segments) -> None:
    """Every plan named in a per-plan value of ``policy`` must exist."""
    known = set(config.plans) | {DEFAULT_PLAN}
    for _attr, encoded, value in encoded_fields(policy):
        if isinstance(value, PerPlan):
            for plan in value.values:
                if plan not in known:
                    raise _unknown_plan(plan, config, (*here, encoded, plan))


def _check_assembly(config: Config, api: Api, here: Segments) -> None:
    # Message policies first: one after the websocket-upgrade is misplaced, not a second end.
    for index, policy in enumerate(api.assembly):
        if isinstance(policy, MESSAGE_POLICY_TYPES):
            raise Invalid(
                f"{policy_tag(policy)} cannot run before the upgrade;"
                " put it in websocket-upgrade.request or .response",
                (*here, "assembly", index),
            )

    last = len(api.assembly) - 1
    identity_at: Segments | None = None
    for index, policy in enumerate(api.assembly):
        at: Segments = (*here, "assembly", index)
        if isinstance(policy, WebsocketUpgrade):
            if index != last:
                raise Invalid("websocket-upgrade must be the last policy of the assembly", at)
            _check_websocket_upgrade(config, policy, at)
            continue
        _check_plans(config, policy, at)
        if isinstance(policy, IDENTITY_POLICY_TYPES):
            if identity_at is not None:
                raise Invalid(
                    "An assembly may hold only one api-key or jwt policy"
                    f" (the first is at `{format_path(identity_at)}`)",
                    at,
                )
            identity_at = at
            _check_identity_headers(policy, at)
        if isinstance(policy, ApiKey):
            _check_api_key(policy, at)
        elif isinstance(policy, Jwt):
            _check_jwt(policy, at)
        elif isinstance(policy, (CountLimit, RateLimit)):
            if policy.key == "client-id" and identity_at is None:
                raise Invalid(
                    "key client-id needs an api-key or jwt policy before it", (*at, "key")
                )
    if last < 0 or not isinstance(api.assembly[last], WebsocketUpgrade):
        raise Invalid("The assembly must end with a websocket-upgrade policy", (*here, "assembly"))


def _check_api_key(policy: ApiKey, here: Segments) -> None:
    if policy.header is None and policy.query is None:
        raise Invalid("An api-key policy needs a header or a query parameter (or both)", here)
    if policy.header is not None and not HTTP_TOKEN.fullmatch(policy.header):
        raise Invalid(
            f"Invalid header name {policy.header!r} (must be an HTTP token)", (*here, "header")
        )


# Headers the gateway writes itself, or that make the upgrade: no identity header may be one.
_GATEWAY_HEADERS = frozenset({
    "host", "connection", "upgrade", "keep-alive", "te", "trailer", "transfer-encoding",
    "content-length", "proxy-authorization", "proxy-connection", "forwarded", "x-real-ip",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
})


def _check_identity_headers(policy: "ApiKey | Jwt", here: Segments) -> None:
    """client-id-header and plan-header: HTTP tokens, two names, none the gateway's own or
    the credential's."""
    credential = policy.header if isinstance(policy, ApiKey) else "Authorization"
    seen: dict[str, str] = {}
    for field in ("client-id-header", "plan-header"):
        name = getattr(policy, field.replace("-", "_"))
        if name is None:
            continue
        at = (*here, field)
        lower = name.lower()
        if not HTTP_TOKEN.fullmatch(name):
            raise Invalid(f"Invalid header name {name!r} (must be an HTTP token)", at)
        if lower in _GATEWAY_HEADERS or lower.startswith("sec-websocket-"):
            raise Invalid(f"{field} cannot be {name!r}: the gateway sets that header itself", at)
        if credential is not None and lower == credential.lower():
            raise Invalid(f"{field} cannot be {name!r}: the credential is read from it", at)
        if lower in seen:
            raise Invalid(f"{field} and {seen[lower]} name the same header {name!r}", at)
        seen[lower] = field


_SECRET_SOURCES = ("secret-env", "secret-file")
_KEY_SOURCES = ("secret-env", "secret-file", "public-key", "jwks-file")


def _check_jwt(policy: Jwt, here: Segments) -> None:
    values = {encoded: value for _attr, encoded, value in encoded_fields(policy)}
    sources = [field for field in _KEY_SOURCES if values[field] is not None]
    if not sources:
        raise Invalid(
            "A jwt policy needs a key source: secret-env, secret-file, public-key or jwks-file",
            here,
        )
    if len(sources) > 1:
        raise Invalid(
            f"A jwt policy takes exactly one key source (got {sources[0]} and {sources[1]})",
            (*here, sources[1]),
        )
    secret = sources[0] in _SECRET_SOURCES
    for index, algorithm in enumerate(policy.algorithms):
        if algorithm == "HS256" and not secret:
            raise Invalid(
                "Algorithm HS256 needs secret-env or secret-file", (*here, "algorithms", index)
            )
        if algorithm != "HS256" and secret:
            raise Invalid(
                f"Algorithm {algorithm} needs public-key or jwks-file",
                (*here, "algorithms", index),
            )
    for index, scope in enumerate(policy.required_scopes or ()):
        if any(ch.isspace() for ch in scope):
            raise Invalid(
                f"Invalid scope {scope!r} (scopes cannot contain spaces)",
                (*here, "required-scopes", index),
            )


HASH_KEYS = ("client-id", "client-ip")
HASH_KEY_PREFIXES = ("header:", "query:")


def _check_targets(policy: WebsocketUpgrade, here: Segments) -> bool:
    """The backend of a websocket-upgrade: ``target-url`` or a pool of ``targets``, and the
    pool's keys. Returns whether any target is wss://."""
    if (policy.target_url is None) == (policy.targets is None):
        raise Invalid("websocket-upgrade needs either target-url or targets (not both)"
                      if policy.target_url is not None else
                      "websocket-upgrade needs target-url or targets", here)
    if policy.target_url is not None:
        try:
            return parse_target(policy.target_url).secure
        except ValueError as exc:
            raise Invalid(str(exc), (*here, "target-url")) from None
    if not policy.targets:
        raise Invalid("targets must list at least one target", (*here, "targets"))
    secure = False
    seen: dict[tuple, int] = {}     # (scheme, host, port, path) -> index: one instance once
    for index, entry in enumerate(policy.targets):
        try:
            target = parse_target(entry.url)
        except ValueError as exc:
            raise Invalid(str(exc), (*here, "targets", index, "url")) from None
        secure |= target.secure
        same = (target.scheme, target.host.lower(), target.port, target.path)
        if same in seen:
            raise Invalid(f"Duplicate target {entry.url!r} (same as"
                          f" `{format_path((*here, 'targets', seen[same], 'url'))}`)",
                          (*here, "targets", index, "url"))
        seen[same] = index
    key = policy.hash_key
    if key is not None:
        name = key.partition(":")[2]
        if key not in HASH_KEYS and not (key.startswith(HASH_KEY_PREFIXES) and name
                                         and HTTP_TOKEN.fullmatch(name)):
            raise Invalid(f"Invalid hash-key {key!r} (client-id, client-ip, header:NAME"
                          " or query:NAME)", (*here, "hash-key"))
    hc = policy.health_check
    if hc is not None:
        for name in ("interval", "timeout"):
            if getattr(hc, name) <= 0:
                raise Invalid(f"{name} must be greater than 0", (*here, "health-check", name))
        if not hc.path.startswith("/"):
            raise Invalid(f"Invalid health-check path {hc.path!r} (it must start with '/')",
                          (*here, "health-check", "path"))
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in hc.path):
            raise Invalid(f"Invalid health-check path {hc.path!r} (no spaces or control"
                          " characters)", (*here, "health-check", "path"))
    if policy.outlier is not None and policy.outlier.eject <= 0:
        raise Invalid("eject must be greater than 0", (*here, "outlier", "eject"))
    return secure


def _check_websocket_upgrade(config: Config, policy: WebsocketUpgrade, here: Segments) -> None:
    secure = _check_targets(policy, here)
    # Zero would refuse everything: a timeout of 0 s, frames or messages of at most 0 bytes.
    for key, value in (("timeout", policy.timeout), ("idle-timeout", policy.idle_timeout),
                       ("max-lifetime", policy.max_lifetime),
                       ("max-frame-size", policy.max_frame_size),
                       ("max-message-size", policy.max_message_size)):
        if value is not None and value <= 0:
            raise Invalid(f"{key} must be greater than 0", (*here, key))
    for key, per_side in (("ping-interval", policy.ping_interval),
                          ("ping-timeout", policy.ping_timeout)):
        for side in PerSide.SIDES:
            value = getattr(per_side, side) if per_side is not None else None
            if value is not None and value <= 0:
                where = (*here, key) if per_side.client == per_side.backend else (*here, key, side)
                raise Invalid(f"{key} must be greater than 0", where)
    if policy.ping_timeout is not None and policy.ping_interval is None:
        raise Invalid("ping-timeout needs a ping-interval", (*here, "ping-timeout"))
    if policy.tls_profile is not None:
        if policy.tls_profile not in config.tls_profiles:
            known = ", ".join(sorted(config.tls_profiles)) or "none"
            raise Invalid(
                f"Unknown tls-profile {policy.tls_profile!r} (known: {known})",
                (*here, "tls-profile"),
            )
        if not secure:
            raise Invalid(
                f"tls-profile {policy.tls_profile!r} needs a wss:// target-url"
                + (" (or a wss:// target)" if policy.targets is not None else ""),
                (*here, "tls-profile"),
            )
    for index, subprotocol in enumerate(policy.subprotocols or ()):
        if not HTTP_TOKEN.fullmatch(subprotocol):
            raise Invalid(
                f"Invalid subprotocol {subprotocol!r} (must be an HTTP token)",
                (*here, "subprotocols", index),
            )
    for flow in ("request", "response"):
        for index, message_policy in enumerate(getattr(policy, flow)):
            at: Segments = (*here, flow, index)
            if isinstance(message_policy, WebsocketUpgrade):
                raise Invalid(f"websocket-upgrade cannot be inside websocket-upgrade.{flow}", at)
            if not isinstance(message_policy, MESSAGE_POLICY_TYPES):
                raise Invalid(
                    f"{policy_tag(message_policy)} runs before the upgrade;"
                    " put it in the assembly before websocket-upgrade",
                    at,
                )
            _check_plans(config, message_policy, at)
            if isinstance(message_policy, MessageRateLimit):
                _check_message_rate_limit(message_policy, at)


def _check_message_rate_limit(policy: MessageRateLimit, here: Segments) -> None:
    if policy.messages is None and policy.bytes is None:
        raise Invalid("message-rate-limit needs messages or bytes (or both)", here)
    if policy.burst is not None and policy.messages is None:
        raise Invalid("burst applies to messages, which is not set", (*here, "burst"))
    if policy.byte_burst is not None and policy.bytes is None:
        raise Invalid("byte-burst applies to bytes, which is not set", (*here, "byte-burst"))


class ClientChecker:
    """Checks clients one list after another, remembering ids and keys across lists."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.api_names = [api.name for api in config.apis]
        self.ids: dict[str, tuple[str, Segments]] = {}  # id -> (file, path of the client)
        self.keys: dict[str, str] = {}  # key -> client id

    def check(self, clients: list[Client], prefix: Segments, file: str) -> None:
        for index, client in enumerate(clients):
            at: Segments = (*prefix, index)
            if client.id in self.ids:
                other_file, other_at = self.ids[client.id]
                where = f"`{format_path(other_at)}`"
                if other_file != file:
                    where += f" in {other_file}"
                raise Invalid(f"Duplicate client id {client.id!r} (same as {where})", (*at, "id"))
            self.ids[client.id] = (file, at)
            if (client.key is None) == (client.keys is None):
                got = "both" if client.key is not None else "neither"
                raise Invalid(f"A client needs exactly one of key or keys (got {got})", at)
            if client.key is not None:
                keys: list[tuple[Segments, str]] = [((*at, "key"), client.key)]
            else:
                keys = [((*at, "keys", i), key) for i, key in enumerate(client.keys or ())]
            for key_at, key in keys:
                if key in self.keys:  # never show the key itself: it is a secret
                    raise Invalid(
                        f"Duplicate API key (already a key of client {self.keys[key]!r})", key_at
                    )
                self.keys[key] = client.id
            if client.plan != DEFAULT_PLAN and client.plan not in self.config.plans:
                raise _unknown_plan(client.plan, self.config, (*at, "plan"))
            for i, api_name in enumerate(client.apis or ()):
                if api_name not in self.api_names:
                    known = ", ".join(sorted(self.api_names))
                    raise Invalid(f"Unknown API {api_name!r} (known: {known})", (*at, "apis", i))



def check_api_key_clients(config: Config) -> None:
    """An api-key policy needs a client that may use its API: without one, every request to
    it would be refused."""
    for api_index, api in enumerate(config.apis):
        for index, policy in enumerate(api.assembly):
            if not isinstance(policy, ApiKey):
                continue
            at: Segments = ("apis", api_index, "assembly", index)
            if not config.clients:
                raise Invalid(
                    "An api-key policy needs clients, and there are none"
                    " (give clients, or a clients-file that holds some)",
                    at,
                )
            if not any(client.apis is None or api.name in client.apis
                       for client in config.clients):
                raise Invalid(
                    f"No client may use the API {api.name!r}: the apis of every client name"
                    f" other APIs (add {api.name!r} to a client's apis)",
                    at,
                )

