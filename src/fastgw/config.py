"""Gateway configuration: msgspec Structs, and loading from YAML, TOML or JSON.

``load(path)`` reads a configuration file (the format is chosen by the file's extension),
``loads(text, fmt)`` parses a string. Both return a frozen :class:`Config` or raise
:class:`ConfigError`, whose ``str()`` reads like a compiler message::

    gateway.yaml:14: Expected `int` >= 0 - at `$.listeners[0].port`

Decoding happens in three steps:

1. the text is parsed into plain Python objects (for YAML we also keep the node tree, to map an
   error's ``$.path`` back to a line number);
2. ``msgspec.convert`` turns those objects into Structs; it checks key names, types and value
   limits, and reports errors with a ``$.path``. Durations and sizes have types of their own
   (float and int subclasses) that msgspec hands to ``_dec_hook``, so their errors carry the
   path too;
3. checks that span several fields (references between sections, uniqueness, order of
   policies, target URLs, files on disk) run on the decoded Structs, and file paths are
   resolved to absolute ones.

Key names in files are kebab-case (``tls-profiles``, ``target-url``); attributes are snake_case.
This module imports nothing else from fastgw.
"""

import json
import math
import os
import re
import tomllib
from collections.abc import Callable
from typing import Annotated, Any, Union
from urllib.parse import urlsplit

import msgspec
import yaml

__all__ = [
    "POLICY_TYPES",
    "Api",
    "Config",
    "ConfigError",
    "Duration",
    "Listener",
    "ListenerTls",
    "Policy",
    "Size",
    "Target",
    "TlsProfile",
    "WebsocketUpgrade",
    "load",
    "loads",
    "parse_duration",
    "parse_size",
    "parse_target",
]


class ConfigError(Exception):
    """A configuration that cannot be used.

    ``str(error)`` is ``"{file}:{line}: {message}"``, or ``"{file}: {message}"`` when the line is
    unknown. ``message`` ends with `` - at `$.path` `` when the problem has a place in the
    document; ``path`` holds that ``$.path`` alone (or None).
    """

    def __init__(
        self, file: str, message: str, line: int | None = None, path: str | None = None
    ) -> None:
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


def parse_duration(value: object) -> float:
    """Return ``value`` (a number of seconds, or a string such as "250ms") as float seconds.

    Raises ValueError for anything else, including negative and non-finite numbers.
    """
    seconds: float | None = None
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"Invalid duration {value!r} (use a number of seconds, or 250ms, 10s, 2m, 1h)"
        )
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


def _dec_hook(type_: type, obj: Any) -> Any:
    """msgspec decoding hook for Duration and Size; its ValueErrors get the field's $.path."""
    if type_ is Duration:
        return Duration(parse_duration(obj))
    if type_ is Size:
        return Size(parse_size(obj))
    raise NotImplementedError(f"Objects of type {type_!r} are not supported")


# --------------------------------------------------------------------------------------------
# The configuration structs
# --------------------------------------------------------------------------------------------

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

MIB = 1024 * 1024


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


# Every policy struct, tagged on the key "policy". To add a policy, define its struct with
# tag_field="policy" and a tag, and append it here.
POLICY_TYPES: tuple[type[_Base], ...] = (WebsocketUpgrade,)
Policy = Union[POLICY_TYPES]  # noqa: UP007 - a Union built from a tuple


class Api(_Base, kw_only=True):
    """Requests whose path starts with ``path`` (and, if given, whose Host is ``host``)."""

    name: NonEmptyStr
    path: NonEmptyStr
    """Must start with "/"; the longest matching prefix wins."""
    host: NonEmptyStr | None = None
    """Match the request's Host (without port), case-insensitive; stored in lower case."""
    assembly: list[Policy]  # type: ignore[valid-type]
    """Policies in order; the last one is the websocket-upgrade."""


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
    """Parse a ws:// or wss:// URL; raise ValueError with a readable message if it is bad."""

    def invalid(reason: str) -> ValueError:
        return ValueError(f"Invalid target URL {url!r} ({reason})")

    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise invalid("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if parts.scheme not in ("ws", "wss"):
        raise invalid("scheme must be ws or wss")
    if not parts.hostname:
        raise invalid("missing host")
    if parts.username is not None or parts.password is not None:
        raise invalid("user names and passwords are not supported")
    if parts.fragment or url.endswith("#"):
        raise invalid("fragments are not allowed")
    if port == 0:
        raise invalid("port 0")
    secure = parts.scheme == "wss"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(
        scheme=parts.scheme,
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

    def __init__(self, message: str, segments: _Segments = (), *, in_key: bool = False) -> None:
        super().__init__(message, segments)
        self.message = message
        self.segments = segments
        self.in_key = in_key  # msgspec's "at `key` in `$.x`": a bad key of the mapping at $.x


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
        return _Invalid(match[1], _parse_path(match[2]), in_key=True)
    if match := _AT_RE.fullmatch(text):
        return _Invalid(match[1], _parse_path(match[2]))
    return _Invalid(text)  # an error at the top level has no path


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
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"Invalid YAML: {exc}") from None
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
        return tomllib.loads(text), None
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11-3.13 only give the position inside the message: "... (at line 2, column 5)".
        message = str(exc).splitlines()[0]
        line = getattr(exc, "lineno", None)
        if match := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message):
            message, line = f"{match[1]} (column {match[3]})", int(match[2])
        raise ConfigError(name, f"Invalid TOML: {message}", line) from None


def _parse_json(text: str, name: str) -> tuple[Any, _LineOf | None]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ConfigError(name, f"Duplicate key {key!r}")
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates), None
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"Invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None


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
                    raise found from None
        raise problem from None

    # With a single policy type, msgspec accepts a policy without its "policy" key (a lone
    # tagged struct has an optional tag). Require it anyway, as a union of several would.
    for api_index, api in enumerate(data["apis"]):
        for index, policy in enumerate(api["assembly"]):
            if "policy" not in policy:
                raise _Invalid(
                    "Object missing required field `policy`",
                    ("apis", api_index, "assembly", index),
                )
    return config


# An HTTP token (RFC 9110), what a subprotocol name must be.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _check(config: Config) -> Config:
    """Checks spanning several fields. Returns the config with api hosts in lower case."""
    listeners_seen: dict[tuple[str, int], int] = {}
    for index, listener in enumerate(config.listeners):
        address = (listener.host.lower(), listener.port)
        if listener.port != 0 and address in listeners_seen:
            raise _Invalid(
                f"Duplicate listener {listener.host}:{listener.port}"
                f" (same as `{_format_path(('listeners', listeners_seen[address]))}`)",
                ("listeners", index),
            )
        listeners_seen[address] = index

    for profile_name, profile in config.tls_profiles.items():
        if (profile.cert is None) != (profile.key is None):
            missing = "key" if profile.key is None else "cert"
            raise _Invalid(
                f"A TLS profile needs both cert and key, or neither ({missing} is missing)",
                ("tls-profiles", profile_name),
            )

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
        host = api.host.lower() if api.host is not None else None
        route = (host, api.path)
        if route in routes_seen:
            where = "" if host is None else f"host {host!r}, "
            raise _Invalid(
                f"Duplicate route ({where}path {api.path!r})"
                f" (same as `{_format_path(('apis', routes_seen[route]))}`)",
                (*here, "path"),
            )
        routes_seen[route] = index
        _check_assembly(config, api, here)
        apis.append(msgspec.structs.replace(api, host=host) if host != api.host else api)

    return msgspec.structs.replace(config, apis=apis)


def _check_assembly(config: Config, api: Api, here: _Segments) -> None:
    last = len(api.assembly) - 1
    for index, policy in enumerate(api.assembly):
        if isinstance(policy, WebsocketUpgrade):
            if index != last:
                raise _Invalid(
                    "websocket-upgrade must be the last policy of the assembly",
                    (*here, "assembly", index),
                )
            _check_websocket_upgrade(config, policy, (*here, "assembly", index))
    if last < 0 or not isinstance(api.assembly[last], WebsocketUpgrade):
        raise _Invalid("The assembly must end with a websocket-upgrade policy", (*here, "assembly"))


def _check_websocket_upgrade(config: Config, policy: WebsocketUpgrade, here: _Segments) -> None:
    try:
        target = parse_target(policy.target_url)
    except ValueError as exc:
        raise _Invalid(str(exc), (*here, "target-url")) from None
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


def _resolve_file(value: str, base_dir: str, segments: _Segments) -> str:
    """Absolute path of ``value`` (relative to ``base_dir``), after checking it is readable."""
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        shown = repr(value) if path == value else f"{value!r} ({path})"
        raise _Invalid(f"Cannot read file {shown}: {exc.strerror}", segments) from None
    return path


def _resolve_files(config: Config, base_dir: str) -> Config:
    """Return ``config`` with every certificate/key/CA path absolute and checked readable."""
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

    return msgspec.structs.replace(config, listeners=listeners, tls_profiles=profiles)


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
            raise ConfigError(name, f"Not valid UTF-8 (byte {exc.start})") from None
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

    try:
        config = _decode(data)
        config = _check(config)
        config = _resolve_files(config, base_dir if base_dir is not None else os.getcwd())
    except _Invalid as problem:
        path = _format_path(problem.segments)
        where = f"`key` in `{path}`" if problem.in_key else f"`{path}`"
        line_segments = problem.segments
        if match := re.fullmatch(r"Object contains unknown field `(.*)`", problem.message):
            line_segments = (*line_segments, match[1])  # point at the unknown key itself
        line = line_of(line_segments) if line_of else None
        raise ConfigError(name, f"{problem.message} - at {where}", line, path) from None
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
