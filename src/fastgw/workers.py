"""The supervisor of worker processes (`workers: N`, N > 1).

`fastgw run` with N > 1 calls `supervise`: the configuration is loaded and checked already.
The supervisor relays nothing. Before any event loop exists it makes

- the shared limit region: LimitZone(2 * max-keys, workers=2 * N) (a rolling restart's new
  process needs a zone slot while the process it replaces still holds its own);
- per worker index and per configured listener, its own listening sockets (SO_REUSEPORT, one
  per address the host resolves to; port 0 is resolved once, by index 0's sockets). The
  supervisor holds them for ever: a restarted worker gets the same sockets, so clients queued
  on them while it restarts are not reset (closing a reuseport socket resets its queue);

then forks the N workers and runs its own loop: the admin API (its backend asks the workers),
supervision (pidfds), heartbeats, a snapshot of every worker each second, and the signals:

    SIGTERM, SIGINT   every worker drains (1001, drain-time) and exits; then the supervisor
    SIGHUP            the file is loaded and checked once, here; refused: no worker changes
    SIGUSR2           rolling restart: one index at a time, start the new process on the same
                      sockets, wait for its "ready", then retire the old one (drain-time)
    SIGUSR1           one "fastgw: status {...}" line with every worker's status

A worker is a Gateway (sockets=, zone=, id_base=incarnation << 32) on a fresh loop, talking to
the supervisor over its control channel (fastgw.control); it beats zone.beat(now) every second.
A worker forked later (restart, rolling restart) is forked from the supervisor's running loop:
the child first drops every trace of that loop (signal handlers, wakeup fd, running loop, the
supervisor's sockets) and always ends with os._exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

from fastgw import control
from fastgw._core import LimitZone
from fastgw.accept import ListenError, raise_fd_limit

log = logging.getLogger("fastgw")

__all__ = ["REASONS", "Supervisor", "WorkerProc", "make_sockets", "supervise"]

# Why a worker was replaced (fastgw_worker_restarts_total{reason}).
REASONS = ("exit", "signal", "heartbeat", "rolling")
HEARTBEAT_INTERVAL = 1.0       # a worker's zone.beat, and the supervisor's look at the beats
POLL_INTERVAL = 1.0            # the "snapshot" of every worker
FAST_DEATH = 2.0               # a worker dead this soon after its start: back-off before the next
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
READY_TIMEOUT = 20.0           # a new worker says "ready" within this, or counts as failed
STOP_MARGIN = 5.0              # past the drain time, before the workers left are killed

# The supervisor's signals; a worker sets them back (and ignores those the supervisor acts on).
SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(eq=False)
class WorkerProc:
    """One worker process (sup.workers holds the current one of each index)."""

    index: int
    slot: int                  # its slot in the zone
    pid: int
    incarnation: int           # unique per process ever started, from 1
    started: float             # time.time()
    restarts: int = 0          # of this index
    ready: bool = False
    # The supervisor's own bookkeeping.
    started_mono: float = field(default=0.0, repr=False)
    peer: control.Peer | None = field(default=None, repr=False)
    retiring: bool = field(default=False, repr=False)
    killed_for: str | None = field(default=None, repr=False)   # "heartbeat": we killed it
    exit_reason: str | None = field(default=None, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)  # our end of the channel
    _pidfd: int = field(default=-1, repr=False)
    _ready: asyncio.Future | None = field(default=None, repr=False)
    _exited: asyncio.Future | None = field(default=None, repr=False)

    def describe(self) -> dict:
        return {"index": self.index, "pid": self.pid, "incarnation": self.incarnation,
                "slot": self.slot, "started": self.started, "restarts": self.restarts,
                "ready": self.ready}


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """The supervisor's default executor: runs the function at once, on the loop's thread,
    and never starts a thread (asyncio's getaddrinfo would start one, and a fork needs a
    process with one thread). A ThreadPoolExecutor only because asyncio insists."""

    def submit(self, fn, /, *args, **kwargs):
        fut = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


async def _getaddrinfo_here(host, port, *, family=0, type=0, proto=0, flags=0):
    """The supervisor's loop.getaddrinfo: on the loop's thread (uvloop's would start libuv's
    thread pool, and a fork needs a process with one thread). Used at its start only (the
    admin API's listener): the supervisor dials nothing."""
    return socket.getaddrinfo(host, port, family, type, proto, flags)


def make_sockets(config, n: int) -> list[list[list[socket.socket]]]:
    """[index][listener] -> the listening sockets of worker `index` for that listener: the
    listener's addresses, each bound with SO_REUSEADDR and SO_REUSEPORT, listen(backlog),
    non-blocking. Port 0 is resolved by index 0; the others bind the same port.
    Raises ListenError ("listeners[i]: cannot listen on HOST:PORT: why")."""
    out: list[list[list[socket.socket]]] = [[] for _ in range(n)]
    made: list[socket.socket] = []
    try:
        for li, lc in enumerate(config.listeners):
            try:
                infos = socket.getaddrinfo(lc.host, lc.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except OSError as exc:
                raise ListenError(exc.errno, f"listeners[{li}]: cannot resolve {lc.host}: {exc}") from None
            addrs = list(dict.fromkeys(infos))
            ports: list[int] = []
            for i in range(n):
                socks = []
                for k, (family, type_, proto, _, addr) in enumerate(addrs):
                    s = socket.socket(family, type_, proto)
                    made.append(s)
                    socks.append(s)
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        if family == socket.AF_INET6:
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        if i > 0:
                            addr = (addr[0], ports[k], *addr[2:])
                        s.bind(addr)
                        s.listen(config.backlog)
                        s.setblocking(False)
                    except OSError as exc:
                        raise ListenError(exc.errno, f"listeners[{li}]: cannot listen on "
                                          f"{lc.host}:{lc.port}: {exc.strerror or exc}") from None
                if i == 0:
                    ports = [s.getsockname()[1] for s in socks]
                out[i].append(socks)
    except BaseException:
        for s in made:
            s.close()
        raise
    return out


class Supervisor:
    """The parent of the worker processes (see the module's docstring).

    Public (the admin side, fastgw.observe.aggregate, uses these):
      attributes: `workers` (the current WorkerProc of each index), `procs` (pid -> every
      worker process not reaped yet: the current ones, a rolling restart's new one, those
      retiring), `config` (as last reloaded), `config_path`, `n`, `zone`, `sockets`
      ([index][listener] -> sockets), `restarts_total` (reason -> count, every reason of
      REASONS), `last_snapshot` (incarnation -> snapshot, within a second), `on_retired`
      (callback(worker, last snapshot or None), called once per process reaped), `admin`,
      `draining`, `stopping`, `drained_targets` ((api, target) drained by the admin API:
      a worker started later is told at its "ready"); properties `rolling`, `addresses`.
      methods: `await ask(worker, op, **args)`, `await ask_all(op, **args)`, `await reload()`,
      `await drain(grace, exit=False)`, `await rolling_restart()` (RuntimeError if one is
      under way), `start_rolling_restart()` (the same in a task), `ready()`, `await status()`,
      `grace()` (the drain time now), `spawn(index, restarts)`, `await run()`.
    """

    def __init__(self, config, config_path: str | None, drain_time: float | None, runner, n: int):
        self.config = config
        self.config_path = config_path
        self.drain_time = drain_time           # --drain-time; None: the file's (as reloaded)
        self.runner = runner                   # fastgw.loops.loop_runner(...)
        self.n = n
        self.zone = LimitZone(2 * config.limits.max_keys, workers=2 * n)
        raise_fd_limit()                       # the workers inherit it
        self.sockets = make_sockets(config, n)
        self.workers: list[WorkerProc] = []
        self.procs: dict[int, WorkerProc] = {}
        self.restarts_total: dict[str, int] = {reason: 0 for reason in REASONS}
        self.last_snapshot: dict[int, object] = {}
        self.on_retired = None                 # on_retired(worker, last snapshot or None)
        self.loop = None
        self.admin = None
        self.draining = False
        self.stopping = False
        # (api, target) drained by the admin API and not enabled since: a worker started
        # later (a restart, a rolling restart) is told at its "ready".
        self.drained_targets: set[tuple[str, str]] = set()
        self._drain_grace = 0.0
        self._incarnations = 0
        self._slots: set[int] = set()          # zone slots held (alive or not yet reconciled)
        self._backoff = [BACKOFF_MIN] * n
        self._rolling_task = None
        self._rolling_index: int | None = None
        self._stop = None
        self._timers: set = set()
        self._threads_warned = False
        self._tasks: set = set()

    # ---- processes -----------------------------------------------------------

    @property
    def rolling(self) -> bool:
        """A rolling restart is under way."""
        return self._rolling_task is not None and not self._rolling_task.done()

    def grace(self) -> float:
        return self.drain_time if self.drain_time is not None else float(self.config.drain_time)

    def _free_slot(self) -> int:
        for slot in range(self.zone.workers):
            if slot not in self._slots:
                return slot
        raise RuntimeError("no free zone slot for a new worker process")

    def spawn(self, index: int, restarts: int = 0) -> WorkerProc:
        """Fork the worker process of `index` (it starts serving on the index's sockets)."""
        slot = self._free_slot()
        self._incarnations += 1
        incarnation = self._incarnations
        threads = len(os.listdir("/proc/self/task"))
        if threads > 1 and not self._threads_warned:
            self._threads_warned = True
            log.warning("forking a worker with %d threads alive in the supervisor (a bug: "
                        "a child inherits their locks)", threads)
        ours, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        # No signal between the fork and the child's own handlers: the supervisor's would
        # write to the supervisor's wakeup descriptor (a child inherits it).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:
                self._child(index, slot, incarnation, theirs, ours, mask)   # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        wp = WorkerProc(index=index, slot=slot, pid=pid, incarnation=incarnation,
                        started=time.time(), restarts=restarts, started_mono=time.monotonic())
        wp._sock = ours
        self.procs[pid] = wp
        self._slots.add(slot)
        return wp

    def _child(self, index: int, slot: int, incarnation: int, sock: socket.socket,
               ours: socket.socket, mask) -> None:
        status = 1
        try:
            gc.freeze()                      # the parent's objects: never collected here
            self._forget_parent(index, sock, ours)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            sockets = self.sockets[index]
            status = self.runner(run_worker(self.config, self.config_path, self.zone, slot,
                                            index, incarnation, sockets, sock, self.grace(),
                                            drained=sorted(self.drained_targets)))
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status if isinstance(status, int) else 1)

    def _forget_parent(self, index: int, sock: socket.socket, ours: socket.socket) -> None:
        """In a new child: no trace of the supervisor's loop, signals or descriptors."""
        # SIGTERM drains this worker alone (its loop's handler); the others are the
        # supervisor's to act on (a terminal's Ctrl-C reaches the whole process group).
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(None)
        ours.close()
        for i, per_listener in enumerate(self.sockets):
            if i != index:
                for socks in per_listener:
                    for s in socks:
                        s.close()
        for wp in self.procs.values():
            if wp._pidfd >= 0:
                os.close(wp._pidfd)
        # Every other socket of the supervisor: the other workers' control ends, the admin
        # API's listener and its clients, the loop's self-pipe (left to nobody: the loop
        # never runs here). Standard streams are kept, whatever they are.
        keep = {0, 1, 2, sock.fileno()}
        keep.update(s.fileno() for socks in self.sockets[index] for s in socks)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep:
                continue
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    os.close(fd)
            except OSError:
                pass

    async def _attach(self, wp: WorkerProc) -> None:
        """Our end of a new worker: its control channel and its pidfd."""
        loop = self.loop
        wp._ready = loop.create_future()
        wp._exited = loop.create_future()
        wp.peer = await control.connect(wp._sock, on_event=lambda m: self._on_event(wp, m))
        wp._pidfd = os.pidfd_open(wp.pid)
        loop.add_reader(wp._pidfd, self._reap, wp)

    def _on_event(self, wp: WorkerProc, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            wp.ready = True
            if not wp._ready.done():
                wp._ready.set_result(None)
            if self.draining and not self.stopping:
                self._spawn_task(self._ask_quietly(wp, "drain", grace=self._drain_grace, exit=False))
            # Forked before a drain (a rolling restart's new process): told now.
            for api, target in list(self.drained_targets):
                self._spawn_task(self._ask_quietly(wp, "drain_target", api=api, target=target,
                                                   grace=0.0))
        elif event == "final":
            self.last_snapshot[wp.incarnation] = message.get("snapshot")

    def _reap(self, wp: WorkerProc) -> None:
        """A worker process ended: why, its zone slot reconciled, then (maybe) its successor."""
        self.loop.remove_reader(wp._pidfd)
        os.close(wp._pidfd)
        wp._pidfd = -1
        try:
            _, status = os.waitpid(wp.pid, 0)
        except ChildProcessError:
            status = 0
        if wp.killed_for is not None:
            reason, why = wp.killed_for, "was killed (no heartbeat)"
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            reason, why = "signal", f"was killed by signal {name}"
        else:
            reason, why = "exit", f"exited with status {os.waitstatus_to_exitcode(status)}"
        if wp.retiring:
            reason = "rolling"
        wp.exit_reason = reason
        released = self.zone.reconcile(wp.slot)
        self._slots.discard(wp.slot)
        self.procs.pop(wp.pid, None)
        if wp.peer is not None:
            wp.peer.close()
        snapshot = self.last_snapshot.pop(wp.incarnation, None)
        if self.on_retired is not None:
            try:
                self.on_retired(wp, snapshot)
            except Exception:
                log.exception("on_retired failed")
        replace = (not self.stopping and not wp.retiring and self.workers[wp.index] is wp
                   and self._rolling_index != wp.index)
        delay = 0.0
        if replace:
            self.restarts_total[reason] += 1
            lived = time.monotonic() - wp.started_mono
            if lived < FAST_DEATH:           # it keeps dying at its start: wait longer each time
                delay = self._backoff[wp.index]
                self._backoff[wp.index] = min(2 * delay, BACKOFF_MAX)
            else:
                self._backoff[wp.index] = BACKOFF_MIN
        quiet = self.stopping or (wp.retiring and reason == "rolling" and status == 0)
        if not quiet:
            held = f"; {released} slots released" if released else ""
            then = ""
            if replace:
                then = (f"; restarting in {delay:g} s (it died {lived:.1f} s after its start)"
                        if delay else "; restarting")
            print(f"fastgw: worker {wp.index} (pid {wp.pid}) {why}{held}{then}",
                  file=sys.stderr, flush=True)
        if not wp._exited.done():
            wp._exited.set_result(status)
        if wp._ready is not None and not wp._ready.done():
            wp._ready.set_exception(RuntimeError(f"worker {wp.index} (pid {wp.pid}) {why} before it was ready"))
            wp._ready.exception()                # looked at: no "never retrieved" warning
        if replace:
            self._later(delay, self._restart, wp)

    def _later(self, delay: float, callback, *args) -> None:
        """callback(*args) in `delay` s, unless the supervisor stops first."""
        def run():
            self._timers.discard(handle)
            callback(*args)
        handle = self.loop.call_later(delay, run)
        self._timers.add(handle)

    def _restart(self, old: WorkerProc) -> None:
        if self.stopping or self.workers[old.index] is not old:
            return
        try:
            new = self.spawn(old.index, restarts=old.restarts + 1)
        except OSError as exc:               # fork: EAGAIN, ENOMEM
            delay = self._backoff[old.index]
            self._backoff[old.index] = min(2 * delay, BACKOFF_MAX)
            print(f"fastgw: cannot start worker {old.index}: {exc}; trying again in {delay:g} s",
                  file=sys.stderr, flush=True)
            self._later(delay, self._restart, old)
            return
        self.workers[old.index] = new
        self._spawn_task(self._attach(new))

    def _spawn_task(self, coro):
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_beats(self) -> None:
        """Every second: a worker whose loop has not beaten for worker-heartbeat-timeout is
        killed (and replaced, reason "heartbeat")."""
        self._later(HEARTBEAT_INTERVAL, self._check_beats)
        timeout = float(self.config.worker_heartbeat_timeout)
        now = time.monotonic()
        for wp in list(self.procs.values()):
            if wp.killed_for is not None or self.stopping:
                continue
            beat = self.zone.worker_info(wp.slot)["beat"]
            silent = now - max(beat, wp.started_mono)
            if silent > timeout:
                print(f"fastgw: worker {wp.index} (pid {wp.pid}) sent no heartbeat for "
                      f"{silent:.1f} s: killing it", file=sys.stderr, flush=True)
                wp.killed_for = "heartbeat"
                try:
                    os.kill(wp.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    async def _poll(self) -> None:
        """Every second: the snapshot of every worker process (sup.last_snapshot)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            procs = [wp for wp in self.procs.values() if wp.ready]
            replies = await asyncio.gather(*(self.ask(wp, "snapshot") for wp in procs),
                                           return_exceptions=True)
            for wp, reply in zip(procs, replies):
                if not isinstance(reply, BaseException) and wp.pid in self.procs:
                    self.last_snapshot[wp.incarnation] = reply

    # ---- asking the workers --------------------------------------------------

    async def ask(self, worker: WorkerProc, op: str, **args):
        """`op` on one worker (2 s at most: TimeoutError; ConnectionError if it is gone)."""
        if worker.peer is None:
            raise ConnectionError(f"worker {worker.index} has no control channel yet")
        return await worker.peer.ask(op, **args)

    async def ask_all(self, op: str, **args) -> list[tuple[WorkerProc, object]]:
        """`op` on every current worker at once; those that did not answer are left out."""
        workers = [wp for wp in self.workers if wp.peer is not None and wp.pid in self.procs]
        replies = await asyncio.gather(*(self.ask(wp, op, **args) for wp in workers),
                                       return_exceptions=True)
        return [(wp, r) for wp, r in zip(workers, replies) if not isinstance(r, BaseException)]

    async def _ask_quietly(self, wp: WorkerProc, op: str, **args):
        try:
            return await self.ask(wp, op, **args)
        except (TimeoutError, ConnectionError, control.ControlError) as exc:
            log.debug("worker %d: %s: %r", wp.index, op, exc)
            return None

    def ready(self) -> bool:
        """Every worker is ready, and nothing drains."""
        return (not self.draining and not self.stopping
                and all(wp.ready and wp.pid in self.procs for wp in self.workers))

    async def status(self) -> dict:
        """Every worker's Gateway.status() and the sums of the numbers."""
        procs = sorted(self.procs.values(), key=lambda wp: (wp.index, wp.incarnation))
        replies = await asyncio.gather(*(self.ask(wp, "status") for wp in procs),
                                       return_exceptions=True)
        rows, sums = [], {"active": 0, "handshakes": 0, "accepted": 0, "lease_leaks": 0}
        for wp, reply in zip(procs, replies):
            row = wp.describe()
            row["current"] = self.workers[wp.index] is wp
            row["zone"] = self.zone.worker_info(wp.slot)      # pid, beat, held
            if isinstance(reply, BaseException):
                row["error"] = repr(reply)
            else:
                row["status"] = reply
                for key in sums:
                    sums[key] += int(reply.get(key, 0))
            rows.append(row)
        return {**sums, "workers": rows, "restarts": dict(self.restarts_total),
                "draining": self.draining, "rolling": self.rolling}

    # ---- reload, drain, rolling restart --------------------------------------

    async def reload(self) -> str | None:
        """Load and check the file once, here; refused (the reason returned): no worker
        changes; accepted: every worker reloads it. None once applied."""
        from fastgw import config as cfgmod
        from fastgw.gateway import _unreloadable, listeners_changed
        from fastgw.routing import compile_config
        path = self.config_path
        if path is None:
            return "no configuration file to reload"
        try:
            config = cfgmod.load(path)
            compile_config(config)
        except cfgmod.ConfigError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"{path}: {exc}"
        problem = _unreloadable(self.config, config) or listeners_changed(self.config, config)
        if problem is not None:
            return f"{path}: {problem}"
        self.config = config                 # what a worker forked from now on starts with
        # Every process that goes on serving: a rolling restart's new one too (forked before
        # this, it may not be sup.workers' yet), not those retiring.
        workers = [wp for wp in self.procs.values() if not wp.retiring and wp.peer is not None]
        answers = await asyncio.gather(*(self.ask(wp, "reload") for wp in workers),
                                       return_exceptions=True)
        replies = {wp: r for wp, r in zip(workers, answers) if not isinstance(r, BaseException)}
        errors = []
        for wp in workers:
            if wp not in replies:
                errors.append(f"worker {wp.index} (pid {wp.pid}) did not answer")
            elif replies[wp] is not None:
                errors.append(f"worker {wp.index} (pid {wp.pid}): {replies[wp]}")
        return "; ".join(errors) if errors else None

    async def drain(self, grace: float, exit: bool = False) -> None:
        """Every worker drains (new upgrades 503, live connections 1001, cut after `grace`);
        with `exit`, the workers exit once drained and so does the supervisor."""
        self.draining = True
        self._drain_grace = grace
        if exit:
            self._request_stop("drain", grace)
            return
        await self.ask_all("drain", grace=grace, exit=False)

    def _request_stop(self, why: str, grace: float) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result((why, grace))

    async def rolling_restart(self) -> None:
        """Replace every worker, one index at a time: fork the new process on the same
        sockets (a fresh zone slot), wait for its "ready", then retire the old one (it stops
        accepting at once, 1001 to its connections, drain-time) and wait for its exit.
        RuntimeError if one is under way already."""
        if self.rolling and self._rolling_task is not asyncio.current_task():
            raise RuntimeError("a rolling restart is under way")
        if self._rolling_task is None or self._rolling_task.done():
            self._rolling_task = asyncio.current_task()
        print(f"fastgw: rolling restart of {self.n} workers", file=sys.stderr, flush=True)
        try:
            for index in range(self.n):
                if self.stopping:
                    return
                if not await self._replace(index):
                    return
        finally:
            self._rolling_index = None
        print("fastgw: rolling restart done", file=sys.stderr, flush=True)

    def start_rolling_restart(self):
        """Start a rolling restart in a task (returned); RuntimeError if one is under way."""
        if self.rolling:
            raise RuntimeError("a rolling restart is under way")
        self._rolling_task = self._spawn_task(self.rolling_restart())
        return self._rolling_task

    async def _replace(self, index: int) -> bool:
        """One index of a rolling restart; False (and a line said why) if it stopped."""
        old = self.workers[index]
        self._rolling_index = index
        new = self.spawn(index, restarts=old.restarts + 1)
        await self._attach(new)
        try:
            await asyncio.wait_for(asyncio.shield(new._ready), READY_TIMEOUT)
        except (Exception, asyncio.TimeoutError) as exc:
            print(f"fastgw: rolling restart stopped: the new worker {index} (pid {new.pid}) "
                  f"was not ready: {exc}", file=sys.stderr, flush=True)
            self._kill(new)
            await asyncio.shield(new._exited)
            self._rolling_index = None
            if old.pid not in self.procs and not self.stopping:     # the old one died meanwhile
                self._restart(old)
            return False
        self._rolling_index = None
        if new.pid not in self.procs:                # died at once after its "ready"
            print(f"fastgw: rolling restart stopped: the new worker {index} (pid {new.pid}) "
                  "ended after it was ready", file=sys.stderr, flush=True)
            if old.pid not in self.procs and not self.stopping:
                self._restart(old)
            return False
        self.workers[index] = new
        if old.pid not in self.procs:               # died while the new one started
            return True
        old.retiring = True
        self.restarts_total["rolling"] += 1
        grace = self.grace()
        await self._ask_quietly(old, "retire", grace=grace)
        try:
            await asyncio.wait_for(asyncio.shield(old._exited), grace + STOP_MARGIN)
        except asyncio.TimeoutError:
            print(f"fastgw: worker {index} (pid {old.pid}) did not exit after its retirement: "
                  "killing it", file=sys.stderr, flush=True)
            self._kill(old)
            await asyncio.shield(old._exited)
        return True

    def _kill(self, wp: WorkerProc) -> None:
        try:
            os.kill(wp.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # ---- the supervisor's loop ----------------------------------------------

    async def run(self) -> int:
        """Attach to the workers forked before the loop; serve until stopped. Exit status."""
        try:
            return await self._run()
        except Exception:                    # a bug: the workers are not left behind
            traceback.print_exc()
            if not self.stopping:
                await self._shutdown(0.0)
            return 1

    async def _run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        loop.set_default_executor(_InlineExecutor())
        loop.getaddrinfo = _getaddrinfo_here
        self._stop = loop.create_future()
        for wp in self.workers:
            await self._attach(wp)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self._on_hup()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._spawn_task(self._on_usr1()))
        loop.add_signal_handler(signal.SIGUSR2, self._on_usr2)
        try:
            await self._wait_ready()
        except RuntimeError as exc:
            print(f"fastgw: {exc}", file=sys.stderr, flush=True)
            await self._shutdown(0.0)
            return 1
        config = self.config
        if config.admin is not None:
            from fastgw.observe.admin import start_admin
            token = os.environ.get(config.admin.token_env) if config.admin.token_env else None
            try:
                self.admin = await start_admin(_backend(self), config.admin.host,
                                               config.admin.port, token)
            except OSError as exc:
                print(f"fastgw: cannot listen: {exc}", file=sys.stderr, flush=True)
                await self._shutdown(0.0)
                return 1
        for scheme, host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            print(f"fastgw: listening on {scheme}://{shown}:{port}", file=sys.stderr, flush=True)
        if self.admin is not None:
            print(f"fastgw: admin on {self.admin.url}", file=sys.stderr, flush=True)
        note = ""
        try:
            st = await self.ask(self.workers[0], "status")
            cap = st.get("max_connections") or "no cap"
            note = f"; max-connections {cap} (descriptor limit {st.get('fd_limit')})"
        except (TimeoutError, ConnectionError, control.ControlError):
            pass
        pids = ", ".join(str(wp.pid) for wp in self.workers)
        print(f"fastgw: {self.n} workers (pids {pids}){note}", file=sys.stderr, flush=True)
        if config.histogram_log is not None:
            print("fastgw: warning: histogram-log is not written with workers > 1 (the admin "
                  "API's /histograms has every worker's)", file=sys.stderr, flush=True)
        self._later(HEARTBEAT_INTERVAL, self._check_beats)
        self._spawn_task(self._poll())
        why, grace = await self._stop
        await self._shutdown(grace)
        print("fastgw: stopped", file=sys.stderr, flush=True)
        return 0

    @property
    def addresses(self) -> list[tuple[str, str, int]]:
        """(scheme, host, port) of index 0's sockets, in the order of the configuration."""
        out = []
        for lc, socks in zip(self.config.listeners, self.sockets[0]):
            scheme = "wss" if lc.tls is not None else "ws"
            out += [(scheme, *s.getsockname()[:2]) for s in socks]
        return out

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for wp in self.workers:
            try:
                await asyncio.wait_for(asyncio.shield(wp._ready), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RuntimeError(f"worker {wp.index} (pid {wp.pid}) was not ready within "
                                   f"{READY_TIMEOUT:g} s") from None

    def _on_stop_signal(self, signame: str) -> None:
        if self._stop.done():
            return
        active = sum(int(s.get("active", 0)) for s in self.last_snapshot.values()
                     if isinstance(s, dict))
        print(f"fastgw: {signame}: draining {active} connections", file=sys.stderr, flush=True)
        self._request_stop(signame, self.grace())

    async def _on_hup(self) -> None:
        error = await self.reload()
        print("fastgw: reloaded" if error is None else f"fastgw: reload refused: {error}",
              file=sys.stderr, flush=True)

    async def _on_usr1(self) -> None:
        print("fastgw: status " + json.dumps(await self.status()), file=sys.stderr, flush=True)

    def _on_usr2(self) -> None:
        try:
            self.start_rolling_restart()
        except RuntimeError as exc:
            print(f"fastgw: SIGUSR2: {exc}", file=sys.stderr, flush=True)

    async def _shutdown(self, grace: float) -> None:
        """Every worker drains and exits; those left after grace + STOP_MARGIN are killed."""
        self.stopping = True
        self.draining = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await asyncio.gather(*(self._ask_quietly(wp, "drain", grace=grace, exit=True)
                               for wp in list(self.procs.values())))
        waiting = [wp._exited for wp in self.procs.values() if wp._exited is not None]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=grace + STOP_MARGIN)
            if pending:
                for wp in list(self.procs.values()):
                    print(f"fastgw: worker {wp.index} (pid {wp.pid}) still running after the "
                          "drain: killing it", file=sys.stderr, flush=True)
                    self._kill(wp)
                await asyncio.wait(pending, timeout=5.0)
        for wp in list(self.procs.values()):       # forked, never attached (not expected)
            self._kill(wp)
            os.waitpid(wp.pid, 0)
            self.zone.reconcile(wp.slot)
            self.procs.pop(wp.pid, None)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        for per_listener in self.sockets:
            for socks in per_listener:
                for s in socks:
                    s.close()


# ---- the worker process ------------------------------------------------------------


def _snapshot(gw):
    """The worker's metrics snapshot (fastgw.observe.aggregate's, once it exists)."""
    try:
        from fastgw.observe.aggregate import snapshot
    except ImportError:
        return gw.status()
    return snapshot(gw)


async def _snapshot_op(gw):
    """The "snapshot" op: the same, one API at a time with a turn for the relay between."""
    try:
        from fastgw.observe.aggregate import snapshot_async
    except ImportError:
        return gw.status()
    return await snapshot_async(gw)


def _target_op(method, *args) -> dict:
    """The "drain_target" and "enable_target" ops: {"view": the target's view} or, for an
    unknown API or target, {"unknown": why} (an answer, not an error: the supervisor
    answers 404 only when every worker says so)."""
    from fastgw.gateway import UnknownTarget
    try:
        return {"view": method(*args)}
    except UnknownTarget as exc:
        return {"unknown": str(exc)}


async def run_worker(config, config_path, zone, slot: int, index: int, incarnation: int,
                     sockets, sock: socket.socket, drain_time: float,
                     drained: list | None = None) -> int:
    """A worker process's main coroutine, on its own fresh loop: the Gateway on the
    supervisor's sockets for `index`, its control channel, its heartbeat. Exit status.
    `drained`: the (api, target) drained by the admin API, drained here before the start."""
    from fastgw.gateway import Gateway
    from fastgw.observe.events import EventSink
    zone.set_worker(slot)
    for handler in logging.getLogger().handlers:     # the CLI's: which worker says it
        handler.setFormatter(logging.Formatter(
            f"fastgw: worker {index}: %(levelname)s %(name)s: %(message)s"))
    loop = asyncio.get_running_loop()
    gw = Gateway(config, config_path, zone=zone, sockets=sockets, id_base=incarnation << 32)
    stop = loop.create_future()

    def finish(why: str) -> None:
        if not stop.done():
            stop.set_result(why)

    gw.on_exit = lambda: finish("drained")
    if config.events is not None:
        try:
            gw.events = EventSink(config.events.target, max_queue=config.events.max_queue)
        except OSError as exc:
            print(f"fastgw: worker {index}: events: {exc}", file=sys.stderr, flush=True)
            return 1
        gw.metrics.events_dropped = lambda: gw.events.dropped

    async def retire(grace: float) -> None:
        async def run():
            await gw.retire(grace)
            finish("retired")
        loop.create_task(run())

    handlers = {
        "snapshot": lambda: _snapshot_op(gw),
        "connections": lambda api=None, client=None: gw.connections(api, client),
        "close": lambda id: gw.close_connection(id),
        "close_client": lambda client: gw.close_client(client),
        "reload": gw.reload,
        "drain": gw.drain,
        "retire": retire,
        "status": gw.status,
        "targets": gw.targets,
        "cluster": gw.cluster_status,
        "drain_target": lambda api, target, grace=None: _target_op(gw.drain_target, api,
                                                                   target, grace),
        "enable_target": lambda api, target: _target_op(gw.enable_target, api, target),
    }
    peer = await control.connect(sock, handlers=handlers,
                                 on_lost=lambda: finish("the supervisor is gone"))
    for api, target in drained or ():
        _target_op(gw.drain_target, api, target, 0.0)    # a reload may have removed it
    try:
        await gw.start()
    except OSError as exc:
        print(f"fastgw: worker {index}: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    beat_timer = None

    def beat() -> None:
        nonlocal beat_timer
        zone.beat(gw.clock.now())
        beat_timer = loop.call_later(HEARTBEAT_INTERVAL, beat)

    beat()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(gw.drain(drain_time, exit=True)))
    peer.event("ready")
    why = await stop
    if why != "retired":
        await gw.shutdown(drain_time if why != "drained" else 0.0)
    beat_timer.cancel()
    peer.event("final", snapshot=_snapshot(gw))
    deadline = time.monotonic() + 1.0
    while (not peer.closed and peer.transport.get_write_buffer_size()
           and time.monotonic() < deadline):
        await asyncio.sleep(0.01)
    if gw.events is not None:
        await gw.events.aclose()
    return 0


def _backend(sup: Supervisor):
    from fastgw.observe.aggregate import SupervisorBackend
    return SupervisorBackend(sup)


def supervise(config, config_path: str | None, drain_time: float | None, loop_name: str | None) -> int:
    """`fastgw run` with workers > 1 (the configuration loaded and checked). Exit status."""
    from fastgw.loops import loop_runner
    runner = loop_runner(loop_name)
    if runner is None:
        return 2
    n = len(os.sched_getaffinity(0)) if config.workers == "auto" else int(config.workers)
    try:
        sup = Supervisor(config, config_path, drain_time, runner, n)
    except OSError as exc:
        print(f"fastgw: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    for index in range(n):
        sup.workers.append(sup.spawn(index))
    try:
        return runner(sup.run())
    except KeyboardInterrupt:
        return 130
