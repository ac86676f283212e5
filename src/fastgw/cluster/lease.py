"""Leased shares of cluster-wide limits (Doorman-style): the server-side script and the node's book.

Every cluster-wide limit key K (the zone's key text) has one Redis hash, ``fgw:{K}`` (one key per
call, so one Redis Cluster slot). A node holds, per key, a *share*: slots for a count limit, a rate
and a burst for a bucket (the same fraction of the limit's rate and of its burst). It spends the
share locally; once per refresh it renews every key it holds or wants, all in one pipeline, with
one call of the script ``lease.lua`` (SCRIPT) each:

    renew(member, seq, limit, integer, demand, applied, used, lease_ms, burst, returned)
        -> (grant, expires_ms, learning, status, credit, members, wanting)

The script is O(members of the key): it reads the hash, drops the entries whose lease is over,
and answers from Redis server time (TIME). This module holds its text and ``LeaseBook``, the pure
node-side half (no I/O: a Store runs the calls and hands the results back).

---- The protocol (this docstring is the spec)

Names. A *member* is one incarnation of a node: ``node-id#incarnation`` (a random token per
LeaseBook), so a node restarted with the same node-id is a new member and its old entry simply
expires. Per key, member m's entry holds R_m (its reservation), its demand, its expiry (server
ms) and the seq of its latest executed call. ``limit`` L is the count's max, or the bucket's
rate (a bucket's grant g is a rate; its burst is g / rate * burst). A node's *applied* share A_m
is what it may spend now: LeaseBook.share(); for counts the report is max(share, used), since
connections in use are held whatever the share.

The node (LeaseBook):
  N1  Each call carries a seq, increasing per member; the node applies a reply only if it
      answers the latest call it sent for that key (an older one, late, is dropped).
  N2  A reply is applied at once: A = grant, valid until t_send + lease * (1 - drift) on the
      node's monotonic clock, t_send being when that call was made (before Redis ran it).
  N3  No reply (lost, late, an error, Redis down): A stays what it was, never more; once the
      validity is over, A = 0 (counts: no new connection; those in use stay, see below). With
      ``hold=True`` (on-unreachable: hold) A stays the last grant past the validity: outside the
      guarantee when only this node is cut off, inside it when Redis is down for everyone.
  N4  The report of a call is (demand, applied = A when sent, used: connections in use).
  N5  Buckets: the tokens a reply applied within its validity took from the node's bucket (its
      burst shrank) are returned with the node's next call, and in no other: a call lost takes
      them with it.

The script, at server time t, for caller c:
  S1  A call whose seq <= the seq stored for c changes nothing (status 1, the node ignores it).
  S2  Entries with expiry <= t are deleted; R_m of a member with no live entry is 0.
  S3  target = c's max-min fair share of L over the live members' demands (c's new one);
      integer for counts (the remainder one slot each, by member name).
  S4  grant = max(used, min(target, L - sum of the others' R)), and while learning also
      <= applied; then R_c = max(grant, applied), expiry t + lease, seq stored.
  S5  Learning (no growth, S4) for one lease: after the server started (INFO's uptime is the
      difference of two truncated whole-second readings, so a server 50 ms old may say 1:
      the start is taken as uptime - 1 s ago, which makes learning up to two seconds longer), after
      the hash was last written by another server process (its `_run` is not this run_id: a
      restart with persistence, a failover), and when a member reports applied > 0 and has no
      entry (the hash was lost).
  S6  The hash expires once no entry and no learning can be live, and (buckets) once a full
      refill would have made the key's bucket full again: lease + burst / rate (PEXPIRE).
  S7  Buckets: the hash keeps a pool P of the tokens no node holds: a fresh hash outside
      learning starts full (P = burst, by S6); while learning P is 0 and does not refill (the
      reservations are not all known); else it refills at the unreserved rate,
      L * (1 - sum R / L) (the entries read, expired ones too), capped at the unreserved burst;
      a grant above the applied rate comes with a credit of min(P, the burst it adds) tokens,
      taken from P; the tokens a call returns (N5) are added to P first, at most the burst of
      R_c (as read) minus the caller's applied one, and only if c's entry is live (then capped
      as P is; lost while learning).

---- Why the applied shares never sum to more than L

Assumption C (clocks): over one lease the node's monotonic clock and Redis's TIME run at the
real rate within drift / 2 (no step of the Redis host's wall clock). Then the node's validity
(N2, counted from t_send <= the call's execution) ends, in real time, before the entry the same
call wrote expires (S4) — and before any later entry of the member expires.

Outside learning, two invariants hold at every instant, for every member m and key:
  (I1) A_m <= R_m                       (I2) sum over m of R_m <= L
so sum A_m <= L (buckets: up to float rounding, a few ulps of L). Proof, by the events that
change A or R:
- A call of c runs (S4). Let a be its reported applied. (L1) a <= R_c just before it runs: at
  t_send, a = A_c <= R_c (I1); between t_send and the run, R_c is changed only by an older call
  of c running late (a newer one would make this one stale, S1), which sets R_c >= its own
  applied, and that is >= a, because from an older call's sending on, c applies no reply sent
  before it (N1) and A_c only falls (N3). (If the call ran so late that c's entry had expired,
  c applies 0 by C; a > 0 with no entry then starts learning, S5: conservative.) So
  R_c' = max(grant, a) with grant <= L - others gives sum R' <= max(L, sum R) <= L (I2). And
  A_c <= a <= R_c' until c applies a reply, the one of its latest call; that reply's grant is
  <= R_c as set by that call, and R_c only changes by c's own later calls, each >= the then
  applied (L1) (I1).
- A reply applied (N2): it answers c's latest call, whose run set R_c >= grant (I1).
- A lost or late reply (N3): A_c does not rise (I1).
- Expiry of c's entry (S2): R_c = 0, but by C c's validity ended before, so A_c = 0 (I1); I2
  only gains. A dead node is the same: its slots come back one lease after its last renewal.
- A stale call (S1), a stale reply (N1): nothing changes.
Counts: A = max(share, used) is what is reported and reserved, and a node admits a connection
only below its share, so its open connections never exceed A; a grant is never under `used`
(S4: one under it would not be applied anyway). A node alive, cut off from Redis past its lease
and keeping its connections is outside the guarantee unless it closes them (the wiring decides:
hold or shed).

Learning. When the state is lost at T0 (restart empty, failover to a stale replica, flush), I1
and I2 held just before T0 with the lost R_m. From T0 on, no call grows anyone: S4 caps grant
<= applied, so a node's A only falls, except by a reply computed before T0, which I1 and I2
covered. So sum A <= sum of the lost R_m <= L during learning. Learning starts at or after T0
(the new server's start, the first write seen from another run_id, the first holder that finds
its entry gone) and lasts one lease, so at its end, by C, every member that still applies > 0
has renewed after T0, with R = max(grant, a) = a (grant <= a): I1 holds, and sum R is a sum of
applied values each <= its lost R_m, so I2 holds; a stale replica's entries are older than T0
and have expired. From then on the first part applies.
What learning does not cover: a hash lost (FLUSHALL, eviction: run Redis with
maxmemory-policy noeviction, or without maxmemory) with the same run_id, before the first holder
of the key renews (within one refresh): a member with nothing may be granted what holders still
apply. A Redis Cluster failover that loses the hash's *creation* (asynchronous replication) is
the same window.

Buckets. The wiring adds to a node's bucket, as its share grows, only the credit that came
with it (take_credit), and clamps the tokens to the new burst as it shrinks. Then at every
instant P + the tokens of all nodes' buckets <= burst: a node's tokens <= its applied burst <= its
reserved one (I1), P <= the unreserved burst (S7), a credit moves tokens from P to one node (or,
lost with its reply, makes them vanish), and a return (N5) moves tokens a node no longer holds
back to P, once (or, lost with its call, makes them vanish). While returned tokens wait for the
call that carries them, they stay inside the node's reservation: the shrunk grant was applied
within its validity, so the entry its call wrote (R_c >= the burst before the clamp, I1) is
live until the next call of c runs, which is the one that carries them (N1: no older call of c
runs after it unless stale), and nothing else is granted from that room meanwhile; the script
checks the entry is live and caps the return at R_c's burst minus what c now applies. And
tokens appear only by refill, at the node's applied rate or P's unreserved rate, summing to
<= L (I2). So admissions over any window of W seconds are <= burst + L * W: the cluster is
one token bucket, or stricter. A fresh key's first node
gets the whole burst at once (P full); after a loss the tokens come back by refill. (P does not
refill while learning: nodes Redis does not know yet may be refilling their own buckets at the
rate P would count as unreserved.)

Sized by demand, converging: targets sum to <= L; with steady demand a node over its target is
granted its target on its next call, and (A falls when applied) reports it on the call after;
a node under its target gets the capacity the others released on its next call after theirs.
``apply()`` returns the keys whose share fell, for an at-once renewal (their release), so that
with steady demand every share is its fair share two refreshes after every node reported it.

---- What the node must do (the wiring: fastgw.cluster.node)

Per refresh: for each key, want(key, demand, used) (demand: what its workers would use, with
headroom; used: open connections of a count); calls = requests(now); run them in one pipeline
(Store.run); apply(calls, results) at once; renew the returned keys at once; then push each
share to the workers' zone — count: the cap for new acquisitions is share(), connections above
it stay; bucket: bucket_share() as (rate, burst), a growth adding only take_credit() tokens, a
shrink clamping them, and the tokens clamped away passed to give_back() (they reach the pool
with the next call: the tokens an idle node's bucket refilled while its client moved to another
node are not lost to the cluster, as they would not be in one bucket). A key whose demand
exceeds its share may be renewed at once (requests(now, [key])).
Between refreshes, once valid(key) is false: exact mode spends 0 (and sheds a count's
connections, or accepts being outside the guarantee); hold (LeaseBook(hold=True)) keeps the
last grant. Never overlap two renewals of one key faster than a round trip: only the latest
call's reply is applied (N1).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from importlib.resources import files

SCRIPT: str = files(__package__).joinpath("lease.lua").read_text(encoding="utf-8")

COUNT = "count"
BUCKET = "bucket"


def hash_key(key: str) -> str:
    """The Redis key of a limit key's hash: ``fgw:{K}``."""
    return f"fgw:{{{key}}}"


@dataclass(slots=True)
class Call:
    """One renewal: ``keys, args = call`` (as a Store runs it), plus what the book needs back."""

    key: str
    keys: list[str]
    args: list[str | int]
    seq: int
    sent: float
    applied: float = 0.0        # what the call reports applied (N4)

    def __iter__(self):
        return iter((self.keys, self.args))


@dataclass(slots=True)
class Held:
    """The book's state of one key."""

    kind: str
    limit: float                # counts: slots; buckets: rate per second
    burst: float = 0.0          # buckets only
    demand: float = 0.0         # counts: slots wanted; buckets: rate wanted
    used: int = 0               # counts: connections in use on this node
    grant: float = 0.0          # the last grant applied
    expires: float = -math.inf  # its validity, node monotonic seconds
    sent_seq: int = 0           # the latest call sent (N1); 0: none outstanding
    learning: bool = False      # the last reply said the key is learning
    credit: float = 0.0         # buckets: tokens granted with a growth, not yet taken
    returned: float = 0.0       # buckets: tokens a shrink took from the node's bucket within
                                # its lease, given back to the pool with the next call (once)
    replies: int = 0            # replies applied
    members: int = 0            # live members of the key at the last reply (this one too)
    wanting: bool = False       # another member wanted more than it reserved (last reply)
    assumed: bool = False       # the grant is assumed (hold, the store unreachable), not granted
    reserved: float = 0.0       # what Redis reserves for this member, as the last reply left it
                                # (max(grant, applied reported), S4); > 0: not forgotten yet


class LeaseBook:
    """A node's shares of cluster-wide limits: what to ask (requests), what came (apply), what
    to spend now (share). Pure: the caller passes `now` (monotonic seconds) and runs the calls.

        book = LeaseBook("edge-a", lease=5.0)
        book.count("client:42", 10); book.want("client:42", 3, used=2)
        calls = book.requests(now)
        results = await store.run(SCRIPT, calls)      # [(keys, args)], one result each
        again = book.apply(calls, results)             # keys to renew at once (released)
        book.share("client:42", now)                    # slots this node may hold
    """

    def __init__(self, node: str, lease: float, *, incarnation: str | None = None,
                 hold: bool = False, drift: float = 0.01):
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self.member = f"{node}#{incarnation if incarnation is not None else secrets.token_hex(4)}"
        self.lease = lease
        self.lease_ms = max(1, round(lease * 1000))
        self.hold = hold
        self.drift = drift
        self.keys: dict[str, Held] = {}
        self._seq = 0

    # ---- what the node has and wants

    def count(self, key: str, limit: int) -> None:
        """Track a count limit (or change its max)."""
        held = self.keys.get(key)
        if held is None:
            self.keys[key] = Held(COUNT, int(limit))
        else:
            held.limit = int(limit)

    def bucket(self, key: str, rate: float, burst: float) -> None:
        """Track a bucket limit (or change its rate and burst)."""
        held = self.keys.get(key)
        if held is None:
            self.keys[key] = Held(BUCKET, float(rate), float(burst))
        else:
            held.limit, held.burst = float(rate), float(burst)

    def want(self, key: str, demand: float, used: int = 0) -> None:
        """This node's demand for key (counts: slots; buckets: rate), and connections in use."""
        held = self.keys[key]
        held.demand = max(0.0, float(demand))
        held.used = max(0, int(used))

    # ---- what to spend

    def share(self, key: str, now: float) -> float:
        """The grant in force (N2, N3): slots, or a rate; 0 for an unknown key."""
        held = self.keys.get(key)
        if held is None:
            return 0
        if now < held.expires or self.hold:
            return held.grant
        return 0 if held.kind == COUNT else 0.0

    def bucket_share(self, key: str, now: float) -> tuple[float, float]:
        """A bucket's share in force: (rate, burst); (0, 0) for an unknown key."""
        held = self.keys.get(key)
        if held is None:
            return 0.0, 0.0
        rate = self.share(key, now)
        return rate, (rate / held.limit * held.burst if held.limit > 0 else 0.0)

    def applied(self, key: str, now: float) -> float:
        """What this node may be using now (reported, N4): counts max(share, used)."""
        held = self.keys.get(key)
        if held is None:
            return 0
        share = self.share(key, now)
        return max(share, held.used) if held.kind == COUNT else share

    def take_credit(self, key: str) -> float:
        """Buckets: the tokens the node may add to its bucket for the growths applied since the
        last call (the unreserved pool's, S7); once."""
        held = self.keys.get(key)
        if held is None:
            return 0.0
        credit, held.credit = held.credit, 0.0
        return credit

    def give_back(self, key: str, tokens: float, now: float) -> None:
        """Buckets: `tokens` left the node's bucket as a grant applied at `now` shrank its burst;
        the next call gives them to the unreserved pool (N5, S7), once: lost with that call,
        they are gone. Outside the lease nothing is given back (the tokens were void already)."""
        held = self.keys.get(key)
        if held is not None and held.kind == BUCKET and tokens > 0 and now < held.expires:
            held.returned += float(tokens)

    def assume(self, key: str, grant: float) -> None:
        """Hold, the store unreachable: spend `grant` of a key Redis never answered for (the
        wiring's limit / nodes). Outside the guarantee, as hold is; reported as applied once
        the store answers, which makes the key learn (S5)."""
        held = self.keys[key]
        held.grant = int(grant) if held.kind == COUNT else float(grant)
        held.assumed = True
        if held.kind == BUCKET and held.limit > 0:
            held.credit = held.grant / held.limit * held.burst

    def valid(self, key: str, now: float) -> bool:
        """True while the key's last grant is within its lease (else N3 applies)."""
        held = self.keys.get(key)
        return held is not None and now < held.expires

    # ---- one refresh

    def requests(self, now: float, keys=None) -> list[Call]:
        """The calls of one refresh (all keys, or the given ones), in key order. A key with no
        demand, no use, no share and nothing reserved in Redis is forgotten instead (a key
        whose share fell to nothing is renewed once more first, reporting nothing applied,
        so that Redis frees its reservation at once rather than when the entry expires)."""
        calls = []
        for key in sorted(self.keys if keys is None else keys):
            held = self.keys.get(key)
            if held is None:
                continue
            applied = self.applied(key, now)
            if held.demand <= 0 and held.used == 0 and applied == 0 and held.sent_seq == 0 \
                    and held.reserved <= 0:
                del self.keys[key]
                continue
            self._seq += 1
            held.sent_seq = self._seq
            if held.kind == COUNT:
                args = [self.member, self._seq, int(held.limit), 1,
                        max(math.ceil(held.demand), held.used), int(applied), held.used,
                        self.lease_ms, 0]
            else:
                args = [self.member, self._seq, repr(held.limit), 0, repr(held.demand),
                        repr(float(applied)), 0, self.lease_ms, repr(held.burst),
                        repr(held.returned)]
                held.returned = 0.0
            calls.append(Call(key, [hash_key(key)], args, self._seq, now, float(applied)))
        return calls

    def apply(self, calls: list[Call], results: list) -> list[str]:
        """Apply the replies of `calls` (a result or an exception each; a missing one is lost).
        Returns the keys whose share fell: renew them at once, so that the release is seen."""
        fell = []
        for call, result in zip(calls, results):
            held = self.keys.get(call.key)
            if held is None or call.seq != held.sent_seq or isinstance(result, BaseException):
                continue                                # lost, failed, or not the latest (N1)
            if result is None or int(result[3]) != 0:
                continue                                # stale at Redis (S1)
            grant = float(result[0])
            if held.kind == COUNT:
                grant = int(grant)
            before = held.grant
            held.grant = grant
            held.reserved = max(grant, call.applied)
            held.expires = call.sent + self.lease * (1.0 - self.drift)
            held.learning = bool(int(result[2]))
            if held.kind == BUCKET and len(result) > 4:
                held.credit += float(result[4])
            if len(result) > 6:
                held.members, held.wanting = int(result[5]), bool(int(result[6]))
            held.assumed = False
            held.sent_seq = 0
            held.replies += 1
            if grant < before:
                fell.append(call.key)
        return fell
