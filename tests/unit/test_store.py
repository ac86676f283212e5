"""The store's pure parts: the circuit breaker (synthetic time), scripts, configuration."""

from __future__ import annotations

import hashlib

import pytest

from fastgw.cluster.store import Breaker, Script, Store


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_for_a_doubling_backoff_then_lets_one_probe_through():
    clock = Clock()
    b = Breaker(0.1, 2.0, clock)
    assert b.allow() and b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 0.099
    assert not b.allow()
    clock.now += 0.002
    assert b.allow() and b.state == "probing"
    assert not b.allow(), "a single probe at a time"
    b.failure()                                   # the probe failed: 0.2 s now
    clock.now += 0.19
    assert not b.allow()
    clock.now += 0.02
    assert b.allow()
    openings = []
    for _ in range(8):
        b.failure()
        openings.append(round(b.open_until - clock.now, 3))
        clock.now = b.open_until
        assert b.allow()
    assert openings == [0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0, 2.0]
    b.success()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.open_until - clock.now == pytest.approx(0.1), "a success resets the back-off"


def test_an_abandoned_probe_lets_the_next_call_probe():
    clock = Clock()
    b = Breaker(0.1, 2.0, clock)
    b.failure()
    clock.now += 0.2
    assert b.allow()
    b.abandon()
    assert b.allow() and b.state == "probing"
    b2 = Breaker(0.1, 2.0, clock)
    b2.abandon()
    assert b2.state == "closed"


def test_a_script_is_known_by_its_sha1():
    text = "return 1"
    assert Script(text).sha == hashlib.sha1(b"return 1").hexdigest()


async def test_from_config_checks_its_arguments():
    with pytest.raises(ValueError):
        Store.from_config()
    with pytest.raises(ValueError):
        Store.from_config(url="redis://127.0.0.1:1/0", cluster_nodes=["redis://127.0.0.1:2"])
    with pytest.raises(ValueError):
        Store.from_config(cluster_nodes=["redis://127.0.0.1:2", "rediss://127.0.0.1:3"])
    with pytest.raises(ValueError):
        Store.from_config(cluster_nodes=["http://127.0.0.1:2"])
    store = Store.from_config(url="redis://127.0.0.1:1/0", timeout=0.02)
    assert store.timeout == 0.02 and not store.is_cluster
    assert store.script("return 1") is store.script("return 1")
    assert (store.breaker.first, store.breaker.longest) == (0.1, 2.0)
    await store.close()
    store = Store.from_config(url="redis://127.0.0.1:1/0", max_backoff=0.5)
    assert (store.breaker.first, store.breaker.longest) == (0.1, 0.5)
    await store.close()
