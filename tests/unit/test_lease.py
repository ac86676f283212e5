"""LeaseBook, the node's pure half of the lease protocol (fastgw.cluster.lease): what it asks,
which replies it applies (only the latest call's), how long a grant holds, what it reports."""

from __future__ import annotations

import pytest

from fastgw.cluster import lease
from fastgw.cluster.lease import LeaseBook, hash_key


def reply(grant, learning=0, status=0, expires=0, credit=0):
    """A script reply as redis-py gives it (bytes for the strings, ints)."""
    return [str(grant).encode(), expires, learning, status, str(credit).encode()]


def book(**kw) -> LeaseBook:
    b = LeaseBook("edge-a", 5.0, incarnation="i1", **kw)
    b.count("client:1", 10)
    b.want("client:1", 4, used=2)
    return b


def test_script_is_package_data():
    assert "redis.call('TIME')" in lease.SCRIPT and "HGETALL" in lease.SCRIPT


def test_requests_carry_the_report_and_a_rising_seq():
    b = book()
    (c1,) = b.requests(100.0)
    keys, args = c1                                     # as a Store unpacks it
    assert keys == [hash_key("client:1")] == ["fgw:{client:1}"]
    assert args == ["edge-a#i1", 1, 10, 1, 4, 2, 2, 5000, 0]   # demand 4, applied = used 2
    (c2,) = b.requests(100.1)
    assert c2.seq == 2 and c2.args[1] == 2


def test_demand_never_below_used_and_bucket_args():
    b = LeaseBook("n", 0.3, incarnation="x")
    b.count("c", 10)
    b.want("c", 1, used=3)
    b.bucket("r", 100.0, 20.0)
    b.want("r", 40.5)
    c, r = b.requests(1.0)                              # key order: "c", "r"
    assert c.args[4] == 3
    assert r.args[2:] == ["100.0", 0, "40.5", "0.0", 0, 300, "20.0", "0.0"]


def test_tokens_given_back_ride_the_next_bucket_call_only():
    b = LeaseBook("n", 0.3, incarnation="x")
    b.count("c", 10)
    b.want("c", 1)
    b.bucket("r", 100.0, 20.0)
    b.want("r", 10.0)
    calls = b.requests(1.0)
    b.apply(calls, [reply(1), reply("50.0")])           # valid until 1.0 + 0.3 * 0.99
    b.give_back("c", 5.0, 1.1)                          # a count has no tokens: ignored
    b.give_back("r", 2.5, 1.1)
    b.give_back("r", 1.0, 1.2)
    b.give_back("r", -3.0, 1.2)                         # nothing to give: ignored
    b.give_back("r", 4.0, 1.3)                          # past the lease: void already
    c, r = b.requests(1.25)
    assert len(c.args) == 9 and r.args[-1] == "3.5"
    (again,) = b.requests(1.26, ["r"])                  # once: a lost call loses them
    assert again.args[-1] == "0.0"


def test_apply_latest_only_and_validity_from_the_send():
    b = book()
    (old,) = b.requests(100.0)
    (new,) = b.requests(101.0)
    assert b.apply([old], [reply(9)]) == []            # superseded by `new`: dropped (N1)
    assert b.share("client:1", 101.5) == 0
    b.apply([new], [reply(6)])
    assert b.share("client:1", 101.5) == 6
    assert b.share("client:1", 101.0 + 5.0 * 0.99 - 1e-6) == 6
    assert b.share("client:1", 101.0 + 5.0 * 0.99) == 0   # valid from the send, lease * (1 - drift)
    assert b.applied("client:1", 200.0) == 2              # counts: connections in use stay
    assert b.apply([new], [reply(8)]) == [] and b.share("client:1", 102) == 6   # applied once


def test_lost_failed_and_stale_replies_change_nothing():
    b = book()
    (c,) = b.requests(10.0)
    b.apply([c], [reply(5)])
    for result in (ConnectionError("gone"), TimeoutError(), None, reply(9, status=1)):
        (c,) = b.requests(11.0)
        b.apply([c], [result])
        assert b.share("client:1", 11.0) == 5             # keeps what it applied, never more
    (c,) = b.requests(12.0)
    b.apply([], [])                                       # the reply never comes
    assert b.share("client:1", 14.9) == 5 and b.share("client:1", 15.0) == 0


def test_hold_keeps_the_last_grant_past_the_lease():
    b = book(hold=True)
    (c,) = b.requests(10.0)
    b.apply([c], [reply(5)])
    assert b.share("client:1", 1000.0) == 5 and not b.valid("client:1", 1000.0)
    assert b.requests(1000.0)[0].args[5] == 5             # and reports it as applied


def test_apply_returns_the_keys_whose_share_fell():
    b = book()
    (c,) = b.requests(1.0)
    assert b.apply([c], [reply(7, learning=1)]) == []
    assert b.keys["client:1"].learning
    (c,) = b.requests(2.0)
    assert b.apply([c], [reply(3)]) == ["client:1"]


def test_bucket_share_scales_the_burst():
    b = LeaseBook("n", 1.0)
    b.bucket("k", 100.0, 20.0)
    b.want("k", 50)
    (c,) = b.requests(0.0)
    b.apply([c], [reply("25.5", credit="5.1")])
    assert b.bucket_share("k", 0.5) == (25.5, pytest.approx(5.1))
    assert b.take_credit("k") == 5.1 and b.take_credit("k") == 0.0
    assert b.bucket_share("k", 2.0) == (0.0, 0.0)


def test_idle_keys_are_forgotten():
    b = book()
    b.want("client:1", 0, used=0)
    assert b.requests(1.0) == [] and "client:1" not in b.keys
    b.count("k", 3)
    b.want("k", 1)
    (c,) = b.requests(1.0)
    b.apply([c], [reply(1)])
    b.want("k", 0)
    (c,) = b.requests(2.0)                                # still holds 1: renews to give it back
    assert c.args[5] == 1                                 # applied 1: Redis keeps 1 reserved
    b.apply([c], [reply(0)])
    (c,) = b.requests(3.0)                                # applied 0: Redis frees it
    assert c.args[5] == 0
    b.apply([c], [reply(0)])
    assert b.requests(4.0) == [] and "k" not in b.keys    # nothing reserved: forgotten


def test_members_are_incarnations():
    assert LeaseBook("a", 1).member != LeaseBook("a", 1).member
    with pytest.raises(ValueError):
        LeaseBook("a", 0)
