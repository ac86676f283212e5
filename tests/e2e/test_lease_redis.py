"""The lease protocol (fastgw.cluster.lease: lease.lua + LeaseBook) against a real redis-server:
simulated nodes (LeaseBooks) renewing in random interleavings — calls run late and out of order,
replies lost or late, nodes dying, leases of 300 ms expiring, Redis restarted empty — and after
every step the sum of what the live nodes apply is checked against the limit."""

from __future__ import annotations

import random
import time

import pytest
import redis

from fastgw.cluster.lease import SCRIPT, LeaseBook, hash_key
from redislib import RedisServer

LEASE = 0.3
KEY = "client:7"


@pytest.fixture(scope="module")
def shared_redis():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server(shared_redis):
    """One server for the module (a fresh one learns for a second), emptied for each test."""
    if shared_redis.proc is None:
        shared_redis.start()
    redis.Redis(port=shared_redis.port).flushall()
    return shared_redis


class Node:
    def __init__(self, name: str, lease: float = LEASE, hold: bool = False):
        self.book = LeaseBook(name, lease, hold=hold)
        self.alive = True
        self.used = 0                                   # counts: connections in use
        self.tokens = 0.0                               # buckets: this node's bucket
        self.rate = 0.0                                 # the rate it refilled at since `last`
        self.last: float | None = None

    def settle(self, now: float) -> None:
        """Refill the node's bucket to `now` (at the lower of its rates since the last settle),
        clamped to the burst in force."""
        rate, burst = self.book.bucket_share(KEY, now)
        if self.last is not None:
            self.tokens += (now - self.last) * min(rate, self.rate)
        self.tokens = min(self.tokens, burst)
        self.last, self.rate = now, rate


class Sim:
    """Nodes, one key, the calls in flight (sent, not run) and the replies not yet delivered."""

    def __init__(self, server: RedisServer, kind: str, limit: float, burst: float = 0.0,
                 hold: bool = False):
        self.server, self.kind, self.limit, self.burst, self.hold = server, kind, limit, burst, hold
        self.client = redis.Redis(port=server.port, socket_timeout=2)
        self.script = self.client.register_script(SCRIPT)
        self.nodes: list[Node] = []
        self.inflight: list[tuple[Node, object]] = []
        self.replies: list[tuple[Node, object, object]] = []
        self.checks = 0
        self.peak = 0.0
        self.admitted: list[tuple[float, float]] = []  # buckets: (when, tokens) over all nodes

    def add(self, name: str) -> Node:
        node = Node(name, hold=self.hold)
        self.want(node, 0)
        self.nodes.append(node)
        return node

    def want(self, node: Node, demand: float, used: int | None = None) -> None:
        """Declare the key (the book forgets an idle one) and the node's demand."""
        if self.kind == "count":
            node.book.count(KEY, int(self.limit))
        else:
            node.book.bucket(KEY, self.limit, self.burst)
        if used is not None:
            node.used = used
        node.book.want(KEY, demand, used=node.used)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def run(self, call):
        for _ in range(3):                              # a restart drops the old connection
            try:
                return self.script(keys=call.keys, args=call.args)
            except redis.ConnectionError:
                continue
        raise AssertionError("redis unreachable")

    def send(self, node: Node, keys=None) -> None:
        for call in node.book.requests(time.monotonic(), keys):
            self.inflight.append((node, call))

    def deliver(self, node: Node, call, result, at_once: bool = False) -> None:
        if not node.alive:
            return
        node.settle(time.monotonic())
        fell = node.book.apply([call], [result])
        node.tokens += node.book.take_credit(KEY)      # a growth adds only its credit
        before = node.tokens
        now = time.monotonic()
        node.settle(now)                                # a shrink clamps: give it back (N5)
        node.book.give_back(KEY, before - node.tokens, now)
        if fell:
            if at_once:                                 # released: tell Redis at once
                for again in node.book.requests(time.monotonic(), [KEY]):
                    self.deliver(node, again, self.run(again))
            else:
                self.send(node, [KEY])

    def refresh(self, nodes=None) -> None:
        """One clean refresh: every node's call runs and its reply is applied, in turn."""
        for node in nodes or self.live():
            for call in node.book.requests(time.monotonic()):
                self.deliver(node, call, self.run(call), at_once=True)
            self.check()

    def spend(self, node: Node, cost: float) -> None:
        """A node admits `cost` tokens if its bucket has them; then no window of any length W
        has admitted more than burst + rate * W over all nodes."""
        now = time.monotonic()
        node.settle(now)
        if cost <= 0 or node.tokens < cost:
            return
        node.tokens -= cost
        self.admitted.append((now, cost))
        total = 0.0
        for when, n in reversed(self.admitted):
            total += n
            assert total <= self.burst + self.limit * (now - when) + 1e-6, (total, now - when)

    def applied(self, node: Node, now: float) -> float:
        book = node.book
        if self.kind == "count":
            if not book.valid(KEY, now) and not self.hold:
                node.used = 0                           # lease over: the node sheds (exact mode)
            return book.applied(KEY, now)
        return book.share(KEY, now)

    def check(self) -> float:
        now = time.monotonic()
        total = sum(self.applied(n, now) for n in self.live())
        assert total <= self.limit * (1 + 1e-12), (total, self.limit, self.state())
        if self.kind == "bucket":
            for n in self.live():
                n.settle(now)
            bursts = sum(n.book.bucket_share(KEY, now)[1] for n in self.live())
            assert bursts <= self.burst * (1 + 1e-9)
        self.checks += 1
        self.peak = max(self.peak, total)
        return total

    def state(self):
        now = time.monotonic()
        return ([(n.book.member, n.alive, n.book.share(KEY, now), n.used) for n in self.nodes],
                self.client.hgetall(f"fgw:{{{KEY}}}"))

    def wait_learning_over(self) -> None:
        """A fresh server learns for one lease after it starts (uptime in whole seconds)."""
        probe = LeaseBook("probe", LEASE)
        probe.count("probe", 1)
        probe.want("probe", 1)
        deadline = time.monotonic() + 5
        while True:
            (call,) = probe.requests(time.monotonic())
            if int(self.run(call)[2]) == 0:
                return
            assert time.monotonic() < deadline, "still learning"
            time.sleep(0.05)

    def step(self, rng: random.Random, restarts: list[int]) -> None:
        live = self.live()
        x = rng.random()
        if x < 0.25:
            self.send(rng.choice(live))
        elif x < 0.50 and self.inflight:                # run a call, in any order (late ones too)
            node, call = self.inflight.pop(rng.randrange(len(self.inflight)))
            self.replies.append((node, call, self.run(call)))
        elif x < 0.75 and self.replies:                 # deliver a reply, in any order
            self.deliver(*self.replies.pop(rng.randrange(len(self.replies))))
        elif x < 0.80:                                  # lose a call or a reply
            pool = rng.choice([self.inflight, self.replies])
            if pool:
                pool.pop(rng.randrange(len(pool)))
        elif x < 0.95:                                  # demand and use move
            node = rng.choice(live)
            share = node.book.share(KEY, time.monotonic())
            if self.kind == "count":
                if rng.random() < 0.5 and node.used < share:
                    node.used += 1                      # admitted within its share
                elif node.used and rng.random() < 0.5:
                    node.used -= 1
                self.want(node, rng.randint(0, int(self.limit)))
            else:
                self.want(node, rng.uniform(0, self.limit))
        elif x < 0.965:
            time.sleep(rng.uniform(0, 0.2))             # leases expire
        elif x < 0.975 and len(live) > 1:
            rng.choice(live).alive = False              # dies: stops renewing, applies nothing
        elif x < 0.985 and len(self.nodes) < 8:
            self.add(f"n{len(self.nodes)}")
        elif x < 0.987 and restarts:
            restarts.pop()
            self.server.stop()
            self.server.start()                         # empty: the nodes' shares are unknown
        if self.kind == "bucket":                       # demand above the limit: spend it all
            for node in live:
                if node.alive and rng.random() < 0.5:
                    node.settle(time.monotonic())
                    self.spend(node, node.tokens)
        self.check()


@pytest.mark.parametrize("kind,seed", [("count", 1), ("count", 2), ("bucket", 3), ("bucket", 4)])
def test_random_interleavings_never_exceed_the_limit(redis_server, kind, seed):
    rng = random.Random(seed)
    sim = Sim(redis_server, kind, 10 if kind == "count" else 1000.0, burst=100.0)
    sim.wait_learning_over()
    for i in range(4):
        sim.add(f"n{i}")
    restarts = [1]
    for _ in range(1500):
        sim.step(rng, restarts)
    assert sim.checks >= 1500 and sim.peak > 0
    if kind == "bucket":                                # it did admit, near the limit
        spent = sum(n for _, n in sim.admitted)
        span = sim.admitted[-1][0] - sim.admitted[0][0]
        assert spent > 0.1 * (sim.burst + sim.limit * span), (spent, span)
    # Liveness: the in-flight calls gone and every live node wanting everything, the limit is
    # handed out whole (what the dead held has come back), within a lease + learning.
    sim.inflight.clear()
    sim.replies.clear()
    for node in sim.live():
        sim.want(node, sim.limit)
    deadline = time.monotonic() + 3
    while True:
        sim.refresh()
        total = sim.check()
        if total >= sim.limit * (1 - 1e-9) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert total == pytest.approx(sim.limit), sim.state()


@pytest.mark.parametrize("kind", ["count", "bucket"])
def test_steady_demand_converges_to_the_fair_share_in_two_refreshes(redis_server, kind):
    limit = 10 if kind == "count" else 1000.0
    sim = Sim(redis_server, kind, limit, burst=100.0)
    sim.wait_learning_over()
    nodes = [sim.add(f"n{i}") for i in range(3)]
    sim.want(nodes[0], limit)                      # n0 first takes it all
    sim.refresh()
    assert nodes[0].book.share(KEY, time.monotonic()) == limit
    demands = [2, 5, 9] if kind == "count" else [100.0, 300.0, 1000.0]
    fair = [2, 4, 4] if kind == "count" else [100.0, 300.0, 600.0]
    rng = random.Random(5)
    for node, d in zip(nodes, demands):
        sim.want(node, d)
    order = nodes[:]
    sim.refresh(order)                                  # the demands are reported
    for _ in range(2):                                  # then two refreshes, in any node order
        rng.shuffle(order)
        sim.refresh(order)
    now = time.monotonic()
    assert [n.book.share(KEY, now) for n in nodes] == pytest.approx(fair)
    if kind == "bucket":
        assert nodes[2].book.bucket_share(KEY, now)[1] == pytest.approx(60.0)


def test_dead_nodes_slots_return_after_the_lease(redis_server):
    sim = Sim(redis_server, "count", 10)
    sim.wait_learning_over()
    a, b, c = (sim.add(n) for n in "abc")
    sim.want(a, 5)
    sim.refresh([a])
    sim.want(a, 5, used=5)
    for node in (b, c):
        sim.want(node, 10)
    sim.refresh()
    sim.refresh()
    now = time.monotonic()
    assert a.book.share(KEY, now) == 5 and b.book.share(KEY, now) + c.book.share(KEY, now) == 5
    a.alive = False                                     # SIGKILL: its connections are gone too
    died = time.monotonic()
    while time.monotonic() - died < LEASE * 0.9:        # its reservation holds for the lease
        sim.refresh()
        assert b.book.share(KEY, time.monotonic()) + c.book.share(KEY, time.monotonic()) <= 5
        time.sleep(0.02)
    deadline = died + LEASE + 1.0
    while b.book.share(KEY, time.monotonic()) + c.book.share(KEY, time.monotonic()) < 10:
        assert time.monotonic() < deadline, sim.state()
        sim.refresh()
        time.sleep(0.02)
    assert b.book.share(KEY, time.monotonic()) == 5 == c.book.share(KEY, time.monotonic())


def test_redis_down_then_restarted_empty_with_hold(redis_server):
    """on-unreachable: hold. Redis is gone for everyone: the nodes keep their last shares past
    the lease; it comes back empty: they re-assert them, a newcomer gets nothing while the key
    learns, and the shares converge once it is over; the sum never exceeds the limit."""
    sim = Sim(redis_server, "count", 10, hold=True)
    sim.wait_learning_over()
    a, b = sim.add("a"), sim.add("b")
    for node in (a, b):
        sim.want(node, 10)
    sim.refresh()
    sim.refresh()
    assert [n.book.share(KEY, time.monotonic()) for n in (a, b)] == [5, 5]
    redis_server.stop()
    time.sleep(LEASE * 1.5)                             # the leases run out while Redis is down
    assert sim.check() == 10                            # held
    redis_server.start()
    c = sim.add("c")
    sim.want(c, 10)
    sim.refresh([c, a, b])
    now = time.monotonic()
    shares = [n.book.share(KEY, now) for n in (a, b, c)]
    assert shares[2] == 0 and 0 < shares[0] <= 5 and 0 < shares[1] <= 5   # re-asserted, no growth
    assert all(n.book.keys[KEY].learning for n in (a, b, c))
    deadline = time.monotonic() + 3
    while c.book.share(KEY, time.monotonic()) == 0 or sim.check() < 10:
        assert time.monotonic() < deadline, sim.state()
        sim.refresh()
        time.sleep(0.05)
    sim.refresh()
    sim.refresh()
    now = time.monotonic()
    assert sorted(n.book.share(KEY, now) for n in (a, b, c)) == [3, 3, 4]


def test_a_call_run_after_a_newer_one_changes_nothing(redis_server):
    """A stale call (its connection slow, a retry) must not lower the reservation that a newer
    call made and the node applies."""
    sim = Sim(redis_server, "count", 10)
    sim.wait_learning_over()
    a, b = sim.add("a"), sim.add("b")
    sim.want(a, 1)
    (old,) = a.book.requests(time.monotonic())
    sim.want(a, 10)
    (new,) = a.book.requests(time.monotonic())
    sim.deliver(a, new, sim.run(new))
    assert a.book.share(KEY, time.monotonic()) == 10
    assert int(sim.run(old)[3]) == 1                    # stale at Redis
    sim.want(b, 10)
    sim.refresh([b])
    assert b.book.share(KEY, time.monotonic()) == 0


def test_a_late_reply_is_valid_from_its_call_not_from_its_arrival(redis_server):
    sim = Sim(redis_server, "count", 10)
    sim.wait_learning_over()
    a, b = sim.add("a"), sim.add("b")
    sim.want(a, 5)
    (call,) = a.book.requests(time.monotonic())
    result = sim.run(call)
    time.sleep(LEASE * 0.6)                             # the reply is late
    sim.deliver(a, call, result)
    assert a.book.share(KEY, time.monotonic()) == 5
    sim.want(b, 10)
    deadline = time.monotonic() + 2
    while b.book.share(KEY, time.monotonic()) < 10:     # a's entry expires: b gets it all
        assert time.monotonic() < deadline
        sim.refresh([b])
        time.sleep(0.01)
    assert a.book.share(KEY, time.monotonic()) == 0     # and a no longer applies its 5


def test_a_count_grant_never_drops_below_the_connections_in_use(redis_server):
    sim = Sim(redis_server, "count", 10)
    sim.wait_learning_over()
    a, b = sim.add("a"), sim.add("b")
    sim.want(a, 10)
    sim.refresh([a])
    sim.want(a, 10, used=8)                             # a holds 8 open connections
    sim.want(b, 10)
    for _ in range(3):
        sim.refresh([b, a])
    now = time.monotonic()
    assert a.book.share(KEY, now) == 8 and b.book.share(KEY, now) == 2
    sim.want(a, 10, used=3)                             # five of them closed
    sim.refresh([a, b])
    sim.refresh([a, b])
    now = time.monotonic()
    assert a.book.share(KEY, now) == 5 == b.book.share(KEY, now)


def test_bucket_growth_adds_only_the_unreserved_pools_tokens(redis_server):
    """A fresh key's bucket is full: its first node gets the whole burst with its share. A share
    moved to another node brings the tokens the first one's clamp gave back, and what the pool
    refilled since (unreserved rate), no more."""
    sim = Sim(redis_server, "bucket", 1000.0, burst=100.0)
    sim.wait_learning_over()
    a, b = sim.add("a"), sim.add("b")
    sim.want(a, 1000.0)
    sim.refresh([a])
    assert a.book.bucket_share(KEY, time.monotonic()) == (1000.0, 100.0)
    assert a.tokens == pytest.approx(100.0)
    sim.want(b, 1000.0)
    start = time.monotonic()
    got = []
    for _ in range(3):
        for node in (a, b):
            before = node.tokens
            sim.refresh([node])
            got.append(node.tokens - before)
    elapsed = time.monotonic() - start
    now = time.monotonic()
    assert [n.book.share(KEY, now) for n in (a, b)] == [500.0, 500.0]
    assert a.tokens <= 50.0 + 1e-9                      # clamped to its new burst
    # b's tokens: credits from the pool, which holds what a's clamp gave back (its 50 spare
    # tokens, N5) and refills at most at the unreserved rate: as one bucket, nothing is lost.
    assert 50.0 - 1e-6 <= b.tokens <= 50.0 + 1000.0 * elapsed + 1e-6
    assert a.tokens + b.tokens <= 100.0 + 1000.0 * elapsed


def test_a_fresh_server_learns_for_a_whole_lease_though_its_uptime_says_1_early():
    """INFO's uptime is whole seconds of wall clock: a server 50 ms old may say 1. A key's first
    call coming only then must still make it learn until a whole lease after the start (no
    growth for what holders may still use), whenever the next call comes."""
    lease = 1.5
    probe = LeaseBook("probe", lease)
    probe.count("fresh", 1)
    probe.want("fresh", 1)
    with RedisServer() as server:
        client = redis.Redis(port=server.port, socket_timeout=2)
        sec, usec = client.time()
        ready = sec * 1000 + usec // 1000               # server ms, after its start
        while client.info("server")["uptime_in_seconds"] < 1:
            time.sleep(0.005)
        (call,) = probe.requests(time.monotonic())
        reply = client.register_script(SCRIPT)(keys=call.keys, args=call.args)
        learn = int(client.hget(hash_key("fresh"), "_learn") or 0)
        sec, usec = client.time()
        now = sec * 1000 + usec // 1000
    print(f"uptime said 1 {now - ready} ms after the server was up; learning until "
          f"{learn - ready} ms after (lease {lease * 1000:.0f} ms)")
    assert int(reply[2]) == 1
    assert learn >= ready + lease * 1000


def test_bucket_pool_is_empty_while_learning(redis_server):
    sim = Sim(redis_server, "bucket", 1000.0, burst=100.0)
    sim.wait_learning_over()
    redis_server.stop()
    redis_server.start()                                # empty, and learning
    a = sim.add("a")
    sim.want(a, 1000.0)
    sim.refresh([a])
    assert a.book.keys[KEY].learning and a.book.share(KEY, time.monotonic()) == 0.0
    deadline = time.monotonic() + 3
    while a.book.share(KEY, time.monotonic()) == 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        sim.refresh([a])
    pool, stamp = sim.client.hget(f"fgw:{{{KEY}}}", "_pool").split()
    # the grant after learning came with no credit: the pool only starts refilling then
    assert a.tokens < 1000.0 * 0.06 and float(pool) == 0.0
