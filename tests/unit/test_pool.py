"""fastgw.pool: which target a dial takes, and what dials teach the pool.

Pools are built as the gateway builds them: from a configuration, through routing's compiled
websocket-upgrade (`build_pools`). Connection counts are kept as a gateway keeps them: a pick
counts one more `active` on its target (the dial, then the live connection) until the
connection ends. Random choices use the module's generator, seeded per test.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fastgw.config import loads
from fastgw.pool import MAX_EJECTION, Pool, build_pools, hash_value
from fastgw.routing import compile_config
from fastgw.verdicts import Refusal

NOW = 1000.0


def config_yaml(targets: list[tuple[str, int]], extra: str = "", api: str = "chat") -> str:
    lines = "".join(f"          - url: {url}\n            weight: {w}\n" for url, w in targets)
    return ("listeners: [{port: 8080}]\n"
            f"apis:\n  - name: {api}\n    path: /\n    assembly:\n"
            "      - policy: websocket-upgrade\n        targets:\n" + lines
            + "".join(f"        {line}\n" for line in extra.splitlines() if line))


def router_of(targets, extra: str = ""):
    return compile_config(loads(config_yaml(targets, extra), "yaml", "gw.yaml"))


def pool_of(targets, extra: str = "", old=None) -> Pool:
    return build_pools(router_of(targets, extra), old)["chat"]


def urls(n: int) -> list[str]:
    return [f"ws://10.0.0.{i + 1}:9000/" for i in range(n)]


W112 = list(zip(urls(3), (1, 1, 2)))


def hold(pool: Pool, n: int, key=None) -> list:
    """n picks, each held open (its target's active count up by one); the targets picked."""
    picked = []
    for i in range(n):
        t = pool.pick(key if key is None else f"{key}{i}", (), NOW)
        t.active += 1
        picked.append(t)
    return picked


def assert_weight_shares(counts: Counter, pool: Pool, tolerance: float = 0.10) -> None:
    """Each target's share of the picks within ±tolerance (relative) of its weight's share."""
    total = sum(counts.values())
    weights = sum(t.weight for t in pool.targets)
    for t in pool.targets:
        share, expected = counts[t] / total, t.weight / weights
        assert abs(share - expected) <= tolerance * expected, (
            f"{t.label}: {share:.3f} of the picks, weight share {expected:.3f}: "
            f"{ {x.label: counts[x] for x in pool.targets} }")


@pytest.fixture(autouse=True)
def _seeded():
    state = random.getstate()
    random.seed(12)
    yield
    random.setstate(state)


# ---- the balance modes, with weights ------------------------------------------------------


@pytest.mark.parametrize("balance", ["round-robin", "random", "least-connections"])
def test_held_connections_follow_the_weights(balance):
    pool = pool_of(W112, f"balance: {balance}")
    counts = Counter(hold(pool, 3000))
    assert_weight_shares(counts, pool)
    assert {t.label: t.active for t in pool.targets} == {t.label: counts[t] for t in pool.targets}


@pytest.mark.parametrize("balance", ["round-robin", "random", "least-connections"])
def test_churn_keeps_the_weights(balance):
    """3,000 held, then 6,000 times one random connection ends and a new one is picked: the
    live connections still follow the weights."""
    pool = pool_of(W112, f"balance: {balance}")
    live = hold(pool, 3000)
    for _ in range(6000):
        gone = live.pop(random.randrange(len(live)))
        gone.active -= 1
        live.extend(hold(pool, 1))
    assert_weight_shares(Counter(live), pool)


@pytest.mark.parametrize("balance", ["round-robin", "random", "least-connections"])
def test_short_connections_follow_the_weights(balance):
    """Connections that end before the next pick (every count 0 at each pick): the weights
    still hold (least-connections breaks its ties by weighted round robin)."""
    pool = pool_of(W112, f"balance: {balance}")
    counts = Counter(pool.pick(None, (), NOW) for _ in range(20000))
    assert_weight_shares(counts, pool, 0.05)


def test_round_robin_is_smooth_and_exact():
    pool = pool_of(W112, "balance: round-robin")
    a, b, c = pool.targets
    seq = [pool.pick(None, (), NOW) for _ in range(8)]
    assert seq == [c, a, b, c] * 2         # nginx's smooth weighted round robin


def test_least_connections_fills_the_emptiest_per_weight():
    pool = pool_of(W112)                    # least-connections is the default
    a, b, c = pool.targets
    a.active, b.active, c.active = 10, 3, 10    # per weight: 10, 3, 5
    assert hold(pool, 2) == [b, b]               # b: 3, then 4 per weight (c: 5)
    assert Counter(hold(pool, 3)) == Counter({b: 1, c: 2})   # b 5, c 5: ties by weight
    a.active, b.active, c.active = 6, 6, 10      # per weight 6, 6, 5
    assert hold(pool, 2) == [c, c]               # c 5 -> 5.5 -> 6
    assert Counter(hold(pool, 4)) == Counter({a: 1, b: 1, c: 2})   # 7, 7, 7 per weight


def test_least_connections_ties_spread():
    pool = pool_of(list(zip(urls(3), (1, 1, 1))))
    for t in pool.targets:
        t.active = 5
    firsts = Counter(pool.pick(None, (), NOW) for _ in range(30))   # nothing held: all tied
    assert set(firsts.values()) == {10}


def test_least_connections_refills_an_emptied_target_first():
    pool = pool_of(W112)
    live = hold(pool, 3000)
    a = pool.targets[0]
    for t in live:
        if t is a:
            t.active -= 1
    assert a.active == 0
    assert set(hold(pool, 500)) == {a}


def test_random_takes_the_lighter_of_two():
    pool = pool_of(list(zip(urls(2), (1, 1))), "balance: random")
    a, b = pool.targets
    a.active = 100
    counts = Counter(pool.pick(None, (), NOW) for _ in range(1000))
    # b wins unless both draws are a (a quarter of the time)
    assert 0.20 <= counts[a] / 1000 <= 0.30, counts


def test_one_target_is_always_the_one():
    pool = build_pools(compile_config(loads(
        "listeners: [{port: 8080}]\napis:\n  - name: chat\n    path: /\n    assembly:\n"
        "      - policy: websocket-upgrade\n        target-url: ws://10.0.0.1:9000/\n",
        "yaml", "gw.yaml")))["chat"]
    (t,) = pool.targets
    assert t.label == "ws://10.0.0.1:9000/" and t.weight == 1
    t.healthy = False                         # fail open
    assert pool.pick(None, (), NOW) is t
    assert pool.pick(None, [t], NOW) is None  # tried already
    t.draining = True
    assert pool.pick(None, (), NOW) is None


# ---- states: draining, unhealthy, ejected, tried -----------------------------------------


MODES = ["round-robin", "random", "least-connections", "consistent-hash"]


@pytest.mark.parametrize("balance", MODES)
def test_draining_is_never_picked(balance):
    pool = pool_of(W112, f"balance: {balance}")
    a, b, c = pool.targets
    c.draining = True
    a.healthy = b.healthy = False             # even when the rest are all down
    assert set(hold(pool, 300, key="k")) == {a, b}
    a.draining = b.draining = True
    assert pool.pick("k", (), NOW) is None


@pytest.mark.parametrize("balance", MODES)
def test_unhealthy_and_ejected_are_skipped(balance):
    pool = pool_of(W112, f"balance: {balance}")
    a, b, c = pool.targets
    a.healthy = False
    c.ejected_until = NOW + 1
    assert set(hold(pool, 300, key="k")) == {b}
    assert c.state(NOW) == "ejected" and c.state(NOW + 1) == "healthy"
    assert a.state(NOW) == "unhealthy" and not a.up(NOW)
    assert pool.pick("k", (), NOW + 1) in (b, c)      # the ejection is over


@pytest.mark.parametrize("balance", MODES)
def test_all_down_fails_open(balance):
    pool = pool_of(W112, f"balance: {balance}")
    a, b, c = pool.targets
    a.healthy = b.healthy = False
    c.ejected_until = NOW + 30
    counts = Counter(hold(pool, 3000, key="k"))
    assert set(counts) == {a, b, c}
    if balance != "consistent-hash":
        assert_weight_shares(counts, pool)


@pytest.mark.parametrize("balance", MODES)
def test_tried_targets_are_not_picked_again(balance):
    pool = pool_of(W112, f"balance: {balance}")
    for i in range(50):
        tried: list = []
        while (t := pool.pick(f"key{i}", tried, NOW)) is not None:
            assert t not in tried
            tried.append(t)
        assert sorted(t.url for t in tried) == sorted(t.url for t in pool.targets)


def test_tried_comes_before_health():
    """A retry takes an untried healthy target; once only unhealthy ones are left untried,
    it fails open to them rather than give up."""
    pool = pool_of(W112)
    a, b, c = pool.targets
    a.healthy = False
    first = pool.pick(None, (), NOW)
    second = pool.pick(None, [first], NOW)
    assert {first, second} == {b, c}
    assert pool.pick(None, [b, c], NOW) is a


# ---- consistent-hash --------------------------------------------------------------------


KEYS = [f"client-{i}" for i in range(1000)]


def mapping(pool: Pool, now: float = NOW) -> dict[str, str]:
    return {k: pool.pick(k, (), now).url for k in KEYS}


def test_same_key_same_target():
    pool = pool_of(list(zip(urls(4), (1, 1, 1, 1))), "balance: consistent-hash")
    first = mapping(pool)
    for t in pool.targets:                   # connection counts do not move a key
        t.active = random.randrange(1000)
    assert mapping(pool) == first
    assert mapping(pool_of(list(zip(urls(4), (1, 1, 1, 1))), "balance: consistent-hash")) == first
    assert len(set(first.values())) == 4


def test_removing_one_of_four_moves_only_its_keys():
    four = list(zip(urls(4), (1, 1, 1, 1)))
    before = mapping(pool_of(four, "balance: consistent-hash"))
    removed = four[2][0]
    after = mapping(pool_of(four[:2] + four[3:], "balance: consistent-hash"))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert len(moved) <= 350, len(moved)
    assert {before[k] for k in moved} == {removed}
    assert moved == [k for k in KEYS if before[k] == removed]   # all of its keys, none other


def test_adding_a_fifth_moves_keys_only_to_it():
    four = list(zip(urls(5), (1,) * 5))[:4]
    before = mapping(pool_of(four, "balance: consistent-hash"))
    after = mapping(pool_of(list(zip(urls(5), (1,) * 5)), "balance: consistent-hash"))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert {after[k] for k in moved} == {urls(5)[4]}
    assert len(moved) <= 300, len(moved)


def test_hash_weights():
    pool = pool_of(W112, "balance: consistent-hash")
    counts = Counter(pool.pick(f"k{i}", (), NOW) for i in range(20000))
    assert_weight_shares(counts, pool, 0.15)


def test_large_weights_build_at_once_and_hold():
    """No table is built: 10 targets of weight 1,000 cost nothing at a reload."""
    t0 = time.perf_counter()
    pool = pool_of(list(zip(urls(10), (1000,) * 9 + (500,))), "balance: consistent-hash")
    assert time.perf_counter() - t0 < 0.5
    counts = Counter(pool.pick(f"k{i}", (), NOW) for i in range(20000))
    assert_weight_shares(counts, pool, 0.15)


def test_the_mapping_is_the_same_in_every_process():
    """Workers, gateway nodes and restarts agree: no per-process hash seed."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_pool as tp\n"
            "p = tp.pool_of(list(zip(tp.urls(4), (1, 1, 1, 1))), 'balance: consistent-hash')\n"
            "print(','.join(p.pick(k, (), 0.0).url[-7:-6] for k in tp.KEYS[:200]))")
    here = str(Path(__file__).parent)
    runs = {subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60).stdout
            for seed in ("1", "2", "random")}
    pool = pool_of(list(zip(urls(4), (1, 1, 1, 1))), "balance: consistent-hash")
    assert runs == {",".join(pool.pick(k, (), 0.0).url[-7:-6] for k in KEYS[:200]) + "\n"}


def test_an_ejected_targets_keys_move_and_come_back():
    pool = pool_of(list(zip(urls(4), (1, 1, 1, 1))),
                   "balance: consistent-hash\noutlier: {failures: 2, eject: 10s}")
    before = mapping(pool)
    t = pool.find(urls(4)[1])
    refused = Refusal(502, "backend unreachable: Connection refused")
    refused.cause, refused.retry = "refused", True
    assert pool.dial_failed(t, refused, NOW) == 0
    assert pool.dial_failed(t, refused, NOW) == 10.0
    during = mapping(pool, NOW + 5)
    moved = {k for k in KEYS if during[k] != before[k]}
    assert moved == {k for k in KEYS if before[k] == t.url} and moved
    assert all(during[k] != t.url for k in KEYS)
    assert mapping(pool, NOW + 10) == before


def test_a_key_falls_to_the_next_untried_target_on_the_ring():
    pool = pool_of(list(zip(urls(4), (1, 1, 1, 1))), "balance: consistent-hash")
    for k in KEYS[:100]:
        first = pool.pick(k, (), NOW)
        second = pool.pick(k, [first], NOW)
        assert second is not first
        assert pool.pick(k, [first], NOW) is second       # the retry is stable too


def test_hash_without_a_key_balances_by_connections():
    pool = pool_of(list(zip(urls(2), (1, 1))), "balance: consistent-hash")
    a, b = pool.targets
    a.active = 3
    assert pool.pick(None, (), NOW) is b


# ---- hash_value -----------------------------------------------------------------------------


class Admission:
    def __init__(self, client_id, client_ip):
        self.client_id, self.client_ip = client_id, client_ip

    @property
    def client_key(self):
        return self.client_id if self.client_id is not None else self.client_ip


HEADERS = [("host", "gw"), ("x-user", "u-42"), ("x-user", "second"), ("x-empty", "")]


@pytest.mark.parametrize(("key", "admission", "query", "expected"), [
    ("client-id", Admission("alice", "10.1.1.1"), "", "alice"),
    ("client-id", Admission(None, "10.1.1.1"), "", "10.1.1.1"),   # anonymous: its address
    ("client-ip", Admission("alice", "10.1.1.1"), "", "10.1.1.1"),
    ("header:x-user", Admission("alice", "10.1.1.1"), "", "u-42"),  # the first of the name
    ("header:X-User", Admission("alice", "10.1.1.1"), "", "u-42"),  # names in any case
    ("header:x-empty", Admission("alice", "10.1.1.1"), "", ""),
    ("header:x-absent", Admission("alice", "10.1.1.1"), "", None),
    ("query:room", Admission("alice", "10.1.1.1"), "a=1&room=r%2F7&room=8", "r/7"),
    ("query:room", Admission("alice", "10.1.1.1"), "room=", ""),
    ("query:room", Admission("alice", "10.1.1.1"), "rooms=1", None),
    (None, Admission("alice", "10.1.1.1"), "room=1", None),         # not consistent-hash
])
def test_hash_value(key, admission, query, expected):
    assert hash_value(key, admission, HEADERS, query) == expected


def test_hash_key_defaults_to_client_id():
    assert pool_of(W112, "balance: consistent-hash").hash_key == "client-id"
    assert pool_of(W112, "balance: consistent-hash\nhash-key: query:room").hash_key == "query:room"
    assert pool_of(W112).hash_key is None


# ---- the outlier detection --------------------------------------------------------------------


def failed(cause: str, retry: bool = True, status: int = 502) -> Refusal:
    r = Refusal(status, f"backend failed: {cause}")
    r.cause, r.retry = cause, retry
    return r


def fail(pool: Pool, t, n: int, now: float, cause: str = "refused") -> list[float]:
    return [pool.dial_failed(t, failed(cause), now) for _ in range(n)]


def test_ejection_after_failures_in_a_row_doubles_up_to_max():
    pool = pool_of(W112, "outlier: {failures: 3, eject: 10s}")
    t = pool.targets[0]
    now = NOW
    lengths = []
    for _ in range(8):
        got = fail(pool, t, 3, now)
        assert got[:2] == [0.0, 0.0]
        lengths.append(got[2])
        assert t.ejected_until == now + got[2] and t.state(now) == "ejected"
        now = t.ejected_until                  # back: and it keeps failing
    assert lengths == [10, 20, 40, 80, 160, MAX_EJECTION, MAX_EJECTION, MAX_EJECTION]
    assert t.dial_failures == {"refused": 24}
    pool.dial_ok(t, now)                       # once it answers, ejections start again
    assert fail(pool, t, 3, now)[-1] == 10


def test_a_success_breaks_the_row():
    pool = pool_of(W112, "outlier: {failures: 3, eject: 10s}")
    t = pool.targets[0]
    assert fail(pool, t, 2, NOW) == [0, 0]
    pool.dial_ok(t, NOW)
    assert fail(pool, t, 2, NOW) == [0, 0]
    assert t.up(NOW)
    assert fail(pool, t, 1, NOW) == [10]


def test_an_ejection_longer_than_the_maximum_is_kept():
    pool = pool_of(W112, "outlier: {failures: 1, eject: 10m}")
    t = pool.targets[0]
    assert fail(pool, t, 1, NOW) == [600]
    assert fail(pool, t, 1, NOW + 600) == [600]


def test_answers_of_the_backend_do_not_eject():
    """A 4xx (retry False) is the backend's answer, not a failure of the instance; a
    time-out is (though not retried)."""
    pool = pool_of(W112, "outlier: {failures: 2, eject: 10s}")
    t = pool.targets[0]
    for _ in range(5):
        assert pool.dial_failed(t, failed("status", retry=False), NOW) == 0
    assert t.up(NOW) and t.dial_failures == {"status": 5}
    assert pool.dial_failed(t, failed("timeout", retry=False, status=504), NOW) == 0
    assert pool.dial_failed(t, failed("status"), NOW) == 10     # a 5xx answer
    assert t.dial_failures == {"status": 6, "timeout": 1}


def test_without_outlier_failures_only_count():
    pool = pool_of(W112)
    t = pool.targets[0]
    assert fail(pool, t, 50, NOW, "reset") == [0] * 50
    assert t.up(NOW) and t.dial_failures == {"reset": 50}


def test_failures_while_ejected_do_not_extend_it():
    pool = pool_of(W112, "outlier: {failures: 2, eject: 10s}")
    t = pool.targets[0]
    assert fail(pool, t, 2, NOW) == [0, 10]
    assert fail(pool, t, 5, NOW + 1) == [0] * 5         # fail-open dials, dials under way
    assert t.ejected_until == NOW + 10


# ---- reloads ----------------------------------------------------------------------------------


def test_build_pools_keeps_states_across_a_reload():
    old = build_pools(router_of(W112))
    a, b, c = old["chat"].targets
    a.active, a.draining, a.healthy = 7, True, False
    b.dial_failures["refused"] = 3
    new_targets = [(W112[0][0], 5), (W112[1][0], 1), ("ws://10.0.0.9:9000/", 1)]
    new = build_pools(router_of(new_targets, "balance: round-robin"), old)["chat"]
    a2, b2, d = new.targets
    assert a2 is a and b2 is b
    assert (a.weight, a.active, a.draining, a.healthy) == (5, 7, True, False)
    assert b.dial_failures == {"refused": 3} and b.weight == 1
    assert d is not c and d.url == "ws://10.0.0.9:9000/" and d.active == 0
    assert new.find(W112[2][0]) is None and new.find(d.label) is d
    assert new.balance == "round-robin"
    assert a.endpoint.host == "10.0.0.1" and a2.endpoint is new.upgrade.targets[0].endpoint


def test_a_state_belongs_to_its_api():
    text = config_yaml(W112) + config_yaml(W112, api="other").split("apis:\n", 1)[1].replace(
        "path: /", "path: /other")
    pools = build_pools(compile_config(loads(text, "yaml", "gw.yaml")))
    assert set(pools) == {"chat", "other"}
    again = build_pools(compile_config(loads(text, "yaml", "gw.yaml")), pools)
    for name in ("chat", "other"):
        assert [id(t) for t in again[name].targets] == [id(t) for t in pools[name].targets]
    assert not set(map(id, pools["chat"].targets)) & set(map(id, pools["other"].targets))


def test_find_by_url_or_label():
    pool = pool_of([("ws://10.0.0.1:9000/?token=s3cret", 1), ("ws://10.0.0.2:9000/", 1)])
    t = pool.targets[0]
    assert t.label == "ws://10.0.0.1:9000/"            # no query: no secret in a metric
    assert pool.find("ws://10.0.0.1:9000/?token=s3cret") is t
    assert pool.find("ws://10.0.0.1:9000/") is t
    assert pool.find("ws://10.0.0.3:9000/") is None
    d = t.describe(NOW)
    assert d["target"] == "ws://10.0.0.1:9000/" and "s3cret" not in repr(d)
