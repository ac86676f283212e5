"""The cluster's store: one Lua script run over Redis (or a Redis Cluster), bounded in time.

    store = Store.from_config(url="redis://127.0.0.1:6379/0", timeout=0.05)
    results = await store.run(script, [(keys, args), ...])   # one result or exception per call
    await store.close()

Only the nodes' refresh task uses it: no Redis call is ever made on the frame path or per
upgrade. What it guarantees:

* **One round trip per node.** The calls of one `run` are sent as one pipeline of EVALSHA
  (for a Redis Cluster: grouped by the node that owns each call's slot, as redis-py's cluster
  pipeline does, the nodes in parallel). Every call's keys must live in one hash slot
  (`{tag}` keys). Results come back in the order of the calls; a call's own error (the
  script raised, a cluster error for its slot, its node unreachable) is returned in its place,
  as an exception, and the other calls' results stand.
* **Scripts registered once.** A script is known by its SHA-1; a NOSCRIPT answer (after
  `SCRIPT FLUSH`, a restart, a new cluster node) loads it (`SCRIPT LOAD`, on every master of
  a cluster) and runs the calls that got it again, in the same `run`.
* **Never waits longer than `timeout`.** The whole `run` (connecting, loading scripts,
  redirections included) is bounded by an asyncio timeout on the loop; redis-py's own
  retries are off. After a timeout the connections may hold unread replies: they are dropped,
  and the next call starts on new ones.
* **A circuit breaker.** After a failure (timeout, connection, cluster), calls are refused at
  once with `Unavailable` for a back-off (100 ms, doubled after each failed probe, at most
  2 s), with no connection attempt; then one call is let through as a probe, and its success
  closes the breaker. A script's own error is the caller's business and trips nothing.
* **Counted.** `errors[kind]` counts failures by kind: ``timeout``, ``connection``,
  ``script`` (the script raised), ``cluster`` (the cluster is down or a slot is not served);
  a call refused by the open breaker is counted in `refused`, not as an error.
  `latency` is an HDR histogram (microseconds) of the round trips of the runs that got
  an answer.

The URL may hold a password: it is never logged nor put in an exception's text.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fastgw.observe.histograms import new_histogram

ERROR_KINDS = ("timeout", "connection", "script", "cluster")

FIRST_BACKOFF = 0.1         # seconds the breaker stays open after a first failure
LONGEST_BACKOFF = 2.0       # ... and at most, doubling after each failed probe

Call = tuple[Sequence[Any], Sequence[Any]]      # (keys, args) of one script call


class StoreError(Exception):
    """A failure of the store; `kind` is one of ERROR_KINDS (or "unavailable")."""

    kind = "connection"


class Unavailable(StoreError):
    """Refused at once: the breaker is open after a failure (no Redis call was made)."""

    kind = "unavailable"


class StoreTimeout(StoreError, TimeoutError):
    """The run did not finish within the store's timeout."""

    kind = "timeout"


class StoreConnectionError(StoreError, ConnectionError):
    """Redis could not be reached, or the connection broke."""

    kind = "connection"


class ClusterError(StoreError):
    """The Redis Cluster is down, or a slot is not served."""

    kind = "cluster"


class Script:
    """A Lua script known by its SHA-1 (what EVALSHA names)."""

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.sha[:12]})"


class Breaker:
    """A circuit breaker: closed; after a failure open for a back-off (doubling, bounded);
    then half-open, letting a single probe through. Pure: time comes from `clock`."""

    def __init__(self, first: float = FIRST_BACKOFF, longest: float = LONGEST_BACKOFF,
                 clock: Callable[[], float] = time.monotonic):
        self.first, self.longest, self.clock = first, longest, clock
        self.backoff = first            # the next opening's length
        self.open_until: float | None = None   # None: closed
        self.probing = False

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "probing" if self.probing else "open"

    def allow(self) -> bool:
        """May a call be made now? When open and the back-off is over, the first caller
        becomes the probe; the others are refused until it ends."""
        if self.open_until is None:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.open_until, self.probing, self.backoff = None, False, self.first

    def failure(self) -> None:
        """A failure (of a probe or of a call made while closed): open for the back-off."""
        self.open_until = self.clock() + self.backoff
        self.backoff = min(self.backoff * 2, self.longest)
        self.probing = False

    def abandon(self) -> None:
        """A call ended without a verdict (its caller cancelled it): the next call probes."""
        if self.open_until is not None:
            self.probing = False
            self.open_until = self.clock()


class _ContextSSLConnection(SSLConnection):
    """An SSL connection using the SSLContext it is given (a tls-profile's) as it is."""

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs):
        super().__init__(**kwargs)
        self._tls_context = tls_context

    def _connection_arguments(self):
        kwargs = super()._connection_arguments()
        kwargs["ssl"] = self._tls_context
        return kwargs


def _kind(exc: BaseException) -> str:
    """The error kind of an exception redis-py raised or returned for a call."""
    if isinstance(exc, rx.RedisClusterException) and isinstance(exc.__cause__, rx.ConnectionError):
        return "connection"              # "cannot be connected": no startup node answered
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (rx.ClusterDownError, rx.TryAgainError, rx.AskError,
                        rx.SlotNotCoveredError, rx.RedisClusterException, rx.ClusterError)):
        return "cluster"
    if isinstance(exc, (rx.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, rx.ResponseError):
        return "script"
    return "connection"


_WRAP = {"timeout": StoreTimeout, "connection": StoreConnectionError, "cluster": ClusterError}


class Store:
    """Runs registered Lua scripts on Redis for the refresh task; see the module text."""

    def __init__(self, client: Redis | RedisCluster, timeout: float,
                 breaker: Breaker | None = None):
        self.client = client
        self.is_cluster = isinstance(client, RedisCluster)
        self.timeout = timeout
        self.breaker = breaker or Breaker()
        self.errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
        self.refused = 0                 # calls refused by the open breaker
        self.round_trips = 0             # runs that got an answer
        self.script_loads = 0            # SCRIPT LOADs after a NOSCRIPT
        self.latency = new_histogram()   # round trips, microseconds
        self._scripts: dict[str, Script] = {}
        self._reset_needed = False

    @classmethod
    def from_config(cls, url: str | None = None, cluster_nodes: Sequence[str] | None = None,
                    timeout: float = 0.05, ssl_context: ssl.SSLContext | None = None,
                    max_backoff: float = LONGEST_BACKOFF) -> "Store":
        """A store on one Redis (`url`: redis:// or rediss://) or a Redis Cluster
        (`cluster_nodes`: the URLs of some of its nodes). `ssl_context` (a tls-profile's)
        is used for rediss:// as it is; without it, redis-py's default verification.
        `max_backoff` bounds the breaker's back-off (about the refresh period)."""
        if (url is None) == (cluster_nodes is None):
            raise ValueError("give either url or cluster_nodes")
        common = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                      retry=Retry(NoBackoff(), 0))
        if url is not None:
            options = parse_url(url)
            if ssl_context is not None and urlsplit(url).scheme == "rediss":
                options["connection_class"] = _ContextSSLConnection
                options["tls_context"] = ssl_context
            client = Redis(connection_pool=ConnectionPool(**options, **common))
            return cls(client, timeout, Breaker(min(FIRST_BACKOFF, max_backoff), max_backoff))
        nodes, tls = [], set()
        for node_url in cluster_nodes:
            parts = urlsplit(node_url)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError("a cluster node is a redis:// or rediss:// URL with a host")
            tls.add(parts.scheme == "rediss")
            nodes.append(ClusterNode(parts.hostname, parts.port or 6379))
        if len(tls) != 1:
            raise ValueError("cluster nodes are all redis:// or all rediss://")
        first = urlsplit(cluster_nodes[0])
        client = RedisCluster(startup_nodes=nodes, ssl=tls == {True},
                              username=first.username, password=first.password,
                              **common)
        if ssl_context is not None and tls == {True}:
            # The nodes it discovers are made with these options; the startup ones exist.
            client.connection_kwargs.update(connection_class=_ContextSSLConnection,
                                            tls_context=ssl_context)
            for node in client.startup_nodes:
                node.connection_class = _ContextSSLConnection
                node.connection_kwargs["tls_context"] = ssl_context
        return cls(client, timeout, Breaker(min(FIRST_BACKOFF, max_backoff), max_backoff))

    def script(self, text: str) -> Script:
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = Script(text)
        return script

    async def run(self, script: Script | str, calls: Sequence[Call]) -> list[Any]:
        """Run `script` once per call `(keys, args)`, pipelined; returns each call's result
        or exception (a StoreError, or redis-py's ResponseError for the script's own error)
        in order. Raises Unavailable (breaker open), StoreTimeout, StoreConnectionError or
        ClusterError when the run as a whole failed."""
        if isinstance(script, str):
            script = self.script(script)
        if not calls:
            return []
        if not self.breaker.allow():
            self.refused += 1
            raise Unavailable("the store is unavailable (circuit breaker open)")
        start = time.perf_counter()      # (uvloop's loop.time() counts milliseconds)
        try:
            async with asyncio.timeout(self.timeout):
                if self._reset_needed:
                    await self._reset()
                results = await self._run(script, calls)
        except asyncio.CancelledError:
            self.breaker.abandon()
            self._reset_needed = True
            raise
        except TimeoutError as exc:      # asyncio's timeout or redis-py's socket timeout
            self._failed("timeout")
            raise StoreTimeout(f"no answer from the store within {self.timeout * 1000:g} ms") from exc
        except Exception as exc:
            kind = _kind(exc)
            self._failed(kind)
            raise _WRAP.get(kind, StoreConnectionError)(
                f"{kind} error from the store: {type(exc).__name__}") from exc
        self.round_trips += 1
        self.latency.record_py(max(1, int((time.perf_counter() - start) * 1e6)))
        failed = None
        for i, result in enumerate(results):
            if isinstance(result, Exception):
                kind = _kind(result)
                self.errors[kind] += 1
                if kind != "script":
                    failed = kind
                    results[i] = _WRAP[kind](f"{kind} error from the store: "
                                             f"{type(result).__name__}")
                    results[i].__cause__ = result
        if failed is None:
            self.breaker.success()
        else:                            # a node of a cluster failed: the breaker opens
            self._reset_needed = True
            self.breaker.failure()
        return results

    def _failed(self, kind: str) -> None:
        self.errors[kind] += 1
        self._reset_needed = True
        self.breaker.failure()

    async def _run(self, script: Script, calls: Sequence[Call]) -> list[Any]:
        results = await self._pipeline(script, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, rx.NoScriptError)]
        if missing:
            await self.client.script_load(script.text)    # every master of a cluster
            self.script_loads += 1
            again = await self._pipeline(script, [calls[i] for i in missing])
            for i, result in zip(missing, again):
                results[i] = result
        return results

    async def _pipeline(self, script: Script, calls: Sequence[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def _reset(self) -> None:
        """Drop every connection (after a timeout, one may hold an unread reply)."""
        self._reset_needed = False
        if self.is_cluster:
            await self.client.aclose()   # it connects again (and re-reads the slots) on use
        else:
            await self.client.connection_pool.disconnect()

    async def close(self) -> None:
        """Close every connection (a Redis client made on a pool of ours leaves the pool open
        by itself). Each connection's close is bounded by the time-out; so is the whole."""
        try:
            async with asyncio.timeout(4 * self.timeout + 1.0):
                if self.is_cluster:
                    await self.client.aclose()
                else:
                    await self.client.aclose(close_connection_pool=True)
        except Exception as exc:         # a socket that will not close is dropped with the client
            self.errors[_kind(exc)] += 1
