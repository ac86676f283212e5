"""The rules the configuration and the running gateway share (fastgw.config.web), one each:
what an origin is, what an HTTP token is, which hosts are loopback. Each is tested on both
sides: the configuration's error (with its line) and what the runtime does."""

import time

import pytest

from fastgw.observe.admin import check_admin_exposure
from fastgw.client import UsageError, parse_header
from fastgw.config import ConfigError, loads
from fastgw.config.web import HTTP_TOKEN, is_loopback, normalize_origin
from fastgw.identity import AuthError
from fastgw.admission import UpgradeRequest, admit as admit_phase, identify
from fastgw.http.head import parse_head
from fastgw.routing import compile_config
from fastgw.verdicts import Refusal
from fastgw._core import LimitZone

UPGRADE = "      - {policy: websocket-upgrade, target-url: 'ws://127.0.0.1:9000'}\n"


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, "yaml", "gw.yaml")
    return info.value


# ---------------------------------------------------------------------------------------------
# Origins
# ---------------------------------------------------------------------------------------------


def with_origins(*origins: str) -> str:
    """An API whose origins are given one per line; the first is on line 6."""
    lines = "".join(f"      - '{origin}'\n" for origin in origins)
    return (
        "listeners: [{port: 0}]\n"
        "apis:\n"
        "  - name: echo\n"
        "    path: /echo\n"
        "    origins:\n"
        f"{lines}"
        "    assembly:\n" + UPGRADE
    )


def admit(text: str, origin: str | None) -> None:
    """Run the API's pre-upgrade phase on a request with this Origin header (None: none)."""
    api = compile_config(loads(text, "yaml")).apis[0]
    headers = [("host", "gw")] + ([("origin", origin)] if origin is not None else [])
    req = UpgradeRequest(headers, "", "192.0.2.1", 1.0, time.time())
    who = identify(api, req)             # the identify and admit phases, as the handshake runs
    if isinstance(who, Refusal):         # them; the refusal a phase returns is raised here
        raise who
    admission = admit_phase(api, LimitZone(64), req, who)
    admission.release()


def test_origins_are_stored_in_their_normal_form() -> None:
    config = loads(with_origins("HTTPS://A.example:443", "http://b.example:80", "wss://c:8443",
                                "ws://[::1]:80", "https://d.example:0444"), "yaml")
    assert config.apis[0].origins == [
        "https://a.example", "http://b.example", "wss://c:8443", "ws://[::1]",
        "https://d.example:444",
    ]


@pytest.mark.parametrize("origin", ["https://[1.2.3.4]", "https://[::1", "https://[zz::1]",
                                    "https://a.example:65536", "https://a.example:"])
def test_an_unparsable_origin_is_a_configuration_error_with_its_line(origin: str) -> None:
    # "https://[1.2.3.4]" passed the configuration's check before and was then silently left out
    # of the allowed origins at run time.
    error = error_of(with_origins("https://a.example", origin))
    assert str(error) == (
        f"gw.yaml:7: Invalid origin {origin!r} (use scheme://host[:port], e.g."
        " https://app.example.com) - at `$.apis[0].origins[1]`"
    )


@pytest.mark.parametrize("entry", ["https://app.example", "HTTPS://App.Example:443"])
@pytest.mark.parametrize("header", ["https://app.example", "https://APP.example:443",
                                    "HTTPS://app.example"])
def test_an_origin_matches_after_lower_casing_and_without_its_default_port(
    entry: str, header: str
) -> None:
    admit(with_origins(entry), header)


@pytest.mark.parametrize("header", [
    None, "", "null", "https://app.example/", "https://app.example:8443", "http://app.example",
    "wss://app.example", "https://app.example.evil", "https://user@app.example",
    " https://app.example", "https://app.example:99999",
])
def test_any_other_origin_is_refused(header: str | None) -> None:
    with pytest.raises(AuthError) as info:
        admit(with_origins("https://app.example", "https://b.example:8443"), header)
    assert (info.value.status, info.value.reason) == (403, "origin not allowed")


def test_a_non_default_port_must_match() -> None:
    text = with_origins("https://b.example:8443", "http://c.example:443")
    admit(text, "https://b.example:8443")
    admit(text, "http://C.example:443")       # 443 is no default port of http
    with pytest.raises(AuthError):
        admit(text, "http://c.example")


@pytest.mark.parametrize("value", [
    "https://a.example", "HTTP://A:80", "app://x", "https://[::1]:8443", "https://a.example/",
    "https://a.example/x", "a.example", "https://", "null", "https://u@a.example",
    "https://a.example:99999", "https://a.example?x", "https://[1.2.3.4]", "https://a b",
])
def test_the_configuration_accepts_what_the_runtime_can_match(value: str) -> None:
    try:
        normal = normalize_origin(value)
    except ValueError:
        normal = None
    try:
        stored = loads(with_origins(value), "yaml").apis[0].origins
    except ConfigError as error:
        assert normal is None and error.message.startswith("Invalid origin")
    else:
        assert stored == [normal]
        admit(with_origins(value), value)


# ---------------------------------------------------------------------------------------------
# HTTP tokens
# ---------------------------------------------------------------------------------------------

NAMES = ["X-API-Key", "a!#$%&'*+-.^_`|~z", "X Key", "x(y)", "x@y", "clé", "x/y", "x\ty", '"x"']


@pytest.mark.parametrize("name", NAMES)
def test_one_token_rule_for_header_names(name: str) -> None:
    token = HTTP_TOKEN.fullmatch(name) is not None
    quoted = name.replace("'", "''")           # in a YAML single-quoted string
    # The configuration: the header an api-key policy reads.
    text = (
        "listeners: [{port: 0}]\nclients: [{id: a, key: k}]\napis:\n  - name: echo\n"
        "    path: /echo\n    assembly:\n"
        f"      - {{policy: api-key, header: '{quoted}'}}\n" + UPGRADE
    )
    if token:
        loads(text, "yaml")
    else:
        assert str(error_of(text)) == (
            f"gw.yaml:7: Invalid header name {name!r} (must be an HTTP token)"
            " - at `$.apis[0].assembly[0].header`"
        )
    # The gateway reading a request head.
    head = f"GET / HTTP/1.1\r\n{name}: v".encode("latin-1")
    if token:
        assert parse_head(head).headers == [(name.lower(), "v")]
    else:
        refusal = parse_head(head)
        assert isinstance(refusal, Refusal)
        assert refusal.status == 400
    # fastgw client -H.
    if token:
        assert parse_header(f"{name}: v") == (name, "v")
    else:
        with pytest.raises(UsageError):
            parse_header(f"{name}: v")


@pytest.mark.parametrize("name", ["chat.v1", "mqtt", "a b", "x,y", "é"])
def test_one_token_rule_for_subprotocols(name: str) -> None:
    text = (
        "listeners: [{port: 0}]\napis:\n  - name: echo\n    path: /echo\n    assembly:\n"
        "      - policy: websocket-upgrade\n        target-url: ws://127.0.0.1:9000\n"
        f"        subprotocols: ['{name}']\n"
    )
    if HTTP_TOKEN.fullmatch(name):
        assert loads(text, "yaml").apis[0].assembly[0].subprotocols == [name]
    else:
        assert str(error_of(text)) == (
            f"gw.yaml:8: Invalid subprotocol {name!r} (must be an HTTP token)"
            " - at `$.apis[0].assembly[0].subprotocols[0]`"
        )


# ---------------------------------------------------------------------------------------------
# Loopback
# ---------------------------------------------------------------------------------------------

LOOPBACK = ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "localhost.",
            "::ffff:127.0.0.1", "[::ffff:127.0.0.1]"]
EXPOSED = ["0.0.0.0", "::", "10.0.0.5", "192.168.1.1", "example.com", "localhost.example.com",
           "::ffff:10.0.0.1", "[::]", " 127.0.0.1", "localhost.."]


def admin_yaml(host: str) -> str:
    return (
        "listeners: [{port: 0}]\n"
        "apis: [{name: a, path: /, assembly:"
        " [{policy: websocket-upgrade, target-url: 'ws://h:1/'}]}]\n"
        f"admin: {{host: '{host}', port: 9901}}\n"
    )


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_admin_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    assert loads(admin_yaml(host), "yaml").admin.host == host
    assert check_admin_exposure(host, None) is None


@pytest.mark.parametrize("host", EXPOSED)
def test_admin_beyond_loopback_needs_a_token(host: str) -> None:
    assert not is_loopback(host)
    assert str(error_of(admin_yaml(host))) == (
        f"gw.yaml:3: the admin API would listen beyond loopback ({host}) without a token:"
        " set token-env - at `$.admin`"
    )
    assert check_admin_exposure(host, None) is not None


def test_every_interface_is_not_loopback() -> None:
    assert not is_loopback("")
    assert check_admin_exposure("", None) == (
        "admin listens on all interfaces without token-env: set token-env"
    )
