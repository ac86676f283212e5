"""Normalising a request target and a Host before routing (sans I/O).

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

import re

__all__ = ["BadTarget", "normalize_host", "normalize_path", "normalize_target"]


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


def normalize_host(host: str) -> str:
    """The host name of a Host header value, for routing: lower-case, without
    its port and without a trailing dot; an IP literal keeps its brackets off.

    Raises BadTarget for a value that is no host.
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
