"""The schema: the msgspec Structs a configuration decodes into.

Key names in files are kebab-case (``tls-profiles``, ``target-url``); attributes are
snake_case. Unknown keys are errors and instances are immutable.

Policies are msgspec Structs tagged on the key ``policy``. Each belongs to one phase:
``PRE_UPGRADE_POLICY_TYPES`` run in the assembly before the ``websocket-upgrade``,
``MESSAGE_POLICY_TYPES`` run per message in ``websocket-upgrade.request`` / ``.response``. Every
policy list decodes the union of all of them, so that a policy in the wrong place gets a message
saying where it belongs rather than "invalid tag".
"""

from typing import Annotated, Literal, Union

import msgspec

from fastgw.config.values import (
    DEFAULT_PLAN,
    ByteRate,
    Duration,
    PerPlan,
    PerSide,
    PositiveSize,
    Rate,
    Size,
)

__all__ = [
    "IDENTITY_POLICY_TYPES",
    "JWT_ALGORITHMS",
    "MESSAGE_POLICY_TYPES",
    "MIN_HEADER_SIZE",
    "POLICY_TYPES",
    "PRE_UPGRADE_POLICY_TYPES",
    "Admin",
    "Api",
    "ApiKey",
    "Base",
    "BALANCE_MODES",
    "Client",
    "Cluster",
    "ClusterRedis",
    "ClientsFile",
    "Config",
    "CountLimit",
    "Events",
    "HealthCheck",
    "HistogramLog",
    "Jwt",
    "Limits",
    "Listener",
    "ListenerTls",
    "MessageRateLimit",
    "MessageSizeLimit",
    "Outlier",
    "Policy",
    "PoolTarget",
    "RateLimit",
    "TlsProfile",
    "WebsocketUpgrade",
    "policy_tag",
]

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

MIB = 1024 * 1024
MIN_HEADER_SIZE = 1024
"""The smallest ``max-header-size``: a WebSocket upgrade request head needs a few hundred
bytes."""


class Base(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """Common options: unknown keys are errors, keys are kebab-case, instances are immutable."""


class ListenerTls(Base, kw_only=True):
    """Server certificate of a listener that speaks wss."""

    cert: NonEmptyStr
    """PEM file with the certificate (it may contain the chain)."""
    key: NonEmptyStr
    """PEM file with the private key."""


class Listener(Base, kw_only=True):
    """A socket the gateway accepts clients on."""

    host: NonEmptyStr = "127.0.0.1"
    port: Port
    """0 picks a free port (tests)."""
    tls: ListenerTls | None = None
    """When present, this listener speaks wss."""


class TlsProfile(Base, kw_only=True):
    """How the gateway dials wss:// backends."""

    ca: NonEmptyStr | None = None
    """CA bundle file; None uses the system trust store."""
    verify: bool = True
    """False disables certificate and hostname checks."""
    server_name: NonEmptyStr | None = None
    """Name to check and to send as SNI (default: the target URL's host)."""
    cert: NonEmptyStr | None = None
    """Client certificate for mTLS; cert and key both or neither."""
    key: NonEmptyStr | None = None


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
LimitKey = Literal["client-ip", "client-id", "api", "global"]
"""What a count-limit or rate-limit counts by: the client's address (after trusted-proxies),
its identity (from an api-key or jwt policy before it), the API, or the whole gateway."""


# ---- Policies before the upgrade ----


class ApiKey(Base, kw_only=True, tag_field="policy", tag="api-key"):
    """Identify the client by an API key (see ``Config.clients``); 401 without a known key."""

    header: NonEmptyStr | None = "X-API-Key"
    """Request header holding the key (None: only the query parameter)."""
    query: NonEmptyStr | None = None
    """Query parameter holding the key (browsers cannot set headers on a WebSocket)."""
    hide_credentials: bool = False
    """Remove the key (the header or query parameter it was read from) from the request
    sent to the backend."""
    client_id_header: NonEmptyStr | None = None
    """Header that gives the backend the client's id (the client's own is removed)."""
    plan_header: NonEmptyStr | None = None
    """Header that gives the backend the client's plan (the client's own is removed)."""


JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
"""The JWT signature algorithms a jwt policy may name (identity verifies exactly these): HS256
with a secret, RS256 and ES256 with a public key or a JWK Set. "none" is never one."""
JwtAlgorithm = Literal[JWT_ALGORITHMS]  # type: ignore[valid-type]


class Jwt(Base, kw_only=True, tag_field="policy", tag="jwt"):
    """Identify the client by a JWT: ``Authorization: Bearer`` or the ``query`` parameter.

    Exactly one key source: ``secret-env`` or ``secret-file`` (HS256), ``public-key`` (a PEM
    file) or ``jwks-file`` (RS256, ES256). Files are absolute paths after loading.
    """

    algorithms: Annotated[list[JwtAlgorithm], msgspec.Meta(min_length=1)]
    secret_env: NonEmptyStr | None = None
    """Name of an environment variable holding the HS256 secret (checked to be set)."""
    secret_file: NonEmptyStr | None = None
    public_key: NonEmptyStr | None = None
    jwks_file: NonEmptyStr | None = None
    issuer: NonEmptyStr | None = None
    """When given, the ``iss`` claim must equal it."""
    audience: NonEmptyStr | None = None
    """When given, the ``aud`` claim (string or list) must contain it."""
    client_id_claim: NonEmptyStr = "sub"
    plan_claim: NonEmptyStr | None = None
    """Claim holding the client's plan name (absent claim: the default plan)."""
    required_scopes: list[NonEmptyStr] | None = None
    """The space-separated ``scope`` claim must hold all of these, else 403."""
    query: NonEmptyStr | None = None
    """Query parameter that may carry the token (besides ``Authorization: Bearer``)."""
    leeway: Duration = Duration(0.0)
    """Allowed clock skew for exp/nbf/iat."""
    close_on_expiry: bool = False
    """Close the connection with 1008 when the token expires."""
    hide_credentials: bool = False
    """Remove the token (the Authorization header or the query parameter it was read from)
    from the request sent to the backend."""
    client_id_header: NonEmptyStr | None = None
    """Header that gives the backend the client's id (the client's own is removed)."""
    plan_header: NonEmptyStr | None = None
    """Header that gives the backend the client's plan (the client's own is removed)."""


class CountLimit(Base, kw_only=True, tag_field="policy", tag="count-limit"):
    """At most ``max`` live connections per ``key``; over it the upgrade gets 429."""

    key: LimitKey
    max: PerPlan[PositiveInt]
    cluster: bool = True
    """With a ``cluster`` section: false keeps this limit per node."""


class RateLimit(Base, kw_only=True, tag_field="policy", tag="rate-limit"):
    """At most ``rate`` upgrade attempts per ``key`` (token bucket); over it: 429 + Retry-After."""

    key: LimitKey
    rate: PerPlan[Rate]
    burst: PerPlan[PositiveInt] | None = None
    """Bucket capacity; None: the count of ``rate`` (see burst_for)."""
    cluster: bool = True
    """With a ``cluster`` section: false keeps this limit per node."""

    def burst_for(self, plan: str) -> float:
        """The bucket capacity for ``plan``: ``burst``, else the count of the plan's rate
        (at least 1)."""
        if self.burst is not None:
            return float(self.burst.for_plan(plan))
        return max(1.0, self.rate.for_plan(plan).count)


# ---- Policies per message (in websocket-upgrade.request / .response) ----


class MessageRateLimit(Base, kw_only=True, tag_field="policy", tag="message-rate-limit"):
    """Token buckets on messages and/or bytes of one flow, per connection, client or API."""

    messages: PerPlan[Rate] | None = None
    bytes: PerPlan[ByteRate] | None = None
    burst: PerPlan[PositiveInt] | None = None
    """Capacity of the message bucket; None: the count of ``messages`` (see burst_for)."""
    byte_burst: PerPlan[PositiveSize] | None = None
    """Capacity of the byte bucket; None: the size of ``bytes`` (see byte_burst_for)."""
    scope: Literal["connection", "client", "api"] = "connection"
    action: Literal["reject", "delay", "drop"] = "reject"
    """reject: close 1008; delay: stop reading until tokens return; drop: discard, count."""
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "message-rate-limit"
    """Label in close reasons and metrics."""
    cluster: bool = True
    """With a ``cluster`` section and ``scope: client`` or ``api``: false keeps it per node."""

    def burst_for(self, plan: str) -> float | None:
        """Message bucket capacity for ``plan`` (None when ``messages`` is not set)."""
        if self.messages is None:
            return None
        if self.burst is not None:
            return float(self.burst.for_plan(plan))
        return max(1.0, self.messages.for_plan(plan).count)

    def byte_burst_for(self, plan: str) -> int | None:
        """Byte bucket capacity for ``plan`` (None when ``bytes`` is not set)."""
        if self.bytes is None:
            return None
        if self.byte_burst is not None:
            return int(self.byte_burst.for_plan(plan))
        return self.bytes.for_plan(plan).size


class MessageSizeLimit(Base, kw_only=True, tag_field="policy", tag="message-size-limit"):
    """A larger whole message (fragments included) closes the connection with 1009."""

    max: PerPlan[PositiveSize]


class PoolTarget(Base, kw_only=True):
    """One backend instance of a pool (``websocket-upgrade.targets``)."""

    url: NonEmptyStr
    """ws://host[:port][/path] or wss://...; a host name is resolved when dialled."""
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class HealthCheck(Base, kw_only=True):
    """Active checks of every target of a pool: a WebSocket upgrade to ``path`` (a 101,
    then a 1000 close, is healthy), or a bare TCP connect with ``tcp: true``."""

    interval: Duration = Duration(5.0)
    timeout: Duration = Duration(2.0)
    path: NonEmptyStr = "/"
    tcp: bool = False
    unhealthy_after: PositiveInt = 2
    """Failed checks in a row that mark a healthy target down."""
    healthy_after: PositiveInt = 2
    """Passed checks in a row that mark a down target up."""


class Outlier(Base, kw_only=True):
    """Passive checks: real dials of a target that fail ``failures`` times in a row eject it
    for ``eject`` (doubled at each new ejection while it keeps failing)."""

    failures: PositiveInt = 5
    eject: Duration = Duration(30.0)


BALANCE_MODES = ("round-robin", "least-connections", "consistent-hash", "random")


class WebsocketUpgrade(Base, kw_only=True, tag_field="policy", tag="websocket-upgrade"):
    """The last policy of every assembly: dial the backend and relay frames both ways."""

    target_url: NonEmptyStr | None = None
    """ws://host[:port][/path] or wss://...; or ``targets`` (a pool), not both."""
    targets: list[PoolTarget] | None = None
    """A pool of backend instances, balanced by ``balance``."""
    balance: Literal["round-robin", "least-connections", "consistent-hash", "random"] = (
        "least-connections")
    hash_key: NonEmptyStr | None = None
    """consistent-hash only: client-id (default) | client-ip | header:NAME | query:NAME."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    """A dial that fails (refused, reset, TLS error, 5xx answer) is tried on another
    target, within ``timeout``."""
    health_check: HealthCheck | None = None
    outlier: Outlier | None = None
    extensions: Literal["pass", "none"] = "pass"
    """pass: permessage-deflate is negotiated between client and backend (frames relayed
    compressed); none: no extension is negotiated."""
    tls_profile: NonEmptyStr | None = None
    """Name of an entry of ``Config.tls_profiles``; only for wss:// targets."""
    timeout: Duration = Duration(10.0)
    """Dial plus backend handshake."""
    idle_timeout: Duration | None = None
    max_lifetime: Duration | None = None
    max_frame_size: Size = Size(4 * MIB)
    """A larger frame from either side closes the connection with 1009."""
    max_message_size: Size = Size(16 * MIB)
    """A larger whole message (fragments included) closes the connection with 1009."""
    subprotocols: list[NonEmptyStr] | None = None
    """Optional allowlist of subprotocols forwarded to the backend."""
    ping_interval: PerSide | None = None
    """Liveness: the gateway pings a side that has sent nothing for this long (one duration
    for both sides, or ``{client: 30s, backend: 10s}``)."""
    ping_timeout: PerSide | None = None
    """How long a pinged side has to send anything (default: its ping interval); then the
    connection ends as if that side's connection were lost."""
    request: list["Policy"] = []  # type: ignore[valid-type]
    """Message policies of the request flow (client to backend), in order."""
    response: list["Policy"] = []  # type: ignore[valid-type]
    """Message policies of the response flow (backend to client), in order."""


# Every policy struct, tagged on the key "policy", by phase. To add a policy, define its struct
# with tag_field="policy" and a tag, and append it to the tuple of its phase.
PRE_UPGRADE_POLICY_TYPES: tuple[type[Base], ...] = (ApiKey, Jwt, CountLimit, RateLimit)
"""Allowed in the assembly before the websocket-upgrade."""
MESSAGE_POLICY_TYPES: tuple[type[Base], ...] = (MessageRateLimit, MessageSizeLimit)
"""Allowed only in websocket-upgrade.request / .response."""
IDENTITY_POLICY_TYPES: tuple[type[Base], ...] = (ApiKey, Jwt)
"""Policies that identify the client (at most one per assembly)."""
POLICY_TYPES: tuple[type[Base], ...] = (
    *PRE_UPGRADE_POLICY_TYPES,
    WebsocketUpgrade,
    *MESSAGE_POLICY_TYPES,
)
Policy = Union[POLICY_TYPES]  # noqa: UP007 - a Union built from a tuple


def policy_tag(policy: object) -> str:
    """The ``policy:`` name of a policy struct or struct type ("count-limit")."""
    cls = policy if isinstance(policy, type) else type(policy)
    return cls.__struct_config__.tag  # type: ignore[attr-defined, no-any-return]


class Api(Base, kw_only=True):
    """Requests whose path starts with ``path`` (and, if given, whose Host is ``host``)."""

    name: NonEmptyStr
    path: NonEmptyStr
    """Must start with "/"; the longest matching prefix wins."""
    host: NonEmptyStr | None = None
    """Match the request's Host (without port), case-insensitive; stored in lower case."""
    origins: list[NonEmptyStr] | None = None
    """Allowed origins ("https://app.example.com"), stored in their normal form (see
    ``web.normalize_origin``: lower case, without the scheme's default port); an Origin header
    is allowed when its normal form is one of them. None: any origin."""
    schemes: tuple[Literal["ws", "wss"], ...] = ("ws", "wss")
    """The schemes clients may reach the API with: ["wss"] refuses it (403) on plain
    listeners, as IBM API Connect's API-level schemes do."""
    assembly: list[Policy]  # type: ignore[valid-type]
    """Policies in order; the last one is the websocket-upgrade."""


class Client(Base, kw_only=True):
    """A client identified by an API key, as written in the configuration or clients-file."""

    id: NonEmptyStr
    key: NonEmptyStr | None = None
    keys: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)] | None = None
    """Several keys (rotation); exactly one of ``key`` and ``keys`` is given."""
    plan: NonEmptyStr = DEFAULT_PLAN
    apis: list[NonEmptyStr] | None = None
    """Names of the APIs this client may use; None: all."""


class Limits(Base, kw_only=True):
    """Capacities of the gateway's limit tables."""

    max_keys: Annotated[int, msgspec.Meta(ge=16)] = 65536
    """Slots of the keyed bucket table and of the connection table."""
    max_connections: Annotated[int, msgspec.Meta(ge=0)] | Literal["auto"] = "auto"
    """Most client connections held at once, in their handshake or relayed; at it the
    listeners stop accepting (new clients wait in the listen backlog). "auto": derived from
    the descriptor limit (see accept.derived_max_connections); 0: no cap."""
    max_handshakes_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 128
    """Most connections in their handshake (TLS, request head, dial) from one peer address;
    past it a new connection from that address is closed at once. 0: no cap."""


class Admin(Base, kw_only=True):
    """The admin API's listener (metrics, health, connections, reload, drain)."""

    host: NonEmptyStr = "127.0.0.1"
    port: Port = 9901
    token_env: NonEmptyStr | None = None
    """Name of an environment variable holding the bearer token; required beyond loopback."""


class Events(Base, kw_only=True):
    """Connection events, one JSON line each."""

    target: NonEmptyStr = "-"
    """"-" for standard output, or a file (appended)."""
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 10000
    """Events waiting to be written; past it they are dropped (and counted)."""


class HistogramLog(Base, kw_only=True):
    """Interval histograms written to a file in the HdrHistogram log format."""

    path: NonEmptyStr
    interval: Duration = Duration(10.0)


class ClusterRedis(Base, kw_only=True):
    """The shared store of the gateway nodes: one Redis (``url``) or a Redis Cluster
    (``cluster-nodes``); Valkey speaks the same protocol."""

    url: NonEmptyStr | None = None
    """redis://host[:port][/db] or rediss:// (TLS)."""
    cluster_nodes: list[NonEmptyStr] | None = None
    """redis:// or rediss:// URLs of some nodes of a Redis Cluster."""
    timeout: Duration = Duration(0.05)
    """The longest a call to the store may take (then it counts as failed)."""
    tls_profile: NonEmptyStr | None = None
    """An entry of ``tls-profiles`` for rediss:// (default: the system's trust)."""


class Cluster(Base, kw_only=True):
    """Gateway nodes sharing their client-, api- and global-keyed limits through Redis, by
    leased shares (see README, "Cluster")."""

    redis: ClusterRedis
    node_id: NonEmptyStr | None = None
    """Default: the host name and the process id."""
    lease: Duration = Duration(5.0)
    """How long a node's share is valid without renewal."""
    refresh: Duration = Duration(0.5)
    """How often a node renews its shares and reports its demand."""
    on_unreachable: Literal["hold", "open", "closed"] = "hold"
    """Once a share's lease ran out without a renewal (or a new key got no first grant): hold
    keeps the last share (a new key gets limit / nodes); open applies the whole limit on this
    node alone; closed admits nothing (503 for an upgrade, a message is over its limit)."""


class Config(Base, kw_only=True):
    """The whole gateway configuration."""

    listeners: Annotated[list[Listener], msgspec.Meta(min_length=1)]
    tls_profiles: dict[str, TlsProfile] = {}
    apis: Annotated[list[Api], msgspec.Meta(min_length=1)]
    handshake_timeout: Duration = Duration(10.0)
    """A client must complete its HTTP upgrade request within this."""
    max_header_size: Size = Size(16384)
    """A larger request head is answered with 431."""
    drain_time: Duration = Duration(10.0)
    """On SIGTERM/SIGINT, time given to live connections before exit."""
    backlog: Annotated[int, msgspec.Meta(ge=1)] = 1024
    trusted_proxies: list[NonEmptyStr] = []
    """Networks whose X-Forwarded-For is believed; normalised to "10.0.0.0/8" form."""
    plans: list[NonEmptyStr] = []
    """Plan names besides "default", which always exists."""
    clients: list[Client] = []
    """API-key clients. After load(), also those of ``clients_file`` (after the inline ones)."""
    clients_file: NonEmptyStr | None = None
    """More clients (YAML, TOML or JSON); an absolute path after loading."""
    limits: Limits = msgspec.field(default_factory=Limits)
    admin: Admin | None = None
    events: Events | None = None
    histogram_log: HistogramLog | None = None
    metrics: bool = True
    """false: no per-message counting or histograms (connection counts remain)."""
    reload_grace: Duration = Duration(30.0)
    """After a reload that removes an API, its live connections get this long before 1001."""
    workers: Annotated[int, msgspec.Meta(ge=1, le=1024)] | Literal["auto"] = 1
    """Worker processes behind the listeners (SO_REUSEPORT, one socket each, held by a
    supervisor); "auto": one per CPU the process may run on. 1: one process, no supervisor."""
    worker_heartbeat_timeout: Duration = Duration(10.0)
    """A worker whose loop has not beaten for this long is killed and replaced."""
    cluster: Cluster | None = None
    """Several gateway nodes sharing their limits (absent: each node on its own)."""


class ClientsFile(Base, kw_only=True):
    """A clients-file holding a mapping (the only form TOML can hold)."""

    clients: list[Client] = []
