"""Gateway configuration: msgspec Structs, and loading from YAML, TOML or JSON.

``load(path)`` reads a configuration file (the format is chosen by the file's extension),
``loads(text, fmt)`` parses a string. Both return a frozen :class:`Config` or raise
:class:`ConfigError`, whose ``str()`` reads like a compiler message::

    gateway.yaml:14: Expected `int` >= 0 - at `$.listeners[0].port`

Decoding happens in three steps:

1. the text is parsed into plain Python objects (for YAML we also keep the node tree, to map an
   error's ``$.path`` back to a line number; for TOML and JSON a scan of the text, made when
   an error needs it, gives the line of each key);
2. ``msgspec.convert`` turns those objects into Structs; it checks key names, types and value
   limits, and reports errors with a ``$.path``. Durations and sizes have types of their own
   (float and int subclasses) that msgspec hands to ``_dec_hook``, so their errors carry the
   path too;
3. checks that span several fields (references between sections, uniqueness, order of
   policies, target URLs, files on disk) run on the decoded Structs, and file paths are
   resolved to absolute ones;
4. the ``clients-file``, if any, is read and checked the same way (its errors name that file)
   and its clients are appended to ``Config.clients``.

Key names in files are kebab-case (``tls-profiles``, ``target-url``); attributes are snake_case.
This module imports nothing else from fastgw but ``fastgw.uri`` (pure functions: the normal
form of an API's path and host).

Value types of their own (decoded by ``_dec_hook``, so that their errors carry the ``$.path``):
:class:`Duration`, :class:`Size`, :class:`Rate` ("100/1s"), :class:`ByteRate` ("1MiB/1s") and
:class:`PerPlan` (one value, or a mapping ``{default: ..., gold: ...}`` of values per plan).

Policies are msgspec Structs tagged on the key ``policy``. Each belongs to one phase:
``PRE_UPGRADE_POLICY_TYPES`` run in the assembly before the ``websocket-upgrade``,
``MESSAGE_POLICY_TYPES`` run per message in ``websocket-upgrade.request`` / ``.response``. Every
policy list decodes the union of all of them, so that a policy in the wrong place gets a message
saying where it belongs rather than "invalid tag".
"""

import bisect
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Generic, Literal, TypeVar, Union
from urllib.parse import urlsplit

import msgspec
import yaml

from fastgw.uri import BadTarget, normalize_host, normalize_path

__all__ = [
    "DEFAULT_PLAN",
    "IDENTITY_POLICY_TYPES",
    "MAX_DURATION",
    "MESSAGE_POLICY_TYPES",
    "MIN_HEADER_SIZE",
    "POLICY_TYPES",
    "PRE_UPGRADE_POLICY_TYPES",
    "Api",
    "ApiKey",
    "ByteRate",
    "Client",
    "Config",
    "ConfigError",
    "CountLimit",
    "Duration",
    "Jwt",
    "Limits",
    "Listener",
    "ListenerTls",
    "MessageRateLimit",
    "MessageSizeLimit",
    "PerPlan",
    "PerSide",
    "Policy",
    "Rate",
    "RateLimit",
    "ResolvedClient",
    "Size",
    "Target",
    "TlsProfile",
    "WebsocketUpgrade",
    "clients_of",
    "enc_hook",
    "load",
    "loads",
    "parse_byte_rate",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "parse_target",
    "policy_tag",
]


# A ConfigError message longer than this (it quotes a long value or key) loses its middle.
MAX_MESSAGE = 400


def _one_bounded_line(message: str) -> str:
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) > MAX_MESSAGE:
        half = MAX_MESSAGE // 2 - 2
        message = f"{message[:half]} ... {message[-half:]}"
    return message


class ConfigError(Exception):
    """A configuration that cannot be used.

    ``str(error)`` is ``"{file}:{line}: {message}"``, or ``"{file}: {message}"`` when the line is
    unknown. ``message`` ends with `` - at `$.path` `` when the problem has a place in the
    document; ``path`` holds that ``$.path`` alone (or None). The message is one line (line
    breaks of quoted values escaped) of at most MAX_MESSAGE characters.
    """

    def __init__(
        self, file: str, message: str, line: int | None = None, path: str | None = None
    ) -> None:
        message = _one_bounded_line(message)
        super().__init__(file, message, line, path)
        self.file = file
        self.message = message
        self.line = line
        self.path = path

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


# --------------------------------------------------------------------------------------------
# Durations and sizes
# --------------------------------------------------------------------------------------------

class Duration(float):
    """Seconds. In a file: a number of seconds, or a string such as "250ms", "10s", "2m", "1h".

    A float subclass, so that msgspec hands these fields to ``_dec_hook``; use the values as
    floats. (msgspec's encoders need ``enc_hook=float`` for them.)
    """


class Size(int):
    """Bytes. In a file: an int, or a string such as "512B", "64KiB", "1MiB", "10KB".

    An int subclass, so that msgspec hands these fields to ``_dec_hook``; use the values as
    ints. (msgspec's encoders need ``enc_hook=int`` for them.)
    """


class _PositiveSize(Size):
    """A Size of at least 1 byte (decoded to a plain Size)."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A plain number ("10", "1.5", "1e3": PyYAML reads 1e3 as a string) with an optional unit.
_DURATION_RE = re.compile(r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(ms|s|m|h)?")

_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_DURATION = 365 * 86400.0
"""The longest duration a file may give (365 days, 8760h): every timer the gateway arms
stays within what the event loop's clock handles."""


def parse_duration(value: object) -> float:
    """Return ``value`` (a number of seconds, or a string such as "250ms") as float seconds.

    Raises ValueError for anything else, including negative and non-finite numbers and
    durations longer than ``MAX_DURATION``.
    """
    seconds: float | None = None
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if seconds is None or seconds < 0:
        raise ValueError(
            f"Invalid duration {value!r} (use a number of seconds, or 250ms, 10s, 2m, 1h)"
        )
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"Invalid duration {value!r} (must be finite and at most 365 days: 8760h)")
    return seconds


def parse_size(value: object) -> int:
    """Return ``value`` (an int of bytes, or a string such as "64KiB") as int bytes.

    Raises ValueError for anything else, including negative numbers, floats and fractions
    of a byte ("1.5KiB" is fine, "0.5B" is not).
    """
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            # Exact arithmetic on the digits: "1.5KiB" -> 1536 without float rounding.
            whole, _, fraction = match[1].partition(".")
            scale = 10 ** len(fraction)
            numerator = int(whole + fraction) * _SIZE_UNITS[match[2] or "B"]
            if numerator % scale == 0:
                size = numerator // scale
    if size is None or size < 0:
        raise ValueError(
            f"Invalid size {value!r} (use a number of bytes, or 512B, 64KiB, 1MiB, 1GiB, 10KB, 1MB)"
        )
    return size


# --------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class _Frozen:
    """Immutable value object: attributes are set once, in __init__, with object.__setattr__."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


class Rate(_Frozen):
    """``count`` events per ``period`` seconds. In a file: "100/1s", "5/s", "10/250ms", "1000/1m".

    ``count`` (> 0) is also the default burst of the limits that take a Rate.
    """

    __slots__ = ("count", "period")
    count: float
    period: float

    def __init__(self, count: float, period: float) -> None:
        object.__setattr__(self, "count", float(count))
        object.__setattr__(self, "period", float(period))

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        other_values = (other.count, other.period)  # type: ignore[attr-defined]
        return (self.count, self.period) == other_values

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.count, self.period))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.count!r}, {self.period!r})"

    def __str__(self) -> str:
        """The form of a file, which parse_rate reads back: "100/1s"."""
        return f"{_format_number(self.count)}/{_format_number(self.period)}s"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.count, self.period))


class ByteRate(_Frozen):
    """``size`` bytes per ``period`` seconds. In a file: "1MiB/1s", "64KiB/100ms", "1000/s".

    ``size`` (> 0) is also the default byte burst.
    """

    __slots__ = ("size", "period")
    size: int
    period: float

    def __init__(self, size: int, period: float) -> None:
        object.__setattr__(self, "size", int(size))
        object.__setattr__(self, "period", float(period))

    @property
    def per_second(self) -> float:
        return self.size / self.period

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        other_values = (other.size, other.period)  # type: ignore[attr-defined]
        return (self.size, self.period) == other_values

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.size, self.period))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size!r}, {self.period!r})"

    def __str__(self) -> str:
        """The form of a file, which parse_byte_rate reads back: "1048576/1s"."""
        return f"{self.size}/{_format_number(self.period)}s"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size, self.period))


def _parse_period(text: str) -> float | None:
    """ "1s", "250ms", "2m", "1h", "10" (seconds) or a bare unit "s" -> seconds > 0, else None."""
    text = text.strip()
    if text in _DURATION_UNITS:
        return _DURATION_UNITS[text]
    try:
        period = parse_duration(text)
    except ValueError:
        return None
    return period if period > 0 else None


def _split_rate(value: object) -> tuple[str, float] | None:
    if not isinstance(value, str) or value.count("/") != 1:
        return None
    amount, _, period_text = value.partition("/")
    period = _parse_period(period_text)
    return None if period is None else (amount.strip(), period)


def parse_rate(value: object) -> Rate:
    """Parse "count/period" ("100/1s", "5/s", "0.5/1m"); raise ValueError if it is bad."""
    if parts := _split_rate(value):
        amount, period = parts
        if _NUMBER_RE.fullmatch(amount):
            count = float(amount)
            if count > 0 and math.isfinite(count):
                return Rate(count, period)
    raise ValueError(f"Invalid rate {value!r} (use count/period, e.g. 100/1s)")


def parse_byte_rate(value: object) -> ByteRate:
    """Parse "size/period" ("1MiB/1s", "512KiB/250ms"); raise ValueError if it is bad."""
    if parts := _split_rate(value):
        amount, period = parts
        try:
            size = parse_size(amount)
        except ValueError:
            size = 0
        if size > 0:
            return ByteRate(size, period)
    raise ValueError(f"Invalid byte rate {value!r} (use size/period, e.g. 1MiB/1s)")


# --------------------------------------------------------------------------------------------
# Values per plan
# --------------------------------------------------------------------------------------------

DEFAULT_PLAN = "default"
"""The plan every configuration has; clients without a plan are on it."""

_T = TypeVar("_T")


class PerPlan(_Frozen, Generic[_T]):
    """A value that may differ per plan. In a file either one value (for every plan) or a
    mapping ``{default: 5, gold: 50}``, which must have a "default" entry.

    ``values`` is a read-only mapping plan -> value that always holds "default";
    ``for_plan(plan)`` gives the plan's value, or the default one for a plan not listed.
    """

    __slots__ = ("values",)
    values: Mapping[str, _T]

    def __init__(self, values: "Mapping[str, _T] | _T") -> None:
        if not isinstance(values, Mapping):
            values = {DEFAULT_PLAN: values}
        if DEFAULT_PLAN not in values:
            raise ValueError(f"PerPlan values need a {DEFAULT_PLAN!r} entry")
        object.__setattr__(self, "values", types.MappingProxyType(dict(values)))

    def for_plan(self, plan: str) -> _T:
        return self.values.get(plan, self.values[DEFAULT_PLAN])

    @property
    def default(self) -> _T:
        return self.values[DEFAULT_PLAN]

    @property
    def is_uniform(self) -> bool:
        """True when only the default value is given (the same for every plan)."""
        return len(self.values) == 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerPlan):
            return NotImplemented
        return dict(self.values) == dict(other.values)

    def __hash__(self) -> int:
        return hash(frozenset(self.values.items()))

    def __repr__(self) -> str:
        return f"PerPlan({dict(self.values)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerPlan, (dict(self.values),))


class PerSide(_Frozen):
    """A duration for each side of a relayed connection. In a file either one duration (both
    sides) or a mapping ``{client: 30s, backend: 10s}`` (a side left out has none).

    ``client`` and ``backend`` are seconds (floats) or None.
    """

    __slots__ = ("client", "backend")
    client: "float | None"
    backend: "float | None"
    SIDES = ("client", "backend")

    def __init__(self, client: "float | None", backend: "float | None") -> None:
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "backend", backend)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerSide):
            return NotImplemented
        return (self.client, self.backend) == (other.client, other.backend)

    def __hash__(self) -> int:
        return hash((self.client, self.backend))

    def __repr__(self) -> str:
        return f"PerSide(client={self.client!r}, backend={self.backend!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerSide, (self.client, self.backend))


class _SubPathError(ValueError):
    """Raised by _dec_hook for a problem below the field msgspec knows of (a plan's entry).

    msgspec keeps it as the __cause__ of its ValidationError; _split_validation_error adds
    ``segments`` to the field's path. "{field}" in the message becomes the field's name.
    """

    def __init__(self, message: str, segments: tuple[str | int, ...], in_key: bool = False):
        super().__init__(message)
        self.message = message
        self.segments = segments
        self.in_key = in_key


def _convert_below(value: Any, value_type: Any, segments: "_Segments") -> Any:
    """Convert a value found at ``segments`` below the field _dec_hook was called for."""
    try:
        return _convert(value, value_type)
    except msgspec.ValidationError as exc:
        problem = _split_validation_error(exc)
        raise _SubPathError(
            problem.message, (*segments, *problem.segments), problem.in_key
        ) from None


def _decode_per_plan(value_type: Any, obj: Any) -> PerPlan[Any]:
    if not isinstance(obj, dict):
        return PerPlan({DEFAULT_PLAN: _convert_below(obj, value_type, ())})
    values = {}
    for plan, value in obj.items():
        if not isinstance(plan, str):
            got = "null" if plan is None else type(plan).__name__
            raise _SubPathError(f"Expected `str`, got `{got}`", (), in_key=True)
        values[plan] = _convert_below(value, value_type, (plan,))
    if DEFAULT_PLAN not in values:
        given = ", ".join(values) or "none"
        raise _SubPathError(
            f"{{field}} needs a {DEFAULT_PLAN!r} entry when given per plan (plans given: {given})",
            (),
        )
    return PerPlan(values)


def _decode_per_side(obj: Any) -> PerSide:
    if not isinstance(obj, dict):
        value = _convert_below(obj, Duration, ())
        return PerSide(float(value), float(value))
    sides: dict[str, float] = {}
    for side, value in obj.items():
        if side not in PerSide.SIDES:
            raise _SubPathError(f"Unknown side {side!r} - expected one of: client, backend", (),
                                in_key=True)
        sides[side] = float(_convert_below(value, Duration, (side,)))
    return PerSide(sides.get("client"), sides.get("backend"))


def _dec_hook(type_: Any, obj: Any) -> Any:
    """msgspec decoding hook for our value types; its ValueErrors get the field's $.path."""
    if type_ is Duration:
        return Duration(parse_duration(obj))
    if type_ is Size:
        return Size(parse_size(obj))
    if type_ is _PositiveSize:
        size = parse_size(obj)
        if size < 1:
            raise ValueError(f"Invalid size {obj!r} (must be at least 1 byte)")
        return _PositiveSize(size)
    if type_ is Rate:
        return parse_rate(obj)
    if type_ is ByteRate:
        return parse_byte_rate(obj)
    if typing.get_origin(type_) is PerPlan:
        (value_type,) = typing.get_args(type_)
        return _decode_per_plan(value_type, obj)
    if type_ is PerSide:
        return _decode_per_side(obj)
    raise NotImplementedError(f"Objects of type {type_!r} are not supported")


def enc_hook(obj: Any) -> Any:
    """msgspec encoding hook for our value types (``msgspec.to_builtins(config,
    enc_hook=enc_hook)``); what it gives decodes back to equal values."""
    if isinstance(obj, Duration):
        return float(obj)
    if isinstance(obj, Size):
        return int(obj)
    if isinstance(obj, (Rate, ByteRate)):
        return str(obj)
    if isinstance(obj, PerPlan):
        return {plan: enc_hook(value) for plan, value in obj.values.items()}
    if isinstance(obj, PerSide):
        return {side: getattr(obj, side) for side in PerSide.SIDES if getattr(obj, side) is not None}
    if isinstance(obj, frozenset):
        return sorted(obj)
    if isinstance(obj, (int, float, str)):
        return obj
    raise NotImplementedError(f"Objects of type {type(obj)!r} are not supported")


# --------------------------------------------------------------------------------------------
# The configuration structs
# --------------------------------------------------------------------------------------------

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

MIB = 1024 * 1024
MIN_HEADER_SIZE = 1024
"""The smallest ``max-header-size``: a WebSocket upgrade request head needs a few hundred
bytes."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """Common options: unknown keys are errors, keys are kebab-case, instances are immutable."""


class ListenerTls(_Base, kw_only=True):
    """Server certificate of a listener that speaks wss."""

    cert: NonEmptyStr
    """PEM file with the certificate (it may contain the chain)."""
    key: NonEmptyStr
    """PEM file with the private key."""


class Listener(_Base, kw_only=True):
    """A socket the gateway accepts clients on."""

    host: NonEmptyStr = "127.0.0.1"
    port: Port
    """0 picks a free port (tests)."""
    tls: ListenerTls | None = None
    """When present, this listener speaks wss."""


class TlsProfile(_Base, kw_only=True):
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


class ApiKey(_Base, kw_only=True, tag_field="policy", tag="api-key"):
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


JwtAlgorithm = Literal["HS256", "RS256", "ES256"]


class Jwt(_Base, kw_only=True, tag_field="policy", tag="jwt"):
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

    def read_secret(self) -> bytes:
        """The HS256 secret: the environment variable's value (UTF-8), or the file's bytes
        without trailing CR/LF. Raises KeyError/OSError when it has gone since loading."""
        if self.secret_env is not None:
            return os.environ[self.secret_env].encode()
        if self.secret_file is not None:
            with open(self.secret_file, "rb") as file:
                return file.read().rstrip(b"\r\n")
        raise ValueError("this jwt policy has no secret (it uses public-key or jwks-file)")


class CountLimit(_Base, kw_only=True, tag_field="policy", tag="count-limit"):
    """At most ``max`` live connections per ``key``; over it the upgrade gets 429."""

    key: LimitKey
    max: PerPlan[PositiveInt]


class RateLimit(_Base, kw_only=True, tag_field="policy", tag="rate-limit"):
    """At most ``rate`` upgrade attempts per ``key`` (token bucket); over it: 429 + Retry-After."""

    key: LimitKey
    rate: PerPlan[Rate]
    burst: PerPlan[PositiveInt] | None = None
    """Bucket capacity; None: the count of ``rate`` (see burst_for)."""

    def burst_for(self, plan: str) -> float:
        """The bucket capacity for ``plan``: ``burst``, else the count of the plan's rate
        (at least 1)."""
        if self.burst is not None:
            return float(self.burst.for_plan(plan))
        return max(1.0, self.rate.for_plan(plan).count)


# ---- Policies per message (in websocket-upgrade.request / .response) ----


class MessageRateLimit(_Base, kw_only=True, tag_field="policy", tag="message-rate-limit"):
    """Token buckets on messages and/or bytes of one flow, per connection, client or API."""

    messages: PerPlan[Rate] | None = None
    bytes: PerPlan[ByteRate] | None = None
    burst: PerPlan[PositiveInt] | None = None
    """Capacity of the message bucket; None: the count of ``messages`` (see burst_for)."""
    byte_burst: PerPlan[_PositiveSize] | None = None
    """Capacity of the byte bucket; None: the size of ``bytes`` (see byte_burst_for)."""
    scope: Literal["connection", "client", "api"] = "connection"
    action: Literal["reject", "delay", "drop"] = "reject"
    """reject: close 1008; delay: stop reading until tokens return; drop: discard, count."""
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "message-rate-limit"
    """Label in close reasons and metrics."""

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


class MessageSizeLimit(_Base, kw_only=True, tag_field="policy", tag="message-size-limit"):
    """A larger whole message (fragments included) closes the connection with 1009."""

    max: PerPlan[_PositiveSize]


class WebsocketUpgrade(_Base, kw_only=True, tag_field="policy", tag="websocket-upgrade"):
    """The last policy of every assembly: dial the backend and relay frames both ways."""

    target_url: NonEmptyStr
    """ws://host[:port][/path] or wss://..."""
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
PRE_UPGRADE_POLICY_TYPES: tuple[type[_Base], ...] = (ApiKey, Jwt, CountLimit, RateLimit)
"""Allowed in the assembly before the websocket-upgrade."""
MESSAGE_POLICY_TYPES: tuple[type[_Base], ...] = (MessageRateLimit, MessageSizeLimit)
"""Allowed only in websocket-upgrade.request / .response."""
IDENTITY_POLICY_TYPES: tuple[type[_Base], ...] = (ApiKey, Jwt)
"""Policies that identify the client (at most one per assembly)."""
POLICY_TYPES: tuple[type[_Base], ...] = (
    *PRE_UPGRADE_POLICY_TYPES,
    WebsocketUpgrade,
    *MESSAGE_POLICY_TYPES,
)
Policy = Union[POLICY_TYPES]  # noqa: UP007 - a Union built from a tuple


def policy_tag(policy: object) -> str:
    """The ``policy:`` name of a policy struct or struct type ("count-limit")."""
    cls = policy if isinstance(policy, type) else type(policy)
    return cls.__struct_config__.tag  # type: ignore[attr-defined, no-any-return]


class Api(_Base, kw_only=True):
    """Requests whose path starts with ``path`` (and, if given, whose Host is ``host``)."""

    name: NonEmptyStr
    path: NonEmptyStr
    """Must start with "/"; the longest matching prefix wins."""
    host: NonEmptyStr | None = None
    """Match the request's Host (without port), case-insensitive; stored in lower case."""
    origins: list[NonEmptyStr] | None = None
    """Allowed Origin header values ("https://app.example.com"), stored in lower case; compare
    the lower-cased header exactly. None: any origin."""
    schemes: tuple[Literal["ws", "wss"], ...] = ("ws", "wss")
    """The schemes clients may reach the API with: ["wss"] refuses it (403) on plain
    listeners, as IBM API Connect's API-level schemes do."""
    assembly: list[Policy]  # type: ignore[valid-type]
    """Policies in order; the last one is the websocket-upgrade."""


class Client(_Base, kw_only=True):
    """A client identified by an API key, as written in the configuration or clients-file."""

    id: NonEmptyStr
    key: NonEmptyStr | None = None
    keys: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)] | None = None
    """Several keys (rotation); exactly one of ``key`` and ``keys`` is given."""
    plan: NonEmptyStr = DEFAULT_PLAN
    apis: list[NonEmptyStr] | None = None
    """Names of the APIs this client may use; None: all."""


class ResolvedClient(msgspec.Struct, frozen=True, kw_only=True):
    """A client as the gateway uses it (see ``Config.all_clients()``)."""

    id: str
    keys: tuple[str, ...]
    plan: str
    apis: frozenset[str] | None
    """None: every API."""

    def may_use(self, api_name: str) -> bool:
        return self.apis is None or api_name in self.apis


class Limits(_Base, kw_only=True):
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


class Admin(_Base, kw_only=True):
    """The admin API's listener (metrics, health, connections, reload, drain)."""

    host: NonEmptyStr = "127.0.0.1"
    port: Port = 9901
    token_env: NonEmptyStr | None = None
    """Name of an environment variable holding the bearer token; required beyond loopback."""


class Events(_Base, kw_only=True):
    """Connection events, one JSON line each."""

    target: NonEmptyStr = "-"
    """"-" for standard output, or a file (appended)."""
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 10000
    """Events waiting to be written; past it they are dropped (and counted)."""


class HistogramLog(_Base, kw_only=True):
    """Interval histograms written to a file in the HdrHistogram log format."""

    path: NonEmptyStr
    interval: Duration = Duration(10.0)


class Config(_Base, kw_only=True):
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

    def known_plans(self) -> tuple[str, ...]:
        """"default" followed by the declared plans."""
        return (DEFAULT_PLAN, *(plan for plan in self.plans if plan != DEFAULT_PLAN))

    def all_clients(self) -> tuple[ResolvedClient, ...]:
        """Every client (inline, then clients-file) with its keys as a tuple."""
        return tuple(
            ResolvedClient(
                id=client.id,
                keys=(client.key,) if client.key is not None else tuple(client.keys or ()),
                plan=client.plan,
                apis=frozenset(client.apis) if client.apis is not None else None,
            )
            for client in self.clients
        )

    def clients_by_key(self) -> dict[str, ResolvedClient]:
        """API key -> client (keys are unique across clients)."""
        return {key: client for client in self.all_clients() for key in client.keys}

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(network) for network in self.trusted_proxies)


def clients_of(config: Config) -> tuple[ResolvedClient, ...]:
    """Same as ``config.all_clients()``."""
    return config.all_clients()


# --------------------------------------------------------------------------------------------
# Target URLs
# --------------------------------------------------------------------------------------------


class Target(msgspec.Struct, frozen=True):
    """A parsed backend URL."""

    scheme: str
    """"ws" or "wss"."""
    host: str
    """Lower case; an IPv6 address comes without brackets."""
    port: int
    """From the URL, else 80 for ws and 443 for wss."""
    path: str
    """Path and query ("/" when the URL has none), as sent in the request line."""
    secure: bool
    """True for wss."""


def parse_target(url: str) -> Target:
    """Parse a ws:// or wss:// URL (http:// and https:// mean the same); raise ValueError
    with a readable message if it is bad."""

    def invalid(reason: str) -> ValueError:
        return ValueError(f"Invalid target URL {url!r} ({reason})")

    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise invalid("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise invalid("scheme must be ws or wss (http and https mean ws and wss)")
    if not parts.hostname:
        raise invalid("missing host")
    if parts.username is not None or parts.password is not None:
        raise invalid("user names and passwords are not supported")
    if parts.fragment or url.endswith("#"):
        raise invalid("fragments are not allowed")
    if port == 0:
        raise invalid("port 0")
    # IBM API Connect's assemblies write http:// and https:// target URLs.
    secure = parts.scheme in ("wss", "https")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(
        scheme="wss" if secure else "ws",
        host=parts.hostname,
        port=port if port is not None else (443 if secure else 80),
        path=path,
        secure=secure,
    )


# --------------------------------------------------------------------------------------------
# Paths into the document
# --------------------------------------------------------------------------------------------

# A path is a tuple of segments: str for a key, int for a list index, _ANY_KEY for msgspec's
# "[...]" (some value of a dict, msgspec does not say which).
_ANY_KEY = "[...]"
_Segments = tuple[str | int, ...]
_LineOf = Callable[[_Segments], "int | None"]


class _Invalid(Exception):
    """A problem found while decoding; turned into a ConfigError by loads()."""

    def __init__(
        self,
        message: str,
        segments: _Segments = (),
        *,
        in_key: bool = False,
        source: "tuple[str, _LineOf | None] | None" = None,
    ) -> None:
        super().__init__(message, segments)
        self.message = message
        self.segments = segments
        self.in_key = in_key  # msgspec's "at `key` in `$.x`": a bad key of the mapping at $.x
        self.source = source  # (file name, line_of) when not the main configuration file


def _format_path(segments: _Segments) -> str:
    """("apis", 0, "target-url") -> "$.apis[0].target-url"."""
    out = ["$"]
    for seg in segments:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif seg == _ANY_KEY:
            out.append(_ANY_KEY)
        else:
            out.append(f".{seg}")
    return "".join(out)


_PATH_SEGMENT_RE = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|(\[\.\.\.\])")
_AT_KEY_RE = re.compile(r"(.*) - at `key` in `(\$[^`]*)`", re.S)
_AT_RE = re.compile(r"(.*) - at `(\$[^`]*)`", re.S)


def _parse_path(path: str) -> _Segments:
    """"$.apis[0].target-url" -> ("apis", 0, "target-url")."""
    segments: list[str | int] = []
    for name, index, any_key in _PATH_SEGMENT_RE.findall(path[1:]):
        segments.append(name if name else int(index) if index else _ANY_KEY)
    return tuple(segments)


def _split_validation_error(error: msgspec.ValidationError) -> _Invalid:
    """Split msgspec's "message - at `$.path`" into its parts."""
    text = str(error)
    if match := _AT_KEY_RE.fullmatch(text):
        problem = _Invalid(match[1], _parse_path(match[2]), in_key=True)
    elif match := _AT_RE.fullmatch(text):
        problem = _Invalid(match[1], _parse_path(match[2]))
    else:
        problem = _Invalid(text)  # an error at the top level has no path
    cause = error.__cause__
    if isinstance(cause, _SubPathError):  # a problem below the field (a plan's entry)
        field = next((seg for seg in reversed(problem.segments) if isinstance(seg, str)), "value")
        problem.message = cause.message.replace("{field}", f"`{field}`")
        problem.segments = (*problem.segments, *cause.segments)
        problem.in_key = cause.in_key
    return problem


# --------------------------------------------------------------------------------------------
# Parsers: text -> (plain objects, function giving the line of a path or None)
# --------------------------------------------------------------------------------------------

_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, name: str) -> tuple[Any, _LineOf | None]:
    loader = _YamlLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_yaml_duplicate_keys(root, name)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            detail = f"{exc.problem} ({exc.context})"
        line = mark.line + 1 if mark else None
        raise ConfigError(name, f"Invalid YAML: {detail}", line) from None
    except yaml.reader.ReaderError as exc:
        # "unacceptable character #x000b: ...", then a second line giving the position.
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(name, f"Invalid YAML: {str(exc).splitlines()[0]}", line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"Invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(name, "Invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()

    def line_of(segments: _Segments) -> int | None:
        return _yaml_line(root, segments)

    return data, line_of


def _yaml_line(root: yaml.Node | None, segments: _Segments) -> int | None:
    """Line (1-based) of the node at ``segments``, or of the deepest node on the way there.

    A key of a mapping is reported at the key's line, a list item at the item's first line.
    """
    if root is None:
        return None
    node = root
    line = node.start_mark.line + 1
    for seg in segments:
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == seg:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int):
            if seg >= len(node.value):
                return line
            node = node.value[seg]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _check_yaml_duplicate_keys(root: yaml.Node, name: str) -> None:
    """PyYAML keeps the last of duplicate keys silently; we refuse them instead."""
    seen_nodes: set[int] = set()  # anchors and aliases may share (or loop back to) nodes

    def walk(node: yaml.Node, segments: _Segments) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, key_node.value) in keys:
                        path = _format_path(segments)
                        raise ConfigError(
                            name,
                            f"Duplicate key {key_node.value!r} - at `{path}`",
                            key_node.start_mark.line + 1,
                            path,
                        )
                    keys.add((key_node.tag, key_node.value))
                    walk(value_node, (*segments, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*segments, index))

    walk(root, ())


def _parse_toml(text: str, name: str) -> tuple[Any, _LineOf | None]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11-3.13 only give the position inside the message: "... (at line 2, column 5)".
        message = str(exc).splitlines()[0]
        line = getattr(exc, "lineno", None)
        if match := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message):
            message, line = f"{match[1]} (column {match[3]})", int(match[2])
        elif line is None and message.endswith("(at end of document)"):
            line = _last_line(text)
        raise ConfigError(name, f"Invalid TOML: {message}", line) from None
    except RecursionError:
        raise ConfigError(name, "Invalid TOML: nested too deeply") from None
    return data, _lazy_line_of(lambda: _TomlLines(text).scan())


def _parse_json(text: str, name: str) -> tuple[Any, _LineOf | None]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise _JsonDuplicateKey
        return result

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"Invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise ConfigError(name, "Invalid JSON: nested too deeply") from None
    except _JsonDuplicateKey:
        scan = _JsonLines(text)
        scan.scan()
        if scan.duplicate is None:  # not expected: the scan sees what json.loads saw
            raise ConfigError(name, "Duplicate key") from None
        segments, key, line = scan.duplicate
        path = _format_path(segments)
        raise ConfigError(name, f"Duplicate key {key!r} - at `{path}`", line, path) from None
    return data, _lazy_line_of(lambda: _JsonLines(text).scan())


def _last_line(text: str) -> int:
    """The line of the last character that is not white space (1 for a blank text)."""
    return text.rstrip().count("\n") + 1


def _lazy_line_of(scan: Callable[[], dict[_Segments, int]]) -> _LineOf:
    """A line_of for a map path -> line that ``scan`` builds when first needed; a path not in
    the map gets the line of its nearest parent that is."""
    lines: dict[_Segments, int] | None = None

    def line_of(segments: _Segments) -> int | None:
        nonlocal lines
        if lines is None:
            lines = scan()
        for end in range(len(segments), -1, -1):
            if segments[:end] in lines:
                return lines[segments[:end]]
        return None

    return line_of


class _JsonDuplicateKey(Exception):
    """An object with a key given twice (the scan of _JsonLines finds where)."""


class _ScanStop(Exception):
    """Text a _LineScan did not expect."""


class _LineScan:
    """The line of each key (and list item) of a document that its parser has accepted.

    ``scan()`` returns {path: line}: the line of the key for a mapping entry, of the item's
    first character for a list item, of the first content for the top level ``()``. The scan
    trusts the parser: on text it does not expect it stops and keeps what it found.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[_Segments, int] = {}
        self._line_starts = [0, *(match.end() for match in re.finditer("\n", text))]

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_right(self._line_starts, self.pos if pos is None else pos)

    def record(self, segments: _Segments, line: int) -> None:
        """Record ``line`` for ``segments``, and for each parent that has no line yet."""
        for end in range(len(segments)):
            self.lines.setdefault(segments[:end], line)
        self.lines.setdefault(segments, line)

    def scan(self) -> dict[_Segments, int]:
        try:
            self._scan()
        except (_ScanStop, RecursionError):
            pass
        return self.lines

    def _scan(self) -> None:
        raise NotImplementedError


_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


class _JsonLines(_LineScan):
    """Lines of a JSON document; also finds the first duplicate key (``duplicate``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicate: tuple[_Segments, str, int] | None = None

    def _scan(self) -> None:
        # The containers being read: [path, keys seen (None for a list), current key or index].
        stack: list[list[Any]] = []
        expect_key = False
        for match in _JSON_TOKEN_RE.finditer(self.text):
            token, line = match[0], self.line(match.start())
            if token == ",":
                top = stack[-1]
                if top[1] is None:
                    top[2] += 1
                else:
                    expect_key = True
            elif token == ":":
                pass
            elif token in "}]":
                stack.pop()
                expect_key = False  # "{}"
                if not stack:
                    # The end of the document. (After a duplicate key json.loads stopped
                    # inside the text: what follows need not be JSON at all.)
                    return
            elif expect_key:  # a key of the object on top
                top = stack[-1]
                if not token.startswith('"'):
                    raise _ScanStop
                try:
                    key = json.loads(token)
                except ValueError:
                    raise _ScanStop from None
                if key in top[1] and self.duplicate is None:
                    self.duplicate = (top[0], key, line)
                top[1].add(key)
                top[2] = key
                self.record((*top[0], key), line)
                expect_key = False
            else:  # a value
                segments: _Segments = (*stack[-1][0], stack[-1][2]) if stack else ()
                self.record(segments, line)
                if token == "{":
                    stack.append([segments, set(), None])
                    expect_key = True
                elif token == "[":
                    stack.append([segments, None, 0])


# Pieces of TOML text.
_TOML_BLANK_RE = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_TOML_SPACE_RE = re.compile(r"[ \t]*")
_TOML_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_BASIC_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_TOML_LITERAL_RE = re.compile(r"'[^'\n]*'")
_TOML_ML_BASIC_RE = re.compile(r'"""(?:[^"\\]|\\.|"{1,2}(?!"))*""""{0,2}', re.S)
_TOML_ML_LITERAL_RE = re.compile(r"'''.*?''''{0,2}", re.S)
_TOML_SCALAR_RE = re.compile(r"[^,\]}\r\n#]+")


class _TomlLines(_LineScan):
    """Lines of a TOML document: ``[table]`` and ``[[array]]`` headers, ``key = value`` lines,
    the keys of inline tables and the items of arrays."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.array_lengths: dict[_Segments, int] = {}  # arrays of tables met so far

    def _scan(self) -> None:
        table: _Segments = ()
        self.skip(_TOML_BLANK_RE)
        self.record((), self.line())
        while self.pos < len(self.text):
            line = self.line()
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                table = self.table(self.keys(), array=True)
                self.expect("]]")
                self.record(table, line)
            elif self.text.startswith("[", self.pos):
                self.pos += 1
                table = self.table(self.keys(), array=False)
                self.expect("]")
                self.record(table, line)
            else:
                path = (*table, *self.keys())
                self.record(path, line)
                self.expect("=")
                self.value(path)
            self.skip(_TOML_BLANK_RE)

    def table(self, keys: list[str], array: bool) -> _Segments:
        """The path of a table header. A key naming an array of tables means its last item;
        the header of an array of tables (``array``) adds an item to it."""
        segments: list[str | int] = []
        for index, key in enumerate(keys):
            segments.append(key)
            length = self.array_lengths.get(tuple(segments), 0)
            if array and index == len(keys) - 1:
                length += 1
                self.array_lengths[tuple(segments)] = length
            if length:
                segments.append(length - 1)
        return tuple(segments)

    def skip(self, pattern: re.Pattern[str]) -> str:
        match = pattern.match(self.text, self.pos)
        if match is None:
            raise _ScanStop
        self.pos = match.end()
        return match[0]

    def expect(self, literal: str) -> None:
        self.skip(_TOML_SPACE_RE)
        if not self.text.startswith(literal, self.pos):
            raise _ScanStop
        self.pos += len(literal)

    def keys(self) -> list[str]:
        """A dotted key: ``a.b``, ``"a b".c``, ``'x'``."""
        keys = []
        while True:
            self.skip(_TOML_SPACE_RE)
            if self.text.startswith('"', self.pos):
                raw = self.skip(_TOML_BASIC_RE)
                keys.append(tomllib.loads(f"k = {raw}")["k"] if "\\" in raw else raw[1:-1])
            elif self.text.startswith("'", self.pos):
                keys.append(self.skip(_TOML_LITERAL_RE)[1:-1])
            else:
                keys.append(self.skip(_TOML_BARE_KEY_RE))
            self.skip(_TOML_SPACE_RE)
            if not self.text.startswith(".", self.pos):
                return keys
            self.pos += 1

    def value(self, path: _Segments) -> None:
        self.skip(_TOML_SPACE_RE)
        text = self.text
        if text.startswith('"""', self.pos):
            self.skip(_TOML_ML_BASIC_RE)
        elif text.startswith("'''", self.pos):
            self.skip(_TOML_ML_LITERAL_RE)
        elif text.startswith('"', self.pos):
            self.skip(_TOML_BASIC_RE)
        elif text.startswith("'", self.pos):
            self.skip(_TOML_LITERAL_RE)
        elif text.startswith("[", self.pos):  # an array: items may be on lines of their own
            self.pos += 1
            self.items(path, "]", self.array_item)
        elif text.startswith("{", self.pos):  # an inline table
            self.pos += 1
            self.items(path, "}", self.table_entry)
        else:  # a number, a boolean, a date
            self.skip(_TOML_SCALAR_RE)

    def items(self, path: _Segments, close: str, item: Callable[[_Segments, int], None]) -> None:
        index = 0
        while True:
            self.skip(_TOML_BLANK_RE)
            if self.text.startswith(close, self.pos):
                self.pos += 1
                return
            item(path, index)
            self.skip(_TOML_BLANK_RE)
            if self.text.startswith(",", self.pos):
                self.pos += 1
                index += 1
            elif not self.text.startswith(close, self.pos):
                raise _ScanStop

    def array_item(self, path: _Segments, index: int) -> None:
        self.record((*path, index), self.line())
        self.value((*path, index))

    def table_entry(self, path: _Segments, index: int) -> None:
        line = self.line()
        keys = self.keys()
        self.record((*path, *keys), line)
        self.expect("=")
        self.value((*path, *keys))


_PARSERS: dict[str, Callable[[str, str], tuple[Any, _LineOf | None]]] = {
    "yaml": _parse_yaml,
    "toml": _parse_toml,
    "json": _parse_json,
}

_EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


# --------------------------------------------------------------------------------------------
# Decoding and checks
# --------------------------------------------------------------------------------------------

# Top-level dict fields and the struct of their values. msgspec reports an error inside a dict
# value as "$.tls-profiles[...].cert"; we decode the values one by one to name the entry.
_DICT_FIELDS: dict[str, type[_Base]] = {"tls-profiles": TlsProfile}


def _convert(data: Any, type_: type) -> Any:
    return msgspec.convert(data, type_, dec_hook=_dec_hook, str_keys=True)


def _decode(data: dict[str, Any]) -> Config:
    """Plain objects -> Config, or _Invalid with the $.path of the first problem."""
    try:
        config: Config = _convert(data, Config)
    except msgspec.ValidationError as exc:
        problem = _split_validation_error(exc)
        segs = problem.segments
        if len(segs) >= 2 and segs[1] == _ANY_KEY and segs[0] in _DICT_FIELDS:
            for key, value in data[segs[0]].items():
                try:
                    _convert(value, _DICT_FIELDS[segs[0]])
                except msgspec.ValidationError as inner:
                    found = _split_validation_error(inner)
                    found.segments = (segs[0], key, *found.segments)
                    raise _name_choices(found, Config, data) from None
        raise _name_choices(problem, Config, data) from None
    return config


def _policies_allowed_in(place: str | int) -> tuple[type[_Base], ...]:
    """The policies a list of that name may hold: an assembly, or a flow of messages."""
    if place == "assembly":
        return (*PRE_UPGRADE_POLICY_TYPES, WebsocketUpgrade)
    if place in ("request", "response"):
        return MESSAGE_POLICY_TYPES
    return POLICY_TYPES


def _is_tagged_struct(type_: Any) -> bool:
    return (
        isinstance(type_, type)
        and issubclass(type_, msgspec.Struct)
        and type_.__struct_config__.tag is not None
    )


def _bare_type(type_: Any) -> Any:
    """``type_`` without Annotated metadata and without ``| None``."""
    while True:
        origin = typing.get_origin(type_)
        if origin is Annotated:
            type_ = typing.get_args(type_)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in typing.get_args(type_) if arg is not type(None)]
            if len(members) != 1:
                return type_
            type_ = members[0]
        else:
            return type_


def _choices_at(root: Any, data: Any, segments: _Segments) -> tuple[str, ...] | None:
    """The values allowed at ``segments`` when that place takes one of a fixed set of strings
    (a Literal, or the ``policy`` tag of a policy list), else None. ``data`` is the document,
    which says the tag of each policy on the way."""
    type_, value = root, data
    for depth, seg in enumerate(segments):
        type_ = _bare_type(type_)
        origin = typing.get_origin(type_)
        if origin in (Union, types.UnionType):  # the policies, told apart by their tag
            members = typing.get_args(type_)
            if not all(_is_tagged_struct(member) for member in members):
                return None
            if seg == "policy":
                place = segments[depth - 2] if depth >= 2 else ""
                return tuple(policy_tag(cls) for cls in _policies_allowed_in(place))
            tag = value.get("policy") if isinstance(value, dict) else None
            matches = [cls for cls in members if policy_tag(cls) == tag]
            if not matches:
                return None
            type_ = matches[0]
        if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
            field = next(
                (f for f in msgspec.structs.fields(type_) if f.encode_name == seg), None
            )
            if field is None:
                return None
            type_ = field.type
        elif origin in (list, tuple) and isinstance(seg, int):
            type_ = typing.get_args(type_)[0]       # list[X] or tuple[X, ...]
        elif origin in (dict, PerPlan):
            type_ = typing.get_args(type_)[-1]
        else:
            return None
        if isinstance(value, dict):
            value = value.get(seg)
        elif isinstance(value, list) and isinstance(seg, int) and seg < len(value):
            value = value[seg]
        else:
            value = None
    type_ = _bare_type(type_)
    if typing.get_origin(type_) is Literal:
        return tuple(str(arg) for arg in typing.get_args(type_))
    return None


_CHOICE_ERROR_RE = re.compile(r"Invalid (?:enum )?value (.*)|Expected `str( \| null)?`, got .*")


def _name_choices(problem: _Invalid, root: Any, data: Any) -> _Invalid:
    """Add the allowed values to msgspec's "Invalid enum value 'x'" (a Literal) and "Invalid
    value 'x'" (a policy tag): "Invalid value 'x' - expected one of: a, b"."""
    match = _CHOICE_ERROR_RE.fullmatch(problem.message)
    if match is None or problem.in_key:
        return problem
    choices = _choices_at(root, data, problem.segments)
    if not choices:
        return problem
    if match[1] is not None:
        problem.message = f"Invalid value {match[1]}"
    problem.message += f" - expected one of: {', '.join(choices)}"
    return problem


# An HTTP token (RFC 9110), what a subprotocol name must be.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check(config: Config, name: str) -> Config:
    """Checks spanning several fields. Returns the config with api hosts and origins in lower
    case and trusted-proxies in canonical form. ``name`` is the configuration's file name."""
    _check_settings(config)
    for index, listener in enumerate(config.listeners):
        for other_index, other in enumerate(config.listeners[:index]):
            if _same_socket(listener.host, listener.port, other.host, other.port):
                raise _Invalid(
                    f"Duplicate listener {listener.host}:{listener.port}"
                    f" (same as `{_format_path(('listeners', other_index))}`)",
                    ("listeners", index),
                )
            if _sockets_overlap(listener.host, listener.port, other.host, other.port):
                raise _Invalid(
                    f"Listener {listener.host}:{listener.port} overlaps"
                    f" {other.host}:{other.port} (`{_format_path(('listeners', other_index))}`):"
                    " a wildcard address takes the port on every address",
                    ("listeners", index),
                )

    admin = config.admin
    if admin is not None:
        for index, listener in enumerate(config.listeners):
            if _sockets_overlap(admin.host, admin.port, listener.host, listener.port):
                raise _Invalid(
                    f"The admin API {admin.host}:{admin.port} and the listener"
                    f" {listener.host}:{listener.port}"
                    f" (`{_format_path(('listeners', index))}`) cannot share a port",
                    ("admin", "port"),
                )
        if not _is_loopback(admin.host) and admin.token_env is None:
            raise _Invalid(
                f"the admin API would listen beyond loopback ({admin.host}) without a token:"
                " set token-env", ("admin",))
        if admin.token_env is not None and not os.environ.get(admin.token_env):
            raise _Invalid(f"environment variable {admin.token_env!r} is not set or empty",
                           ("admin", "token-env"))

    for profile_name, profile in config.tls_profiles.items():
        if (profile.cert is None) != (profile.key is None):
            missing = "key" if profile.key is None else "cert"
            raise _Invalid(
                f"A TLS profile needs both cert and key, or neither ({missing} is missing)",
                ("tls-profiles", profile_name),
            )

    plans_seen: dict[str, int] = {}
    for index, plan in enumerate(config.plans):
        if plan in plans_seen:
            raise _Invalid(
                f"Duplicate plan {plan!r} (same as `{_format_path(('plans', plans_seen[plan]))}`)",
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
        here: _Segments = ("apis", index)
        if api.name in names_seen:
            raise _Invalid(
                f"Duplicate API name {api.name!r}"
                f" (same as `{_format_path(('apis', names_seen[api.name]))}`)",
                (*here, "name"),
            )
        names_seen[api.name] = index
        if not api.path.startswith("/"):
            raise _Invalid(f"Invalid path {api.path!r} (must start with '/')", (*here, "path"))
        try:
            canonical = normalize_path(api.path)
        except BadTarget as exc:
            raise _Invalid(f"Invalid path {api.path!r} ({exc})", (*here, "path")) from None
        if canonical != api.path:
            raise _Invalid(f"Invalid path {api.path!r} (requests are routed on their normal"
                           f" form, write {canonical!r})", (*here, "path"))
        host = None
        if api.host is not None:
            try:
                host = normalize_host(api.host)
            except BadTarget:
                raise _Invalid(f"Invalid host {api.host!r}", (*here, "host")) from None
            if host not in (api.host.lower(), api.host.lower().strip("[]")):
                raise _Invalid(f"Invalid host {api.host!r} (a host name without port or"
                               f" trailing dot: {host!r})", (*here, "host"))
        if not api.schemes:
            raise _Invalid("Invalid schemes (at least one of ws, wss)", (*here, "schemes"))
        if len(set(api.schemes)) != len(api.schemes):
            raise _Invalid(f"Duplicate scheme in {list(api.schemes)}", (*here, "schemes"))
        route = (host, api.path)
        if route in routes_seen:
            where = "" if host is None else f"host {host!r}, "
            raise _Invalid(
                f"Duplicate route ({where}path {api.path!r})"
                f" (same as `{_format_path(('apis', routes_seen[route]))}`)",
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
    _ClientChecker(config).check(config.clients, ("clients",), name)
    return config


def _check_settings(config: Config) -> None:
    """Values of the top-level settings that no client could work with."""
    if config.handshake_timeout <= 0:
        raise _Invalid("handshake-timeout must be greater than 0", ("handshake-timeout",))
    if config.max_header_size < MIN_HEADER_SIZE:
        raise _Invalid(
            f"max-header-size must be at least 1KiB ({MIN_HEADER_SIZE} bytes):"
            " a smaller one cannot hold a WebSocket upgrade request",
            ("max-header-size",),
        )
    if config.histogram_log is not None and config.histogram_log.interval <= 0:
        raise _Invalid("interval must be greater than 0", ("histogram-log", "interval"))


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


def _canonical_network(value: str, segments: _Segments) -> str:
    """ "10.0.0.0/8", "127.0.0.1", "::1" -> canonical network text ("127.0.0.1/32")."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        reason = str(exc)
        if "host bits" not in reason:
            reason = "use an address or a network, e.g. 10.0.0.0/8"
        raise _Invalid(f"Invalid network {value!r} ({reason})", segments) from None


_ORIGIN_RE = re.compile(
    r"[A-Za-z][A-Za-z0-9+.\-]*://(?:\[[0-9A-Fa-f:.]+\]|[^/?#@\s:\[\]]+)(?::(\d{1,5}))?"
)


def _canonical_origin(value: str, segments: _Segments) -> str:
    """An Origin header value to allow ("https://App.example.com:8443"), in lower case."""
    if value.strip() == "*":
        raise _Invalid(
            "Origin '*' is not allowed (leave out origins to accept any origin)", segments
        )
    match = _ORIGIN_RE.fullmatch(value)
    if match is None or (match[1] is not None and not 0 < int(match[1]) <= 65535):
        raise _Invalid(
            f"Invalid origin {value!r} (use scheme://host[:port], e.g. https://app.example.com)",
            segments,
        )
    return value.lower()


def _unknown_plan(plan: str, config: Config, segments: _Segments) -> _Invalid:
    known = ", ".join((DEFAULT_PLAN, *sorted(set(config.plans) - {DEFAULT_PLAN})))
    return _Invalid(f"Unknown plan {plan!r} (known: {known})", segments)


def _encoded_fields(policy: msgspec.Struct) -> Iterator[tuple[str, str, Any]]:
    """(attribute, name in files, value) of each field of a struct."""
    for attr, encoded in zip(policy.__struct_fields__, policy.__struct_encode_fields__):
        yield attr, encoded, getattr(policy, attr)


def _check_plans(config: Config, policy: msgspec.Struct, here: _Segments) -> None:
    """Every plan named in a per-plan value of ``policy`` must exist."""
    known = set(config.plans) | {DEFAULT_PLAN}
    for _attr, encoded, value in _encoded_fields(policy):
        if isinstance(value, PerPlan):
            for plan in value.values:
                if plan not in known:
                    raise _unknown_plan(plan, config, (*here, encoded, plan))


def _check_assembly(config: Config, api: Api, here: _Segments) -> None:
    # Message policies first: one after the websocket-upgrade is misplaced, not a second end.
    for index, policy in enumerate(api.assembly):
        if isinstance(policy, MESSAGE_POLICY_TYPES):
            raise _Invalid(
                f"{policy_tag(policy)} cannot run before the upgrade;"
                " put it in websocket-upgrade.request or .response",
                (*here, "assembly", index),
            )

    last = len(api.assembly) - 1
    identity_at: _Segments | None = None
    for index, policy in enumerate(api.assembly):
        at: _Segments = (*here, "assembly", index)
        if isinstance(policy, WebsocketUpgrade):
            if index != last:
                raise _Invalid("websocket-upgrade must be the last policy of the assembly", at)
            _check_websocket_upgrade(config, policy, at)
            continue
        _check_plans(config, policy, at)
        if isinstance(policy, IDENTITY_POLICY_TYPES):
            if identity_at is not None:
                raise _Invalid(
                    "An assembly may hold only one api-key or jwt policy"
                    f" (the first is at `{_format_path(identity_at)}`)",
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
                raise _Invalid(
                    "key client-id needs an api-key or jwt policy before it", (*at, "key")
                )
    if last < 0 or not isinstance(api.assembly[last], WebsocketUpgrade):
        raise _Invalid("The assembly must end with a websocket-upgrade policy", (*here, "assembly"))


def _check_api_key(policy: ApiKey, here: _Segments) -> None:
    if policy.header is None and policy.query is None:
        raise _Invalid("An api-key policy needs a header or a query parameter (or both)", here)
    if policy.header is not None and not _TOKEN_RE.fullmatch(policy.header):
        raise _Invalid(
            f"Invalid header name {policy.header!r} (must be an HTTP token)", (*here, "header")
        )


# Headers the gateway writes itself, or that make the upgrade: no identity header may be one.
_GATEWAY_HEADERS = frozenset({
    "host", "connection", "upgrade", "keep-alive", "te", "trailer", "transfer-encoding",
    "content-length", "proxy-authorization", "proxy-connection", "forwarded", "x-real-ip",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
})


def _check_identity_headers(policy: "ApiKey | Jwt", here: _Segments) -> None:
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
        if not _TOKEN_RE.fullmatch(name):
            raise _Invalid(f"Invalid header name {name!r} (must be an HTTP token)", at)
        if lower in _GATEWAY_HEADERS or lower.startswith("sec-websocket-"):
            raise _Invalid(f"{field} cannot be {name!r}: the gateway sets that header itself", at)
        if credential is not None and lower == credential.lower():
            raise _Invalid(f"{field} cannot be {name!r}: the credential is read from it", at)
        if lower in seen:
            raise _Invalid(f"{field} and {seen[lower]} name the same header {name!r}", at)
        seen[lower] = field


_SECRET_SOURCES = ("secret-env", "secret-file")
_KEY_SOURCES = ("secret-env", "secret-file", "public-key", "jwks-file")


def _check_jwt(policy: Jwt, here: _Segments) -> None:
    values = {encoded: value for _attr, encoded, value in _encoded_fields(policy)}
    sources = [field for field in _KEY_SOURCES if values[field] is not None]
    if not sources:
        raise _Invalid(
            "A jwt policy needs a key source: secret-env, secret-file, public-key or jwks-file",
            here,
        )
    if len(sources) > 1:
        raise _Invalid(
            f"A jwt policy takes exactly one key source (got {sources[0]} and {sources[1]})",
            (*here, sources[1]),
        )
    secret = sources[0] in _SECRET_SOURCES
    for index, algorithm in enumerate(policy.algorithms):
        if algorithm == "HS256" and not secret:
            raise _Invalid(
                "Algorithm HS256 needs secret-env or secret-file", (*here, "algorithms", index)
            )
        if algorithm != "HS256" and secret:
            raise _Invalid(
                f"Algorithm {algorithm} needs public-key or jwks-file",
                (*here, "algorithms", index),
            )
    if policy.secret_env is not None:
        value = os.environ.get(policy.secret_env)
        if not value:
            state = "is not set" if value is None else "is empty"
            raise _Invalid(
                f"Environment variable {policy.secret_env!r} {state}", (*here, "secret-env")
            )
    for index, scope in enumerate(policy.required_scopes or ()):
        if any(ch.isspace() for ch in scope):
            raise _Invalid(
                f"Invalid scope {scope!r} (scopes cannot contain spaces)",
                (*here, "required-scopes", index),
            )


def _check_websocket_upgrade(config: Config, policy: WebsocketUpgrade, here: _Segments) -> None:
    try:
        target = parse_target(policy.target_url)
    except ValueError as exc:
        raise _Invalid(str(exc), (*here, "target-url")) from None
    # Zero would refuse everything: a timeout of 0 s, frames or messages of at most 0 bytes.
    for key, value in (("timeout", policy.timeout), ("idle-timeout", policy.idle_timeout),
                       ("max-lifetime", policy.max_lifetime),
                       ("max-frame-size", policy.max_frame_size),
                       ("max-message-size", policy.max_message_size)):
        if value is not None and value <= 0:
            raise _Invalid(f"{key} must be greater than 0", (*here, key))
    for key, per_side in (("ping-interval", policy.ping_interval),
                          ("ping-timeout", policy.ping_timeout)):
        for side in PerSide.SIDES:
            value = getattr(per_side, side) if per_side is not None else None
            if value is not None and value <= 0:
                where = (*here, key) if per_side.client == per_side.backend else (*here, key, side)
                raise _Invalid(f"{key} must be greater than 0", where)
    if policy.ping_timeout is not None and policy.ping_interval is None:
        raise _Invalid("ping-timeout needs a ping-interval", (*here, "ping-timeout"))
    if policy.tls_profile is not None:
        if policy.tls_profile not in config.tls_profiles:
            known = ", ".join(sorted(config.tls_profiles)) or "none"
            raise _Invalid(
                f"Unknown tls-profile {policy.tls_profile!r} (known: {known})",
                (*here, "tls-profile"),
            )
        if not target.secure:
            raise _Invalid(
                f"tls-profile {policy.tls_profile!r} needs a wss:// target-url",
                (*here, "tls-profile"),
            )
    for index, subprotocol in enumerate(policy.subprotocols or ()):
        if not _TOKEN_RE.fullmatch(subprotocol):
            raise _Invalid(
                f"Invalid subprotocol {subprotocol!r} (must be an HTTP token)",
                (*here, "subprotocols", index),
            )
    for flow in ("request", "response"):
        for index, message_policy in enumerate(getattr(policy, flow)):
            at: _Segments = (*here, flow, index)
            if isinstance(message_policy, WebsocketUpgrade):
                raise _Invalid(f"websocket-upgrade cannot be inside websocket-upgrade.{flow}", at)
            if not isinstance(message_policy, MESSAGE_POLICY_TYPES):
                raise _Invalid(
                    f"{policy_tag(message_policy)} runs before the upgrade;"
                    " put it in the assembly before websocket-upgrade",
                    at,
                )
            _check_plans(config, message_policy, at)
            if isinstance(message_policy, MessageRateLimit):
                _check_message_rate_limit(message_policy, at)


def _check_message_rate_limit(policy: MessageRateLimit, here: _Segments) -> None:
    if policy.messages is None and policy.bytes is None:
        raise _Invalid("message-rate-limit needs messages or bytes (or both)", here)
    if policy.burst is not None and policy.messages is None:
        raise _Invalid("burst applies to messages, which is not set", (*here, "burst"))
    if policy.byte_burst is not None and policy.bytes is None:
        raise _Invalid("byte-burst applies to bytes, which is not set", (*here, "byte-burst"))


class _ClientChecker:
    """Checks clients one list after another, remembering ids and keys across lists."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.api_names = [api.name for api in config.apis]
        self.ids: dict[str, tuple[str, _Segments]] = {}  # id -> (file, path of the client)
        self.keys: dict[str, str] = {}  # key -> client id

    def check(self, clients: list[Client], prefix: _Segments, file: str) -> None:
        for index, client in enumerate(clients):
            at: _Segments = (*prefix, index)
            if client.id in self.ids:
                other_file, other_at = self.ids[client.id]
                where = f"`{_format_path(other_at)}`"
                if other_file != file:
                    where += f" in {other_file}"
                raise _Invalid(f"Duplicate client id {client.id!r} (same as {where})", (*at, "id"))
            self.ids[client.id] = (file, at)
            if (client.key is None) == (client.keys is None):
                got = "both" if client.key is not None else "neither"
                raise _Invalid(f"A client needs exactly one of key or keys (got {got})", at)
            if client.key is not None:
                keys: list[tuple[_Segments, str]] = [((*at, "key"), client.key)]
            else:
                keys = [((*at, "keys", i), key) for i, key in enumerate(client.keys or ())]
            for key_at, key in keys:
                if key in self.keys:  # never show the key itself: it is a secret
                    raise _Invalid(
                        f"Duplicate API key (already a key of client {self.keys[key]!r})", key_at
                    )
                self.keys[key] = client.id
            if client.plan != DEFAULT_PLAN and client.plan not in self.config.plans:
                raise _unknown_plan(client.plan, self.config, (*at, "plan"))
            for i, api_name in enumerate(client.apis or ()):
                if api_name not in self.api_names:
                    known = ", ".join(sorted(self.api_names))
                    raise _Invalid(f"Unknown API {api_name!r} (known: {known})", (*at, "apis", i))


def _resolve_file(value: str, base_dir: str, segments: _Segments) -> str:
    """Absolute path of ``value`` (relative to ``base_dir``), after checking it is readable."""
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    try:
        with open(path, "rb"):
            pass
    except (OSError, ValueError) as exc:    # ValueError: a NUL in the name
        shown = repr(value) if path == value else f"{value!r} ({path})"
        reason = exc.strerror if isinstance(exc, OSError) else "NUL in the file name"
        raise _Invalid(f"Cannot read file {shown}: {reason}", segments) from None
    return path


# Attributes of policies that name files: resolved to absolute paths and checked readable.
_POLICY_FILE_FIELDS: dict[type[_Base], tuple[str, ...]] = {
    Jwt: ("secret_file", "public_key", "jwks_file"),
}


def _resolve_policy_files(policy: Any, base_dir: str, here: _Segments) -> Any:
    changes = {}
    for attr, encoded, value in _encoded_fields(policy):
        if attr in _POLICY_FILE_FIELDS.get(type(policy), ()) and value is not None:
            changes[attr] = _resolve_file(value, base_dir, (*here, encoded))
    if isinstance(policy, WebsocketUpgrade):
        for flow in ("request", "response"):
            items = getattr(policy, flow)
            resolved = [
                _resolve_policy_files(item, base_dir, (*here, flow, index))
                for index, item in enumerate(items)
            ]
            if resolved != items:
                changes[flow] = resolved
    return msgspec.structs.replace(policy, **changes) if changes else policy


def _resolve_files(config: Config, base_dir: str) -> Config:
    """Return ``config`` with every file path absolute and checked readable (certificates,
    keys, CA bundles, jwt keys; the clients-file is read by _load_clients_file)."""
    listeners = []
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            here = ("listeners", index, "tls")
            tls = ListenerTls(
                cert=_resolve_file(listener.tls.cert, base_dir, (*here, "cert")),
                key=_resolve_file(listener.tls.key, base_dir, (*here, "key")),
            )
            listener = msgspec.structs.replace(listener, tls=tls)
        listeners.append(listener)

    profiles = {}
    for profile_name, profile in config.tls_profiles.items():
        changes = {}
        for field in ("ca", "cert", "key"):
            value = getattr(profile, field)
            if value is not None:
                segments = ("tls-profiles", profile_name, field)
                changes[field] = _resolve_file(value, base_dir, segments)
        profiles[profile_name] = msgspec.structs.replace(profile, **changes)

    apis = []
    for api_index, api in enumerate(config.apis):
        assembly = [
            _resolve_policy_files(policy, base_dir, ("apis", api_index, "assembly", index))
            for index, policy in enumerate(api.assembly)
        ]
        if assembly != api.assembly:
            api = msgspec.structs.replace(api, assembly=assembly)
        apis.append(api)

    return msgspec.structs.replace(
        config, listeners=listeners, tls_profiles=profiles, apis=apis
    )


def _utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> tuple[str, int]:
    """The message and line of a text that is not UTF-8."""
    return f"Not valid UTF-8 (byte {exc.start})", raw.count(b"\n", 0, exc.start) + 1


def _check_api_key_clients(config: Config) -> None:
    """An api-key policy needs a client that may use its API: without one, every request to
    it would be refused."""
    for api_index, api in enumerate(config.apis):
        for index, policy in enumerate(api.assembly):
            if not isinstance(policy, ApiKey):
                continue
            at: _Segments = ("apis", api_index, "assembly", index)
            if not config.clients:
                raise _Invalid(
                    "An api-key policy needs clients, and there are none"
                    " (give clients, or a clients-file that holds some)",
                    at,
                )
            if not any(client.apis is None or api.name in client.apis
                       for client in config.clients):
                raise _Invalid(
                    f"No client may use the API {api.name!r}: the apis of every client name"
                    f" other APIs (add {api.name!r} to a client's apis)",
                    at,
                )


class _ClientsFile(_Base, kw_only=True):
    """A clients-file holding a mapping (the only form TOML can hold)."""

    clients: list[Client] = []


def _load_clients_file(config: Config, name: str, base_dir: str) -> Config:
    """Read ``config.clients_file``, check its clients together with the inline ones, and
    return the config with both in ``clients``. Problems in the file name that file."""
    if config.clients_file is None:
        return config
    path = _resolve_file(config.clients_file, base_dir, ("clients-file",))
    fmt = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        extension = os.path.splitext(path)[1]
        shown = repr(extension) if extension else "no extension"
        raise _Invalid(
            f"Unknown clients file type ({shown}; use .yaml, .yml, .toml or .json)",
            ("clients-file",),
        )
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise _Invalid(f"Cannot read file {path!r}: {exc.strerror}", ("clients-file",)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, *_utf8_problem(raw, exc)) from None

    data, line_of = _PARSERS[fmt](text, path) if text.strip() else (None, None)
    source = (path, line_of)
    prefix: _Segments = ()
    try:
        if data is None:  # empty, or only comments: no clients
            clients: list[Client] = []
        elif isinstance(data, list):
            clients = _convert(data, list[Client])
        elif isinstance(data, dict):
            prefix = ("clients",)
            clients = _convert(data, _ClientsFile).clients
        else:
            raise _Invalid(
                "The clients file must hold a list of clients or a mapping with `clients`,"
                f" not a {type(data).__name__}",
            )
    except msgspec.ValidationError as exc:
        problem = _split_validation_error(exc)
        problem.source = source
        raise _name_choices(problem, _ClientsFile if prefix else list[Client], data) from None
    except _Invalid as problem:
        problem.source = source
        raise

    checker = _ClientChecker(config)
    checker.check(config.clients, ("clients",), name)
    try:
        checker.check(clients, prefix, path)
    except _Invalid as problem:
        problem.source = source
        raise
    return msgspec.structs.replace(config, clients_file=path, clients=[*config.clients, *clients])


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def loads(
    text: str | bytes, fmt: str, name: str = "<string>", *, base_dir: str | None = None
) -> Config:
    """Parse a configuration from ``text`` in ``fmt`` ("yaml", "toml" or "json").

    ``name`` is the file name used in error messages. Relative file paths in the configuration
    are resolved against ``base_dir`` (default: the current directory), checked to be
    readable, and stored as absolute paths. Raises ConfigError on any problem.
    """
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise ConfigError(name, f"Unknown configuration format {fmt!r} (use yaml, toml or json)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(name, *_utf8_problem(text, exc)) from None
    if not text.strip():
        raise ConfigError(name, "The configuration is empty")

    data, line_of = parser(text, name)
    if data is None:  # a YAML file holding only comments, or "---", or "null"
        raise ConfigError(name, "The configuration is empty")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(
            name,
            f"The top level must be a mapping of settings, not {kind}",
            line_of(()) if line_of else None,
        )

    base_dir = base_dir if base_dir is not None else os.getcwd()
    try:
        config = _decode(data)
        config = _check(config, name)
        config = _resolve_files(config, base_dir)
        config = _load_clients_file(config, name, base_dir)
        _check_api_key_clients(config)
    except RecursionError:
        raise ConfigError(name, "The configuration is nested too deeply") from None
    except _Invalid as problem:
        file, file_line_of = problem.source if problem.source else (name, line_of)
        path = _format_path(problem.segments)
        where = f"`key` in `{path}`" if problem.in_key else f"`{path}`"
        line_segments = problem.segments
        if match := re.fullmatch(r"Object contains unknown field `(.*)`", problem.message):
            line_segments = (*line_segments, match[1])  # point at the unknown key itself
        line = file_line_of(line_segments) if file_line_of else None
        raise ConfigError(file, f"{problem.message} - at {where}", line, path) from None
    return config


def load(path: str | os.PathLike[str]) -> Config:
    """Read the configuration file at ``path``; the extension (.yaml, .yml, .toml, .json)
    gives the format. Relative file paths inside are resolved against the file's directory.
    Raises ConfigError on any problem."""
    name = os.fspath(path)
    extension = os.path.splitext(name)[1].lower()
    fmt = _EXTENSIONS.get(extension)
    if fmt is None:
        shown = repr(extension) if extension else "no extension"
        raise ConfigError(
            name, f"Unknown configuration file type ({shown}; use .yaml, .yml, .toml or .json)"
        )
    try:
        with open(name, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(name, f"Cannot read the configuration: {exc.strerror}") from None
    base_dir = os.path.dirname(os.path.abspath(name))
    return loads(text, fmt, name, base_dir=base_dir)
