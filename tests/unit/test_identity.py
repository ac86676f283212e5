"""Identity: client address, API keys, JWTs and Origin, without sockets.

Every key is generated here; time is injected through ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fastgw.clock import Clock
from fastgw.config.schema import JWT_ALGORITHMS
from fastgw.config.web import normalize_origin
from fastgw.identity import (
    ApiKeyAuth,
    AuthError,
    Client,
    Identity,
    JwtAuth,
    check_origin,
    client_ip,
    clients_by_key,
    key_digest,
)

NOW = 1_700_000_000.0
SECRET = b"s" * 32
ISSUER = "https://issuer.example"
AUDIENCE = "fastgw-tests"


def challenge(err: AuthError) -> str:
    """The single WWW-Authenticate value of a refusal (fails if there is none)."""
    values = [v for k, v in err.headers if k.lower() == "www-authenticate"]
    assert len(values) == 1, err.headers
    return values[0]


def refused(fn, *args, **kwargs) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args, **kwargs)
    return info.value


def assert_invalid_token(err: AuthError, description: str | None = None) -> None:
    assert err.status == 401 and err.kind == "unauthorized"
    value = challenge(err)
    assert value.startswith('Bearer realm="fastgw"')
    assert 'error="invalid_token"' in value
    if description is not None:
        assert err.reason == description
        assert f'error_description="{description}"' in value


# --------------------------------------------------------------------------------------
# AuthError
# --------------------------------------------------------------------------------------


def test_auth_error_fields():
    err = AuthError(401, "nope", [("WWW-Authenticate", 'Bearer realm="fastgw"')])
    assert (err.status, err.reason, err.kind, str(err)) == (401, "nope", "unauthorized", "nope")
    assert AuthError(403, "no").kind == "forbidden"
    assert AuthError(403, "no").headers == []
    with pytest.raises(ValueError):
        AuthError(500, "boom")


# --------------------------------------------------------------------------------------
# client_ip
# --------------------------------------------------------------------------------------

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"),
           ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize("peer, xff, expected", [
    # An untrusted peer is the client, whatever it claims.
    ("203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
    ("203.0.113.9", [], "203.0.113.9"),
    # A trusted peer without X-Forwarded-For is the client.
    ("10.0.0.1", [], "10.0.0.1"),
    # One trusted proxy.
    ("10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
    # Trusted hops are skipped from the right; a spoofed leftmost entry is not believed.
    ("10.0.0.1", ["6.6.6.6, 1.1.1.1, 10.0.0.2"], "1.1.1.1"),
    # Several headers form one list, in order.
    ("10.0.0.1", ["6.6.6.6, 1.1.1.1", "10.0.0.2"], "1.1.1.1"),
    # All trusted: the leftmost.
    ("10.0.0.1", ["10.9.9.9, 10.0.0.2"], "10.9.9.9"),
    # Ports stripped.
    ("10.0.0.1", ["1.2.3.4:5"], "1.2.3.4"),
    # Malformed entries stop the walk at the nearest good address.
    ("10.0.0.1", ["1.1.1.1, garbage, 10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", ["1.1.1.1, garbage"], "10.0.0.1"),
    ("10.0.0.1", ["1.1.1.1, , 10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", ["1.1.1.1:99999"], "10.0.0.1"),
    ("10.0.0.1", ["[1.1.1.1]:80"], "10.0.0.1"),
    ("10.0.0.1", ["unknown"], "10.0.0.1"),
    # IPv6, with and without brackets and ports.
    ("::1", ["[2001:db8::1]:443"], "2001:db8::1"),
    ("::1", ["2001:DB8:0::1"], "2001:db8::1"),
    ("fd00::5", ["2001:db8::7, [fd00::9]"], "2001:db8::7"),
    ("fd00::5", ["[2001:db8::7"], "fd00::5"),
    # IPv4 behind an IPv6 proxy, and the other way round.
    ("::1", ["198.51.100.1"], "198.51.100.1"),
    ("10.0.0.1", ["2001:db8::2"], "2001:db8::2"),
    # A dual-stack socket's IPv4-mapped peer matches IPv4 networks.
    ("::ffff:10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
    ("::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
])
def test_client_ip(peer, xff, expected):
    assert client_ip(peer, xff, TRUSTED) == expected


def test_client_ip_trusts_nothing_by_default():
    assert client_ip("10.0.0.1", ["1.1.1.1"], []) == "10.0.0.1"


# --------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------

ALICE = Client("alice", plan="gold")
BOB = Client("bob", apis=frozenset({"quotes"}))


@pytest.fixture
def keys():
    return clients_by_key([(ALICE, ["alice-key-1", "alice-key-2"]), (BOB, ["bob-key"])])


def test_clients_by_key_stores_digests_only(keys):
    assert set(keys) == {key_digest(k) for k in ("alice-key-1", "alice-key-2", "bob-key")}
    assert key_digest("bob-key") == hashlib.sha256(b"bob-key").hexdigest()
    assert "bob-key" not in keys


def test_clients_by_key_rejects_shared_and_empty_keys():
    with pytest.raises(ValueError, match="share") as info:
        clients_by_key([(ALICE, ["k"]), (BOB, ["k"])])
    assert "'k'" not in str(info.value)
    with pytest.raises(ValueError):
        clients_by_key([(ALICE, [""])])
    with pytest.raises(ValueError):
        clients_by_key([(ALICE, "a-string-not-a-list")])


def test_api_key_auth_wants_digests():
    with pytest.raises(ValueError, match="clients_by_key"):
        ApiKeyAuth({"alice-key-1": ALICE})
    with pytest.raises(ValueError):
        ApiKeyAuth({}, header=None, query=None)


def test_api_key_in_header(keys):
    auth = ApiKeyAuth(keys)
    identity = auth.authenticate([("host", "gw"), ("x-api-key", "alice-key-2")], "", "chat")
    assert identity == Identity(client_id="alice", plan="gold", expires_at=None)


def test_api_key_header_name_any_case_first_occurrence(keys):
    auth = ApiKeyAuth(keys, header="X-API-Key")
    headers = [("x-api-key", "bob-key"), ("x-api-key", "alice-key-1")]
    assert auth.authenticate(headers, "", "quotes").client_id == "bob"


def test_api_key_in_query(keys):
    auth = ApiKeyAuth(keys, header="x-api-key", query="api_key")
    identity = auth.authenticate([], "a=1&api_key=alice-key-1&api_key=bob-key", "chat")
    assert identity.client_id == "alice"
    # As with parse_qs, blank values are skipped: the first non-empty one counts.
    assert auth.authenticate([], "api_key=&api_key=bob-key", "quotes").client_id == "bob"
    # Percent-encoding is decoded as parse_qs does.
    keys2 = clients_by_key([(ALICE, ["a key/+"])])
    assert ApiKeyAuth(keys2, query="k").authenticate([], "k=a%20key%2F%2B", "x").client_id == "alice"
    # The header wins over the query.
    assert auth.authenticate([("x-api-key", "bob-key")], "api_key=alice-key-1",
                             "quotes").client_id == "bob"


def test_api_key_query_not_read_unless_configured(keys):
    err = refused(ApiKeyAuth(keys).authenticate, [], "x-api-key=alice-key-1", "chat")
    assert err.status == 401 and err.reason == "missing API key"


def test_api_key_missing(keys):
    err = refused(ApiKeyAuth(keys, header="X-API-Key").authenticate, [("host", "gw")], "", "chat")
    assert (err.status, err.kind, err.reason) == (401, "unauthorized", "missing API key")
    assert challenge(err) == 'ApiKey realm="fastgw", header="X-API-Key"'
    err = refused(ApiKeyAuth(keys, header=None, query="api_key").authenticate,
                  [], "api_key=", "chat")
    assert err.reason == "missing API key"
    assert challenge(err) == 'ApiKey realm="fastgw", query="api_key"'
    # An empty header counts as missing.
    err = refused(ApiKeyAuth(keys).authenticate, [("x-api-key", "")], "", "chat")
    assert err.reason == "missing API key"


def test_api_key_wrong(keys):
    auth = ApiKeyAuth(keys, query="api_key")
    for headers, query in ([("x-api-key", "alice-key-3")], ""), ([], "api_key=ALICE-KEY-1"):
        err = refused(auth.authenticate, headers, query, "chat")
        assert (err.status, err.reason) == (401, "invalid API key")
        assert challenge(err).startswith('ApiKey realm="fastgw"')
        assert "alice" not in err.reason.lower()


def test_api_key_forbidden_api(keys):
    auth = ApiKeyAuth(keys)
    assert auth.authenticate([("x-api-key", "bob-key")], "", "quotes").plan == "default"
    err = refused(auth.authenticate, [("x-api-key", "bob-key")], "", "chat")
    assert (err.status, err.kind, err.reason) == (403, "forbidden", "client may not use this API")


# --------------------------------------------------------------------------------------
# JWT: keys and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def jwks(rsa_key, ec_key):
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "rsa-1"}
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True) | {"kid": "ec-1"}
    return {"keys": [rsa_jwk, ec_jwk]}


def claims(**extra):
    base = {"sub": "carol", "iss": ISSUER, "aud": AUDIENCE, "iat": int(NOW) - 10,
            "exp": int(NOW) + 300}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(payload=None, secret=SECRET, **headers) -> str:
    return jwt.encode(payload or claims(), secret, algorithm="HS256", headers=headers or None)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("host", "gw"), ("authorization", f"Bearer {token}")]


def hs_auth(**kwargs) -> JwtAuth:
    options = {"secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE} | kwargs
    return JwtAuth(["HS256"], **options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------------------
# JWT: valid tokens
# --------------------------------------------------------------------------------------


def test_jwt_hs256_valid():
    identity = hs_auth().authenticate(bearer(hs_token()), "", "chat", now=NOW)
    assert identity == Identity(client_id="carol", plan="default", expires_at=NOW + 300)


def test_jwt_rs256_with_public_key_pem(rsa_key):
    auth = JwtAuth(["RS256"], public_key_pem=public_pem(rsa_key), issuer=ISSUER,
                   audience=AUDIENCE)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"


def test_jwt_es256_with_public_key_pem(ec_key):
    auth = JwtAuth(["ES256"], public_key_pem=public_pem(ec_key))
    token = jwt.encode(claims(aud=None), ec_key, algorithm="ES256")
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"


def test_jwt_on_the_real_clocks_wall_time():
    wall = Clock().wall()       # what the gateway passes: its clock's wall time
    token = hs_token(claims(iat=int(time.time()), exp=int(time.time()) + 60))
    assert hs_auth().authenticate(bearer(token), "", "chat", now=wall).client_id == "carol"
    old = hs_token(claims(iat=int(time.time()) - 120, exp=int(time.time()) - 60))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(old), "", "chat", now=wall),
                         "token expired")


def test_jwt_without_exp_never_expires():
    token = hs_token(claims(exp=None))
    assert hs_auth().authenticate(bearer(token), "", "chat", now=NOW).expires_at is None


def test_jwt_audience_not_checked_unless_configured():
    auth = JwtAuth(["HS256"], secret=SECRET)
    token = hs_token(claims(aud="someone-else", iss="anyone"))
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"


def test_jwt_audience_list():
    token = hs_token(claims(aud=["other", AUDIENCE]))
    assert hs_auth().authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"


# --------------------------------------------------------------------------------------
# JWT: time
# --------------------------------------------------------------------------------------


def test_jwt_expired():
    auth = hs_auth()
    token = hs_token()
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW + 301),
                         "token expired")
    # exp is the first instant at which the token is no longer valid.
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW + 300),
                         "token expired")
    assert auth.authenticate(bearer(token), "", "chat", now=NOW + 299.5).client_id == "carol"


def test_jwt_not_yet_valid():
    token = hs_token(claims(nbf=int(NOW) + 60))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "token not yet valid")
    assert hs_auth().authenticate(bearer(token), "", "chat", now=NOW + 60).client_id == "carol"


def test_jwt_issued_in_the_future():
    token = hs_token(claims(iat=int(NOW) + 60))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "token issued in the future")


def test_jwt_leeway():
    expired = hs_token(claims(exp=int(NOW) - 5))
    early = hs_token(claims(nbf=int(NOW) + 5, iat=int(NOW) + 5))
    strict = hs_auth()
    lenient = hs_auth(leeway=10)
    for token in (expired, early):
        assert_invalid_token(refused(strict.authenticate, bearer(token), "", "chat", now=NOW))
        assert lenient.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"
    assert_invalid_token(refused(lenient.authenticate, bearer(expired), "", "chat",
                                 now=NOW + 6), "token expired")


def test_jwt_malformed_time_claims():
    for bad in ({"exp": "tomorrow"}, {"nbf": True}, {"iat": [1]}):
        token = hs_token(claims(**bad))
        assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat",
                                     now=NOW))


# --------------------------------------------------------------------------------------
# JWT: issuer, audience, signature, algorithms
# --------------------------------------------------------------------------------------


def test_jwt_wrong_issuer():
    token = hs_token(claims(iss="https://evil.example"))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "wrong issuer")
    token = hs_token(claims(iss=None))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW))


def test_jwt_wrong_audience():
    token = hs_token(claims(aud="someone-else"))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "wrong audience")
    token = hs_token(claims(aud=None))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW))


def test_jwt_bad_signature(rsa_key, other_rsa_key):
    token = hs_token(secret=b"x" * 32)
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "bad signature")
    # A payload changed after signing.
    head, _, sig = hs_token().split(".")
    forged = ".".join([head, b64(json.dumps(claims(sub="mallory")).encode()), sig])
    assert_invalid_token(refused(hs_auth().authenticate, bearer(forged), "", "chat", now=NOW),
                         "bad signature")
    # Signed by another RSA key.
    auth = JwtAuth(["RS256"], public_key_pem=public_pem(rsa_key))
    token = jwt.encode(claims(aud=None), other_rsa_key, algorithm="RS256")
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "bad signature")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "", "e30.e30", "Zm9v.YmFy.YmF6"])
def test_jwt_malformed(token):
    auth = hs_auth()
    err = refused(auth.authenticate, [("authorization", f"Bearer {token}")], "", "chat", now=NOW)
    assert err.status == 401
    challenge(err)


def test_jwt_alg_confusion_hs256_signed_with_rsa_public_key(rsa_key):
    """The classic attack: HS256 with the server's RSA public key as the HMAC secret."""
    pem = public_pem(rsa_key)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(aud=None)).encode())
    signature = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{payload}.{signature}"
    auth = JwtAuth(["RS256"], public_key_pem=pem)
    assert_invalid_token(refused(auth.authenticate, bearer(forged), "", "chat", now=NOW),
                         "algorithm not allowed")
    # Configuring HS256 next to a public key does not make the public key a secret.
    with pytest.raises(ValueError, match="HS256 needs a secret"):
        JwtAuth(["RS256", "HS256"], public_key_pem=pem)
    # Nor can the PEM be given as the secret.
    with pytest.raises(ValueError):
        JwtAuth(["HS256"], secret=pem)


def test_jwt_alg_confusion_with_both_keys(rsa_key):
    """With a secret and a public key, each algorithm still uses its own key."""
    pem = public_pem(rsa_key)
    header = b64(json.dumps({"alg": "HS256"}).encode())
    payload = b64(json.dumps(claims(aud=None)).encode())
    signature = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    auth = JwtAuth(["RS256", "HS256"], public_key_pem=pem, secret=SECRET)
    assert_invalid_token(refused(auth.authenticate, bearer(f"{header}.{payload}.{signature}"),
                                 "", "chat", now=NOW), "bad signature")
    assert auth.authenticate(bearer(hs_token(claims(aud=None))), "", "chat",
                             now=NOW).client_id == "carol"
    rs = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256")
    assert auth.authenticate(bearer(rs), "", "chat", now=NOW).client_id == "carol"


def test_jwt_alg_none_rejected():
    token = jwt.encode(claims(), None, algorithm="none")
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "algorithm not allowed")
    # Hand-made, with an empty signature and the HS256 alg name in other cases.
    for alg in ("none", "None", "NONE", "hs256"):
        header = b64(json.dumps({"alg": alg}).encode())
        token = f"{header}.{b64(json.dumps(claims()).encode())}."
        assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat",
                                     now=NOW))
    with pytest.raises(ValueError):
        JwtAuth(["none"], secret=SECRET)


def test_jwt_algorithm_not_configured(ec_key, rsa_key):
    auth = JwtAuth(["RS256"], public_key_pem=public_pem(rsa_key))
    token = jwt.encode(claims(aud=None), ec_key, algorithm="ES256")
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "algorithm not allowed")
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS384")
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "algorithm not allowed")


def test_jwt_algorithms_are_the_configurations(rsa_key, ec_key):
    """Identity verifies exactly the algorithms a jwt policy may name (one list)."""
    assert JWT_ALGORITHMS == ("HS256", "RS256", "ES256")
    auths = {"HS256": (JwtAuth(["HS256"], secret=SECRET), SECRET),
             "RS256": (JwtAuth(["RS256"], public_key_pem=public_pem(rsa_key)), rsa_key),
             "ES256": (JwtAuth(["ES256"], public_key_pem=public_pem(ec_key)), ec_key)}
    assert sorted(auths) == sorted(JWT_ALGORITHMS)
    for algorithm, (auth, key) in auths.items():
        token = jwt.encode(claims(aud=None), key, algorithm=algorithm)
        assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"
    for algorithm in ("HS384", "HS512", "RS384", "RS512", "PS256", "ES384", "ES512", "none"):
        with pytest.raises(ValueError, match="unsupported JWT algorithm"):
            JwtAuth([algorithm], secret=SECRET)


def test_jwt_configuration_errors(rsa_key, ec_key):
    with pytest.raises(ValueError):
        JwtAuth([], secret=SECRET)
    with pytest.raises(ValueError):
        JwtAuth("HS256", secret=SECRET)
    with pytest.raises(ValueError):
        JwtAuth(["XS256"], secret=SECRET)
    with pytest.raises(ValueError):
        JwtAuth(["HS256"])  # no secret
    with pytest.raises(ValueError):
        JwtAuth(["HS256"], secret=b"short")  # shorter than the hash
    with pytest.raises(ValueError):
        JwtAuth(["ES256"], public_key_pem=public_pem(rsa_key))  # wrong key type
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], public_key_pem=public_pem(ec_key))
    with pytest.raises(ValueError):
        JwtAuth(["ES384"], public_key_pem=public_pem(ec_key))  # not one of JWT_ALGORITHMS
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], public_key_pem=b"not a pem")
    with pytest.raises(ValueError):
        JwtAuth(["HS256"], secret=SECRET, leeway=-1)
    with pytest.raises(ValueError):
        JwtAuth(["HS256"], secret=SECRET, jwks={"keys": []})


# --------------------------------------------------------------------------------------
# JWT: claims
# --------------------------------------------------------------------------------------


def test_jwt_missing_client_id():
    token = hs_token(claims(sub=None))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW),
                         "token has no client id")
    token = hs_token(claims(sub=""))
    assert_invalid_token(refused(hs_auth().authenticate, bearer(token), "", "chat", now=NOW))


def test_jwt_custom_client_id_claim():
    auth = hs_auth(client_id_claim="azp")
    token = hs_token(claims(azp="mobile-app"))
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "mobile-app"
    assert_invalid_token(refused(auth.authenticate, bearer(hs_token()), "", "chat", now=NOW),
                         "token has no client id")


@pytest.mark.parametrize("value, plan", [("gold", "gold"), (7, "default"), (None, "default")])
def test_jwt_plan_claim(value, plan):
    token = hs_token(claims(tier=value))
    assert hs_auth(plan_claim="tier").authenticate(bearer(token), "", "chat",
                                                   now=NOW).plan == plan
    assert hs_auth().authenticate(bearer(token), "", "chat", now=NOW).plan == "default"


def test_jwt_scopes():
    auth = hs_auth(required_scopes=["quotes:read", "chat"])
    for granted in ({"scope": "chat quotes:read other"}, {"scp": ["quotes:read", "chat"]},
                    {"scope": "chat", "scp": "quotes:read"}):
        token = hs_token(claims(**granted))
        assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"
    for granted in ({}, {"scope": "chat"}, {"scp": ["quotes:read"]}, {"scope": "chatquotes:read"}):
        token = hs_token(claims(**granted))
        err = refused(auth.authenticate, bearer(token), "", "chat", now=NOW)
        assert (err.status, err.kind) == (403, "forbidden")
        value = challenge(err)
        assert 'error="insufficient_scope"' in value
        assert 'scope="quotes:read chat"' in value


def test_jwt_scopes_checked_after_validity():
    """An expired token without the scope is a 401, not a 403."""
    auth = hs_auth(required_scopes=["chat"])
    err = refused(auth.authenticate, bearer(hs_token()), "", "chat", now=NOW + 1000)
    assert_invalid_token(err, "token expired")


# --------------------------------------------------------------------------------------
# JWT: where the token comes from
# --------------------------------------------------------------------------------------


def test_jwt_missing_token():
    auth = hs_auth(query="access_token")
    for headers, query in (([], ""), ([("authorization", "Basic YTpi")], ""),
                           ([("authorization", "Bearer ")], "access_token=")):
        err = refused(auth.authenticate, headers, query, "chat", now=NOW)
        assert (err.status, err.kind) == (401, "unauthorized")
        assert challenge(err) == 'Bearer realm="fastgw"'


def test_jwt_token_via_query():
    auth = hs_auth(query="access_token")
    identity = auth.authenticate([], f"x=1&access_token={hs_token()}", "chat", now=NOW)
    assert identity.client_id == "carol"
    # Not read unless configured.
    err = refused(hs_auth().authenticate, [], f"access_token={hs_token()}", "chat", now=NOW)
    assert err.status == 401 and challenge(err) == 'Bearer realm="fastgw"'


def test_jwt_header_wins_over_query_and_scheme_is_case_insensitive():
    auth = hs_auth(query="access_token")
    good = hs_token()
    bad = hs_token(secret=b"x" * 32)
    assert auth.authenticate([("authorization", f"bearer {good}")], f"access_token={bad}",
                             "chat", now=NOW).client_id == "carol"
    assert_invalid_token(refused(auth.authenticate, bearer(bad), f"access_token={good}",
                                 "chat", now=NOW))


# --------------------------------------------------------------------------------------
# JWT: JWKS
# --------------------------------------------------------------------------------------


def test_jwks_selects_key_by_kid(jwks, rsa_key, ec_key):
    auth = JwtAuth(["RS256", "ES256"], jwks=jwks, issuer=ISSUER, audience=AUDIENCE)
    rs = jwt.encode(claims(sub="r"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(sub="e"), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert auth.authenticate(bearer(rs), "", "chat", now=NOW).client_id == "r"
    assert auth.authenticate(bearer(es), "", "chat", now=NOW).client_id == "e"


def test_jwks_unknown_or_missing_kid(jwks, rsa_key):
    auth = JwtAuth(["RS256", "ES256"], jwks=jwks)
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256", headers={"kid": "rsa-2"})
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "unknown key id")
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256")
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "token has no key id")


def test_jwks_kid_of_another_key_type(jwks, ec_key, rsa_key):
    auth = JwtAuth(["RS256", "ES256"], jwks=jwks)
    token = jwt.encode(claims(aud=None), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "algorithm does not match key")
    # An HS256 token signed with the RSA JWK's public key must not pass either.
    pem = public_pem(rsa_key)
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims(aud=None)).encode())
    sig = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert_invalid_token(refused(auth.authenticate, bearer(f"{header}.{payload}.{sig}"),
                                 "", "chat", now=NOW), "algorithm not allowed")


def test_jwks_kid_with_wrong_signature(jwks, other_rsa_key):
    auth = JwtAuth(["RS256"], jwks=jwks)
    token = jwt.encode(claims(aud=None), other_rsa_key, algorithm="RS256",
                       headers={"kid": "rsa-1"})
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "bad signature")


def test_jwks_single_key_without_kid(jwks, rsa_key):
    only_rsa = {"keys": [jwks["keys"][0]]}
    auth = JwtAuth(["RS256"], jwks=only_rsa)
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256")
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"
    # With only RS256 configured, the EC key is unusable: one usable key left.
    auth = JwtAuth(["RS256"], jwks=jwks)
    assert auth.authenticate(bearer(token), "", "chat", now=NOW).client_id == "carol"


def test_jwks_respects_alg_and_use(jwks, rsa_key):
    rsa_jwk, ec_jwk = jwks["keys"]
    # The RSA key says it is for ES256 only: no use for RS256 (nor for ES256, being RSA).
    auth = JwtAuth(["RS256", "ES256"], jwks={"keys": [rsa_jwk | {"alg": "ES256"}, ec_jwk]})
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "unknown key id")
    token = jwt.encode(claims(aud=None), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert_invalid_token(refused(auth.authenticate, bearer(token), "", "chat", now=NOW),
                         "algorithm does not match key")
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], jwks={"keys": [rsa_jwk | {"alg": "ES256"}]})
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], jwks={"keys": [rsa_jwk | {"use": "enc"}]})
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], jwks={"keys": [rsa_jwk, dict(rsa_jwk)]})  # duplicate kid
    with pytest.raises(ValueError):
        JwtAuth(["RS256"], jwks={"not-keys": []})


def test_load_jwks(tmp_path, jwks):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    assert JwtAuth.load_jwks(path) == jwks
    path.write_text(json.dumps(jwks["keys"][1]))
    assert JwtAuth.load_jwks(str(path)) == {"keys": [jwks["keys"][1]]}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError):
        JwtAuth.load_jwks(path)
    path.write_text("{")
    with pytest.raises(ValueError):
        JwtAuth.load_jwks(path)


# --------------------------------------------------------------------------------------
# Origin
# --------------------------------------------------------------------------------------

# As the configuration stores its origins: in their normal form.
ALLOWED = frozenset(normalize_origin(o) for o in ("https://App.Example.com", "http://localhost:8080"))


@pytest.mark.parametrize("origin", [
    "https://app.example.com",
    "https://app.example.com:443",
    "HTTPS://APP.EXAMPLE.COM",
    "http://localhost:8080",
])
def test_origin_allowed(origin):
    check_origin(origin, ALLOWED)


@pytest.mark.parametrize("origin", [
    None,
    "",
    "http://app.example.com",
    "https://app.example.com:8443",
    "https://evil.example.com",
    "https://app.example.com.evil.com",
    "http://localhost",
    "http://localhost:8080/path",
    "https://user@app.example.com",
    "https://app.example.com:99999",
    "app.example.com",
    # Not scheme://host[:port]: the one origin rule refuses them (so no entry can allow them).
    "https://app.example.com/",
    "null",
    " https://app.example.com",
])
def test_origin_refused(origin):
    err = refused(check_origin, origin, ALLOWED)
    assert (err.status, err.kind, err.reason) == (403, "forbidden", "origin not allowed")


def test_origin_any():
    check_origin(None, None)
    check_origin("https://anything.example", None)


def test_normalize_origin():
    assert normalize_origin("https://App.Example.com:443") == "https://app.example.com"
    assert normalize_origin("WS://Host:80") == "ws://host"
    assert normalize_origin("wss://host:444") == "wss://host:444"
    assert normalize_origin("http://[::1]:80") == "http://[::1]"
    assert normalize_origin("https://host:0443") == "https://host"
    assert normalize_origin("app://x") == "app://x"
    for bad in ("https://host/path", "https://host/", "null", "https://[1.2.3.4]", "https://h:0",
                "https://u@h", "https://h?x", "https://", "h"):
        with pytest.raises(ValueError):
            normalize_origin(bad)
