"""The gateway of one process: its listeners, the live connection table, reload, drain.

Accepting: the listeners' sockets are accepted by readers of ours (one accept() at a
time against limits.max-connections) or, far from the cap, by uvloop servers (see
README, "Descriptors and accepting"); each client gets a Handshake (http.handshake),
whose phases end in `attach` (the live table, the connection's timers) or a refusal.
The end of life of every connection is `end_of_life`: once, however it ended.
Reload re-reads the configuration and applies all of it or nothing; drain answers new
upgrades 503 and closes live connections with 1001, cut when the grace is over. Every
timer and time read goes through `self.clock` (fastgw.clock).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket

import msgspec

from fastgw import config as cfgmod
from fastgw.config.web import redact_url
from fastgw._core import ClusterStore, LimitZone, key_hash
from fastgw.admission import SharedLimit
from fastgw.cluster.node import start_cluster
from fastgw.accept import (RESERVED_FDS, RESOURCE_ERRNOS, Spares, connect_accepted,
                           derived_max_connections, raise_fd_limit)
from fastgw.clock import Clock, Deadline, Deadlines
from fastgw.connection import Connection
from fastgw.health import HealthChecks
from fastgw.http.handshake import Handshake
from fastgw.listeners import HandshakeTable, Listener, bind, listener_context
from fastgw.observe import events as ev
from fastgw.observe.logs import Throttle, clean, url_without_query
from fastgw.observe.metrics import Metrics, TableFullWarnings
from fastgw.pool import build_pools
from fastgw.routing import Router, compile_config
from fastgw.verdicts import HANDSHAKE_LIMIT, Refusal

log = logging.getLogger("fastgw")

# Most accept() calls per readiness wake-up of one listening socket.
ACCEPT_BATCH = 64
# Pause of the listeners after EMFILE/ENFILE: doubled while it repeats, up to the maximum.
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 1.0
# With workers, a numeric limits.max-connections is one count in the shared zone, under this
# key; a worker at it looks again this often (other workers' connections end unseen).
CAP_KEY = key_hash("fastgw:limits.max-connections")
CAP_POLL = 0.02
# A target's drain closes the connections due at most this often (s).
TARGET_DRAIN_TICK = 0.05


class UnknownTarget(KeyError):
    """No such API, or no such target in its pool (drain_target, enable_target)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown target"


def _show(value) -> str:
    return json.dumps(_redacted(msgspec.to_builtins(value, enc_hook=_plain)),
                      separators=(", ", ": "))


def _plain(value):
    """msgspec's hook for the configuration's own number types (Duration, Size, ...)."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    raise NotImplementedError(type(value).__name__)


def _redacted(value):
    """A configuration value as plain data, with the user and password of every URL in it
    (a Redis URL's) replaced by "***": a reload's refusal is logged and answered."""
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def _unreloadable(old, new) -> str | None:
    """What a reload from `old` to `new` would change that is read once at start."""
    fields = (("admin", old.admin, new.admin), ("events", old.events, new.events),
              ("histogram-log", old.histogram_log, new.histogram_log),
              ("metrics", old.metrics, new.metrics),
              ("limits.max-keys", old.limits.max_keys, new.limits.max_keys),
              ("workers", old.workers, new.workers), ("cluster", old.cluster, new.cluster))
    changed = [f"{name} ({_show(a)} -> {_show(b)})" for name, a, b in fields if a != b]
    if not changed:
        return None
    return ("cannot change on reload (read once at start; restart the gateway to apply): "
            + "; ".join(changed))


def listeners_changed(old, new) -> str | None:
    """With workers > 1 the supervisor holds the listening sockets: a reload cannot change
    which addresses are listened on (a listener's TLS files and the backlog may change)."""
    if [(lc.host, lc.port) for lc in old.listeners] == [(lc.host, lc.port) for lc in new.listeners]:
        return None
    return "listeners cannot change on reload with workers > 1: restart fastgw"


class Gateway:
    """Listeners and live connections of one process."""

    # A full limit table is logged at most this often (s), looked at this often (s).
    TABLE_FULL_LOG_INTERVAL = 10.0
    TABLE_FULL_CHECK = 1.0

    def __init__(self, config, config_path: str | None = None, clock: Clock | None = None, *,
                 zone: LimitZone | None = None, sockets: list[list[socket.socket]] | None = None,
                 id_base: int = 0):
        """`zone`, `sockets` and `id_base` are for a worker process (fastgw.workers): the
        region shared with the other workers, the listening sockets the supervisor made (one
        list per configured listener: start() binds nothing, a reload cannot change the
        listeners) and the base of its connection ids (id_base + 1, id_base + 2, ...)."""
        self.config = config
        self.config_path = config_path
        # The one source of time: timers and time reads here, in the handshakes, in
        # admission and (given to each Relay) in the core. A test may give a SimClock.
        self.clock = clock if clock is not None else Clock()
        self.router: Router = compile_config(config)
        self.metrics = Metrics(intervals=config.histogram_log is not None, enabled=config.metrics)
        self.metrics.max_connections = lambda: self.max_connections
        self.events = None                     # an events.EventSink, set by the CLI
        self.log_throttle = Throttle(log, clock=self.clock)   # lines a request can cause
        for api in self.router.apis:
            self.metrics.api(api.name)
        self.pools = build_pools(self.router)  # API name -> pool.Pool
        self._bind_pools()
        self._eject_timers: dict = {}          # TargetState -> the timer at its ejection's end
        # TargetState -> [schedule [(due, Connection)], next index, timer] of its drain
        self._target_drains: dict = {}
        self.health = HealthChecks(self)       # the active checks (fastgw.health), from start()
        # Linear probing with a bounded probe finds no slot for a few keys past
        # about 60% load: twice the slots keeps max-keys active keys well below it.
        # A worker process is given the zone its supervisor shares with every worker.
        self.zone = zone if zone is not None else LimitZone(2 * config.limits.max_keys)
        self._zone_shared = zone is not None
        self.metrics.message_table_full = lambda: self.zone.message_overflows
        # With a `cluster` section the limits the nodes share are spent from this process's
        # leased shares (fastgw.cluster.node); `store` is what admission and the relay use.
        self.cluster = None
        self.store = self.zone
        if config.cluster is not None:
            self.store = ClusterStore(self.zone, idle_wait=float(config.cluster.refresh) / 10)
        self.table_warnings = TableFullWarnings(self.metrics, self.TABLE_FULL_LOG_INTERVAL)
        self._table_timer = None
        self.handshake_timeout = float(config.handshake_timeout)
        # Every handshake's time-out, in one FIFO with one timer (fastgw.clock.Deadlines).
        self.handshake_deadlines = Deadlines(self.clock, self.handshake_timeout)
        # Every upgrade's dial time-out: one FIFO per policy time-out (dial_deadline).
        self.dial_deadlines: dict[float, Deadlines] = {}
        # Each Relay keeps its on_end: one bound method for all, not a new one each.
        self.relay_gone = self.relay_gone
        self.max_header_size = int(config.max_header_size)
        self.loop = None
        self.listeners: list[Listener] = []
        self.handshakes = HandshakeTable()
        self.handshakes.gone = self._handshake_gone
        self.live: dict[int, Connection] = {}
        self.draining = False
        self.on_exit = None                    # called once a drain asked to exit is over (the CLI)
        self._ids = 0
        self.id_base = id_base
        self._given_sockets = sockets          # the supervisor's (workers > 1), else None
        self._retired = False                  # retire(): accepting stopped for good
        self._idle = None
        self._drain_task = None
        self._exit_asked = False
        # Descriptors and accepting (see README, "Descriptors and accepting").
        self.fd_limit_at_start = self.fd_limit = 0
        self.max_connections = 0               # effective cap (0: none)
        self.derived_max_connections = 0
        self.max_handshakes_per_ip = 0
        self._open = False                     # listeners open (between start and close)
        self._mode = "off"                     # accepting: "off", "own" (readers), "native"
        self._native_ok = False                # uvloop servers allowed (see _desired_mode)
        self._native_broken = False
        self._native_timer = None
        self._slack = 0
        self.shared_cap = False                # max-connections counted in the shared zone
        self._cap_timer = None
        self._recheck = False                  # _update_accepting on each connection's end
        self._backing_off = False
        self._backoff = ACCEPT_BACKOFF_MIN
        self._burst = 1                        # accept() calls per wake-up (see _on_readable)
        self._full = 0
        self.spares = Spares()
        self._connecting: dict = {}            # connect_accepted_socket coroutine -> Handshake

    def next_id(self) -> int:
        self._ids += 1
        return self.id_base + self._ids

    @property
    def accepted(self) -> int:
        """Upgrades relayed since the start (fastgw_connections_total of every API)."""
        return sum(am.accepted for am in self.metrics.apis.values())

    @property
    def refused(self) -> dict[int, int]:
        """Upgrades refused since the start, by HTTP status."""
        return dict(self.metrics.rejected_status)

    def _watch_table(self) -> None:
        """Log refusals for want of a limit-table slot (upgrades and messages alike)."""
        line = self.table_warnings.check(self.clock.now())
        if line is not None:
            log.warning("%s", line)
        self._table_timer = self.clock.call_later(self.TABLE_FULL_CHECK, self._watch_table)

    @property
    def addresses(self) -> list[tuple[str, str, int]]:
        """(scheme, host, port) of every listening socket, in the order of the configuration."""
        return [a for listener in self.listeners for a in listener.addresses]

    # ---- start, accepting -------------------------------------------------

    async def start(self) -> list[tuple[str, str, int]]:
        """Raise the descriptor limit, open the listeners and start accepting."""
        self.loop = asyncio.get_running_loop()
        # "native" accepting (see _desired_mode) is for uvloop's servers only: asyncio's
        # create_server(sock=...) does not complete at once and would leave a stale reader.
        self._native_broken |= not type(self.loop).__module__.startswith("uvloop")
        if self._table_timer is None:
            self._table_timer = self.clock.call_later(self.TABLE_FULL_CHECK, self._watch_table)
        self.fd_limit_at_start, self.fd_limit = raise_fd_limit()
        self.spares.take()
        listeners = []
        try:
            for i, lc in enumerate(self.config.listeners):
                ctx = listener_context(i, lc)
                if self._given_sockets is not None:
                    socks = self._given_sockets[i]
                else:
                    socks = await bind(self.loop, i, lc, self.config.backlog)
                listeners.append(Listener(lc.host, lc.port, socks, ctx))
        except BaseException:
            for listener in listeners:
                listener.close()
            self.spares.release()
            raise
        self.listeners = listeners
        if self.config.cluster is not None and self.cluster is None:
            self.cluster = start_cluster(self.config, self.store, self.clock)
            self.metrics.cluster = self.cluster.sample
            await self.cluster.start()
        self._apply_limits(self.config)
        self._open = True
        self._update_accepting()
        self.health.update()
        return self.addresses

    def _apply_limits(self, config) -> None:
        sockets = sum(len(listener.sockets) for listener in self.listeners)
        self.derived_max_connections = derived_max_connections(self.fd_limit, sockets) if self.fd_limit else 0
        value = config.limits.max_connections
        self.max_connections = self.derived_max_connections if value == "auto" else int(value)
        self.max_handshakes_per_ip = int(config.limits.max_handshakes_per_ip)
        self._slack = int(config.backlog) + 64
        # Worker processes (given their supervisor's zone): a number is the cap of them all,
        # counted in the shared zone (each accept() takes a slot first); "auto" stays each
        # process's own descriptor bound.
        # With a cluster, a number is the cap of every node's processes: this process's
        # share of it is counted in the ClusterStore (fastgw.cluster.node).
        self.shared_cap = ((self._zone_shared or self.cluster is not None)
                           and value != "auto" and self.max_connections > 0)
        if self.shared_cap and self.cluster is not None:
            self.cluster.hold(SharedLimit(CAP_KEY, "count", "max-connections", self.max_connections))
        self._native_ok = (not self._native_broken and not self.shared_cap
                           and 0 < self.max_connections <= self.derived_max_connections)
        if value != "auto" and self.derived_max_connections and \
                (value == 0 or value > self.derived_max_connections):
            log.warning("limits.max-connections %s: the descriptor limit %d holds about %d "
                        "connections; past them accept() fails with EMFILE (and is retried)",
                        value or "0 (no cap)", self.fd_limit, self.derived_max_connections)

    def capacity_note(self) -> str:
        """One line for the start: the cap and where it comes from."""
        value = self.config.limits.max_connections
        raised = (f"; the limit was raised from {self.fd_limit_at_start}"
                  if self.fd_limit > self.fd_limit_at_start else "")
        if value == "auto":
            sockets = sum(len(listener.sockets) for listener in self.listeners)
            cap = (f"max-connections {self.max_connections} (auto: (descriptor limit {self.fd_limit}"
                   f" - {RESERVED_FDS + sockets} reserved) / 2 per connection{raised})")
        elif value == 0:
            cap = f"max-connections: no cap (descriptor limit {self.fd_limit}{raised})"
        else:
            cap = f"max-connections {self.max_connections} (descriptor limit {self.fd_limit}{raised})"
        per_ip = self.max_handshakes_per_ip or "no cap"
        return f"{cap}; max-handshakes-per-ip {per_ip}"

    @property
    def _watching(self) -> bool:
        return self._mode != "off"

    def _desired_mode(self) -> str:
        """How new clients are accepted now.

        "off": not at all (closed, backing off, or at the cap: clients wait in the backlog).
        "native": plain listeners by uvloop servers (its accept path costs less per
        connection); only while room for more than `_slack` connections is left (twice
        that to go back to it), since one wake-up of a uvloop server accepts every client
        queued (up to the backlog), and only with a cap the descriptors can hold.
        "own": by the gateway's readers, one accept() at a time against the cap."""
        if not self._open or self._backing_off or self._retired:
            return "off"
        cap = self.max_connections
        if not cap:
            return "own"
        if self.shared_cap:
            return "own" if self.store.room(CAP_KEY, cap) > 0 else "off"
        room = cap - len(self.handshakes._ip) - len(self.live)
        if room <= 0:
            return "off"
        if self._native_ok and room > (self._slack if self._mode == "native" else 2 * self._slack):
            return "native"
        return "own"

    def _update_accepting(self) -> None:
        """Accept new clients exactly as `_desired_mode` says."""
        mode = self._desired_mode()
        if mode == "off" and self.shared_cap and self._open and not self._backing_off \
                and not self._retired \
                and self._cap_timer is None:
            self._cap_timer = self.clock.call_later(CAP_POLL, self._cap_poll)
        if mode == self._mode:
            return
        self._apply_mode(mode)
        if mode == "off" and self._open and not self._backing_off and not self._retired:
            self.log_throttle.warning(
                "at-cap", "at max-connections %d (%d relayed, %d in handshake): new clients wait "
                "in the listen backlog until a connection ends", self.max_connections,
                len(self.live), self.handshakes.counted)

    def _cap_poll(self) -> None:
        self._cap_timer = None
        if self.cluster is not None and self.shared_cap and \
                self.store.room(CAP_KEY, self.max_connections) == 0:
            self.store.note_refused(CAP_KEY)       # at this process's share: ask for more
        self._update_accepting()

    def _take_cap_slot(self) -> bool:
        """One slot of the shared max-connections count, before an accept()."""
        return self.store.acquire_py(CAP_KEY, self.max_connections) == 1

    def _handshake_gone(self, hs) -> None:
        """A client connection stops counting as a handshake (ended, or handed over to the
        relay: then its connection record holds the slot)."""
        if hs.cap_slot:
            hs.cap_slot = False
            self.store.release_py(CAP_KEY)

    def _apply_mode(self, mode: str) -> None:
        self._mode = mode
        for listener in self.listeners:
            self._set_listener(listener, mode)
        # Who looks again, and when: at each connection's end while off (room returns) or
        # while "own" could go back to "native"; at each connection's start while "native".
        self._recheck = mode == "off" or (mode == "own" and self._native_ok)
        self.handshakes.wake = self._update_accepting if self._recheck else None
        self.handshakes.added = self._native_added if mode == "native" else None
        if mode == "native" and self._native_timer is None:
            self._native_timer = self.clock.call_later(1.0, self._check_native)

    def _set_listener(self, listener: Listener, mode: str) -> None:
        native = mode == "native" and listener.ctx is None
        if native and listener.native is None and not self._start_native(listener):
            native = False
        reading = mode != "off" and not native
        if reading and not listener.reading:
            for s in listener.sockets:
                self.loop.add_reader(s.fileno(), self._on_readable, s, int(s.family), listener)
            listener.reading = True
        elif not reading and listener.reading:
            for s in listener.sockets:
                self.loop.remove_reader(s.fileno())
            listener.reading = False
        if not native and listener.native is not None:
            for server in listener.native:
                server.close()               # closes its duplicate only
            listener.native = None

    def _start_native(self, listener: Listener) -> bool:
        servers = []
        try:
            for s in listener.sockets:
                dup = socket.socket(s.family, s.type, s.proto, os.dup(s.fileno()))
                # create_server(sock=...) does not wait for anything: one step ends it.
                coro = self.loop.create_server(lambda: Handshake(self, False), sock=dup,
                                               backlog=self.config.backlog)
                try:
                    coro.send(None)
                except StopIteration as done:
                    servers.append(done.value)
                    done.value.sockets           # cached now: native_alive() reads them
                else:
                    coro.close()
                    dup.close()
                    raise RuntimeError("loop.create_server(sock=...) did not complete at once")
        except Exception as exc:
            for server in servers:
                server.close()
            log.warning("accepting by ourselves only: cannot serve a listener with uvloop: %r", exc)
            self._native_broken = True
            self._native_ok = False
            return False
        listener.native = servers
        return True

    def _native_added(self, hs: "Handshake", n: int) -> None:
        """A connection accepted by a uvloop server starts (connection_made)."""
        per_ip = self.max_handshakes_per_ip
        if per_ip and n > per_ip:
            hs.transport.abort()                 # its connection_lost ends its count
            self._refused_at_accept(hs.peer_ip)
        if self.max_connections - len(self.handshakes._ip) - len(self.live) <= self._slack:
            self._update_accepting()

    def _check_native(self) -> None:
        """Every second while uvloop servers accept: uvloop closes one for good when its
        accept() fails (after libuv's reserve descriptor reset a client): then accept
        ourselves, from now on."""
        self._native_timer = None
        if self._mode != "native":
            return
        if all(listener.native_alive() for listener in self.listeners):
            self._native_timer = self.clock.call_later(1.0, self._check_native)
            return
        log.warning("uvloop closed a listening socket of its own after a failed accept() (out "
                    "of descriptors?); the gateway accepts by itself from now on")
        self._native_broken = True
        self._native_ok = False
        self._update_accepting()

    def _refused_at_accept(self, ip: str) -> None:
        self.metrics.count_reject(None, HANDSHAKE_LIMIT)
        self.log_throttle.warning(
            "per-ip-cap", "closed a new connection from %s at once: %d connections of that "
            "address in their handshake (limits.max-handshakes-per-ip)", ip,
            self.max_handshakes_per_ip)

    def _on_readable(self, sock: socket.socket, family: int, listener: Listener) -> None:
        # Up to `_burst` accept() calls per wake-up: it doubles after 4 wake-ups in a row that
        # found that many clients and halves when one comes up empty. One client per wake-up
        # (the usual case) then costs one accept(), without the EAGAIN of a second; readiness
        # is level-triggered, so a client left in the queue wakes us again.
        cap = self.max_connections
        burst = self._burst
        shared = self.shared_cap
        room = cap - len(self.handshakes._ip) - len(self.live) if cap and not shared else burst
        for _ in range(min(room, burst)):
            if shared and not self._take_cap_slot():
                self._update_accepting()         # at the cap of all workers: off, and poll
                return
            try:
                fd, addr = sock._accept()        # an int, no socket.socket (accept.AcceptedSocket)
            except (BlockingIOError, InterruptedError):
                if shared:
                    self.store.release_py(CAP_KEY)
                self._burst = max(1, burst >> 1)
                self._full = 0
                break
            except OSError as exc:
                if shared:
                    self.store.release_py(CAP_KEY)
                if self.accept_error(exc):
                    return
                continue
            self._accept(fd, addr[0], family, listener, shared)
        else:
            if room < burst:                     # the cap, not the burst, ended the loop
                self._update_accepting()
            else:
                self._full += 1
                if self._full >= 4:
                    self._burst = min(2 * burst, ACCEPT_BATCH)
                    self._full = 0
        self._backoff = ACCEPT_BACKOFF_MIN

    def _accept(self, fd: int, ip: str, family: int, listener: Listener,
                cap_slot: bool = False) -> None:
        per_ip = self.max_handshakes_per_ip
        if per_ip and self.handshakes.by_ip.get(ip, 0) >= per_ip:
            os.close(fd)
            if cap_slot:
                self.store.release_py(CAP_KEY)
            self._refused_at_accept(ip)
            return
        ctx = listener.ctx
        hs = Handshake(self, ctx is not None)
        hs.cap_slot = cap_slot
        table = self.handshakes
        table._ip[hs] = ip                       # it counts from now (see HandshakeTable)
        table.by_ip[ip] = table.by_ip.get(ip, 0) + 1
        try:
            coro = connect_accepted(self.loop, fd, family, lambda: hs, self._connected, hs, ctx,
                                    self.handshake_timeout if ctx is not None else None)
        except Exception as exc:
            log.debug("accepted connection from %s not served: %r", ip, exc)
            coro = None
        if coro is None:
            self._connected(None, hs)
        else:
            self._connecting[coro] = hs

    def _connected(self, coro, hs) -> None:
        """The accepted socket's transport is made (or its TLS handshake failed)."""
        if coro is not None and self._connecting.pop(coro, None) is None:
            return                               # close() ended it
        if hs not in self.handshakes._set:       # no connection_made: it stops counting here
            self.handshakes.discard(hs)

    def accept_error(self, exc: OSError) -> bool:
        """A failed accept() on a listener of the process (the admin API's too), counted.
        Out of descriptors or memory: the spare descriptors are released and the listeners
        pause (back-off). True then (and the caller stops accepting for now)."""
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        self.metrics.accept_errors[name] += 1
        if exc.errno not in RESOURCE_ERRNOS:
            log.debug("accept: %s", exc)         # ECONNABORTED and the like: the client left first
            return False
        self.spares.release()
        if not self._backing_off:
            delay = self._backoff
            self._backoff = min(2 * delay, ACCEPT_BACKOFF_MAX)
            self.log_throttle.warning(
                "accept-error", "accept: %s (%s; descriptor limit %d, %d client connections "
                "held): not accepting for %.1f s", exc.strerror, name, self.fd_limit,
                len(self.live) + self.handshakes.counted, delay)
            self._backing_off = True
            self._update_accepting()
            self.clock.call_later(delay, self._backoff_over)
        return True

    def _backoff_over(self) -> None:
        if not self._open:
            return
        if not self.spares.take():              # still out of descriptors: wait longer
            delay = self._backoff
            self._backoff = min(2 * delay, ACCEPT_BACKOFF_MAX)
            self.clock.call_later(delay, self._backoff_over)
            return
        self._backing_off = False
        self._update_accepting()

    # ---- live connections -------------------------------------------------

    def attach(self, conn: Connection, api) -> None:
        """A relayed connection whose client is about to get its 101 joins the live table."""
        relay = conn.relay
        self.live[conn.id] = conn
        am = self.metrics.api(api.name)
        am.accepted += 1
        handshake_us = (self.clock.now() - conn.head_at) * 1e6
        am.record("handshake_us", handshake_us)
        am.record("upstream_connect_us", conn.dial_us)
        conn.head_at = conn.dial_us = 0.0    # recorded: the shared 0.0, not a float each held
        if self.events is not None:
            self.events.emit(ev.UpgradeEvent(
                id=conn.id, api=conn.api, client=conn.client_key, remote=conn.peer,
                subprotocol=conn.subprotocol, handshake_ms=handshake_us / 1e3,
                plan=conn.admission.plan))
        if self.draining:            # dialled before the drain began: it ends with the others
            self.loop.call_soon(relay.close, 1001, "gateway shutting down")
            return
        target = conn.target
        if target is not None:
            target.conns[conn.id] = conn
            if target.draining:      # dialled before its drain began
                self.loop.call_soon(relay.close, 1001, "backend draining")
        conn.start_timers(self.clock, api)

    # ---- the pools ---------------------------------------------------------------

    def _bind_pools(self) -> None:
        """Each API's metrics show its pool's targets."""
        for name, pool in self.pools.items():
            am = self.metrics.api(name)
            am.pool = pool
            am.now = self.clock.now

    def dial_deadline(self, timeout: float, callback) -> Deadline:
        """An upgrade's dial time-out: `callback()` in `timeout` seconds unless cancelled, in
        the FIFO of that time-out (fastgw.clock.Deadlines), not an event-loop timer each."""
        deadlines = self.dial_deadlines.get(timeout)
        if deadlines is None:
            deadlines = self.dial_deadlines[timeout] = Deadlines(self.clock, timeout)
        return deadlines.call_later(callback)

    def dial_ok(self, target) -> None:
        self.pools[target.api].dial_ok(target, self.clock.now())

    def dial_failed(self, target, refusal: Refusal) -> None:
        """A dial of a pool's target failed: counted, and its outlier detection told."""
        pool = self.pools.get(target.api)
        if pool is None or pool.find(target.url) is not target:
            # A reload removed it meanwhile: only count.
            target.dial_failures[refusal.cause] = target.dial_failures.get(refusal.cause, 0) + 1
            return
        eject = pool.dial_failed(target, refusal, self.clock.now())
        if not eject:
            return
        log.warning("api %s: target %s ejected for %gs after %d failed dials in a row",
                    target.api, target.label, eject, pool.upgrade.outlier.failures)
        if self.events is not None:
            self.events.emit(ev.TargetDownEvent(api=target.api, target=target.label,
                                                reason="outlier", detail=clean(refusal.reason),
                                                eject_s=eject))
        old = self._eject_timers.pop(target, None)
        if old is not None:
            old.cancel()
        self._eject_timers[target] = self.clock.call_later(eject, self._ejection_over, target)

    def _ejection_over(self, target) -> None:
        self._eject_timers.pop(target, None)
        if target.ejected_until > self.clock.now():
            return
        log.warning("api %s: target %s back after its ejection", target.api, target.label)
        if self.events is not None and target.healthy:
            self.events.emit(ev.TargetUpEvent(api=target.api, target=target.label,
                                              reason="outlier"))

    # ---- draining and enabling a target (the admin API) ----------------------------

    def _target(self, api: str, target: str):
        """(pool, TargetState) of `api`'s target named `target` (its URL as configured, or
        without its query); UnknownTarget if there is none."""
        pool = self.pools.get(api)
        if pool is None:
            raise UnknownTarget(f"no API named {clean(api)!r}")
        t = pool.find(target)
        if t is None:
            raise UnknownTarget(f"API {clean(api)!r} has no target "
                                f"{clean(url_without_query(target))!r}")
        return pool, t

    @staticmethod
    def _target_view(pool, t, now: float) -> dict:
        return {**t.describe(now), "balance": pool.balance}

    def targets(self) -> list[dict]:
        """Every pool's targets (GET /targets): APIs in name order, targets in the order of
        the configuration, each its TargetState.describe() and its pool's balance."""
        now = self.clock.now()
        return [self._target_view(pool, t, now)
                for _, pool in sorted(self.pools.items()) for t in pool.targets]

    def drain_target(self, api: str, target: str, grace: float | None = None) -> dict:
        """An operator's drain of one target: no new connection goes to it from now on
        (Pool.pick never chooses a draining target; one dialled before is closed as it
        attaches), and its live connections are closed with 1001 "backend draining", spread
        evenly over `grace` s (connection i of n at grace * i / n), so that their clients
        reconnect to the rest of the pool a few at a time. A drain under way is replaced
        (its schedule is made again over the new grace). `grace` None: the configuration's
        drain-time. Returns the target's view."""
        pool, t = self._target(api, target)
        grace = float(self.config.drain_time) if grace is None else max(0.0, float(grace))
        self._stop_target_drain(t)
        t.draining = True
        now = self.clock.now()
        # Its live connections (not those closing already, by whichever side).
        conns = [c for c in t.conns.values() if c.relay is not None and c.relay.end_side is None]
        n = len(conns)
        schedule = [(now + grace * i / n, conn) for i, conn in enumerate(conns)]
        log.warning("api %s: target %s draining: %d connections closed with 1001 over %gs",
                    t.api, t.label, n, grace)
        if self.events is not None:
            self.events.emit(ev.TargetDrainEvent(api=t.api, target=t.label, grace_s=grace,
                                                 connections=n))
        self._target_drains[t] = [schedule, 0, None]
        self._drain_tick(t)
        return self._target_view(pool, t, now)

    def _drain_tick(self, t) -> None:
        """Close the connections of `t`'s drain that are due; the timer again for the next
        one (TARGET_DRAIN_TICK s later at the soonest)."""
        plan = self._target_drains.get(t)
        if plan is None:
            return
        schedule, i, _ = plan
        now = self.clock.now()
        n = len(schedule)
        while i < n and schedule[i][0] <= now:
            conn = schedule[i][1]
            i += 1
            relay = conn.relay
            if relay is not None and relay.end_side is None and t.conns.get(conn.id) is conn:
                try:
                    relay.close(1001, "backend draining")
                except Exception:            # a bug: the drain goes on with the others
                    log.exception("api %s: target %s: closing connection %d failed",
                                  t.api, t.label, conn.id)
        plan[1] = i
        if i >= n:
            del self._target_drains[t]
            return
        plan[2] = self.clock.call_later(max(TARGET_DRAIN_TICK, schedule[i][0] - now),
                                        self._drain_tick, t)

    def _stop_target_drain(self, t) -> None:
        """Cancel the closes of `t`'s drain still pending."""
        plan = self._target_drains.pop(t, None)
        if plan is not None and plan[2] is not None:
            plan[2].cancel()

    def _stop_target_drains(self) -> None:
        for t in list(self._target_drains):
            self._stop_target_drain(t)

    def enable_target(self, api: str, target: str) -> dict:
        """Bring a target back into its pool: not draining (the closes still pending are
        cancelled), its outlier ejection cleared. Its active checks' verdict stays what
        it is. Returns the target's view."""
        pool, t = self._target(api, target)
        self._stop_target_drain(t)
        timer = self._eject_timers.pop(t, None)
        if timer is not None:
            timer.cancel()
        t.draining = False
        t.ejected_until = 0.0
        t.ejections = 0
        t.fails_in_row = 0
        log.warning("api %s: target %s enabled", t.api, t.label)
        if self.events is not None:
            self.events.emit(ev.TargetUpEvent(api=t.api, target=t.label, reason="enable"))
        return self._target_view(pool, t, self.clock.now())

    # ---- end of life -----------------------------------------------------------

    def relay_gone(self, relay) -> None:
        """The core's end of a relay (both legs gone, or an aborted relay's backend leg)."""
        self.end_of_life(relay.info)

    def end_of_life(self, conn: Connection, refusal: Refusal | None = None) -> None:
        """The last phase of every client connection, whatever ended it: refused (the
        refusal counted and its event emitted), relayed (its close counted and its event
        emitted, it leaves the table) or gone during its handshake. Its slots are released.
        Runs once per connection: a second call is a no-op."""
        if conn.ended:
            return
        conn.ended = True
        conn.cancel_timers()
        if conn.cap_slot:
            conn.cap_slot = False
            self.store.release_py(CAP_KEY)
        if conn.admission is not None:
            conn.admission.release()
        if conn.shared is not None:
            shared, conn.shared = conn.shared, None
            if self.cluster is not None:
                self.cluster.release(shared)
        target = conn.target
        if target is not None:
            conn.target = None
            target.active -= 1
            target.conns.pop(conn.id, None)
        if refusal is not None:
            self.metrics.count_reject(refusal.api or conn.api, refusal.kind, refusal.status)
            if refusal.table_full is not None:
                self.metrics.table_full[refusal.table_full] += 1
            if self.events is not None:
                self.events.emit(ev.RejectEvent(
                    api=refusal.api or conn.api, reason=refusal.kind, status=refusal.status,
                    client=refusal.client or conn.client_key, remote=conn.peer,
                    detail=refusal.reason))
        relay = conn.relay
        conn.relay = None
        if relay is None or self.live.pop(conn.id, None) is None:
            return
        am = self.metrics.api(conn.api)
        code, side = relay.end_code or 1006, relay.end_side or "gateway"
        am.closes[(code, side)] += 1
        duration = self.clock.now() - conn.started_mono
        am.record("duration_ms", duration * 1e3)
        if self.events is not None:
            c, b = relay.client, relay.backend
            self.events.emit(ev.CloseEvent(
                id=conn.id, api=conn.api, client=conn.client_key, code=code,
                reason=(relay.end_reason or b"").decode("utf-8", "replace"), side=side,
                duration_s=duration, messages_in=c.messages, messages_out=b.messages,
                bytes_in=c.bytes, bytes_out=b.bytes, rejected=c.rejected + b.rejected,
                delayed=c.delayed + b.delayed, dropped=c.dropped + b.dropped))
        if not self.live and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if self._recheck:
            self._update_accepting()

    # ---- the admin API's view (admin.AdminBackend) ------------------------

    def ready(self) -> bool:
        return self._open and bool(self.listeners) and not self.draining

    async def metrics_text(self) -> str:
        """Formatted on the loop one API at a time (see metrics.render_async)."""
        return await self.metrics.render()

    def histogram_names(self) -> list[str]:
        return [f"{api}/{kind}" for api, am in sorted(self.metrics.apis.items())
                for kind, arr in am.histograms().items() if arr is not None]

    def histogram(self, name: str):
        """A snapshot of a histogram named API/kind_unit (see README, "Histograms")."""
        api, _, kind = name.rpartition("/")
        am = self.metrics.apis.get(api)
        arr = am.histograms().get(kind) if am is not None else None
        return arr.to_hdr() if arr is not None else None

    def cluster_status(self) -> dict | None:
        """GET /cluster: this process's membership, renewals and shares (None: no cluster)."""
        return self.cluster.status() if self.cluster is not None else None

    def connections(self, api: str | None = None, client: str | None = None) -> list[dict]:
        return [c.describe() for c in self.live.values()
                if (api is None or c.api == api) and (client is None or c.client_key == client)]

    def close_connection(self, conn_id: int) -> bool:
        conn = self.live.get(conn_id)
        if conn is None or conn.relay is None:
            return False
        conn.relay.close(1001, "closed by administrator")
        return True

    def close_client(self, client: str) -> int:
        n = 0
        for conn in list(self.live.values()):
            if conn.client_key == client and conn.relay is not None:
                conn.relay.close(1001, "closed by administrator")
                n += 1
        return n

    async def reload(self) -> str | None:
        """Re-read the configuration file and apply it; None when applied, else why not
        (and nothing was changed)."""
        if self.config_path is None:
            return "no configuration file to reload"
        try:
            config = cfgmod.load(self.config_path)
            router = compile_config(config)
        except cfgmod.ConfigError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"{self.config_path}: {exc}"
        problem = _unreloadable(self.config, config)
        if problem is None and self._given_sockets is not None:
            problem = listeners_changed(self.config, config)
        if problem is not None:
            return f"{self.config_path}: {problem}"
        # Listeners: contexts read and new sockets bound before anything changes.
        current = {(listener.host, listener.port): listener for listener in self.listeners}
        plan: list[tuple[Listener, object]] = []
        opened: list[Listener] = []
        try:
            for i, lc in enumerate(config.listeners):
                ctx = listener_context(i, lc)
                old = current.get((lc.host, lc.port))
                if old is None:
                    old = Listener(lc.host, lc.port, await bind(self.loop, i, lc, config.backlog), None)
                    opened.append(old)
                plan.append((old, ctx))
        except OSError as exc:
            for listener in opened:
                listener.close()
            return f"{self.config_path}: {exc}"
        kept = {id(listener) for listener, _ in plan}
        removed = [listener for listener in self.listeners if id(listener) not in kept]
        self._update_accepting_off()     # and on again below, for the new set
        for listener, ctx in plan:
            listener.ctx = ctx
            if listener not in opened and config.backlog != self.config.backlog:
                for s in listener.sockets:
                    s.listen(config.backlog)
        for listener in removed:
            listener.close()             # live connections accepted there are not touched
        self.listeners = [listener for listener, _ in plan]
        names = {a.name for a in router.apis}
        self.config, self.router = config, router
        self.pools = build_pools(router, self.pools)
        self.handshake_timeout = float(config.handshake_timeout)
        if self.handshake_timeout != self.handshake_deadlines.delay:
            # New handshakes go to a new FIFO; the old one runs out on its own.
            self.handshake_deadlines = Deadlines(self.clock, self.handshake_timeout)
        # Empty FIFOs go: one for a time-out no longer configured is not kept.
        self.dial_deadlines = {t: d for t, d in self.dial_deadlines.items() if len(d)}
        self.max_header_size = int(config.max_header_size)
        self._apply_limits(config)
        for name in names:
            self.metrics.api(name)
        self._bind_pools()
        grace = float(config.reload_grace)
        for conn in self.live.values():
            if conn.api not in names and conn.relay is not None and conn.removal_timer is None:
                conn.removal_timer = self.clock.call_later(
                    grace, conn.relay.close, 1001, "API removed by reload")
        self._update_accepting()
        self.health.update()
        changes = [f"+{listener.describe()}" for listener in opened]
        changes += [f"-{listener.host}:{listener.port}" for listener in removed]
        log.warning("configuration reloaded from %s%s", self.config_path,
                    f" (listeners: {', '.join(changes)})" if changes else "")
        return None

    def _update_accepting_off(self) -> None:
        """Stop accepting on every listener (before the set of listeners changes, or the end)."""
        self._apply_mode("off")

    # ---- drain and shutdown -----------------------------------------------

    async def drain(self, grace: float, exit: bool = False) -> None:
        """Start draining and return: `/readyz` turns false, new upgrades get 503, live
        connections get 1001 and are cut after `grace`. The listeners stay open (answering
        503); with `exit`, once the drain is over the process is asked to exit (`on_exit`),
        or, without one, the listeners are closed."""
        task = self._start_drain(grace)
        if exit and not self._exit_asked:
            self._exit_asked = True
            task.add_done_callback(self._drained_exit)

    def _start_drain(self, grace: float):
        if self._drain_task is None:
            self.draining = True
            self._drain_task = self.loop.create_task(self._drain(grace))
        return self._drain_task

    def _drained_exit(self, _task) -> None:
        if self.on_exit is not None:
            self.on_exit()
        else:
            self.loop.create_task(self.close())

    async def _drain(self, grace: float) -> None:
        if self._retired:
            log.info("retiring: %d connections closed with 1001, %g s to end; new clients "
                     "are accepted by the successor", len(self.live), grace)
        else:
            log.info("draining: %d connections closed with 1001, %g s to end; new upgrades "
                     "get 503", len(self.live), grace)
        self._stop_target_drains()       # every connection gets its 1001 now
        for hs in list(self.handshakes):
            if hs.state == "head" and not self._retired:
                hs.refuse(Refusal(503, "gateway is shutting down"))
        for conn in list(self.live.values()):
            if conn.relay is not None:
                conn.relay.close(1001, "gateway shutting down")
        if not await self._wait_live_gone(grace):
            log.warning("drain time over: cutting %d connections", len(self.live))
            self._cut()
        self.health.close()
        log.info("drained")

    async def _wait_live_gone(self, timeout: float) -> bool:
        if not self.live:
            return True
        if self._idle is None or self._idle.done():
            self._idle = self.loop.create_future()
        return await self._within(self._idle, timeout)

    async def _within(self, fut, timeout: float) -> bool:
        """Wait until `fut` is done, for `timeout` s of the clock at most (`fut` goes on
        after a time-out); True if it is done."""
        if fut.done():
            return True
        waiter = self.loop.create_future()

        def wake(*_) -> None:
            if not waiter.done():
                waiter.set_result(None)

        fut.add_done_callback(wake)
        timer = self.clock.call_later(timeout, wake)
        try:
            await waiter
        finally:
            timer.cancel()
            fut.remove_done_callback(wake)
        return fut.done()

    def _cut(self) -> None:
        for conn in list(self.live.values()):
            relay = conn.relay
            if relay is not None:
                for leg in (relay.client, relay.backend):
                    if leg.connected:
                        leg.abort_transport()

    async def retire(self, grace: float) -> None:
        """Leave the listeners to a successor (a rolling restart, fastgw.workers): stop
        accepting at once and close this process's descriptors of the listening sockets,
        whose queue the successor (holding the same sockets) goes on accepting from; nobody
        is answered 503. Handshakes under way finish; then every live connection gets 1001
        "gateway shutting down" and those left after `grace` are cut. Returns once that is
        over and the gateway is closed."""
        if self.loop is None or self._retired:
            return
        self._retired = True
        self._update_accepting()
        for listener in self.listeners:
            listener.close()         # this process's descriptors: the queue stays open
        # A client a uvloop server accepted in this loop turn counts from its connection_made,
        # one turn later: let it arrive before looking at the handshakes under way.
        for _ in range(3):
            await asyncio.sleep(0)
        start = self.clock.now()
        while (self.handshakes.counted or self._connecting) and self.clock.now() - start < grace:
            await self._within(self.loop.create_future(), 0.01)     # 10 ms on the clock
        await self.shutdown(max(0.0, grace - (self.clock.now() - start)))

    @property
    def retired(self) -> bool:
        """retire() was called: accepting stopped for good, and nobody is answered 503."""
        return self._retired

    def status(self) -> dict:
        return {
            "active": len(self.live),
            "handshakes": self.handshakes.counted,
            "accepted": self.accepted,
            "refused": {str(k): v for k, v in sorted(self.refused.items())},
            "draining": self.draining,
            "accepting": self._watching,
            "max_connections": self.max_connections,
            "fd_limit": self.fd_limit,
            # Slots given back by a lease's deallocator instead of the end of life: a bug.
            "lease_leaks": self.zone.lease_leaks,
        }

    async def shutdown(self, drain_time: float) -> None:
        """Drain (or go on with a drain already begun, cut after `drain_time` at most),
        then close the listeners."""
        if self.loop is None:
            return
        task = self._start_drain(drain_time)
        if not await self._within(task, drain_time):
            log.warning("drain time over: cutting %d connections", len(self.live))
            self._cut()
            await self._within(task, 1.0)
        await self.close()

    async def close(self) -> None:
        """Close the listeners; handshakes still open get 503, connections still live are cut
        (after up to 1 s for those closing)."""
        if not self._open:
            return
        self._open = False
        self._update_accepting_off()
        self.health.close()
        self.handshakes.wake = None
        if self._native_timer is not None:
            self._native_timer.cancel()
            self._native_timer = None
        if self._cap_timer is not None:
            self._cap_timer.cancel()
            self._cap_timer = None
        self._stop_target_drains()
        for timer in self._eject_timers.values():
            timer.cancel()
        self._eject_timers.clear()
        if self._table_timer is not None:
            self._table_timer.cancel()
            self._table_timer = None
            line = self.table_warnings.check(float("inf"))     # what the last interval held
            if line is not None:
                log.warning("%s", line)
        for listener in self.listeners:
            listener.close()
        for coro, hs in list(self._connecting.items()):
            del self._connecting[coro]
            coro.close()                 # closes its transport (a TLS handshake under way)
            self.handshakes.forget(hs)
        for hs in list(self.handshakes):
            hs.refuse(Refusal(503, "gateway is shutting down"))
        self.handshake_deadlines.cancel()
        for deadlines in self.dial_deadlines.values():
            deadlines.cancel()
        if not await self._wait_live_gone(1.0):
            self._cut()
        self.spares.release()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.stop()
