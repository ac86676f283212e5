"""A gateway process as a member of the cluster: its cluster-wide keys, their leased shares spent
through the core's ClusterStore, and the renewals that keep them (the wiring of fastgw.cluster.lease).

    node = ClusterNode(config.cluster, store, cstore, clock)
    await node.start()                             # the first round, then one every `refresh`
    keys, refusal = await node.prepare(limits)     # an upgrade's shared limits (admission.shared_limits)
    ...                                            # admit() and the relay spend through cstore
    node.release(keys)                             # the connection's end of life

Every process is a member on its own (a worker of `workers: N` too): it spends only its own
shares, so nothing of the cluster is shared between the processes of a node, and a process that
dies loses its shares one lease after its last renewal, as a node does.

What the node does, per key (fastgw.cluster.lease, "What the node must do"):
- Demand. Counts: connections held + attempts refused for the share since the last report +
  upgrades waiting for the renewal + a spare (a quarter, at least one) while no other member
  wants more. Buckets: the rate taken and refused since the last report
  (x HEADROOM, at most the limit); a key idle for longer than two `quick` periods (or four
  mean gaps between its takes) wants only IDLE_FLOOR of the limit while connections use it, so
  that its share goes to the members that want it and the next message still finds a token.
- A key new to the process: the first upgrade that needs it waits for one renewal (all the
  upgrades that need it then share it), at most the store's timeout; a bucket's first demand
  is the whole limit, its measured one is reported a `quick` (refresh / 10) later. An upgrade
  beyond the share of a count waits for the key's next round: at once when the last grant
  was all this process asked for, else a quick after the last one (then it gets its 429).
- Every `quick`, the core's ClusterStore.due() names the keys refused for their share (renewed
  at once: they want more) and the buckets gone idle (renewed at once: their share goes back);
  a count released while another member wants more (or on a key at the cluster's limit) is
  renewed at once too.
- After every round, the shares are pushed into the ClusterStore: counts as slots, buckets as a
  rate and burst whose growth adds only the credit that came with it; the tokens a shrink
  clamps away go back to the pool with the next renewal (LeaseBook.give_back), so the tokens a
  bucket refilled after its client moved to another member reach that member as credit.
- A node that stops (SIGTERM, once its connections are gone; a worker retired by a rolling
  restart) gives its shares back in a last renewal; one killed loses them after `lease`.
- The store unreachable (on-unreachable), once a share's lease ran out without a renewal or a
  new key got no first grant: hold keeps the last share (a new key gets limit / nodes once no
  renewal has been answered for a whole refresh, 503 until then: one time-out is only
  slowness; nodes: the members alive in the registry, nodes.lua, at the last answer); open
  applies the whole limit on this node alone; closed admits nothing (the upgrade gets 503, a
  message is over its limit).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from dataclasses import dataclass
from importlib.resources import files

from fastgw._core import ClusterStore, ShareKind, ShareMode
from fastgw.cluster.lease import BUCKET, COUNT, LeaseBook
from fastgw.cluster.refresh import Refresher, cancel_and_wait
from fastgw.cluster.store import Store, StoreError
from fastgw.observe.metrics import LATENCY_BUCKETS
from fastgw.verdicts import Refusal

log = logging.getLogger("fastgw")

WAIT_ROUNDS = 4            # an upgrade at its share waits this many of the key's rounds at most
HEADROOM = 1.25            # a bucket's demand: the rate it saw, times this
IDLE_FLOOR = 0.01          # the demand of an idle bucket that connections use, of the limit
UNREACHABLE_REASON = "the cluster store is unreachable"
SLOW_REASON = "the cluster store did not answer in time"
NODES_KEY = "fgw:{nodes}"
NODES_SCRIPT: str = files(__package__).joinpath("nodes.lua").read_text(encoding="utf-8")

_EXPIRED = {"hold": ShareMode.SHARE_LEASED, "open": ShareMode.SHARE_LOCAL,
            "closed": ShareMode.SHARE_CLOSED}


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True, eq=False)
class Key:
    """One cluster-wide key this process spends from."""

    zkey: int                  # the table key (the ClusterStore's, the zone's)
    name: str                  # the lease book's and Redis's: the table key in hex
    kind: str                  # COUNT | BUCKET
    policy: str                # the metrics label
    limit: float               # counts: slots; buckets: rate per second
    burst: float               # buckets
    refs: int = 0              # connections (and handshakes) that need it
    asked: float = -math.inf   # when it was last renewed at once for an upgrade
    released: float = -math.inf  # ... to give slots back to a member that wants them
    measured: float = 0.0      # buckets: the demand measured at the last report


class ClusterNode:
    def __init__(self, cfg, store: Store, cstore: ClusterStore, clock):
        self.cfg = cfg
        self.mode = cfg.on_unreachable
        self.expired_mode = _EXPIRED[self.mode]
        self.refresh = float(cfg.refresh)
        self.quick = self.refresh / 10
        self.book = LeaseBook(cfg.node_id or default_node_id(), float(cfg.lease),
                              hold=self.mode == "hold")
        self.store = store
        self.cstore = cstore
        self.clock = clock
        self.refresher = Refresher(self.book, store, self.refresh, now=clock.now)
        self.refresher.before = self._report
        self.refresher.after = self._after
        self.keys: dict[str, Key] = {}
        self._held: dict[int, Key] = {}             # hold(): for the process's life
        self._waiters: dict[str, list[asyncio.Future]] = {}   # for the key's next round
        self._riding: dict[str, list[asyncio.Future]] = {}    # ... for the round under way
        self._delayed: dict[str, object] = {}                 # _later's timers
        self._batch: set[str] = set()
        self._flush_handle = None
        self._tasks: set[asyncio.Task] = set()
        self._tick = None
        self._ticks = 0
        self.members = 1                            # live members, as the registry counted them

    @property
    def member(self) -> str:
        return self.book.member

    # ---- running

    async def start(self) -> None:
        await self._register()                      # the members alive, before any upgrade
        self.refresher.start()
        self._tick = self.clock.call_later(self.quick, self._on_tick)

    async def _register(self, leave: bool = False) -> None:
        """This member in the registry of members (nodes.lua); their number for hold."""
        args = [self.member, self.book.lease_ms] + (["leave"] if leave else [])
        r = self.refresher
        try:
            (n,) = await self.store.run(NODES_SCRIPT, [([NODES_KEY], args)])
        except StoreError as exc:                   # counted by the store
            if not r.down:                          # a node with no key learns of an outage
                r.down, r.down_since = True, self.clock.now()       # from this call alone
                log.warning("cluster: the store did not answer (%s); the shares in force are"
                            " kept", exc)
            return
        if r.down:
            r.down = False
            log.warning("cluster: the store answers again")
        if isinstance(n, int) and not leave:
            self.members = max(1, n)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop renewing; first give every share back (a stopped node's slots are usable on
        the others at once, not one lease later), if the store answers within its timeout."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        await cancel_and_wait(list(self._tasks))
        await self.refresher.stop()                 # no round under way from here on
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        for futures in (*self._waiters.values(), *self._riding.values()):
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        self._riding.clear()
        if not self.refresher.down and self.book.keys:
            self.refresher.before = None            # no demand any more
            for key in self.keys.values():
                if key.name in self.book.keys:
                    used = self.cstore.used(key.zkey) if key.kind == COUNT else 0
                    self.book.want(key.name, used, used)
            try:
                await asyncio.wait_for(self.refresher.renew(),
                                       4 * float(self.cfg.redis.timeout) + 0.1)
            except Exception:                       # the store is gone: the leases expire
                pass
        if not self.refresher.down:
            await self._register(leave=True)
        await self.store.close()

    # ---- an upgrade's keys

    def _ref(self, limit, now: float) -> Key:
        name = f"{limit.key:016x}"
        key = self.keys.get(name)
        if key is None:
            key = self.keys[name] = Key(limit.key, name, limit.kind, limit.policy,
                                        float(limit.limit), float(limit.burst))
            self.cstore.add(limit.key, ShareKind.SHARE_COUNT if limit.kind == COUNT
                            else ShareKind.SHARE_BUCKET, now)
        else:                                       # a plan may change a client's limit
            key.limit, key.burst = float(limit.limit), float(limit.burst)
        key.refs += 1
        self._track(key)
        return key

    def _track(self, key: Key) -> None:
        """The key in the lease book (it forgets keys with nothing; they may come back)."""
        if key.kind == COUNT:
            self.book.count(key.name, int(key.limit))
        else:
            self.book.bucket(key.name, key.limit, key.burst)

    async def prepare(self, limits) -> tuple[list[Key], Refusal | None]:
        """The shared limits of one upgrade (admission.shared_limits): the keys it holds until
        release(), and a Refusal (503) when on-unreachable is closed and a share is out."""
        now = self.clock.now()
        keys = [self._ref(limit, now) for limit in limits]
        # Up to WAIT_ROUNDS rounds (the third and later only while other members hold more
        # than this one's fair share): a slot another member gives back (its spare, a refused
        # upgrade's) reaches Redis a round or two after this process first asked.
        for attempt in range(WAIT_ROUNDS):
            need, later, delay = [], [], 0.0
            for key in keys:
                held = self.book.keys.get(key.name)
                if held is None:                    # forgotten by a renewal while we waited
                    self._track(key)
                    held = self.book.keys[key.name]
                if held.replies == 0 and not held.assumed:
                    if attempt == 0:
                        need.append(key)            # new here: its first grant
                elif key.kind == COUNT and \
                        self.cstore.used(key.zkey) >= self.book.share(key.name, now) < key.limit:
                    # At its share: wait for the next renewal of the key, which asks for
                    # more: at once if the last grant was all this process asked for (the
                    # cluster has room, most likely), else a quick after the last one (other
                    # members hold the rest: an upgrade over the limit waits that long for
                    # its 429).
                    if held.grant >= held.demand or now - key.asked >= self.quick:
                        key.asked = now
                        need.append(key)
                    else:
                        delay = max(delay, key.asked + self.quick - now)
                        self._later(key.name, key.asked + self.quick - now)
                        later.append(key)
            if not need and not later:
                break
            if attempt >= 2 and not any(self.book.keys[k.name].grant < self.book.keys[k.name].demand
                                        for k in later + need):
                break
            try:
                await self._renew_now([k.name for k in need], wait=True,
                                      also=[k.name for k in later], delay=delay)
            except BaseException:                   # the client went away meanwhile
                self.release(keys)
                raise
            now = self.clock.now()
        closed = slow = False
        for key in keys:
            if self._push(key, now) == ShareMode.SHARE_CLOSED:
                closed = True
            held = self.book.keys.get(key.name)
            if held is not None and held.replies == 0 and not held.assumed \
                    and not self.unreachable(now):
                slow = True                         # no first grant, and not unreachable yet
        if slow:
            return keys, Refusal(503, SLOW_REASON, [("Retry-After", "1")], kind="capacity")
        if closed:
            return keys, Refusal(503, UNREACHABLE_REASON, [("Retry-After", "1")], kind="capacity")
        return keys, None

    def hold(self, limit) -> Key:
        """A key the process needs for as long as it runs (limits.max-connections): tracked
        from now on, its first grant asked for at once (not awaited)."""
        key = self._held.get(limit.key)
        if key is None:
            key = self._held[limit.key] = self._ref(limit, self.clock.now())
        else:
            key.limit = float(limit.limit)
            self._track(key)
        self._soon(key.name)
        return key

    def release(self, keys: list[Key]) -> None:
        """A connection (or a refused upgrade) is gone: its keys need it no more."""
        now = self.clock.now()
        for key in keys:
            key.refs -= 1
            if key.kind == COUNT:
                # Another member wants slots, or may (this one's last grant was less than it
                # asked: the key is at the cluster's limit): give the slot back at once.
                held = self.book.keys.get(key.name)
                if held is not None and (held.wanting or held.grant < held.demand) and \
                        self.cstore.used(key.zkey) < self.book.share(key.name, now):
                    self._soon(key.name)

    # ---- renewals at once

    def _pending(self, name: str) -> bool:
        return name in self._batch or name in self.refresher._inflight

    def _soon(self, name: str) -> None:
        self._batch.add(name)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _later(self, name: str, delay: float) -> None:
        """Renew `name` in `delay` s (one timer per key)."""
        if name not in self._delayed:
            self._delayed[name] = self.clock.call_later(max(0.0, delay), self._due_later, name)

    def _due_later(self, name: str) -> None:
        del self._delayed[name]
        self._soon(name)

    async def _renew_now(self, names: list[str], wait: bool, also: list[str] = (),
                         delay: float = 0.0) -> None:
        """Renew `names` now (and wait for it), and wait for the renewal of `also` due in
        `delay` s. A waiter rides the next round that starts after it came (its demand is
        counted in it), never one already under way."""
        loop = asyncio.get_running_loop()
        futures = []
        for name in names:
            self._soon(name)
        if wait:
            for name in (*names, *also):
                fut = loop.create_future()
                self._waiters.setdefault(name, []).append(fut)
                futures.append(fut)
        if futures:
            await asyncio.wait(futures, timeout=delay + float(self.cfg.redis.timeout) + 0.05)

    def _flush(self) -> None:
        self._flush_handle = None
        names, self._batch = self._batch, set()
        for name in names:
            key = self.keys.get(name)
            if key is not None:
                self._track(key)
        self._spawn(self.refresher.renew(names))

    def _on_tick(self) -> None:
        self._tick = self.clock.call_later(self.quick, self._on_tick)
        now = self.clock.now()
        for zkey in self.cstore.due(now, 2 * self.quick):
            key = self.keys.get(f"{zkey:016x}")
            if key is not None:
                self._soon(key.name)
        self._ticks += 1
        if self._ticks % 10 == 0:                   # once a refresh: O(keys)
            self._forget()
            self._spawn(self._register())

    def _forget(self) -> None:
        """Keys no connection needs and the book no longer holds go back to the zone."""
        for name in [n for n, k in self.keys.items() if k.refs <= 0 and n not in self.book.keys]:
            key = self.keys[name]
            if self.cstore.remove(key.zkey):
                del self.keys[name]

    # ---- the refresher's hooks

    def _report(self, names: set[str]) -> None:
        """Before a round: each key's demand, from what the core saw since the last report."""
        now = self.clock.now()
        for name in names:
            key = self.keys.get(name)
            if key is None or name not in self.book.keys:
                continue
            held = self.book.keys[name]
            riders = self._waiters.pop(name, None)
            if riders:
                self._riding.setdefault(name, []).extend(riders)
            if key.kind == COUNT:
                # Held + refused + waiting, and a spare (a quarter, at least one) while
                # connections need the key and no other member wants more: the next upgrade
                # finds a slot without waiting.
                used, refused = self.cstore.report(key.zkey)
                waiting = len(riders or ())
                spare = max(1, used // 4) if key.refs > 0 and not held.wanting else 0
                self.book.want(name, min(key.limit, used + refused + waiting + spare), used)
                continue
            taken, wanted, first, last, takes, gap = self.cstore.report(key.zkey)
            if held.replies == 0 and not held.assumed:
                self.book.want(name, key.limit)     # nothing seen yet: the whole limit, then
                continue                            # the demand measured from the next round
            floor = IDLE_FLOOR * key.limit if key.refs > 0 else 0.0
            demand = 0.0
            if takes and now - last <= max(2 * self.quick, 4 * gap):
                demand = HEADROOM * (taken + wanted) / max(now - first, self.quick)
            key.measured = min(key.limit, max(demand, floor))
            # While no other member wants more, the share is kept (a short window's rate is
            # noisy: a client between two bursts would lose its share); once one does, the
            # measured demand goes (and _after renews at once to say it).
            self.book.want(name, key.measured if held.wanting or key.refs <= 0
                           else max(key.measured, min(held.grant, key.limit)))

    def _after(self, names: set[str], ok: bool) -> None:
        """After a round: the shares in force, the upgrades waiting for them."""
        now = self.clock.now()
        for name in names:
            key = self.keys.get(name)
            held = self.book.keys.get(name)
            if key is not None and held is not None:
                if not ok and held.replies == 0 and not held.assumed and self.mode == "hold" \
                        and self.unreachable(now):
                    nodes = self.nodes_seen()
                    self.book.assume(name, key.limit / nodes if key.kind == BUCKET
                                     else key.limit // nodes)
                self._push(key, now)
                if ok and key.kind == BUCKET and held.replies == 1:
                    self._later(name, self.quick)   # its first demand was the whole limit
                if ok and key.kind == BUCKET and held.wanting and key.measured < held.grant \
                        and now - key.released >= self.quick:
                    key.released = now              # another member wants: give back at once
                    self._soon(name)
                if ok and key.kind == COUNT and held.wanting and now - key.released >= self.quick \
                        and self.cstore.used(key.zkey) < self.book.share(key.name, now):
                    key.released = now              # another member waits: give back the spare
                    self._soon(name)
            for fut in self._riding.pop(name, ()):
                if not fut.done():
                    fut.set_result(None)
            if self._waiters.get(name):             # came during the round: the next one
                self._soon(name)

    def _push(self, key: Key, now: float) -> ShareMode:
        """This process's share of `key` into the ClusterStore; the mode in force."""
        held = self.book.keys.get(key.name)
        valid = held is not None and (self.book.valid(key.name, now) or self.book.hold)
        mode = ShareMode.SHARE_LEASED if valid else self.expired_mode
        if key.kind == COUNT:
            slots = int(self.book.share(key.name, now)) if held is not None else 0
            self.cstore.set_count(key.zkey, max(0, slots), mode)
            return mode
        rate, burst = self.book.bucket_share(key.name, now)
        credit = self.book.take_credit(key.name)
        until = math.inf if self.book.hold else (held.expires if held is not None else -math.inf)
        dropped = self.cstore.set_bucket(key.zkey, rate, burst, credit, now, ShareMode.SHARE_LEASED,
                                         until, self.expired_mode)
        self.book.give_back(key.name, dropped, now)
        return mode

    # ---- observing

    def unreachable(self, now: float) -> bool:
        """No renewal answered for a whole refresh: the store is unreachable (a single
        time-out is only slow)."""
        r = self.refresher
        return r.down and now - r.down_since >= self.refresh

    def nodes_seen(self) -> int:
        """The live members as the registry last counted them, or as the most members any
        key had at its last reply (at least 1)."""
        return max(self.members, *(h.members for h in self.book.keys.values()), 1)

    def shares(self) -> list[dict]:
        now = self.clock.now()
        out = []
        for key in self.keys.values():
            held = self.book.keys.get(key.name)
            share = self.book.share(key.name, now) if held is not None else 0
            out.append({"policy": key.policy, "kind": key.kind, "limit": key.limit,
                        "share": share, "used": self.cstore.used(key.zkey) if key.kind == COUNT else None,
                        "valid": self.book.valid(key.name, now)})
        return out

    def sample(self) -> dict:
        """The metrics' sample (fastgw.observe.metrics.process_sample's `cluster`)."""
        now = self.clock.now()
        shares: dict[str, float] = {}
        for key in self.keys.values():
            share = self.book.share(key.name, now) if key.name in self.book.keys else 0
            shares[key.policy] = shares.get(key.policy, 0) + share
        errors = dict(self.store.errors)
        errors["refused"] = self.store.refused
        buckets, total = self.store.latency.cumulative([b * 1e6 for b in LATENCY_BUCKETS])
        return {"errors": errors, "renewals": self.refresher.renewals, "shares": shares,
                "redis": {"buckets": buckets, "sum": total,
                          "count": self.store.latency.total_count}}

    def status(self) -> dict:
        r = self.refresher
        return {"member": self.member, "down": r.down, "rounds": r.rounds, "failed": r.failed,
                "renewals": r.renewals, "keys": len(self.keys), "nodes": self.nodes_seen(),
                "errors": {**self.store.errors, "refused": self.store.refused},
                "shares": self.shares()}


def start_cluster(config, cstore: ClusterStore, clock) -> ClusterNode:
    """The ClusterNode of a gateway process with a `cluster` section."""
    cl = config.cluster
    r = cl.redis
    ctx = None
    if r.tls_profile is not None:
        from fastgw.upstream import make_ssl_context
        ctx = make_ssl_context(config.tls_profiles[r.tls_profile])
    store = Store.from_config(url=r.url, cluster_nodes=r.cluster_nodes, timeout=float(r.timeout),
                              ssl_context=ctx, max_backoff=max(float(cl.refresh), 0.1))
    return ClusterNode(cl, store, cstore, clock)
