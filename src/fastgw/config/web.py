"""Values of the web that the configuration and the running gateway share: one rule each.

- the normal form of a request target and a Host (what is routed and forwarded);
- backend URLs (``parse_target``);
- origins (``normalize_origin``: what an ``origins`` entry and an Origin header mean);
- HTTP tokens (``HTTP_TOKEN``: header names, methods, subprotocols);
- loopback hosts (``is_loopback``: where the admin API may listen without a token).

Everything here is pure (no I/O) and raises ValueError (BadTarget for request targets).

Request targets
---------------

A gateway routes on the path it sees; a backend acts on the path it resolves.
If the two disagree (``/public/../private``, ``/public/%2e%2e/private``,
``//private``), a client reaches an API through the policies of another. So the
path is brought to one canonical form first, and that form is what is routed
and what the backend gets:

1. percent-encodings are checked (``%`` then two hex digits); those of
   unreserved characters (RFC 3986 2.3: letters, digits, ``-._~``) are decoded,
   the others keep their encoding with upper-case hex digits (RFC 3986 6.2.2);
2. an encoded ``/`` or ``\\`` (``%2F``, ``%5C``), a NUL (``%00``), a raw ``\\``
   and a fragment (``#``) are refused: their meaning differs between servers;
3. repeated slashes are merged;
4. ``.`` and ``..`` segments are resolved (RFC 3986 5.2.4); a path that climbs
   above the root is refused.

The query is passed on as it came (it is the backend's to interpret), but a
``%00`` in it is refused as well.

A Host is lower-cased and loses a trailing dot and its port.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "HTTP_TOKEN",
    "BadTarget",
    "Target",
    "is_loopback",
    "normalize_host",
    "normalize_origin",
    "normalize_path",
    "normalize_target",
    "parse_target",
]

# An HTTP token (RFC 9110, section 5.6.2): what a method, a header name and a subprotocol
# name must be.
HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class BadTarget(ValueError):
    """A request target or Host that cannot be routed safely (HTTP 400)."""


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"
_PERCENT = re.compile(r"%(.?.?)")
# RFC 3986 reg-name / IPv4 characters (percent-encodings included), or an IP literal; then a port.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::([0-9]*))?")


def _decode_percent(match: re.Match) -> str:
    digits = match.group(1)
    if len(digits) != 2 or digits[0] not in _HEX or digits[1] not in _HEX:
        raise BadTarget("malformed percent-encoding in the path")
    value = int(digits, 16)
    if value in _UNRESERVED:
        return chr(value)
    if value == 0x2F or value == 0x5C:
        raise BadTarget("encoded '/' or '\\' in the path")
    if value == 0:
        raise BadTarget("NUL in the path")
    return "%" + digits.upper()


def normalize_path(path: str) -> str:
    """The canonical form of an absolute path (see the module docstring).

    Raises BadTarget. The result starts with "/"; a trailing slash is kept.
    """
    if not path.startswith("/"):
        raise BadTarget("the path must start with '/'")
    if "\\" in path:
        raise BadTarget("'\\' in the path")
    if "#" in path:
        raise BadTarget("a fragment in the request target")
    if "%" in path:
        path = _PERCENT.sub(_decode_percent, path)
    if "//" not in path and "/." not in path:
        return path                     # no empty, "." or ".." segment: canonical already
    segments = path.split("/")
    out: list[str] = []
    # segments[0] is the empty string before the leading slash.
    last = len(segments) - 1
    for i in range(1, len(segments)):
        seg = segments[i]
        if seg == "" and i != last:
            continue                    # "//": merged
        if seg == ".":
            if i == last:
                out.append("")          # "/a/." is "/a/"
            continue
        if seg == "..":
            if not out:
                raise BadTarget("the path climbs above the root")
            out.pop()
            if i == last:
                out.append("")          # "/a/b/.." is "/a/"
            continue
        out.append(seg)
    return "/" + "/".join(out)


def normalize_target(target: str) -> str:
    """The canonical request target: normalize_path of its path, the query kept.

    Raises BadTarget.
    """
    path, sep, query = target.partition("?")
    path = normalize_path(path)
    if sep:
        if "#" in query:
            raise BadTarget("a fragment in the request target")
        if "%00" in query:
            raise BadTarget("NUL in the query")
        return f"{path}?{query}"
    return path


@functools.lru_cache(maxsize=1024)
def normalize_host(host: str) -> str:
    """The host name of a Host header value, for routing: lower-case, without
    its port and without a trailing dot; an IP literal keeps its brackets off.

    Raises BadTarget for a value that is no host. The answers are cached (a bounded LRU:
    a few Host values recur on every upgrade; a client sending new ones only evicts).
    """
    m = _HOST.fullmatch(host)
    if m is None or not m.group(1):
        raise BadTarget("malformed Host header")
    name = m.group(1).lower()
    if name.startswith("["):
        return name[1:-1]
    if name.endswith("."):
        name = name[:-1]
        if not name or name.endswith("."):
            raise BadTarget("malformed Host header")
    return name


# --------------------------------------------------------------------------------------------
# Backend URLs
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
# Origins
# --------------------------------------------------------------------------------------------

# scheme "://" host [":" port]: a host name, or an IPv6 address in brackets.
_ORIGIN_RE = re.compile(
    r"([A-Za-z][A-Za-z0-9+.\-]*)://(\[[0-9A-Fa-f:.]+\]|[^/?#@\s:\[\]]+)(?::(\d{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(value: str) -> str:
    """The one origin rule: ``value`` as ``scheme://host[:port]`` in lower case, without the
    scheme's default port (80 for http and ws, 443 for https and wss).

    ``https://App.Example.com:443`` becomes ``https://app.example.com``. An ``origins`` entry
    of the configuration is stored in this form, and an Origin header is allowed when its
    form is one of them. Raises ValueError for anything else: a path (even "/"), a query,
    user info, a port outside 1-65535, an IPv6 host that is no address, the opaque origin
    ``null``, surrounding white space.
    """
    match = _ORIGIN_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"not an origin: {value!r}")
    scheme, host, port = match[1].lower(), match[2].lower(), match[3]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an origin: {value!r}") from None
    if port is None:
        return f"{scheme}://{host}"
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"not an origin: {value!r}")
    if number == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{number}"


# --------------------------------------------------------------------------------------------
# Loopback
# --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a socket bound to ``host`` is reachable from this machine only.

    Loopback is the name ``localhost`` (any case, also with its trailing dot), an address of
    127.0.0.0/8, ``::1`` (also written ``[::1]``) and an IPv4-mapped loopback address
    (``::ffff:127.0.0.1``). Any other host name may resolve to anything, and "" (every
    interface) is not loopback either.
    """
    name = host.lower()
    if name in ("localhost", "localhost."):
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def redact_url(url: str) -> str:
    """`url` with its user and password (before the host's "@") replaced by "***": for error
    messages and logs, which must never show a secret."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
