"""Fuzz target: the identity policies (`fastgw.identity`).

Modes (the last input byte picks one):
- API keys: `ApiKeyAuth.authenticate` with fuzzed headers and query strings;
- JWT, raw: a fuzzed string as the bearer token (header or query);
- JWT, structured: a header and claims built from fuzzed fields (odd types,
  huge numbers, NaN, unknown algorithms and key ids), signed with the right
  key, a wrong one or none, then perhaps altered, against authenticators
  configured with HS256, RS256, ES256 and a JWK Set;
- client address: `client_ip` with fuzzed peer addresses, X-Forwarded-For
  values and trusted networks;
- origin: `check_origin` with a fuzzed Origin.

Only `AuthError` may escape (401/403, a short one-line reason without the
credential, headers fit for an HTTP answer); an accepted credential is one
that was really issued (the right key, the signed text unchanged).

    python tests/fuzz/fuzz_identity.py [libFuzzer args]   (or tests/fuzz/run_fuzz.py identity)
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import sys

INSTRUMENT = ["fastgw", "jwt", "ipaddress", "urllib"]

NOW = 1_700_000_000.0
SECRET = b"fuzz-secret-0123456789abcdef0123"
KEYS = {"alice-key-0001": ("alice", "gold", None), "bob-key-0002": ("bob", "default", frozenset({"chat"}))}
APIS = ("chat", "other")
TRUSTED = ("10.0.0.0/8", "192.168.0.0/16", "::1/128", "fd00::/8", "127.0.0.1/32")
# In their normal form, as the configuration stores them.
ORIGINS = frozenset({"https://app.example", "http://localhost:8080", "https://[::1]"})

identity = jwt = normalize_origin = None
api_key_auths = []
jwt_auths = []           # (name, auth, {alg: signing key})
OTHER_KEYS = {}
ALGS = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def setup() -> None:
    global identity, jwt, ALGS, normalize_origin
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from fastgw import identity as ident
    from fastgw.config.web import normalize_origin
    import jwt as pyjwt
    from jwt.algorithms import get_default_algorithms
    identity, jwt, ALGS = ident, pyjwt, get_default_algorithms()

    clients = [(ident.Client(cid, plan, apis), [key]) for key, (cid, plan, apis) in KEYS.items()]
    table = ident.clients_by_key(clients)
    api_key_auths[:] = [ident.ApiKeyAuth(table, header="x-api-key", query="api_key"),
                        ident.ApiKeyAuth(table, header=None, query="key"),
                        ident.ApiKeyAuth(table, header="Authorization")]

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    OTHER_KEYS.update({"HS256": b"another-secret-0123456789abcdef0",
                       "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                       "ES256": ec.generate_private_key(ec.SECP256R1())})

    def pem(key):
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(alg, key, kid=None):
        out = json.loads(ALGS[alg].to_jwk(key if alg == "HS256" else key.public_key()))
        if kid:
            out["kid"] = kid
        return out

    signers = {"HS256": SECRET, "RS256": rsa_key, "ES256": ec_key}
    jwt_auths[:] = [
        ("hs", ident.JwtAuth(["HS256"], secret=SECRET, issuer="iss-a", audience="aud-a",
                             plan_claim="plan", required_scopes=["read"], query="access_token",
                             leeway=5.0), signers),
        ("rs", ident.JwtAuth(["RS256"], public_key_pem=pem(rsa_key), client_id_claim="cid"), signers),
        ("es", ident.JwtAuth(["ES256"], public_key_pem=pem(ec_key), required_scopes=["a", "b"]), signers),
        ("jwks", ident.JwtAuth(["HS256", "RS256", "ES256"], jwks={"keys": [
            jwk("HS256", SECRET, "k-hs"), jwk("RS256", rsa_key, "k-rsa"), jwk("ES256", ec_key, "k-ec"),
            {"kty": "oct", "k": "AAAA", "use": "enc", "kid": "k-enc"}]}), signers),
        ("one", ident.JwtAuth(["RS256"], jwks={"keys": [jwk("RS256", rsa_key)]}, audience="aud-b",
                              query="token"), signers),
    ]


# --------------------------------------------------------------------------------------
# Checks on what comes out
# --------------------------------------------------------------------------------------

def _check_error(exc, credential: str | None) -> None:
    assert exc.status in (401, 403), exc
    assert exc.kind == ("unauthorized" if exc.status == 401 else "forbidden"), exc
    reason = exc.reason
    assert isinstance(reason, str) and reason and len(reason) <= 100, reason
    assert "\n" not in reason and "\r" not in reason, reason
    # A credential long enough not to occur by chance in fixed texts.
    secret = credential if credential and len(credential) >= 12 else None
    if secret:
        assert secret not in reason, "the credential in the reason"
    for name, value in exc.headers:
        assert name == "WWW-Authenticate", name
        assert isinstance(value, str) and not any(c in value for c in "\r\n\x00"), value
        assert not secret or secret not in value, "the credential in a header"
        value.encode("latin-1")


def _check_identity(who) -> None:
    assert isinstance(who.client_id, str) and who.client_id, who
    assert isinstance(who.plan, str) and who.plan, who
    assert who.expires_at is None or (isinstance(who.expires_at, float)
                                      and math.isfinite(who.expires_at)), who


# --------------------------------------------------------------------------------------
# Fuzzed values
# --------------------------------------------------------------------------------------

NUMBERS = [0, -1, 1, NOW, NOW - 10, NOW + 3, NOW + 10, NOW + 1e6, 2**31, 2**53 + 1, 2**63,
           -2**63, 10**30, 10**400, -10**400, 1e308, float("inf"), float("-inf"), float("nan"),
           True, False]


def _value(fdp, depth=0):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.PickValueInList(NUMBERS)
    if kind == 1:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 48))
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return None
    if kind == 4 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 5 and depth < 3:
        return {fdp.ConsumeUnicodeNoSurrogates(4): _value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if kind == 6:
        return fdp.PickValueInList(["iss-a", "aud-a", "aud-b", "read", "read write", "a b", "gold",
                                    "alice", "", " ", "\x00", "é", "none", "HS256"])
    if kind == 7:
        return fdp.PickValueInList([["aud-a"], ["read"], ["a", "b"], ["x", 1], [], {}])
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))


CLAIMS = ("sub", "cid", "exp", "nbf", "iat", "iss", "aud", "scope", "scp", "plan", "jti")


def _structured_token(fdp, auth_name, signers):
    alg = fdp.PickValueInList(["HS256", "RS256", "ES256", "HS256", "RS256", "ES256", "none",
                               "HS512", "PS256", "ES384", "", "hs256", None, 5, ["HS256"]])
    header = {"alg": alg}
    if fdp.ConsumeBool():
        header["typ"] = fdp.PickValueInList(["JWT", "at+jwt", None, 1])
    if fdp.ConsumeBool():
        header["kid"] = fdp.PickValueInList(["k-hs", "k-rsa", "k-ec", "k-enc", "nope", "", 5, None,
                                             ["k-hs"], {"k": 1}])
    if fdp.ConsumeIntInRange(0, 7) == 0:
        header[fdp.PickValueInList(["crit", "jku", "x5u", "b64", "zip"])] = _value(fdp)
    claims = {}
    # Usually a token that could pass: the claims the authenticators want, with fuzz on top.
    if fdp.ConsumeIntInRange(0, 3):
        claims.update({"sub": "alice", "cid": "alice", "iss": "iss-a", "aud": "aud-a",
                       "scope": "read a b", "exp": NOW + 60, "iat": NOW - 60})
        if auth_name == "one":
            claims["aud"] = "aud-b"
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        claims[fdp.PickValueInList(list(CLAIMS))] = _value(fdp)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        claims = _value(fdp)                 # not an object at all
    header_text = json.dumps(header).encode()
    claims_text = json.dumps(claims).encode()
    if fdp.ConsumeIntInRange(0, 15) == 0:
        claims_text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    signing_input = _b64(header_text) + "." + _b64(claims_text)
    how = fdp.ConsumeIntInRange(0, 7)        # 0-4: the right key; 5: another; 6: garbage; 7: none
    signed_right = False
    if how <= 5 and isinstance(alg, str) and alg in signers:
        key = signers[alg] if how <= 4 else OTHER_KEYS[alg]
        signature = ALGS[alg].sign(signing_input.encode(), ALGS[alg].prepare_key(key))
        signed_right = how <= 4
    elif how == 7:
        signature = b""
    else:
        signature = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    token = signing_input + "." + _b64(signature)
    original_signed = token.rsplit(".", 1)[0]
    kind = fdp.ConsumeIntInRange(0, 15)      # sometimes altered as text
    if kind == 1 and token:
        i = fdp.ConsumeIntInRange(0, len(token) - 1)
        token = token[:i] + fdp.ConsumeUnicodeNoSurrogates(2) + token[i + 1:]
    elif kind == 2:
        token = token[:fdp.ConsumeIntInRange(0, len(token))]
    elif kind == 3:
        token += fdp.PickValueInList([".", "..", "=", "==", " x", ".e30"])
    intact = token.count(".") == 2 and token.rsplit(".", 1)[0] == original_signed
    return token, signed_right and intact, claims, alg


def _deliver_token(fdp, auth_name, token):
    where = fdp.ConsumeIntInRange(0, 7)
    query = ""
    headers = [(fdp.PickValueInList(["x-other", "authorization", "cookie"]), fdp.ConsumeUnicodeNoSurrogates(8))] \
        if where == 7 else []
    if where < 4:
        scheme = fdp.PickValueInList(["Bearer", "bearer", "BEARER", "Basic", "Bearer ", ""])
        headers.append(("authorization", f"{scheme} {token}"))
    else:
        from urllib.parse import quote
        name = fdp.PickValueInList(["access_token", "token", "api_key"])
        value = quote(token, safe="") if where != 5 else token
        query = f"{name}={value}" + ("&x=1" if where == 6 else "")
    return headers, query


# --------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------

def _api_key(fdp) -> None:
    auth = fdp.PickValueInList(api_key_auths)
    headers = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        name = fdp.PickValueInList(["x-api-key", "authorization", "x-other", "X-API-Key"])
        value = fdp.PickValueInList(list(KEYS) + ["", " alice-key-0001", "alice-key-000"]) \
            if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        headers.append((name, value))
    query = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if fdp.ConsumeBool():
        query += "&api_key=" + fdp.PickValueInList(list(KEYS) + ["%61lice-key-0001", ""])
    api = fdp.PickValueInList(list(APIS))
    from urllib.parse import unquote_plus
    presented = [v for _, v in headers] + [query, unquote_plus(query)]
    try:
        who = auth.authenticate(headers, query, api, now=NOW)
    except identity.AuthError as exc:
        _check_error(exc, None)
        for key in KEYS:
            assert key not in exc.reason and all(key not in v for _, v in exc.headers)
        return
    _check_identity(who)
    # Accepted: the key of that client, and a client allowed on the API.
    matches = [k for k, (cid, _, apis) in KEYS.items()
               if cid == who.client_id and (apis is None or api in apis)]
    assert matches, (who, api)
    assert any(k in text for k in matches for text in presented), "accepted a key never given"


def _jwt_raw(fdp) -> None:
    name, auth, _ = fdp.PickValueInList(jwt_auths)
    token = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 400))
    headers, query = _deliver_token(fdp, name, token)
    try:
        who = auth.authenticate(headers, query, "chat", now=NOW)
    except identity.AuthError as exc:
        _check_error(exc, token)
        return
    raise AssertionError(f"accepted a token that was never issued: {token!r} -> {who}")


def _jwt_structured(fdp) -> None:
    name, auth, signers = fdp.PickValueInList(jwt_auths)
    token, issued, claims, alg = _structured_token(fdp, name, signers)
    headers, query = _deliver_token(fdp, name, token)
    now = fdp.PickValueInList([NOW, NOW + 100, NOW - 100, 0.0])
    try:
        who = auth.authenticate(headers, query, "chat", now=now)
    except identity.AuthError as exc:
        _check_error(exc, token)
        return
    _check_identity(who)
    assert issued, f"accepted a token not signed by its key: {token!r}"
    assert isinstance(claims, dict)
    exp = claims.get("exp")
    assert exp is None or exp > now - 5.0, (exp, now)


def _client_ip(fdp) -> None:
    trusted = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        text = fdp.PickValueInList(list(TRUSTED)) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(20)
        try:
            trusted.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
    peer = fdp.PickValueInList(["10.1.2.3", "127.0.0.1", "::1", "::ffff:10.0.0.1", "203.0.113.9",
                                "[::1]", "fd00::5", "", "not-an-ip"]) if fdp.ConsumeBool() \
        else fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    xff = [fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
           for _ in range(fdp.ConsumeIntInRange(0, 3))]
    result = identity.client_ip(peer, xff, tuple(trusted))
    assert isinstance(result, str)
    try:
        peer_address = ipaddress.ip_address(peer.strip().strip("[]"))
    except ValueError:
        peer_address = None
    if peer_address is not None and not any(peer_address in n for n in trusted) \
            and peer_address.version == 4:
        assert result == str(peer_address), (peer, result)
    if result != peer:
        address = ipaddress.ip_address(result)          # a canonical address
        assert str(address) == result, result


def _origin(fdp) -> None:
    allowed = None if fdp.ConsumeIntInRange(0, 7) == 0 else ORIGINS
    origin = None if fdp.ConsumeIntInRange(0, 15) == 0 else (
        fdp.PickValueInList(sorted(ORIGINS) + ["HTTPS://APP.EXAMPLE:443", "https://app.example/", "null",
                                              "https://app.example:0", "https://app.example:99999",
                                              "https://user@app.example", "https://[::1"])
        if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60)))
    try:
        identity.check_origin(origin, allowed)
    except identity.AuthError as exc:
        _check_error(exc, None)
        assert exc.status == 403
        return
    assert allowed is None or normalize_origin(origin) in allowed


MODES = (_api_key, _jwt_raw, _jwt_structured, _jwt_structured, _client_ip, _origin)


def test_one_input(data: bytes) -> None:
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    MODES[fdp.ConsumeIntInRange(0, len(MODES) - 1)](fdp)


if __name__ == "__main__":
    import fuzzlib
    fuzzlib.main("identity", sys.modules[__name__])
