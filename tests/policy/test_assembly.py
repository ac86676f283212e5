"""Assemblies built from YAML, fed with synthetic upgrade requests and
(opcode, fin, size, time) sequences: the decisions, without sockets."""

from __future__ import annotations

import time

import jwt
import pytest

from fastgw import config as cfgmod
from fastgw._core import LimitZone, RateRule, Relay, Scope, Verdict
from fastgw import admission
from fastgw.admission import UpgradeRequest
from fastgw.policies import ACTIONS
from fastgw.identity import AuthError
from fastgw.routing import compile_config
from fastgw.verdicts import Refusal

PASS, REJECT, DELAY, DROP = Verdict.PASS, Verdict.REJECT, Verdict.DELAY, Verdict.DROP

YAML = """
listeners: [{port: 0}]
plans: [gold]
trusted-proxies: [10.0.0.0/8]
clients:
  - {id: alice, key: alice-key, plan: gold}
  - {id: bob, key: bob-key}
  - {id: carol, key: carol-key, apis: [other]}
apis:
  - name: chat
    path: /chat
    origins: [https://app.example.com]
    assembly:
      - policy: api-key
        query: api_key
      - policy: count-limit
        key: client-id
        max: {default: 2, gold: 3}
      - policy: rate-limit
        key: client-ip
        rate: 1/10s
        burst: 4
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9000/
        max-message-size: 1MiB
        request:
          - policy: message-rate-limit
            name: chat-rate
            messages: {default: 1/1s, gold: 10/1s}
            burst: {default: 2, gold: 20}
            action: reject
          - policy: message-size-limit
            max: {default: 64KiB, gold: 256KiB}
        response:
          - policy: message-rate-limit
            bytes: 1000/1s
            byte-burst: 2000
            action: delay
  - name: other
    path: /other
    assembly:
      - policy: jwt
        algorithms: [HS256]
        secret-env: FASTGW_POLICY_TEST_SECRET
        issuer: https://issuer.example
        plan-claim: plan
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:9000/
        request:
          - policy: message-rate-limit
            messages: 2/1s
            burst: 2
            scope: client
            action: drop
"""

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def admit(api, zone, req):
    """The identify and admit phases, as the handshake runs them; the refusal a phase
    returns is raised here."""
    who = admission.identify(api, req)
    if isinstance(who, Refusal):
        raise who
    adm = admission.admit(api, zone, req, who)
    if isinstance(adm, Refusal):
        raise adm
    return adm


@pytest.fixture
def router(monkeypatch):
    monkeypatch.setenv("FASTGW_POLICY_TEST_SECRET", SECRET)
    return compile_config(cfgmod.loads(YAML, "yaml"))


def api_named(router, name):
    return next(a for a in router.apis if a.name == name)


def request(headers=(), query="", peer="192.0.2.1", now=100.0, wall=None):
    base = [("host", "gw"), ("origin", "https://app.example.com")]
    return UpgradeRequest(base + list(headers), query, peer, now, wall if wall is not None else time.time())


def test_api_key_identity_and_plan(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    adm = admit(chat, zone, request([("x-api-key", "alice-key")]))
    assert (adm.client_id, adm.plan, adm.client_key) == ("alice", "gold", "alice")
    assert adm.request_max_size == 256 * 1024
    adm2 = admit(chat, zone, request(query="api_key=bob-key"))
    assert (adm2.client_id, adm2.plan) == ("bob", "default")
    assert adm2.request_max_size == 64 * 1024
    assert adm2.response_max_size == 1024 * 1024
    adm.release()
    adm2.release()
    assert zone.counts_used() == 0


@pytest.mark.parametrize("headers, query, status", [
    ([], "", 401),
    ([("x-api-key", "nope")], "", 401),
    ([("x-api-key", "carol-key")], "", 403),
])
def test_api_key_refusals(router, headers, query, status):
    with pytest.raises(AuthError) as info:
        admit(api_named(router, "chat"), LimitZone(64), request(headers, query))
    assert info.value.status == status
    if status == 401:
        assert any(k.lower() == "www-authenticate" for k, _ in info.value.headers)


def test_origin_refused(router):
    req = request([("x-api-key", "alice-key")])
    req.headers[1] = ("origin", "https://evil.example.com")
    with pytest.raises(AuthError) as info:
        admit(api_named(router, "chat"), LimitZone(64), req)
    assert info.value.status == 403


def test_count_limit_per_client_and_plan(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    # Distinct peers so that the attempt limit (per client-ip) stays out of the way.
    bobs = [admit(chat, zone, request([("x-api-key", "bob-key")], peer=f"192.0.2.{i}")) for i in range(2)]
    with pytest.raises(Refusal) as info:
        admit(chat, zone, request([("x-api-key", "bob-key")], peer="192.0.2.9"))
    assert info.value.status == 429 and info.value.kind == "count_limit"
    assert ("Retry-After", "1") in info.value.headers
    alices = [admit(chat, zone, request([("x-api-key", "alice-key")], peer=f"198.51.100.{i}")) for i in range(3)]
    with pytest.raises(Refusal):
        admit(chat, zone, request([("x-api-key", "alice-key")], peer="198.51.100.9"))
    bobs[0].release()
    bobs[0].release()                     # a second release changes nothing
    again = admit(chat, zone, request([("x-api-key", "bob-key")], peer="192.0.2.20"))
    with pytest.raises(Refusal):
        admit(chat, zone, request([("x-api-key", "bob-key")], peer="192.0.2.21"))
    for adm in [bobs[1], again, *alices]:
        adm.release()
    assert zone.counts_used() == 0


def test_rate_limit_admits_burst_then_429_with_retry_after(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    for i in range(4):                    # burst 4
        admit(chat, zone, request([("x-api-key", "bob-key")], now=100.0)).release()
    with pytest.raises(Refusal) as info:
        admit(chat, zone, request([("x-api-key", "bob-key")], now=100.0))
    assert info.value.status == 429 and info.value.kind == "rate_limit"
    assert ("Retry-After", "10") in info.value.headers          # 1/10s: the next token in 10 s
    with pytest.raises(Refusal) as info:
        admit(chat, zone, request([("x-api-key", "bob-key")], now=106.0))
    assert ("Retry-After", "4") in info.value.headers
    admit(chat, zone, request([("x-api-key", "bob-key")], now=110.0)).release()
    # A refused attempt held no connection slot.
    assert zone.counts_used() == 0


def test_trusted_proxy_address_is_the_client(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    adm = admit(chat, zone, request([("x-api-key", "bob-key"), ("x-forwarded-for", "203.0.113.7, 10.1.1.1")],
                                   peer="10.0.0.2"))
    assert adm.client_ip == "203.0.113.7"
    untrusted = admit(chat, zone, request([("x-api-key", "bob-key"), ("x-forwarded-for", "203.0.113.7")],
                                         peer="192.0.2.50"))
    assert untrusted.client_ip == "192.0.2.50"
    adm.release()
    untrusted.release()


def relay_for(adm, zone):
    relay = Relay(None, None)
    relay.client.set_policies(adm.request_rules, zone, adm.request_max_size, now=0.0)
    relay.backend.set_policies(adm.response_rules, zone, adm.response_max_size, now=0.0)
    return relay


def test_message_reject_after_burst_per_plan(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    bob = admit(chat, zone, request([("x-api-key", "bob-key")]))
    relay = relay_for(bob, zone)
    decisions = [relay.client.decide(1, True, 10, 1000.0)[0] for _ in range(3)]
    assert decisions == [PASS, PASS, REJECT]                # burst 2 (default plan)
    assert relay.client.rejected == 1 and relay.client.rule_limited() == [1]
    alice = admit(chat, zone, request([("x-api-key", "alice-key")], peer="192.0.2.2"))
    relay = relay_for(alice, zone)
    assert [relay.client.decide(1, True, 10, 1000.0)[0] for _ in range(21)] == [PASS] * 20 + [REJECT]
    # Tokens come back with time: 10/s for gold.
    relay = relay_for(alice, zone)
    for _ in range(20):
        relay.client.decide(2, True, 10, 2000.0)
    assert relay.client.decide(2, True, 10, 2000.05)[0] == REJECT
    relay = relay_for(alice, zone)
    for _ in range(20):
        relay.client.decide(2, True, 10, 3000.0)
    assert relay.client.decide(2, True, 10, 3000.11)[0] == PASS
    bob.release()
    alice.release()


def test_fragmented_message_counted_once(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    bob = admit(chat, zone, request([("x-api-key", "bob-key")]))
    relay = relay_for(bob, zone)
    # Two fragmented messages of three frames each fit a burst of 2 messages.
    seq = [(1, False), (0, False), (0, True), (2, False), (0, False), (0, True)]
    assert [relay.client.decide(op, fin, 100, 50.0)[0] for op, fin in seq] == [PASS] * 6
    assert relay.client.decide(1, True, 1, 50.0)[0] == REJECT
    bob.release()


def test_response_bytes_delay_waits_for_tokens(router):
    chat = api_named(router, "chat")
    zone = LimitZone(1024)
    bob = admit(chat, zone, request([("x-api-key", "bob-key")]))
    relay = relay_for(bob, zone)
    backend = relay.backend                  # the response flow: 1000 B/s, burst 2000
    assert backend.decide(2, True, 1500, 10.0) == (PASS, 0.0)
    verdict, wait = backend.decide(2, True, 1000, 10.0)
    assert verdict == DELAY and wait == pytest.approx(0.5)   # 500 left, 1000 needed
    assert backend.decide(2, True, 1000, 10.5, retry=True) == (PASS, 0.0)
    assert backend.delayed == 1                                  # counted once per message
    # Bytes of later fragments are counted in full.
    assert backend.decide(2, False, 0, 20.0)[0] == PASS
    assert backend.decide(0, False, 2000, 20.0)[0] == PASS
    assert backend.decide(0, True, 500, 20.0)[0] == DELAY
    bob.release()


def test_jwt_identity_plan_and_expiry(router):
    other = api_named(router, "other")
    zone = LimitZone(1024)
    now = time.time()
    token = jwt.encode({"sub": "dave", "plan": "gold", "iss": "https://issuer.example", "exp": now + 60},
                       SECRET, algorithm="HS256")
    adm = admit(other, zone, request([("authorization", f"Bearer {token}")], wall=now))
    assert (adm.client_id, adm.plan) == ("dave", "gold")
    assert adm.expires_at == pytest.approx(now + 60)
    expired = jwt.encode({"sub": "dave", "iss": "https://issuer.example", "exp": now - 5}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        admit(other, zone, request([("authorization", f"Bearer {expired}")], wall=now))
    assert info.value.status == 401
    wrong_iss = jwt.encode({"sub": "dave", "iss": "https://evil", "exp": now + 60}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        admit(other, zone, request([("authorization", f"Bearer {wrong_iss}")], wall=now))


def test_client_scope_drop_shared_across_connections(router):
    other = api_named(router, "other")
    zone = LimitZone(1024)
    now = time.time()
    token = jwt.encode({"sub": "erin", "iss": "https://issuer.example", "exp": now + 60}, SECRET, algorithm="HS256")
    relays = []
    for _ in range(3):
        adm = admit(other, zone, request([("authorization", f"Bearer {token}")], wall=now))
        relays.append(relay_for(adm, zone))
    # Burst 2 for the client as a whole: the third message, on any connection, is dropped.
    assert relays[0].client.decide(1, True, 5, 7.0)[0] == PASS
    assert relays[1].client.decide(1, True, 5, 7.0)[0] == PASS
    assert relays[2].client.decide(1, True, 5, 7.0)[0] == DROP
    # A dropped message is dropped whole: its continuation follows it.
    assert relays[0].client.decide(1, False, 5, 7.0)[0] == DROP
    assert relays[0].client.decide(0, True, 5, 7.0)[0] == DROP
    assert relays[2].client.dropped == 1 and relays[0].client.dropped == 1
    # Another client has its own budget.
    token2 = jwt.encode({"sub": "frank", "iss": "https://issuer.example", "exp": now + 60}, SECRET, algorithm="HS256")
    adm = admit(other, zone, request([("authorization", f"Bearer {token2}")], wall=now))
    assert relay_for(adm, zone).client.decide(1, True, 5, 7.0)[0] == PASS


# ------------------------------------------------------------------ a full limit table

def full_buckets(zone, now=0.0):
    """Every bucket slot of a 16-slot zone held by another key, active for 1000 s."""
    for k in range(1, 17):
        assert zone.take_py(10_000 + k, 0.001, 1.0, now, 1.0) == 0.0
    assert zone.buckets_used(now) == 16


def test_rate_limit_at_a_full_table_refuses_503(router):
    chat = api_named(router, "chat")
    zone = LimitZone(16)
    full_buckets(zone, 100.0)
    for _ in range(3):             # every attempt refused and counted; none admitted
        with pytest.raises(Refusal) as info:
            admit(chat, zone, request([("x-api-key", "bob-key")], now=100.0))
        r = info.value
        assert (r.status, r.kind, r.table_full) == (503, "capacity", "rate-limit")
        assert r.reason == "the gateway's limit table is full"
    assert zone.overflows == 3
    assert zone.counts_used() == 0            # the count-limit slot taken first was given back
    # Once the other keys' buckets are full again (t = 1100), the oldest idle one is evicted.
    admit(chat, zone, request([("x-api-key", "bob-key")], now=1100.0)).release()
    assert zone.bucket_reuses == 1 and zone.overflows == 3


def test_count_limit_at_a_full_table_refuses_503(router):
    # (limits.max-connections is no key of the table: the listeners stop accepting at it.)
    chat = api_named(router, "chat")
    for api in (chat,):
        zone = LimitZone(16)
        for k in range(1, 17):                 # every count slot held by another key
            assert zone.acquire_py(10_000 + k, 5) == 1
        with pytest.raises(Refusal) as info:
            admit(api, zone, request([("x-api-key", "bob-key")]))
        r = info.value
        assert (r.status, r.kind, r.table_full) == (503, "capacity", "count-limit")
        assert r.reason == "the gateway's limit table is full"
        assert zone.count_overflows == 1 and zone.counts_used() == 16
        zone.release_py(10_001)                # a key at count 0: its slot is taken over
        admit(api, zone, request([("x-api-key", "bob-key")])).release()
        assert zone.count_reuses == 1


def client_scope_leg(zone, action, name="per-client"):
    from fastgw._core import key_hash
    relay = Relay(None, None)
    leg = relay.client
    # scope client, 1 message/s, burst 2, no byte limit
    leg.set_policies([RateRule(name, ACTIONS[action], Scope.SCOPE_CLIENT, msg_rate=1.0, msg_burst=2.0,
                               msg_key=key_hash("m|chat|request|0|bob|m"),
                               byte_key=key_hash("m|chat|request|0|bob|b"))],
                     zone, now=0.0)
    return relay, leg


@pytest.mark.parametrize("action", ["reject", "delay", "drop"])
def test_client_scope_message_at_a_full_table_is_over_the_limit(action):
    zone = LimitZone(16)
    full_buckets(zone, 0.0)
    relay, leg = client_scope_leg(zone, action)
    verdict, wait = leg.decide(1, True, 10, 1.0)
    assert verdict == Verdict[action.upper()]  # never PASS: the rule's own action
    assert zone.message_overflows == 1 and zone.overflows == 1
    assert leg.rule_limited() == [1]
    if action == "delay":
        assert wait == pytest.approx(0.1)      # tried again a little later
        assert leg.decide(1, True, 10, 1.1, retry=True) == (DELAY, pytest.approx(0.1))
        assert zone.message_overflows == 1 and leg.delayed == 1   # one message, counted once
        # The other keys' buckets are full again at t = 1000: the held message passes.
        assert leg.decide(1, True, 10, 1000.0, retry=True) == (PASS, 0.0)
        assert zone.bucket_reuses == 1
    elif action == "drop":
        assert leg.decide(0, True, 10, 1.0)[0] == DROP          # the rest of the message
        assert leg.dropped == 1 and zone.message_overflows == 1
        assert leg.decide(1, True, 10, 2.0)[0] == DROP          # the next message too
        assert zone.message_overflows == 2
    else:
        assert leg.rejected == 1 and relay.end_code == 1008
        assert relay.end_reason == b"message rate limit exceeded: per-client"
