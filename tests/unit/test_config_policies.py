"""Tests for the policy half of the configuration: plans, clients, limits, origins, the
pre-upgrade policies (api-key, jwt, count-limit, rate-limit) and the message policies of
websocket-upgrade.request / .response, with their value types (Rate, ByteRate, PerPlan)."""

import json
import pickle
from pathlib import Path

import msgspec
import pytest

from fastgw.config import (
    DEFAULT_PLAN,
    MESSAGE_POLICY_TYPES,
    POLICY_TYPES,
    PRE_UPGRADE_POLICY_TYPES,
    Api,
    ApiKey,
    ByteRate,
    Client,
    Config,
    ConfigError,
    CountLimit,
    Jwt,
    Limits,
    Listener,
    MessageRateLimit,
    MessageSizeLimit,
    PerPlan,
    PerSide,
    Rate,
    RateLimit,
    Size,
    WebsocketUpgrade,
    load,
    loads,
)
from fastgw.config.schema import policy_tag
from fastgw.config.values import parse_byte_rate, parse_rate
from fastgw.identity import ApiKeyAuth, AuthError, api_key_clients, key_digest, read_secret
from fastgw.identity import Client as KeyClient
from fastgw.identity import trusted_networks

SECRET_ENV = "FASTGW_TEST_JWT_SECRET"

# Line numbers asserted below refer to this text.
FULL_YAML = """\
listeners:
  - port: 8080
trusted-proxies: [10.0.0.0/8, 127.0.0.1, "::1"]
plans: [gold, silver]
clients:
  - id: alice
    key: alice-key
    plan: gold
    apis: [quotes]
  - id: bob
    keys: [bob-key-1, bob-key-2]
clients-file: clients.yaml
limits:
  max-keys: 1024
  max-connections: 100
apis:
  - name: quotes
    path: /quotes
    origins: [https://App.Example.com, "http://localhost:3000"]
    assembly:
      - policy: api-key
        header: X-API-Key
        query: api_key
      - policy: count-limit
        key: client-id
        max: {default: 5, gold: 50}
      - policy: rate-limit
        key: client-ip
        rate: {default: 5/1s, gold: 50/1s}
        burst: 10
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9000/quotes
        request:
          - policy: message-rate-limit
            messages: {default: 10/1s, gold: 1000/1s}
            bytes: 1MiB/1s
            burst: 200
            byte-burst: 2MiB
            scope: client
            action: delay
            name: chat-limit
          - policy: message-size-limit
            max: {default: 64KiB, gold: 1MiB}
        response:
          - policy: message-rate-limit
            bytes: 10MiB/1s
            scope: api
            action: drop
  - name: chat
    path: /chat
    assembly:
      - policy: jwt
        algorithms: [RS256, ES256]
        public-key: keys/pub.pem
        issuer: https://issuer.example
        audience: chat
        client-id-claim: uid
        plan-claim: plan
        required-scopes: ["chat:read", "chat:write"]
        query: access_token
        leeway: 5s
        close-on-expiry: true
      - policy: rate-limit
        key: client-id
        rate: 100/1m
      - policy: count-limit
        key: global
        max: 1000
      - policy: websocket-upgrade
        target-url: wss://chat.internal/ws
        response:
          - {policy: message-size-limit, max: 16KiB}
  - name: feed
    path: /feed
    assembly:
      - policy: jwt
        algorithms: [HS256]
        secret-env: FASTGW_TEST_JWT_SECRET
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9001
  - name: news
    path: /news
    assembly:
      - policy: jwt
        algorithms: [ES256]
        jwks-file: keys/jwks.json
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9002
"""

FULL_TOML = """\
trusted-proxies = ["10.0.0.0/8", "127.0.0.1", "::1"]
plans = ["gold", "silver"]
clients-file = "clients.yaml"

[[listeners]]
port = 8080

[[clients]]
id = "alice"
key = "alice-key"
plan = "gold"
apis = ["quotes"]

[[clients]]
id = "bob"
keys = ["bob-key-1", "bob-key-2"]

[limits]
max-keys = 1024
max-connections = 100

[[apis]]
name = "quotes"
path = "/quotes"
origins = ["https://App.Example.com", "http://localhost:3000"]

[[apis.assembly]]
policy = "api-key"
header = "X-API-Key"
query = "api_key"

[[apis.assembly]]
policy = "count-limit"
key = "client-id"
max = {default = 5, gold = 50}

[[apis.assembly]]
policy = "rate-limit"
key = "client-ip"
rate = {default = "5/1s", gold = "50/1s"}
burst = 10

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "ws://127.0.0.1:9000/quotes"

[[apis.assembly.request]]
policy = "message-rate-limit"
messages = {default = "10/1s", gold = "1000/1s"}
bytes = "1MiB/1s"
burst = 200
byte-burst = "2MiB"
scope = "client"
action = "delay"
name = "chat-limit"

[[apis.assembly.request]]
policy = "message-size-limit"
max = {default = "64KiB", gold = "1MiB"}

[[apis.assembly.response]]
policy = "message-rate-limit"
bytes = "10MiB/1s"
scope = "api"
action = "drop"

[[apis]]
name = "chat"
path = "/chat"

[[apis.assembly]]
policy = "jwt"
algorithms = ["RS256", "ES256"]
public-key = "keys/pub.pem"
issuer = "https://issuer.example"
audience = "chat"
client-id-claim = "uid"
plan-claim = "plan"
required-scopes = ["chat:read", "chat:write"]
query = "access_token"
leeway = "5s"
close-on-expiry = true

[[apis.assembly]]
policy = "rate-limit"
key = "client-id"
rate = "100/1m"

[[apis.assembly]]
policy = "count-limit"
key = "global"
max = 1000

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "wss://chat.internal/ws"
response = [{policy = "message-size-limit", max = "16KiB"}]

[[apis]]
name = "feed"
path = "/feed"

[[apis.assembly]]
policy = "jwt"
algorithms = ["HS256"]
secret-env = "FASTGW_TEST_JWT_SECRET"

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "ws://127.0.0.1:9001"

[[apis]]
name = "news"
path = "/news"

[[apis.assembly]]
policy = "jwt"
algorithms = ["ES256"]
jwks-file = "keys/jwks.json"

[[apis.assembly]]
policy = "websocket-upgrade"
target-url = "ws://127.0.0.1:9002"
"""

# Line numbers asserted below refer to this text too.
CLIENTS_YAML = """\
- id: carol
  key: carol-key
  plan: silver
- id: dave
  keys: [dave-key]
  apis: [chat, feed]
"""

MINIMAL_YAML = """\
listeners:
  - port: 8080
apis:
  - name: echo
    path: /echo
    assembly:
"""
UPGRADE = "      - {policy: websocket-upgrade, target-url: 'ws://127.0.0.1:9000'}\n"


def with_assembly(*policies: str, upgrade: str = UPGRADE) -> str:
    """MINIMAL_YAML whose assembly holds ``policies`` (one flow mapping per line) and then
    the upgrade. The first policy is on line 7."""
    return MINIMAL_YAML + "".join(f"      - {policy}\n" for policy in policies) + upgrade


def with_flow(flow: str, *policies: str) -> str:
    """MINIMAL_YAML whose websocket-upgrade (line 7) has ``policies`` in ``flow``; the first
    of them is on line 10."""
    return MINIMAL_YAML + (
        "      - policy: websocket-upgrade\n"
        "        target-url: ws://127.0.0.1:9000\n"
        f"        {flow}:\n"
        + "".join(f"          - {policy}\n" for policy in policies)
    )


def error_of(text: str, fmt: str = "yaml", name: str = "gw.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, fmt, name)
    return info.value


@pytest.fixture(autouse=True)
def jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable that secret-env names in these tests is set (to "s3cret")."""
    monkeypatch.setenv(SECRET_ENV, "s3cret")


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A directory with the files FULL_YAML names."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "pub.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    (tmp_path / "keys" / "jwks.json").write_text('{"keys": []}')
    (tmp_path / "clients.yaml").write_text(CLIENTS_YAML)
    return tmp_path


def full_expected(confdir: Path) -> Config:
    keys = confdir / "keys"
    return Config(
        listeners=[Listener(port=8080)],
        trusted_proxies=["10.0.0.0/8", "127.0.0.1/32", "::1/128"],
        plans=["gold", "silver"],
        clients=[
            Client(id="alice", key="alice-key", plan="gold", apis=["quotes"]),
            Client(id="bob", keys=["bob-key-1", "bob-key-2"]),
            Client(id="carol", key="carol-key", plan="silver"),
            Client(id="dave", keys=["dave-key"], apis=["chat", "feed"]),
        ],
        clients_file=str(confdir / "clients.yaml"),
        limits=Limits(max_keys=1024, max_connections=100),
        apis=[
            Api(
                name="quotes",
                path="/quotes",
                origins=["https://app.example.com", "http://localhost:3000"],
                assembly=[
                    ApiKey(header="X-API-Key", query="api_key"),
                    CountLimit(key="client-id", max=PerPlan({"default": 5, "gold": 50})),
                    RateLimit(
                        key="client-ip",
                        rate=PerPlan({"default": Rate(5, 1), "gold": Rate(50, 1)}),
                        burst=PerPlan(10),
                    ),
                    WebsocketUpgrade(
                        target_url="ws://127.0.0.1:9000/quotes",
                        request=[
                            MessageRateLimit(
                                messages=PerPlan(
                                    {"default": Rate(10, 1), "gold": Rate(1000, 1)}
                                ),
                                bytes=PerPlan(ByteRate(1048576, 1)),
                                burst=PerPlan(200),
                                byte_burst=PerPlan(2 * 1048576),
                                scope="client",
                                action="delay",
                                name="chat-limit",
                            ),
                            MessageSizeLimit(max=PerPlan({"default": 65536, "gold": 1048576})),
                        ],
                        response=[
                            MessageRateLimit(
                                bytes=PerPlan(ByteRate(10 * 1048576, 1)),
                                scope="api",
                                action="drop",
                            ),
                        ],
                    ),
                ],
            ),
            Api(
                name="chat",
                path="/chat",
                assembly=[
                    Jwt(
                        algorithms=["RS256", "ES256"],
                        public_key=str(keys / "pub.pem"),
                        issuer="https://issuer.example",
                        audience="chat",
                        client_id_claim="uid",
                        plan_claim="plan",
                        required_scopes=["chat:read", "chat:write"],
                        query="access_token",
                        leeway=5.0,
                        close_on_expiry=True,
                    ),
                    RateLimit(key="client-id", rate=PerPlan(Rate(100, 60))),
                    CountLimit(key="global", max=PerPlan(1000)),
                    WebsocketUpgrade(
                        target_url="wss://chat.internal/ws",
                        response=[MessageSizeLimit(max=PerPlan(16384))],
                    ),
                ],
            ),
            Api(
                name="feed",
                path="/feed",
                assembly=[
                    Jwt(algorithms=["HS256"], secret_env=SECRET_ENV),
                    WebsocketUpgrade(target_url="ws://127.0.0.1:9001"),
                ],
            ),
            Api(
                name="news",
                path="/news",
                assembly=[
                    Jwt(algorithms=["ES256"], jwks_file=str(keys / "jwks.json")),
                    WebsocketUpgrade(target_url="ws://127.0.0.1:9002"),
                ],
            ),
        ],
    )


# ---------------------------------------------------------------------------------------------
# The full example
# ---------------------------------------------------------------------------------------------


def test_full_example_yaml(confdir: Path) -> None:
    path = confdir / "gateway.yaml"
    path.write_text(FULL_YAML)
    config = load(path)
    assert config == full_expected(confdir)
    # Defaults of the new fields.
    feed_jwt = config.apis[2].assembly[0]
    assert isinstance(feed_jwt, Jwt)
    assert feed_jwt.client_id_claim == "sub"
    assert feed_jwt.leeway == 0.0
    assert feed_jwt.close_on_expiry is False
    assert read_secret(feed_jwt.secret_env, feed_jwt.secret_file) == b"s3cret"
    response_limit = config.apis[0].assembly[3].response[0]
    assert isinstance(response_limit, MessageRateLimit)
    assert response_limit.name == "message-rate-limit"
    assert response_limit.messages is None
    assert config.apis[2].assembly[1].request == []
    assert config.apis[1].origins is None


def test_full_example_toml_equals_yaml(confdir: Path) -> None:
    (confdir / "gateway.yaml").write_text(FULL_YAML)
    (confdir / "gateway.toml").write_text(FULL_TOML)
    from_yaml = load(confdir / "gateway.yaml")
    from_toml = load(confdir / "gateway.toml")
    assert from_toml == from_yaml
    assert from_toml.apis[0].assembly[2].rate.for_plan("gold") == Rate(50, 1)


def enc_hook(obj: object) -> object:
    """What a file says for a value of the configuration's own types."""
    if isinstance(obj, (Rate, ByteRate)):
        return str(obj)                 # "5/1s": the form parse_rate reads back
    if isinstance(obj, PerPlan):
        return {plan: enc_hook(value) for plan, value in obj.values.items()}
    if isinstance(obj, PerSide):
        sides = {side: getattr(obj, side) for side in PerSide.SIDES}
        return {side: value for side, value in sides.items() if value is not None}
    if isinstance(obj, Size):
        return int(obj)
    if isinstance(obj, float):          # Duration
        return float(obj)
    if isinstance(obj, frozenset):
        return sorted(obj)
    return obj


def test_encode_and_decode_again(confdir: Path) -> None:
    config = load_full(confdir)
    data = msgspec.to_builtins(config, enc_hook=enc_hook)
    rate_limit = data["apis"][0]["assembly"][2]
    assert rate_limit == {
        "policy": "rate-limit",
        "key": "client-ip",
        "rate": {"default": "5/1s", "gold": "50/1s"},
        "burst": {"default": 10},
        "cluster": True,
    }
    # The clients-file's clients are inline now; decode without the file.
    data["clients-file"] = None
    again = loads(json.dumps(data), "json")
    assert again == msgspec.structs.replace(config, clients_file=None)


def load_full(confdir: Path) -> Config:
    path = confdir / "gateway.yaml"
    path.write_text(FULL_YAML)
    return load(path)


def test_all_clients(confdir: Path) -> None:
    """The inline clients and those of the clients-file, as the api-key policy uses them."""
    config = load_full(confdir)
    assert [client.id for client in config.clients] == ["alice", "bob", "carol", "dave"]
    by_digest = api_key_clients(config.clients)
    keys = ["alice-key", "bob-key-1", "bob-key-2", "carol-key", "dave-key"]
    assert sorted(by_digest) == sorted(key_digest(key) for key in keys)
    by_key = {key: by_digest[key_digest(key)] for key in keys}
    assert by_key == {
        "alice-key": KeyClient("alice", "gold", frozenset({"quotes"})),
        "bob-key-1": KeyClient("bob", "default", None),
        "bob-key-2": KeyClient("bob", "default", None),
        "carol-key": KeyClient("carol", "silver", None),
        "dave-key": KeyClient("dave", "default", frozenset({"chat", "feed"})),
    }
    auth = ApiKeyAuth(by_digest, header="x-api-key")
    assert auth.authenticate([("x-api-key", "alice-key")], "", "quotes").client_id == "alice"
    with pytest.raises(AuthError) as info:
        auth.authenticate([("x-api-key", "alice-key")], "", "chat")
    assert info.value.status == 403
    assert auth.authenticate([("x-api-key", "bob-key-1")], "", "anything").client_id == "bob"


def test_helpers_on_config(confdir: Path) -> None:
    import ipaddress

    config = load_full(confdir)
    assert config.plans == ["gold", "silver"]
    assert trusted_networks(config.trusted_proxies) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    defaults = loads(MINIMAL_YAML + UPGRADE, "yaml")
    assert defaults.limits == Limits(max_keys=65536, max_connections="auto", max_handshakes_per_ip=128)
    assert defaults.plans == [] and defaults.clients == [] and defaults.trusted_proxies == []
    assert api_key_clients(defaults.clients) == {}


def test_bursts(confdir: Path) -> None:
    config = load_full(confdir)
    rate_limit = config.apis[0].assembly[2]
    assert rate_limit.burst_for("gold") == 10.0  # given: the same for every plan
    no_burst = config.apis[1].assembly[1]
    assert isinstance(no_burst, RateLimit) and no_burst.burst is None
    assert no_burst.burst_for("silver") == 100.0  # the count of the rate
    request_limit = config.apis[0].assembly[3].request[0]
    assert request_limit.burst_for("gold") == 200.0
    assert request_limit.byte_burst_for("silver") == 2 * 1048576
    response_limit = config.apis[0].assembly[3].response[0]
    assert response_limit.burst_for("gold") is None  # no messages limit
    assert response_limit.byte_burst_for("gold") == 10 * 1048576  # the size of bytes
    per_plan = MessageRateLimit(messages=PerPlan({"default": Rate(10, 1), "gold": Rate(0.5, 1)}))
    assert per_plan.burst_for("default") == 10.0
    assert per_plan.burst_for("gold") == 1.0  # never below one message


def test_phases_of_policy_types() -> None:
    assert set(POLICY_TYPES) == {*PRE_UPGRADE_POLICY_TYPES, WebsocketUpgrade, *MESSAGE_POLICY_TYPES}
    assert [policy_tag(cls) for cls in PRE_UPGRADE_POLICY_TYPES] == [
        "api-key",
        "jwt",
        "count-limit",
        "rate-limit",
    ]
    assert [policy_tag(cls) for cls in MESSAGE_POLICY_TYPES] == [
        "message-rate-limit",
        "message-size-limit",
    ]
    assert policy_tag(MessageSizeLimit(max=PerPlan(1))) == "message-size-limit"


def test_config_with_new_values_pickles(confdir: Path) -> None:
    config = load_full(confdir)
    assert pickle.loads(pickle.dumps(config)) == config


# ---------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/1s", 100, 1.0),
        ("5/s", 5, 1.0),
        ("5/m", 5, 60.0),
        ("10/250ms", 10, 0.25),
        ("100/1m", 100, 60.0),
        ("3600/1h", 3600, 3600.0),
        ("0.5/1s", 0.5, 1.0),
        ("1e3/1s", 1000, 1.0),
        (" 3 / 2s ", 3, 2.0),
        ("7/10", 7, 10.0),
        ("2.5/1.5s", 2.5, 1.5),
    ],
)
def test_parse_rate(text: str, count: float, period: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.period) == (count, period)
    assert rate.per_second == pytest.approx(count / period)
    assert isinstance(rate.count, float)


@pytest.mark.parametrize(
    "value",
    ["fast", "", "5", "5/", "/1s", "0/1s", "-1/1s", "5/0s", "5/0", "5/-1s", "5/1d", "5/1s/2",
     "inf/1s", "nan/1s", "5/ms2", 5, 5.0, None, True, ["5/1s"]],
)
def test_parse_rate_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate(value)
    assert str(info.value) == f"Invalid rate {value!r} (use count/period, e.g. 100/1s)"


@pytest.mark.parametrize(
    ("text", "size", "period"),
    [
        ("1MiB/1s", 1048576, 1.0),
        ("64KiB/100ms", 65536, 0.1),
        ("1000/s", 1000, 1.0),
        ("1.5KiB/2s", 1536, 2.0),
        ("10MB/1m", 10_000_000, 60.0),
    ],
)
def test_parse_byte_rate(text: str, size: int, period: float) -> None:
    rate = parse_byte_rate(text)
    assert (rate.size, rate.period) == (size, period)
    assert type(rate.size) is int
    assert rate.per_second == pytest.approx(size / period)


@pytest.mark.parametrize(
    "value", ["0/1s", "1MiB", "big/1s", "1MiB/0s", "0.5B/1s", "1MiB/", "-1/1s", 1024, None]
)
def test_parse_byte_rate_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_byte_rate(value)
    assert str(info.value) == f"Invalid byte rate {value!r} (use size/period, e.g. 1MiB/1s)"


def test_rates_print_as_they_parse() -> None:
    assert str(Rate(100, 1)) == "100/1s"
    assert str(Rate(2.5, 0.25)) == "2.5/0.25s"
    assert parse_rate(str(Rate(2.5, 0.25))) == Rate(2.5, 0.25)
    assert str(ByteRate(1048576, 60)) == "1048576/60s"
    assert parse_byte_rate(str(ByteRate(1048576, 60))) == ByteRate(1048576, 60)


def test_rates_are_immutable_values() -> None:
    rate = Rate(5, 1)
    with pytest.raises(AttributeError):
        rate.count = 6  # type: ignore[misc]
    assert rate == Rate(5.0, 1.0) and hash(rate) == hash(Rate(5.0, 1.0))
    assert rate != Rate(300, 60)  # same per second, other burst
    assert rate != ByteRate(5, 1)
    assert pickle.loads(pickle.dumps(ByteRate(7, 2))) == ByteRate(7, 2)


def test_bad_rate_names_the_field() -> None:
    error = error_of(with_assembly("{policy: rate-limit, key: client-ip, rate: fast}"))
    assert str(error) == (
        "gw.yaml:7: Invalid rate 'fast' (use count/period, e.g. 100/1s)"
        " - at `$.apis[0].assembly[0].rate`"
    )


def test_bad_rate_of_one_plan_names_the_plan() -> None:
    text = "plans: [gold]\n" + MINIMAL_YAML + (
        "      - policy: rate-limit\n"
        "        key: api\n"
        "        rate:\n"
        "          default: 5/1s\n"
        "          gold: lots\n"
    ) + UPGRADE
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:12: Invalid rate 'lots' (use count/period, e.g. 100/1s)"
        " - at `$.apis[0].assembly[0].rate.gold`"
    )


def test_bad_byte_rate_in_a_flow() -> None:
    error = error_of(with_flow("response", "{policy: message-rate-limit, bytes: 1MiB}"))
    assert str(error) == (
        "gw.yaml:10: Invalid byte rate '1MiB' (use size/period, e.g. 1MiB/1s)"
        " - at `$.apis[0].assembly[0].response[0].bytes`"
    )


# ---------------------------------------------------------------------------------------------
# Values per plan
# ---------------------------------------------------------------------------------------------


def test_per_plan_lookup() -> None:
    value = PerPlan({"default": 5, "gold": 50})
    assert value.for_plan("gold") == 50
    assert value.for_plan("default") == 5
    assert value.for_plan("silver") == 5  # not listed: the default
    assert value.for_plan(DEFAULT_PLAN) == 5
    assert dict(value.values) == {"default": 5, "gold": 50}
    single = PerPlan(7)
    assert dict(single.values) == {DEFAULT_PLAN: 7}
    assert single.for_plan("gold") == 7
    assert single == PerPlan({"default": 7})
    assert hash(single) == hash(PerPlan({"default": 7}))
    assert single != PerPlan({"default": 7, "gold": 7})


def test_per_plan_is_frozen() -> None:
    value = PerPlan({"default": 5})
    with pytest.raises(TypeError):
        value.values["gold"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        value.values = {}  # type: ignore[misc]
    with pytest.raises(ValueError, match="'default'"):
        PerPlan({"gold": 1})


def test_per_plan_decoding() -> None:
    text = "plans: [gold, silver]\n" + with_assembly(
        "{policy: count-limit, key: api, max: 3}",
        "{policy: count-limit, key: global, max: {default: 4, silver: 40}}",
        "{policy: rate-limit, key: api, rate: {default: 1/s, gold: 2/s}, burst: {default: 3, gold: 6}}",
    )
    assembly = loads(text, "yaml").apis[0].assembly
    assert assembly[0].max == PerPlan(3)
    assert [assembly[1].max.for_plan(plan) for plan in ("default", "gold", "silver")] == [4, 4, 40]
    assert assembly[2].rate.for_plan("gold") == Rate(2, 1)
    assert assembly[2].rate.for_plan("silver") == Rate(1, 1)
    assert assembly[2].burst_for("gold") == 6.0
    assert assembly[2].burst_for("silver") == 3.0


def test_per_plan_sizes_decode_as_sizes() -> None:
    text = "plans: [gold]\n" + with_flow(
        "request", "{policy: message-size-limit, max: {default: 1KiB, gold: 2MiB}}"
    )
    limit = loads(text, "yaml").apis[0].assembly[0].request[0]
    assert limit.max.for_plan("gold") == 2 * 1048576
    assert limit.max.for_plan("default") == 1024
    assert isinstance(limit.max.for_plan("default"), int)


def test_per_plan_map_needs_default() -> None:
    text = "plans: [gold]\n" + with_assembly("{policy: count-limit, key: api, max: {gold: 50}}")
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:8: `max` needs a 'default' entry when given per plan (plans given: gold)"
        " - at `$.apis[0].assembly[0].max`"
    )


def test_per_plan_bad_value_has_exact_path() -> None:
    text = "plans: [gold]\n" + MINIMAL_YAML + (
        "      - policy: count-limit\n"
        "        key: api\n"
        "        max:\n"
        "          default: 5\n"
        "          gold: 0\n"
    ) + UPGRADE
    error = error_of(text)
    assert str(error) == "gw.yaml:12: Expected `int` >= 1 - at `$.apis[0].assembly[0].max.gold`"
    assert error.path == "$.apis[0].assembly[0].max.gold"


def test_per_plan_scalar_out_of_range() -> None:
    error = error_of(with_assembly("{policy: count-limit, key: api, max: 0}"))
    assert str(error) == "gw.yaml:7: Expected `int` >= 1 - at `$.apis[0].assembly[0].max`"


def test_per_plan_wrong_type() -> None:
    error = error_of(with_assembly("{policy: count-limit, key: api, max: [1, 2]}"))
    assert str(error) == "gw.yaml:7: Expected `int`, got `array` - at `$.apis[0].assembly[0].max`"


def test_per_plan_non_string_plan() -> None:
    error = error_of(with_assembly("{policy: count-limit, key: api, max: {default: 1, 2: 3}}"))
    assert str(error) == (
        "gw.yaml:7: Expected `str`, got `int` - at `key` in `$.apis[0].assembly[0].max`"
    )


def test_size_of_zero_is_refused_per_plan() -> None:
    text = "plans: [gold]\n" + with_flow(
        "request", "{policy: message-size-limit, max: {default: 1KiB, gold: 0}}"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:11: Invalid size 0 (must be at least 1 byte)"
        " - at `$.apis[0].assembly[0].request[0].max.gold`"
    )


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def test_unknown_plan_in_per_plan_map() -> None:
    text = "plans: [silver, gold]\n" + MINIMAL_YAML + (
        "      - {policy: api-key}\n"
        "      - policy: count-limit\n"
        "        key: client-id\n"
        "        max:\n"
        "          default: 5\n"
        "          platinum: 500\n"
    ) + UPGRADE
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:13: Unknown plan 'platinum' (known: default, gold, silver)"
        " - at `$.apis[0].assembly[1].max.platinum`"
    )
    assert error.line == 13


def test_unknown_plan_in_message_policy() -> None:
    text = with_flow("response", "{policy: message-rate-limit, messages: {default: 1/s, gold: 2/s}}")
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:10: Unknown plan 'gold' (known: default)"
        " - at `$.apis[0].assembly[0].response[0].messages.gold`"
    )


def test_unknown_plan_of_client() -> None:
    text = "plans: [gold, silver]\nclients:\n  - {id: a, key: k, plan: platinum}\n" + (
        MINIMAL_YAML + UPGRADE
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:3: Unknown plan 'platinum' (known: default, gold, silver) - at `$.clients[0].plan`"
    )


def test_default_plan_may_be_named() -> None:
    text = "plans: [default, gold]\nclients: [{id: a, key: k, plan: default}]\n"
    text += MINIMAL_YAML + UPGRADE
    config = loads(text, "yaml")
    assert config.plans == ["default", "gold"] and config.clients[0].plan == "default"
    unknown = error_of(text.replace("plan: default}", "plan: platinum}"))
    assert "Unknown plan 'platinum' (known: default, gold)" in unknown.message


def test_duplicate_plan() -> None:
    error = error_of("plans: [gold, silver, gold]\n" + MINIMAL_YAML + UPGRADE)
    assert str(error) == "gw.yaml:1: Duplicate plan 'gold' (same as `$.plans[0]`) - at `$.plans[2]`"


# ---------------------------------------------------------------------------------------------
# Where policies may run
# ---------------------------------------------------------------------------------------------


def test_message_policy_before_the_upgrade() -> None:
    error = error_of(with_assembly("{policy: message-rate-limit, messages: 5/1s}"))
    assert str(error) == (
        "gw.yaml:7: message-rate-limit cannot run before the upgrade;"
        " put it in websocket-upgrade.request or .response - at `$.apis[0].assembly[0]`"
    )


def test_message_policy_after_the_upgrade() -> None:
    text = MINIMAL_YAML + UPGRADE + "      - {policy: message-size-limit, max: 1KiB}\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:8: message-size-limit cannot run before the upgrade;"
        " put it in websocket-upgrade.request or .response - at `$.apis[0].assembly[1]`"
    )


@pytest.mark.parametrize(
    ("policy", "tag"),
    [
        ("{policy: count-limit, key: api, max: 1}", "count-limit"),
        ("{policy: rate-limit, key: api, rate: 1/s}", "rate-limit"),
        ("{policy: api-key}", "api-key"),
        ("{policy: jwt, algorithms: [HS256], secret-env: FASTGW_TEST_JWT_SECRET}", "jwt"),
    ],
)
def test_pre_upgrade_policy_in_a_flow(policy: str, tag: str) -> None:
    text = with_flow("request", "{policy: message-size-limit, max: 1KiB}", policy)
    error = error_of(text)
    assert str(error) == (
        f"gw.yaml:11: {tag} runs before the upgrade; put it in the assembly before"
        " websocket-upgrade - at `$.apis[0].assembly[0].request[1]`"
    )


def test_upgrade_inside_a_flow() -> None:
    error = error_of(with_flow("response", "{policy: websocket-upgrade, target-url: 'ws://x'}"))
    assert str(error) == (
        "gw.yaml:10: websocket-upgrade cannot be inside websocket-upgrade.response"
        " - at `$.apis[0].assembly[0].response[0]`"
    )


def test_unknown_policy_in_a_flow() -> None:
    error = error_of(with_flow("request", "{policy: message-size, max: 1}"))
    assert str(error) == (
        "gw.yaml:10: Invalid value 'message-size' - expected one of: message-rate-limit,"
        " message-size-limit - at `$.apis[0].assembly[0].request[0].policy`"
    )


def test_policy_key_required_in_a_flow() -> None:
    error = error_of(with_flow("request", "{max: 1}"))
    assert str(error) == (
        "gw.yaml:10: Object missing required field `policy` - at `$.apis[0].assembly[0].request[0]`"
    )


def test_websocket_upgrade_still_last() -> None:
    text = MINIMAL_YAML + UPGRADE + "      - {policy: count-limit, key: api, max: 1}\n"
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:7: websocket-upgrade must be the last policy of the assembly"
        " - at `$.apis[0].assembly[0]`"
    )


# ---------------------------------------------------------------------------------------------
# Identity and keys of limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["count-limit, max: 1", "rate-limit, rate: 5/s"])
def test_client_id_key_needs_identity_before(limit: str) -> None:
    text = with_assembly("{policy: count-limit, key: client-ip, max: 9}",
                         f"{{policy: {limit}, key: client-id}}",
                         "{policy: api-key}")
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:8: key client-id needs an api-key or jwt policy before it"
        " - at `$.apis[0].assembly[1].key`"
    )


def test_client_id_key_after_identity() -> None:
    text = with_assembly(
        "{policy: jwt, algorithms: [HS256], secret-env: FASTGW_TEST_JWT_SECRET}",
        "{policy: count-limit, key: client-id, max: 1}",
    )
    assert loads(text, "yaml").apis[0].assembly[1] == CountLimit(key="client-id", max=PerPlan(1))


def test_one_identity_policy_per_assembly() -> None:
    text = with_assembly("{policy: api-key}", "{policy: count-limit, key: api, max: 1}",
                         "{policy: jwt, algorithms: [HS256], secret-env: FASTGW_TEST_JWT_SECRET}")
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:9: An assembly may hold only one api-key or jwt policy"
        " (the first is at `$.apis[0].assembly[0]`) - at `$.apis[0].assembly[2]`"
    )


def test_limit_key_must_be_known() -> None:
    error = error_of(with_assembly("{policy: count-limit, key: user, max: 1}"))
    assert str(error) == (
        "gw.yaml:7: Invalid value 'user' - expected one of: client-ip, client-id, api, global"
        " - at `$.apis[0].assembly[0].key`"
    )


# ---------------------------------------------------------------------------------------------
# api-key and jwt
# ---------------------------------------------------------------------------------------------


def test_api_key_defaults_and_query_only() -> None:
    clients = "clients: [{id: a, key: k}]\n"
    config = loads(with_assembly("{policy: api-key}") + clients, "yaml")
    assert config.apis[0].assembly[0] == ApiKey(header="X-API-Key", query=None)
    config = loads(with_assembly("{policy: api-key, header: null, query: key}") + clients, "yaml")
    assert config.apis[0].assembly[0] == ApiKey(header=None, query="key")


def test_api_key_needs_header_or_query() -> None:
    error = error_of(with_assembly("{policy: api-key, header: null}"))
    assert str(error) == (
        "gw.yaml:7: An api-key policy needs a header or a query parameter (or both)"
        " - at `$.apis[0].assembly[0]`"
    )


def test_api_key_header_must_be_a_token() -> None:
    error = error_of(with_assembly("{policy: api-key, header: 'X Key'}"))
    assert str(error) == (
        "gw.yaml:7: Invalid header name 'X Key' (must be an HTTP token)"
        " - at `$.apis[0].assembly[0].header`"
    )


def test_jwt_needs_a_key_source() -> None:
    error = error_of(with_assembly("{policy: jwt, algorithms: [RS256]}"))
    assert str(error) == (
        "gw.yaml:7: A jwt policy needs a key source: secret-env, secret-file, public-key or"
        " jwks-file - at `$.apis[0].assembly[0]`"
    )


def test_jwt_takes_one_key_source() -> None:
    text = MINIMAL_YAML + (
        "      - policy: jwt\n"
        "        algorithms: [RS256]\n"
        "        public-key: pub.pem\n"
        "        jwks-file: jwks.json\n"
    ) + UPGRADE
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:10: A jwt policy takes exactly one key source (got public-key and jwks-file)"
        " - at `$.apis[0].assembly[0].jwks-file`"
    )


def test_jwt_hs256_needs_a_secret(tmp_path: Path) -> None:
    (tmp_path / "pub.pem").write_text("")
    text = with_assembly("{policy: jwt, algorithms: [RS256, HS256], public-key: pub.pem}")
    with pytest.raises(ConfigError) as info:
        loads(text, "yaml", "gw.yaml", base_dir=str(tmp_path))
    assert str(info.value) == (
        "gw.yaml:7: Algorithm HS256 needs secret-env or secret-file"
        " - at `$.apis[0].assembly[0].algorithms[1]`"
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_jwt_asymmetric_needs_a_public_key(algorithm: str) -> None:
    text = with_assembly(f"{{policy: jwt, algorithms: [{algorithm}], secret-env: FASTGW_TEST_JWT_SECRET}}")
    error = error_of(text)
    assert str(error) == (
        f"gw.yaml:7: Algorithm {algorithm} needs public-key or jwks-file"
        " - at `$.apis[0].assembly[0].algorithms[0]`"
    )


def test_jwt_algorithms(tmp_path: Path) -> None:
    error = error_of(with_assembly("{policy: jwt, algorithms: [], secret-env: FASTGW_TEST_JWT_SECRET}"))
    assert str(error) == (
        "gw.yaml:7: Expected `array` of length >= 1 - at `$.apis[0].assembly[0].algorithms`"
    )
    error = error_of(with_assembly("{policy: jwt, algorithms: [none], secret-env: FASTGW_TEST_JWT_SECRET}"))
    assert str(error) == (
        "gw.yaml:7: Invalid value 'none' - expected one of: HS256, RS256, ES256"
        " - at `$.apis[0].assembly[0].algorithms[0]`"
    )


def test_jwt_secret_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    text = MINIMAL_YAML + (
        "      - policy: jwt\n"
        "        algorithms: [HS256]\n"
        f"        secret-env: {SECRET_ENV}\n"
    ) + UPGRADE
    error = error_of(text)
    assert str(error) == (
        f"gw.yaml:9: Environment variable '{SECRET_ENV}' is not set"
        " - at `$.apis[0].assembly[0].secret-env`"
    )
    monkeypatch.setenv(SECRET_ENV, "")
    assert error_of(text).message.startswith(f"Environment variable '{SECRET_ENV}' is empty")
    monkeypatch.setenv(SECRET_ENV, "k")
    jwt = loads(text, "yaml").apis[0].assembly[0]
    assert read_secret(jwt.secret_env, jwt.secret_file) == b"k"


def test_jwt_files_resolve_against_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "secret.txt").write_bytes(b"top-secret\r\n")
    text = with_assembly("{policy: jwt, algorithms: [HS256], secret-file: ../secret.txt}")
    path = tmp_path / "etc" / "gw.yaml"
    path.write_text(text)
    jwt = load(path).apis[0].assembly[0]
    assert jwt.secret_file == str(tmp_path / "secret.txt")
    assert read_secret(jwt.secret_env, jwt.secret_file) == b"top-secret"


def test_jwt_missing_file(tmp_path: Path) -> None:
    text = MINIMAL_YAML + (
        "      - policy: jwt\n"
        "        algorithms: [ES256]\n"
        "        jwks-file: keys/jwks.json\n"
    ) + UPGRADE
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    resolved = tmp_path / "keys" / "jwks.json"
    assert str(info.value) == (
        f"{path}:9: Cannot read file 'keys/jwks.json' ({resolved}): No such file or directory"
        " - at `$.apis[0].assembly[0].jwks-file`"
    )


def test_jwt_scopes_have_no_spaces() -> None:
    text = with_assembly(
        f"{{policy: jwt, algorithms: [HS256], secret-env: {SECRET_ENV},"
        " required-scopes: [a, 'b c']}"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:7: Invalid scope 'b c' (scopes cannot contain spaces)"
        " - at `$.apis[0].assembly[0].required-scopes[1]`"
    )


# ---------------------------------------------------------------------------------------------
# Message policies
# ---------------------------------------------------------------------------------------------


def test_message_rate_limit_defaults() -> None:
    limit = loads(with_flow("request", "{policy: message-rate-limit, messages: 5/s}"), "yaml")
    policy = limit.apis[0].assembly[0].request[0]
    assert policy == MessageRateLimit(messages=PerPlan(Rate(5, 1)))
    assert (policy.scope, policy.action, policy.name) == ("connection", "reject", "message-rate-limit")
    assert policy.bytes is None and policy.burst is None and policy.byte_burst is None
    assert policy.burst_for("gold") == 5.0
    assert policy.byte_burst_for("gold") is None


def test_delay_with_api_scope_is_allowed() -> None:
    text = with_flow(
        "response", "{policy: message-rate-limit, bytes: 1KiB/s, scope: api, action: delay}"
    )
    policy = loads(text, "yaml").apis[0].assembly[0].response[0]
    assert (policy.scope, policy.action) == ("api", "delay")


def test_message_rate_limit_needs_messages_or_bytes() -> None:
    error = error_of(with_flow("request", "{policy: message-rate-limit, scope: client}"))
    assert str(error) == (
        "gw.yaml:10: message-rate-limit needs messages or bytes (or both)"
        " - at `$.apis[0].assembly[0].request[0]`"
    )


def test_burst_without_messages() -> None:
    error = error_of(with_flow("request", "{policy: message-rate-limit, bytes: 1KiB/s, burst: 5}"))
    assert str(error) == (
        "gw.yaml:10: burst applies to messages, which is not set"
        " - at `$.apis[0].assembly[0].request[0].burst`"
    )


def test_byte_burst_without_bytes() -> None:
    error = error_of(with_flow("request", "{policy: message-rate-limit, messages: 1/s, byte-burst: 5}"))
    assert str(error) == (
        "gw.yaml:10: byte-burst applies to bytes, which is not set"
        " - at `$.apis[0].assembly[0].request[0].byte-burst`"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scope", "user", "Invalid value 'user' - expected one of: connection, client, api"),
        ("action", "close", "Invalid value 'close' - expected one of: reject, delay, drop"),
        ("name", "''", "Expected `str` of length >= 1"),
    ],
)
def test_message_rate_limit_enums(field: str, value: str, message: str) -> None:
    text = with_flow("request", f"{{policy: message-rate-limit, messages: 1/s, {field}: {value}}}")
    error = error_of(text)
    assert str(error) == f"gw.yaml:10: {message} - at `$.apis[0].assembly[0].request[0].{field}`"


def test_unknown_field_in_message_policy_points_at_it() -> None:
    text = MINIMAL_YAML + (
        "      - policy: websocket-upgrade\n"
        "        target-url: ws://127.0.0.1:9000\n"
        "        request:\n"
        "          - policy: message-size-limit\n"
        "            max: 1KiB\n"
        "            min: 1\n"
    )
    error = error_of(text)
    assert str(error) == (
        "gw.yaml:12: Object contains unknown field `min` - at `$.apis[0].assembly[0].request[0]`"
    )


# ---------------------------------------------------------------------------------------------
# Origins, trusted proxies, limits
# ---------------------------------------------------------------------------------------------


def with_origins(origins: str) -> str:
    text = MINIMAL_YAML.replace("    path: /echo\n", f"    path: /echo\n    origins: {origins}\n")
    return text + UPGRADE


def test_origins_are_stored_in_lower_case() -> None:
    config = loads(with_origins("['HTTPS://App.Example.COM', 'http://[::1]:8080', 'app://x']"), "yaml")
    assert config.apis[0].origins == ["https://app.example.com", "http://[::1]:8080", "app://x"]


def test_origin_star_is_refused() -> None:
    error = error_of(with_origins("[https://a.example, '*']"))
    assert str(error) == (
        "gw.yaml:6: Origin '*' is not allowed (leave out origins to accept any origin)"
        " - at `$.apis[0].origins[1]`"
    )


@pytest.mark.parametrize(
    "origin", ["https://a.example/", "https://a.example/app", "a.example", "https://", "null",
               "https://u@a.example", "https://a.example:99999", "https://a.example?x"],
)
def test_bad_origin(origin: str) -> None:
    error = error_of(with_origins(f"['{origin}']"))
    assert str(error) == (
        f"gw.yaml:6: Invalid origin {origin!r} (use scheme://host[:port], e.g."
        " https://app.example.com) - at `$.apis[0].origins[0]`"
    )


def test_trusted_proxies_bad_values() -> None:
    error = error_of("trusted-proxies: [10.0.0.0/8, 10.0.0.1/8]\n" + MINIMAL_YAML + UPGRADE)
    assert str(error) == (
        "gw.yaml:1: Invalid network '10.0.0.1/8' (10.0.0.1/8 has host bits set)"
        " - at `$.trusted-proxies[1]`"
    )
    error = error_of("trusted-proxies:\n  - localhost\n" + MINIMAL_YAML + UPGRADE)
    assert str(error) == (
        "gw.yaml:2: Invalid network 'localhost' (use an address or a network, e.g. 10.0.0.0/8)"
        " - at `$.trusted-proxies[0]`"
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("{max-keys: 15}", "Expected `int` >= 16 - at `$.limits.max-keys`"),
        ("{max-connections: -1}", "Expected `int` >= 0 - at `$.limits.max-connections`"),
        ("{max-conns: 1}", "Object contains unknown field `max-conns` - at `$.limits`"),
        ("{max-handshakes-per-ip: -1}", "Expected `int` >= 0 - at `$.limits.max-handshakes-per-ip`"),
    ],
)
def test_bad_limits(limits: str, message: str) -> None:
    assert str(error_of(MINIMAL_YAML + UPGRADE + f"limits: {limits}\n")) == f"gw.yaml:8: {message}"


def test_max_connections_is_auto_or_a_number() -> None:
    def limits(text: str):
        return loads(MINIMAL_YAML + UPGRADE + f"limits: {text}\n", "yaml").limits

    assert limits("{}").max_connections == "auto"
    assert limits("{max-connections: auto}").max_connections == "auto"
    assert limits("{max-connections: 5000, max-handshakes-per-ip: 0}") == Limits(
        max_connections=5000, max_handshakes_per_ip=0)
    assert "$.limits.max-connections" in str(error_of(MINIMAL_YAML + UPGRADE + "limits: {max-connections: many}\n"))


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def with_clients(clients: str) -> str:
    return "plans: [gold]\nclients:\n" + clients + MINIMAL_YAML + UPGRADE


def test_duplicate_client_id() -> None:
    error = error_of(with_clients("  - {id: a, key: k1}\n  - {id: a, key: k2}\n"))
    assert str(error) == (
        "gw.yaml:4: Duplicate client id 'a' (same as `$.clients[0]`) - at `$.clients[1].id`"
    )


def test_duplicate_key_does_not_show_the_key() -> None:
    error = error_of(with_clients("  - {id: a, key: s3cret}\n  - {id: b, keys: [other, s3cret]}\n"))
    assert str(error) == (
        "gw.yaml:4: Duplicate API key (already a key of client 'a') - at `$.clients[1].keys[1]`"
    )
    assert "s3cret" not in str(error)


def test_duplicate_key_within_one_client() -> None:
    error = error_of(with_clients("  - {id: a, keys: [k, k]}\n"))
    assert error.message == (
        "Duplicate API key (already a key of client 'a') - at `$.clients[0].keys[1]`"
    )


@pytest.mark.parametrize(("fields", "got"), [("key: k, keys: [j]", "both"), ("plan: gold", "neither")])
def test_client_key_or_keys(fields: str, got: str) -> None:
    error = error_of(with_clients(f"  - {{id: a, {fields}}}\n"))
    assert str(error) == (
        f"gw.yaml:3: A client needs exactly one of key or keys (got {got}) - at `$.clients[0]`"
    )


def test_client_keys_not_empty() -> None:
    error = error_of(with_clients("  - {id: a, keys: []}\n"))
    assert str(error) == "gw.yaml:3: Expected `array` of length >= 1 - at `$.clients[0].keys`"


def test_client_unknown_api() -> None:
    error = error_of(with_clients("  - id: a\n    key: k\n    apis: [echo, quotes]\n"))
    assert str(error) == "gw.yaml:5: Unknown API 'quotes' (known: echo) - at `$.clients[0].apis[1]`"


# ---------------------------------------------------------------------------------------------
# clients-file
# ---------------------------------------------------------------------------------------------


def write_config(directory: Path, clients_file: str, clients_text: str | None) -> Path:
    if clients_text is not None:
        (directory / clients_file).write_text(clients_text)
    text = (
        "plans: [gold]\n"
        "clients:\n"
        "  - {id: alice, key: alice-key}\n"
        f"clients-file: {clients_file}\n"
    ) + MINIMAL_YAML + UPGRADE
    path = directory / "gw.yaml"
    path.write_text(text)
    return path


def clients_file_error(directory: Path, clients_file: str, clients_text: str | None) -> ConfigError:
    path = write_config(directory, clients_file, clients_text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "clients.yaml",
            "- {id: bob, key: bob-key, plan: gold}\n- {id: eve, keys: [e1, e2], apis: [echo]}\n",
        ),
        (
            "clients.yml",
            "clients:\n"
            "  - {id: bob, key: bob-key, plan: gold}\n"
            "  - {id: eve, keys: [e1, e2], apis: [echo]}\n",
        ),
        ("clients.json", json.dumps([{"id": "bob", "key": "bob-key", "plan": "gold"},
                                     {"id": "eve", "keys": ["e1", "e2"], "apis": ["echo"]}])),
        ("clients.toml", '[[clients]]\nid = "bob"\nkey = "bob-key"\nplan = "gold"\n\n'
                         '[[clients]]\nid = "eve"\nkeys = ["e1", "e2"]\napis = ["echo"]\n'),
    ],
)
def test_clients_file_forms(tmp_path: Path, name: str, text: str) -> None:
    config = load(write_config(tmp_path, name, text))
    assert config.clients_file == str(tmp_path / name)
    assert config.clients == [
        Client(id="alice", key="alice-key"),
        Client(id="bob", key="bob-key", plan="gold"),
        Client(id="eve", keys=["e1", "e2"], apis=["echo"]),
    ]


@pytest.mark.parametrize("text", ["", "# nobody yet\n", "[]\n", "clients: []\n"])
def test_empty_clients_file(tmp_path: Path, text: str) -> None:
    config = load(write_config(tmp_path, "clients.yaml", text))
    assert [client.id for client in config.clients] == ["alice"]


def test_clients_file_error_names_its_file_and_line(tmp_path: Path) -> None:
    text = (
        "- id: bob\n"
        "  key: bob-key\n"
        "- id: carol\n"
        "  key: 42\n"
    )
    error = clients_file_error(tmp_path, "clients.yaml", text)
    clients_path = str(tmp_path / "clients.yaml")
    assert str(error) == f"{clients_path}:4: Expected `str | null`, got `int` - at `$[1].key`"
    assert (error.file, error.line, error.path) == (clients_path, 4, "$[1].key")


def test_clients_file_unknown_field_points_at_it(tmp_path: Path) -> None:
    text = "clients:\n  - id: bob\n    key: bob-key\n    tier: gold\n"
    error = clients_file_error(tmp_path, "clients.yaml", text)
    assert str(error) == (
        f"{tmp_path / 'clients.yaml'}:4: Object contains unknown field `tier` - at `$.clients[0]`"
    )


def test_clients_file_semantic_errors_name_its_file(tmp_path: Path) -> None:
    text = "- {id: bob, key: bob-key}\n- {id: carol, key: c, plan: platinum}\n"
    error = clients_file_error(tmp_path, "clients.yaml", text)
    assert str(error) == (
        f"{tmp_path / 'clients.yaml'}:2: Unknown plan 'platinum' (known: default, gold)"
        " - at `$[1].plan`"
    )


def test_clients_file_duplicates_of_inline_clients(tmp_path: Path) -> None:
    error = clients_file_error(tmp_path, "clients.yaml", "- {id: bob, key: b}\n- {id: alice, key: x}\n")
    assert str(error) == (
        f"{tmp_path / 'clients.yaml'}:2: Duplicate client id 'alice'"
        f" (same as `$.clients[0]` in {tmp_path / 'gw.yaml'}) - at `$[1].id`"
    )
    error = clients_file_error(tmp_path, "clients.yaml", "- {id: bob, keys: [b, alice-key]}\n")
    assert str(error) == (
        f"{tmp_path / 'clients.yaml'}:1: Duplicate API key (already a key of client 'alice')"
        " - at `$[0].keys[1]`"
    )


def test_clients_file_duplicate_within_it(tmp_path: Path) -> None:
    text = '[[clients]]\nid = "b"\nkey = "1"\n[[clients]]\nid = "b"\nkey = "2"\n'
    error = clients_file_error(tmp_path, "clients.toml", text)
    assert str(error) == (
        f"{tmp_path / 'clients.toml'}:5: Duplicate client id 'b' (same as `$.clients[0]`)"
        " - at `$.clients[1].id`"
    )
    assert error.line == 5


def test_clients_file_missing(tmp_path: Path) -> None:
    error = clients_file_error(tmp_path, "clients.yaml", None)
    assert str(error) == (
        f"{tmp_path / 'gw.yaml'}:4: Cannot read file 'clients.yaml' ({tmp_path / 'clients.yaml'}):"
        " No such file or directory - at `$.clients-file`"
    )


def test_clients_file_unknown_type(tmp_path: Path) -> None:
    error = clients_file_error(tmp_path, "clients.txt", "- {id: b, key: k}\n")
    assert str(error) == (
        f"{tmp_path / 'gw.yaml'}:4: Unknown clients file type ('.txt'; use .yaml, .yml, .toml or"
        " .json) - at `$.clients-file`"
    )


def test_clients_file_syntax_error(tmp_path: Path) -> None:
    error = clients_file_error(tmp_path, "clients.json", '[\n  {"id": "b",\n  "key": }\n]')
    assert str(error) == f"{tmp_path / 'clients.json'}:3: Invalid JSON: Expecting value (column 10)"


def test_clients_file_of_wrong_shape(tmp_path: Path) -> None:
    error = clients_file_error(tmp_path, "clients.yaml", "just text\n")
    assert str(error) == (
        f"{tmp_path / 'clients.yaml'}:1: The clients file must hold a list of clients or a"
        " mapping with `clients`, not a str - at `$`"
    )


def test_clients_file_relative_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "clients.yaml").write_text("- {id: bob, key: k}\n")
    path = write_config(tmp_path / "etc", "clients.yaml", None)
    monkeypatch.chdir(tmp_path)
    config = load("etc/gw.yaml")
    assert config.clients_file == str(tmp_path / "etc" / "clients.yaml")
    assert [c.id for c in config.clients] == ["alice", "bob"]
    assert path.exists()


@pytest.mark.parametrize("key, value", [
    ("timeout", "0s"), ("idle-timeout", 0), ("max-lifetime", "0ms"),
    ("max-frame-size", 0), ("max-message-size", "0KiB"),
])
def test_zero_limits_of_the_upgrade_are_refused(key, value):
    text = ("listeners: [{port: 0}]\napis:\n  - name: a\n    path: /\n    assembly:\n"
            "      - policy: websocket-upgrade\n        target-url: ws://127.0.0.1:1/\n"
            f"        {key}: {value}\n")
    from fastgw import config as cfgmod
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.loads(text, "yaml", "zero.yaml")
    assert str(info.value) == (f"zero.yaml:8: {key} must be greater than 0 - at "
                               f"`$.apis[0].assembly[0].{key}`")


def test_admin_beyond_loopback_needs_a_token(monkeypatch):
    from fastgw import config as cfgmod
    base = ("listeners: [{port: 0}]\napis: [{name: a, path: /, assembly: [{policy: websocket-upgrade,"
            " target-url: 'ws://h:1/'}]}]\n")
    assert cfgmod.loads(base + "admin: {port: 9901}\n", "yaml").admin.host == "127.0.0.1"
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.loads(base + "admin: {host: 0.0.0.0, port: 9901}\n", "yaml", "a.yaml")
    assert "set token-env" in str(info.value) and "`$.admin`" in str(info.value)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.loads(base + "admin: {host: 0.0.0.0, token-env: FASTGW_T_UNSET}\n", "yaml", "a.yaml")
    assert "FASTGW_T_UNSET" in str(info.value)
    monkeypatch.setenv("FASTGW_T_SET", "s3cret")
    cfg = cfgmod.loads(base + "admin: {host: 0.0.0.0, token-env: FASTGW_T_SET}\n", "yaml")
    assert cfg.admin.token_env == "FASTGW_T_SET"
