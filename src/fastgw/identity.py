"""Who the client is, decided from a parsed upgrade request.

Everything here is sans-I/O: the functions and classes take plain values that the
server has already parsed out of the HTTP upgrade request and answer with an
:class:`Identity` or raise :class:`AuthError`. Nothing here opens sockets, runs
an event loop or imports the rest of fastgw but the (pure) configuration package,
whose rules it shares (the JWT algorithms, the origin rule); the policies module
maps the configuration onto these classes.

The inputs, wherever they appear:

``headers``
    ``list[tuple[str, str]]``: header names in lower case, in the order they
    arrived; a name may repeat.
``query``
    the raw query string of the request target, without the leading ``?``.
``api``
    the name of the API the request was routed to.
``now``
    Unix time in seconds, from the gateway's clock (``Clock.wall``; a ``SimClock`` in tests).

A refusal is always an :class:`AuthError` carrying the HTTP status (401 or
403), a short reason that never contains secrets, and the response headers
(``WWW-Authenticate`` on a 401) the gateway should send with it.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote_plus

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms

from fastgw.config import schema
from fastgw.config.schema import JWT_ALGORITHMS
from fastgw.config.web import normalize_origin
from fastgw.verdicts import Refusal

__all__ = [
    "REALM",
    "ApiKeyAuth",
    "AuthError",
    "Client",
    "Identity",
    "JwtAuth",
    "api_key_clients",
    "check_origin",
    "client_ip",
    "clients_by_key",
    "forwarded_node",
    "header_value",
    "key_digest",
    "peer_is_trusted",
    "read_secret",
    "remove_query_params",
    "trusted_networks",
]

#: The realm named in every ``WWW-Authenticate`` challenge.
REALM = "fastgw"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------------------
# Results and refusals
# --------------------------------------------------------------------------------------


class AuthError(Refusal):
    """The request may not be upgraded: answer with an HTTP error, never a 101.

    ``status`` is 401 (we do not know who you are) or 403 (we know, and the
    answer is no); ``kind`` says the same in words ("unauthorized" or
    "forbidden"). ``reason`` is a short text for the response body and the logs;
    it never contains a key or a token. ``headers`` are extra response headers,
    typically one ``WWW-Authenticate`` challenge on a 401.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        kind: Literal["unauthorized", "forbidden"] | None = None,
    ) -> None:
        if status not in (401, 403):
            raise ValueError(f"AuthError status must be 401 or 403, not {status}")
        super().__init__(status, reason, list(headers), kind=kind)


@dataclass(frozen=True)
class Client:
    """A client known by API key.

    ``apis`` is the set of API names this client may use; ``None`` means all.
    """

    id: str
    plan: str = "default"
    apis: frozenset[str] | None = None


@dataclass(frozen=True)
class Identity:
    """Who the client is, as far as the gateway's policies are concerned.

    ``client_id`` is ``None`` for an anonymous client (identified by address
    only). ``expires_at`` is the Unix time at which the credential stops being
    valid (a JWT's ``exp``), so that the connection can be closed then; ``None``
    when the credential does not expire. ``credential`` says where the credential
    was read, so that it can be kept from the backend: ``("header", name)`` (name in
    lower case) or ``("query", parameter)``; ``None`` for an anonymous client.
    """

    client_id: str | None
    plan: str
    expires_at: float | None
    credential: tuple[str, str] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------------------
# Small helpers for headers and query strings
# --------------------------------------------------------------------------------------


def _first_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The value of the first header called ``name`` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def _query_param(query: str, name: str) -> str | None:
    """The first non-empty value of query parameter ``name``, as parse_qs gives it."""
    if not query:
        return None
    values = parse_qs(query).get(name)
    return values[0] if values else None


def remove_query_params(query: str, names: frozenset[str] | set[str]) -> str:
    """``query`` without its parameters called one of ``names``, the others kept as
    they are and in order. Names are compared after decoding, as :func:`parse_qs`
    reads them (``api%5Fkey`` is ``api_key``), so every parameter that could have
    been read under one of ``names`` goes."""
    if not query or not names:
        return query
    kept = [part for part in query.split("&")
            if unquote_plus(part.partition("=")[0]) not in names]
    return "&".join(kept)


# Printable ASCII but "%": what an identity header value keeps as it is.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if c != 0x25)


def header_value(text: str) -> str:
    """``text`` as a header value the backend can read back: printable ASCII as it is,
    anything else (spaces, controls, non-ASCII) percent-encoded from UTF-8. A client id or
    plan from a token's claims can never break the request's header block."""
    return quote(text, safe=_HEADER_SAFE)


def _quote(value: str) -> str:
    """``value`` as an HTTP quoted-string (RFC 9110, section 5.6.4)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _challenge(scheme: str, **params: str) -> tuple[str, str]:
    """A ``WWW-Authenticate`` header: the scheme, the realm, then ``params`` in order."""
    parts = [f"realm={_quote(REALM)}"]
    parts += [f"{name}={_quote(value)}" for name, value in params.items()]
    return ("WWW-Authenticate", f"{scheme} " + ", ".join(parts))


# --------------------------------------------------------------------------------------
# The client's address
# --------------------------------------------------------------------------------------


# Addresses parsed lately (the peers of the last upgrades, the X-Forwarded-For entries
# they carry) are remembered: ipaddress costs microseconds per parse. Only texts as short
# as an address can be are kept, so hostile headers cannot fill the caches.
_ADDRESS_TEXT_MAX = 64


def _parse_address(text: str) -> IPAddress | None:
    """`_parse_one`, remembered for the last addresses seen."""
    return _parse_one(text) if len(text) > _ADDRESS_TEXT_MAX else _parse_remembered(text)


def _parse_one(text: str) -> IPAddress | None:
    """Parse one address as it may appear in X-Forwarded-For, or None if malformed.

    Accepts ``1.2.3.4``, ``1.2.3.4:5``, ``::1``, ``[::1]`` and ``[::1]:80``. An
    IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, as a dual-stack socket reports
    an IPv4 peer) is returned as the IPv4 address, so that IPv4 networks match it.
    """
    text = text.strip()
    port = ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
            if not port:
                return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port:
            return None
    else:
        host = text
    if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if text.startswith("[") and address.version != 6:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    # An IPv4 address is simply not "in" an IPv6 network (and vice versa).
    return any(address in network for network in trusted)


def peer_is_trusted(peer_ip: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the TCP peer is one of the trusted proxies (whose forwarding headers
    are believed and passed on)."""
    peer = _parse_address(peer_ip)
    return peer is not None and _is_trusted(peer, trusted)


def forwarded_node(address: str) -> str:
    """An address as a ``Forwarded`` ``for=`` value (RFC 7239 section 6): an IPv6
    address in brackets and quotes; anything not an address as an obfuscated
    identifier would be, ``unknown``."""
    return _node(address) if len(address) > _ADDRESS_TEXT_MAX else _node_remembered(address)


def _node(address: str) -> str:
    parsed = _parse_address(address)
    if parsed is None:
        return "unknown"
    if parsed.version == 6:
        return f'"[{parsed}]"'
    return str(parsed)


_parse_remembered = functools.lru_cache(maxsize=4096)(_parse_one)
_node_remembered = functools.lru_cache(maxsize=4096)(_node)


def trusted_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks of ``trusted-proxies`` ("10.0.0.0/8", as the configuration stores them)."""
    return tuple(ipaddress.ip_network(network) for network in networks)


def client_ip(peer_ip: str, xff_values: list[str], trusted: Sequence[IPNetwork]) -> str:
    """The address of the client, taking trusted proxies into account.

    ``peer_ip`` is the address of the TCP peer; ``xff_values`` are the values of
    every X-Forwarded-For header in order (each may hold a comma-separated list);
    ``trusted`` are the networks of the proxies whose X-Forwarded-For we believe.

    If the peer is not trusted, X-Forwarded-For is ignored and the peer is the
    client. Otherwise the combined list is walked from the right (nearest hop
    first), skipping trusted addresses, and the first untrusted one is the
    client; if all are trusted, the leftmost is. A malformed entry stops the
    walk: the answer is then the last good address seen (the one nearest to it
    on the right, or the peer itself). Ports and brackets are stripped; the
    result is the address in its canonical text form.
    """
    peer = _parse_address(peer_ip)
    if peer is None:
        return peer_ip
    if not _is_trusted(peer, trusted):
        return str(peer)
    entries = [entry for value in xff_values for entry in value.split(",")]
    nearest = peer
    for entry in reversed(entries):
        address = _parse_address(entry)
        if address is None:
            break
        nearest = address
        if not _is_trusted(address, trusted):
            break
    return str(nearest)


# --------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------


def key_digest(key: str) -> str:
    """The SHA-256 digest (hex) under which an API key is looked up."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def clients_by_key(clients: Iterable[tuple[Client, Sequence[str]]]) -> dict[str, Client]:
    """Map each API key, by its :func:`key_digest`, to its client.

    ``clients`` yields ``(client, keys)`` pairs. The result is what
    :class:`ApiKeyAuth` expects. An empty key, or a key given to two clients, is
    a configuration error (ValueError; the message never shows the key).
    """
    table: dict[str, Client] = {}
    for client, keys in clients:
        if isinstance(keys, str):
            raise ValueError(f"client {client.id!r}: keys must be a list of strings")
        for key in keys:
            if not key:
                raise ValueError(f"client {client.id!r} has an empty API key")
            digest = key_digest(key)
            other = table.get(digest)
            if other is not None and other != client:
                raise ValueError(
                    f"clients {other.id!r} and {client.id!r} share an API key")
            table[digest] = client
    return table


def api_key_clients(clients: Iterable[schema.Client]) -> dict[str, Client]:
    """:func:`clients_by_key` for the clients of a configuration (each with ``key`` or
    ``keys``, and ``apis``: the names of the APIs it may use, None for all)."""
    return clients_by_key(
        (Client(c.id, c.plan, frozenset(c.apis) if c.apis is not None else None),
         (c.key,) if c.key is not None else tuple(c.keys or ()))
        for c in clients)


class ApiKeyAuth:
    """Identify clients by an API key sent in a header or a query parameter.

    ``clients_by_key`` maps the SHA-256 hex digest of each key to its client:
    build it with :func:`clients_by_key`. A presented key is looked up by its
    digest, never compared with stored keys byte by byte, so the time a lookup
    takes tells nothing about how close a guess came to a real key.
    ``header`` (any case) and ``query`` name where the key is looked for, the
    header first; at least one must be set.
    """

    def __init__(
        self,
        clients_by_key: Mapping[str, Client],
        header: str | None = "x-api-key",
        query: str | None = None,
    ) -> None:
        if not header and not query:
            raise ValueError("ApiKeyAuth needs a header or a query parameter to read")
        for digest in clients_by_key:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    "ApiKeyAuth expects SHA-256 hex digests as keys: "
                    "build the mapping with clients_by_key()")
        self._clients = dict(clients_by_key)
        self._header = header.lower() if header else None
        self._query = query or None
        where = {}
        if header:
            where["header"] = header
        if query:
            where["query"] = query
        self._challenge = [_challenge("ApiKey", **where)]

    def authenticate(
        self,
        headers: Sequence[tuple[str, str]],
        query: str,
        api: str,
        now: float | None = None,
    ) -> Identity:
        """The identity of the key's client, or AuthError (401 or 403).

        ``now`` is accepted (and ignored) so that both authenticators can be
        called the same way.
        """
        key = None
        source = None
        if self._header:
            key = _first_header(headers, self._header)
            source = ("header", self._header)
        if not key and self._query:
            key = _query_param(query, self._query)
            source = ("query", self._query)
        if not key:
            raise AuthError(401, "missing API key", self._challenge)
        # Looked up by digest: how long the lookup takes may depend on how much
        # of the digest matches a stored one, which says nothing about the key.
        client = self._clients.get(key_digest(key))
        if client is None:
            raise AuthError(401, "invalid API key", self._challenge)
        if client.apis is not None and api not in client.apis:
            raise AuthError(403, "client may not use this API")
        return Identity(client_id=client.id, plan=client.plan, expires_at=None,
                        credential=source)


# --------------------------------------------------------------------------------------
# JSON Web Tokens
# --------------------------------------------------------------------------------------


def read_secret(secret_env: str | None, secret_file: str | None) -> bytes | None:
    """The HS256 secret a jwt policy names: the environment variable's value (UTF-8), or the
    file's bytes without trailing CR/LF; None when it names neither (it uses a public key).
    Raises KeyError/OSError when the variable or the file has gone since loading."""
    if secret_env is not None:
        return os.environ[secret_env].encode()
    if secret_file is not None:
        with open(secret_file, "rb") as file:
            return file.read().rstrip(b"\r\n")
    return None


def _is_symmetric(algorithm: str) -> bool:
    return algorithm.startswith("HS")


def _load_public_key(pem: bytes) -> Any:
    """A public key from a PEM ``PUBLIC KEY`` block or a PEM certificate."""
    try:
        return serialization.load_pem_public_key(pem)
    except ValueError:
        pass
    try:
        return x509.load_pem_x509_certificate(pem).public_key()
    except ValueError:
        raise ValueError(
            "public_key_pem is neither a PEM public key nor a PEM certificate") from None


def _prepare_key(algorithm: str, material: Any) -> Any:
    """Check that ``material`` is a usable key for ``algorithm``; return PyJWT's form of it.

    Raises ValueError for a key of the wrong type or curve, or one that is too
    short (an HMAC secret shorter than the hash, an RSA key under 2048 bits).
    """
    algo = get_default_algorithms()[algorithm]
    try:
        key = algo.prepare_key(material)
    except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
        raise ValueError(f"key not usable with {algorithm}: {exc}") from None
    weakness = algo.check_key_length(key)
    if weakness:
        raise ValueError(weakness)
    return key


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:       # an int beyond any float: JSON integers have no bound
        return False


class JwtAuth:
    """Identify clients by a signed JWT (RFC 7519) sent as a Bearer token.

    The token is read from ``Authorization: Bearer <token>`` or, if ``query`` is
    set, from that query parameter. ``algorithms`` are some of the configuration's
    ``JWT_ALGORITHMS`` (HS256, RS256, ES256); only those configured are
    accepted, and each algorithm is bound to its kind of key, so a token cannot
    choose how its signature is checked:

    * HS256 verifies with ``secret``;
    * RS256 and ES256 verify with ``public_key_pem`` (a PEM public key or
      certificate), or with the key in ``jwks`` (a JWK Set, as a dict) that the
      token's ``kid`` names. A token without ``kid`` is accepted only if the
      set has exactly one usable key. With ``jwks``, ``oct`` keys in the set
      serve HS256, and ``secret``/``public_key_pem`` are not used.

    PyJWT verifies the signature, ``iss`` (if ``issuer`` is set) and ``aud`` (if
    ``audience`` is set; otherwise ``aud`` is not checked). ``exp``, ``nbf`` and
    ``iat`` are checked here against the ``now`` given to :meth:`authenticate`,
    with ``leeway`` seconds of tolerance. The client id is the string in claim
    ``client_id_claim``; the plan is the string in ``plan_claim``, else
    "default". Every scope in ``required_scopes`` must appear in the token's
    ``scope`` (space-separated) or ``scp`` (string or list) claim.

    Configuration errors (no key for an algorithm, a key of the wrong type, an
    unknown algorithm, "none") raise ValueError here, never at request time.
    """

    def __init__(
        self,
        algorithms: Sequence[str],
        *,
        secret: bytes | None = None,
        public_key_pem: bytes | None = None,
        jwks: dict | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        client_id_claim: str = "sub",
        plan_claim: str | None = None,
        required_scopes: Sequence[str] = (),
        query: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        if isinstance(algorithms, str):
            raise ValueError("algorithms must be a list of names, not one string")
        if not algorithms:
            raise ValueError("JwtAuth needs at least one algorithm")
        for name in algorithms:
            if name not in JWT_ALGORITHMS:
                raise ValueError(f"unsupported JWT algorithm {name!r}")
        if leeway < 0 or not math.isfinite(leeway):
            raise ValueError("leeway must be a finite number >= 0")
        for scope in required_scopes:
            if not scope or any(c in scope for c in ' "\\'):
                raise ValueError(f"invalid scope name {scope!r}")

        self._algorithms = frozenset(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._client_id_claim = client_id_claim
        self._plan_claim = plan_claim
        self._required_scopes = tuple(required_scopes)
        self._query = query or None
        self._leeway = float(leeway)
        # exp, nbf and iat are ours to check (against an injectable clock).
        self._options = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }

        # Key tables, built once: algorithm -> PyJWT-ready key.
        self._static_keys: dict[str, Any] = {}
        # JWKS: kid -> algorithm -> key; and the single key for tokens without kid.
        self._keys_by_kid: dict[str, dict[str, Any]] = {}
        self._only_key: dict[str, Any] | None = None

        if jwks is not None:
            if secret is not None or public_key_pem is not None:
                raise ValueError("give jwks, or secret/public_key_pem, not both")
            self._load_jwk_set(jwks)
        else:
            self._load_static_keys(secret, public_key_pem)

    def _load_static_keys(self, secret: bytes | None, public_key_pem: bytes | None) -> None:
        public_key = _load_public_key(public_key_pem) if public_key_pem is not None else None
        for name in sorted(self._algorithms):
            if _is_symmetric(name):
                if secret is None:
                    raise ValueError(f"{name} needs a secret")
                self._static_keys[name] = _prepare_key(name, secret)
            else:
                if public_key is None:
                    raise ValueError(f"{name} needs public_key_pem or jwks")
                self._static_keys[name] = _prepare_key(name, public_key)

    def _load_jwk_set(self, jwks: dict) -> None:
        keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(keys, list):
            raise ValueError('a JWK Set is an object with a "keys" list')
        usable: list[tuple[str | None, dict[str, Any]]] = []
        for jwk in keys:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            kid = jwk.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise ValueError("a JWK's kid must be a string")
            by_alg: dict[str, Any] = {}
            for name in sorted(self._algorithms):
                if "alg" in jwk and jwk["alg"] != name:
                    continue
                try:
                    pyjwk = jwt.PyJWK(jwk, algorithm=name)
                    by_alg[name] = _prepare_key(name, pyjwk.key)
                except (jwt.PyJWTError, ValueError):
                    continue  # not a key for this algorithm (wrong kty or curve)
            if by_alg:
                usable.append((kid, by_alg))
        if not usable:
            raise ValueError("the JWK Set has no key usable with the configured algorithms")
        for kid, by_alg in usable:
            if kid is None:
                continue
            if kid in self._keys_by_kid:
                raise ValueError(f"the JWK Set has two keys with kid {kid!r}")
            self._keys_by_kid[kid] = by_alg
        if len(usable) == 1:
            self._only_key = usable[0][1]

    @staticmethod
    def load_jwks(path: str | Path) -> dict:
        """Read a JWK Set from a JSON file (a single JWK is wrapped into a set)."""
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if isinstance(data, dict) and "kty" in data:
            data = {"keys": [data]}
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError(f'{path}: a JWK Set is an object with a "keys" list')
        return data

    # -- per request ---------------------------------------------------------------

    def _invalid(self, description: str) -> AuthError:
        return AuthError(401, description, [
            _challenge("Bearer", error="invalid_token", error_description=description)])

    def _token(
        self, headers: Sequence[tuple[str, str]], query: str
    ) -> tuple[str | None, tuple[str, str] | None]:
        """The token and where it was read (see :attr:`Identity.credential`)."""
        for name, value in headers:
            if name == "authorization":
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip(), ("header", "authorization")
        if self._query:
            return _query_param(query, self._query), ("query", self._query)
        return None, None

    def _key_for(self, header: dict[str, Any], algorithm: str) -> Any:
        """The key that verifies a token with this header, or AuthError."""
        if self._static_keys:
            return self._static_keys[algorithm]
        kid = header.get("kid")
        if kid is None:
            if self._only_key is None:
                raise self._invalid("token has no key id")
            by_alg = self._only_key
        else:
            by_alg = self._keys_by_kid.get(kid)
            if by_alg is None:
                raise self._invalid("unknown key id")
        key = by_alg.get(algorithm)
        if key is None:
            raise self._invalid("algorithm does not match key")
        return key

    def _check_times(self, claims: dict[str, Any], now: float) -> float | None:
        """Check exp, nbf and iat against ``now``; return exp (or None)."""
        leeway = self._leeway
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise self._invalid(f"malformed {name} claim")
        exp = claims.get("exp")
        if exp is not None and exp <= now - leeway:
            raise self._invalid("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and nbf > now + leeway:
            raise self._invalid("token not yet valid")
        iat = claims.get("iat")
        if iat is not None and iat > now + leeway:
            raise self._invalid("token issued in the future")
        return float(exp) if exp is not None else None

    def _check_scopes(self, claims: dict[str, Any]) -> None:
        if not self._required_scopes:
            return
        granted: set[str] = set()
        for name in ("scope", "scp"):
            value = claims.get(name)
            if isinstance(value, str):
                granted.update(value.split())
            elif isinstance(value, list):
                granted.update(v for v in value if isinstance(v, str))
        if not all(scope in granted for scope in self._required_scopes):
            raise AuthError(403, "insufficient scope", [
                _challenge("Bearer", error="insufficient_scope",
                           error_description="insufficient scope",
                           scope=" ".join(self._required_scopes))])

    def authenticate(
        self,
        headers: Sequence[tuple[str, str]],
        query: str,
        api: str,
        now: float,
    ) -> Identity:
        """The identity the token vouches for, or AuthError (401 or 403).

        ``now`` is wall-clock seconds from the gateway's clock (``Clock.wall``).
        ``api`` is not used (yet): a token is valid for every API that accepts
        its issuer and audience.
        """
        token, source = self._token(headers, query)
        if not token:
            raise AuthError(401, "missing bearer token", [_challenge("Bearer")])

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise self._invalid("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise self._invalid("algorithm not allowed")
        key = self._key_for(header, algorithm)

        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], options=self._options,
                issuer=self._issuer, audience=self._audience)
        except jwt.InvalidSignatureError:
            raise self._invalid("bad signature") from None
        except jwt.InvalidIssuerError:
            raise self._invalid("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise self._invalid("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise self._invalid(f"missing {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise self._invalid("algorithm not allowed") from None
        except jwt.PyJWTError:
            raise self._invalid("invalid token") from None

        expires_at = self._check_times(claims, now)
        client_id = claims.get(self._client_id_claim)
        if not isinstance(client_id, str) or not client_id:
            raise self._invalid("token has no client id")
        self._check_scopes(claims)
        plan = claims.get(self._plan_claim) if self._plan_claim else None
        return Identity(
            client_id=client_id,
            plan=plan if isinstance(plan, str) and plan else "default",
            expires_at=expires_at,
            credential=source,
        )


# --------------------------------------------------------------------------------------
# Origin
# --------------------------------------------------------------------------------------

def check_origin(origin: str | None, allowed: frozenset[str] | None) -> None:
    """Refuse (403) a request whose Origin header is not one of ``allowed``.

    ``allowed`` None allows any origin, even none. Otherwise it holds origins in the normal
    form of :func:`fastgw.config.web.normalize_origin` (as the configuration stores them), and
    the Origin header must be present and its normal form one of them.
    """
    if allowed is None:
        return
    if origin is not None:
        try:
            if normalize_origin(origin) in allowed:
                return
        except ValueError:
            pass
    raise AuthError(403, "origin not allowed", kind="forbidden")
