"""One set of metrics for worker processes (workers > 1): snapshots, their sum, the
supervisor's admin backend.

Each worker sends its supervisor a :func:`snapshot` of its metrics (plain data: a msgpack
map). The supervisor adds them up in :class:`Totals`: the counters of every worker that
ever ran (a retired worker's last snapshot is *folded* into the total for ever, so that
counters never go down when a worker dies and is replaced), the gauges of the live ones,
the histograms merged (HdrHistogram addition). It renders the exposition with the single
process's renderer (:class:`fastgw.observe.metrics.Exposition`), plus two families of its
own: ``fastgw_workers`` and ``fastgw_worker_restarts_total{reason}``.

:class:`SupervisorBackend` is the :class:`fastgw.observe.admin.AdminBackend` of the
supervisor (fastgw.workers): every route reaches the workers through their control
channels. A worker killed (SIGKILL) loses what it counted since its last snapshot (polled
every second, and taken afresh by each /metrics): at most one poll interval of its counts.
Its live connections were counted in fastgw_connections_total but never in
fastgw_closes_total: after a SIGKILL the two no longer differ by the active gauge.
Messages limited for want of a limit-table slot are counted in the limit zone that every
worker shares: that count is read from the zone itself, not summed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

from hdrh.histogram import HdrHistogram

from fastgw.observe.metrics import (Exposition, _label, _num, api_sample, cluster_families,
                                    process_sample)
from fastgw.observe.histograms import new_histogram

__all__ = ["RESTART_REASONS", "SNAPSHOT_TIMEOUT", "SupervisorBackend", "Totals", "merge_targets",
           "snapshot", "snapshot_async"]

log = logging.getLogger("fastgw.admin")

#: The `reason` label of fastgw_worker_restarts_total, every one always written.
RESTART_REASONS = ("exit", "signal", "heartbeat", "rolling")

#: How long /metrics waits for a worker's fresh snapshot (then its last one is used).
SNAPSHOT_TIMEOUT = 1.0

_WORKER_FAMILIES = (
    ("fastgw_workers", "gauge", "Live worker processes."),
    ("fastgw_worker_restarts_total", "counter", "Worker processes replaced, by why."),
)


# ---- one worker's snapshot ----------------------------------------------------------


def snapshot(gw) -> dict:
    """Everything one gateway's /metrics and /histograms show, as plain data (str keys,
    ints, floats, lists, bytes: msgpack-able)::

        {"taken": monotonic s, "active": live relayed connections (as Gateway.status()),
         "apis": {name: metrics.api_sample},       # "active" a gauge, the rest counters
         "process": metrics.process_sample,        # "connections_max" a gauge
         "histograms": {"API/kind_unit": HdrHistogram encoding (b"": empty)}}

    About 0.05 ms per API, plus ~0.15 ms per histogram recorded into since the last
    snapshot (its encoding; see ApiMetrics.encoded_histograms). :func:`snapshot_async`
    gives the loop a turn between APIs.
    """
    snap = _start(gw)
    for name in sorted(gw.metrics.apis):
        _add_api_snapshot(snap, name, gw.metrics.apis[name])
    return _finish(snap, gw)


async def snapshot_async(gw) -> dict:
    """:func:`snapshot`, one API at a time with a turn for the event loop in between (so
    that the relay is never held for more than one API's work, ~0.3 ms)."""
    snap = _start(gw)
    for name in sorted(gw.metrics.apis):
        am = gw.metrics.apis.get(name)
        if am is not None:
            _add_api_snapshot(snap, name, am)
        await asyncio.sleep(0)
    return _finish(snap, gw)


def _start(gw) -> dict:
    return {"taken": time.monotonic(), "active": 0, "apis": {}, "process": {},
            "histograms": {}}


def _add_api_snapshot(snap: dict, name: str, am) -> None:
    snap["apis"][name] = api_sample(am)
    for kind, encoded in am.encoded_histograms().items():
        snap["histograms"][f"{name}/{kind}"] = encoded


def _finish(snap: dict, gw) -> dict:
    snap["process"] = process_sample(gw.metrics)
    snap["active"] = len(gw.live)
    return snap


# ---- their sum ----------------------------------------------------------------------


def _add_counts(into: dict, more: dict) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


def _add_list(into: list, more: list) -> list:
    if len(into) < len(more):
        into.extend([0] * (len(more) - len(into)))
    for i, n in enumerate(more):
        into[i] += n
    return into


def _empty_api() -> dict:
    return {"active": 0, "accepted": 0, "rejected": {}, "closes": [],
            "flows": {d: {"messages": 0, "bytes": 0, "rejected": 0, "delayed": 0, "dropped": 0,
                          "sizes": []} for d in ("request", "response")},
            "latency": {}, "targets": []}


def _empty_process() -> dict:
    return {"rejected_unrouted": {}, "events_dropped": 0, "table_full": {},
            "accept_errors": {}, "connections_max": 0}


def _add_api(into: dict, s: dict, gauges: bool) -> None:
    if gauges:
        into["active"] += s["active"]
    into["accepted"] += s["accepted"]
    _add_counts(into["rejected"], s["rejected"])
    closes = {(c, side): n for c, side, n in into["closes"]}
    for c, side, n in s["closes"]:
        closes[(c, side)] = closes.get((c, side), 0) + n
    into["closes"] = [[c, side, n] for (c, side), n in sorted(closes.items())]
    for d, flow in s["flows"].items():
        mine = into["flows"][d]
        for k, n in flow.items():
            if k == "sizes":
                _add_list(mine["sizes"], n)
            else:
                mine[k] += n
    for kind, h in s["latency"].items():
        if h is None:
            into["latency"].setdefault(kind, None)
            continue
        mine = into["latency"].get(kind)
        if mine is None:
            mine = into["latency"][kind] = {"buckets": [], "sum": 0.0, "count": 0}
        _add_list(mine["buckets"], h["buckets"])
        mine["sum"] += h["sum"]
        mine["count"] += h["count"]
    _add_targets(into["targets"], s.get("targets", ()), gauges)


def _add_targets(into: list, more, gauges: bool) -> None:
    """A pool's targets over workers, by label: counters summed, `active` summed and `up`
    the minimum (the target is up only where every worker finds it up); a target known
    to one worker only counts as that worker has it. Folded (not `gauges`): the
    counters only (`up` None until a live worker tells it)."""
    mine = {t["target"]: t for t in into}
    for t in more:
        kept = mine.get(t["target"])
        if kept is None:
            kept = mine[t["target"]] = {"target": t["target"], "active": 0, "up": None,
                                        "dial_failures": {}, "health_checks": {}}
            into.append(kept)
        if gauges:
            kept["active"] += t["active"]
            if t["up"] is not None:
                kept["up"] = t["up"] if kept["up"] is None else min(kept["up"], t["up"])
        _add_counts(kept["dial_failures"], t["dial_failures"])
        _add_counts(kept["health_checks"], t["health_checks"])


def _add_process(into: dict, s: dict, gauges: bool) -> None:
    _add_counts(into["rejected_unrouted"], s["rejected_unrouted"])
    into["events_dropped"] += s["events_dropped"]
    _add_counts(into["table_full"], s["table_full"])
    _add_counts(into["accept_errors"], s["accept_errors"])
    if gauges:
        # Each worker's own cap (its descriptors): the machine holds their sum.
        into["connections_max"] += s["connections_max"]
    c = s.get("cluster")
    if c is not None:                   # every worker process is a member on its own
        mine = into.setdefault("cluster", {"errors": {}, "renewals": 0, "shares": {},
                                           "redis": {"buckets": [], "sum": 0.0, "count": 0}})
        _add_counts(mine["errors"], c["errors"])
        mine["renewals"] += c["renewals"]
        _add_list(mine["redis"]["buckets"], c["redis"]["buckets"])
        mine["redis"]["sum"] += c["redis"]["sum"]
        mine["redis"]["count"] += c["redis"]["count"]
        if gauges:
            _add_counts(mine["shares"], c["shares"])


def _add_histogram(into: dict, name: str, encoded: bytes) -> None:
    """Add one encoded histogram to into[name] (an HdrHistogram; created empty)."""
    h = into.get(name)
    if h is None:
        h = into[name] = new_histogram().to_hdr()
    if encoded:
        h.decode_and_add(encoded)


class Totals:
    """The sum of worker snapshots: the folded counters of every retired worker, plus
    what the live workers' snapshots give (their gauges included)."""

    def __init__(self):
        self.apis: dict[str, dict] = {}             # folded counters (gauges stay 0)
        self.process = _empty_process()
        self.histograms: dict[str, HdrHistogram] = {}
        self.folded = 0                             # snapshots folded in so far

    def fold(self, snap: dict) -> None:
        """Add a retired worker's last snapshot for ever (its counters and histograms; its
        gauges died with it)."""
        for name, s in snap["apis"].items():
            _add_api(self.apis.setdefault(name, _empty_api()), s, gauges=False)
        _add_process(self.process, snap["process"], gauges=False)
        for name, encoded in snap["histograms"].items():
            _add_histogram(self.histograms, name, encoded)
        self.folded += 1

    def combined(self, live: Iterable[dict]) -> dict:
        """A snapshot-shaped sum (without histograms): folded counters + the live ones'."""
        apis = {name: _copy_api(s) for name, s in self.apis.items()}
        process = _copy_process(self.process)
        active = 0
        for snap in live:
            for name, s in snap["apis"].items():
                _add_api(apis.setdefault(name, _empty_api()), s, gauges=True)
            _add_process(process, snap["process"], gauges=True)
            active += snap.get("active", 0)
        return {"apis": dict(sorted(apis.items())), "process": process, "active": active}

    def render(self, live: Iterable[dict], workers: int, restarts: dict[str, int],
               zone_table_full: dict[str, int] | None = None) -> str:
        """The Prometheus exposition of the sum: the single process's families, then
        fastgw_workers and fastgw_worker_restarts_total (every reason).

        `zone_table_full`: the counts of fastgw_limit_table_full_total that the shared
        limit zone keeps for the whole machine (messages limited for want of a slot), read
        from the zone itself: every worker reports the same region's number, so their sum
        would count it once per worker, and it must not be folded either."""
        total = self.combined(live)
        if zone_table_full:
            total["process"]["table_full"].update(zone_table_full)
        ex = Exposition()
        for name, s in total["apis"].items():
            ex.add_api(name, s)
        ex.add_process(total["process"])
        reasons = [*RESTART_REASONS, *sorted(set(restarts) - set(RESTART_REASONS))]
        extra = (
            *(cluster_families(total["process"]["cluster"]) if "cluster" in total["process"] else ()),
            (*_WORKER_FAMILIES[0], [f"fastgw_workers {_num(workers)}"]),
            (*_WORKER_FAMILIES[1],
             [f'fastgw_worker_restarts_total{{reason="{_label(r)}"}} {_num(restarts.get(r, 0))}'
              for r in reasons]),
        )
        return ex.text(extra)

    def histogram_names(self, live: Iterable[dict]) -> list[str]:
        names = set(self.histograms)
        for snap in live:
            names.update(snap["histograms"])
        return sorted(names)

    def histogram(self, name: str, live: Iterable[dict]) -> HdrHistogram | None:
        """The merged histogram `name` (folded + live), or None if no worker has it."""
        found = name in self.histograms
        merged = new_histogram().to_hdr()
        if found:
            merged.add(self.histograms[name])
        for snap in live:
            encoded = snap["histograms"].get(name)
            if encoded is None:
                continue
            found = True
            if encoded:
                merged.decode_and_add(encoded)
        return merged if found else None


#: A target's states, the most severe first: the merged state is the most severe of the
#: workers' (one worker that sees it unhealthy is enough to say so).
_SEVERITY = ("draining", "unhealthy", "ejected", "healthy")


def merge_targets(per_worker: Iterable[list[dict]]) -> list[dict]:
    """The workers' GET /targets lists as one: by (api, target), in the order first seen;
    connections and dial_failures summed, the state the most severe of the workers'
    (draining > unhealthy > ejected > healthy), up only if up in every worker, ejected_for
    the longest, health_check the latest (by its "at")."""
    merged: dict[tuple, dict] = {}
    for rows in per_worker:
        for row in rows:
            key = (row["api"], row["target"])
            m = merged.get(key)
            if m is None:
                merged[key] = dict(row)
                continue
            m["connections"] += row["connections"]
            m["dial_failures"] += row["dial_failures"]
            m["state"] = min(m["state"], row["state"], key=_severity)
            m["up"] = bool(m["up"] and row["up"])
            m["ejected_for"] = max(m.get("ejected_for", 0.0), row.get("ejected_for", 0.0))
            check = row.get("health_check")
            if check is not None and (m.get("health_check") is None
                                      or check.get("at", 0) > m["health_check"].get("at", 0)):
                m["health_check"] = check
    return list(merged.values())


def _severity(state: str) -> int:
    return _SEVERITY.index(state) if state in _SEVERITY else len(_SEVERITY)


def _copy_api(s: dict) -> dict:
    out = _empty_api()
    _add_api(out, s, gauges=True)
    return out


def _copy_process(s: dict) -> dict:
    out = _empty_process()
    _add_process(out, s, gauges=True)
    return out


# ---- the supervisor's admin backend -------------------------------------------------


class SupervisorBackend:
    """The admin API of the supervisor of worker processes (admin.AdminBackend, and the
    routes only a supervisor has: /workers, /workers/restart).

    `sup` is fastgw.workers' supervisor: ``workers`` (the current process of each index:
    index, pid, incarnation, started, restarts, ready), ``ask(worker, op, **args)``,
    ``ask_all(op, **args)``, ``last_snapshot`` (incarnation -> its latest polled snapshot),
    ``restarts_total`` (reason -> count), ``reload()``, ``drain(grace, exit)``,
    ``rolling_restart()`` and the ``on_retired(worker, snapshot)`` hook, which this backend
    sets: a retired worker's last snapshot is folded into the totals.

    The counters shown are kept monotonic: the freshest snapshot seen of each worker
    process (asked by /metrics, or polled by the supervisor) counts until the process is
    retired, and then its freshest one is folded, once.
    """

    def __init__(self, sup, timeout: float = SNAPSHOT_TIMEOUT):
        self.sup = sup
        self.timeout = timeout
        self.totals = Totals()
        self.latest: dict[int, dict] = {}           # incarnation -> freshest snapshot seen
        self.retired: set[int] = set()              # incarnations folded already
        self._rolling: asyncio.Task | None = None
        sup.on_retired = self.retire

    # ---- the workers' snapshots ---------------------------------------------------

    def _workers(self) -> list:
        return [w for w in self.sup.workers if w is not None]

    def _serving(self, w) -> bool:
        """A worker process up (not reaped yet, when the supervisor says) and ready."""
        procs = getattr(self.sup, "procs", None)      # pid -> WorkerProc, of processes not reaped
        return bool(getattr(w, "ready", True)) and (procs is None or w.pid in procs)

    def _keep(self, incarnation: int, snap: dict | None) -> None:
        """Remember `snap` of that process if it is fresher than the one kept."""
        if snap is None or incarnation in self.retired:
            return
        kept = self.latest.get(incarnation)
        if kept is None or snap.get("taken", 0.0) >= kept.get("taken", 0.0):
            self.latest[incarnation] = snap

    def retire(self, worker, snap: dict | None) -> None:
        """The supervisor's on_retired hook: `worker` is gone for good; its freshest
        snapshot (the one given, or a fresher one seen) is folded into the totals, once."""
        inc = worker.incarnation
        if inc in self.retired:
            return
        self._keep(inc, snap)
        self._keep(inc, self.sup.last_snapshot.get(inc))
        self.retired.add(inc)
        last = self.latest.pop(inc, None)
        if last is not None:
            self.totals.fold(last)

    async def _ask(self, worker, op: str, timeout: float | None = None, **args) -> Any:
        return await asyncio.wait_for(self.sup.ask(worker, op, **args),
                                      self.timeout if timeout is None else timeout)

    async def _fresh(self) -> list[dict]:
        """The live snapshots: every ready worker asked afresh (at most `timeout` s each, in
        parallel); one that does not answer counts with its last snapshot. Processes not
        retired yet that are no longer in sup.workers (a rolling restart's old one, still
        draining) count with their last snapshot too."""
        workers = [w for w in self._workers() if self._serving(w)]
        answers = await asyncio.gather(*(self._ask(w, "snapshot") for w in workers),
                                       return_exceptions=True)
        for w, answer in zip(workers, answers):
            if isinstance(answer, dict):
                self._keep(w.incarnation, answer)
        for inc, snap in list(self.sup.last_snapshot.items()):
            self._keep(inc, snap)
        return [snap for inc, snap in self.latest.items() if inc not in self.retired]

    def live_workers(self) -> int:
        """fastgw_workers: worker processes up and serving."""
        return sum(1 for w in self._workers() if self._serving(w))

    # ---- admin.AdminBackend -------------------------------------------------------

    def ready(self) -> bool:
        """Some worker serves and nothing drains (a worker being replaced leaves the others
        serving, and its queue waits for its successor: the machine stays ready)."""
        sup = self.sup
        return (not getattr(sup, "draining", False) and not getattr(sup, "stopping", False)
                and any(self._serving(w) for w in self._workers()))

    async def metrics_text(self) -> str:
        live = await self._fresh()
        zone = getattr(self.sup, "zone", None)       # the limit zone all workers share
        shared = {"message-rate-limit": int(zone.message_overflows)} if zone is not None else None
        return self.totals.render(live, self.live_workers(), dict(self.sup.restarts_total), shared)

    async def histogram_names(self) -> list[str]:
        return self.totals.histogram_names(await self._fresh())

    async def histogram(self, name: str) -> HdrHistogram | None:
        return self.totals.histogram(name, await self._fresh())

    async def connections(self, api: str | None, client: str | None) -> list[dict]:
        rows = []
        for w, listed in sorted(await self.sup.ask_all("connections", api=api, client=client),
                                key=lambda pair: pair[0].index):
            for row in listed:
                rows.append({**row, "worker": w.index})
        return rows

    async def close_connection(self, conn_id: int) -> bool:
        inc = conn_id >> 32
        # Every process not reaped (a rolling restart's old one, still draining, too).
        procs = getattr(self.sup, "procs", None)
        for w in (list(procs.values()) if procs is not None else self._workers()):
            if w.incarnation == inc:
                try:
                    return bool(await self.sup.ask(w, "close", id=conn_id))
                except (TimeoutError, asyncio.TimeoutError, ConnectionError):
                    return False          # the worker is gone, and its connections with it
        return False

    async def close_client(self, client: str) -> int:
        return sum(int(n) for _, n in await self.sup.ask_all("close_client", client=client))

    async def reload(self) -> str | None:
        return await self.sup.reload()

    async def drain(self, grace: float, exit: bool = False) -> None:
        await self.sup.drain(grace, exit)

    # ---- the pools' targets -------------------------------------------------------------

    async def _ask_serving(self, op: str, **args) -> list:
        """`op` on every serving worker at once (at most `timeout` s each); the answers of
        those that answered."""
        workers = [w for w in self._workers() if self._serving(w)]
        answers = await asyncio.gather(*(self._ask(w, op, **args) for w in workers),
                                       return_exceptions=True)
        return [a for a in answers if not isinstance(a, BaseException)]

    async def targets(self) -> list[dict]:
        """GET /targets: every worker's targets merged by (api, target) (merge_targets)."""
        return merge_targets(await self._ask_serving("targets"))

    async def cluster_status(self) -> dict | None:
        """GET /cluster: each worker process's own (every one is a member on its own)."""
        answers = [a for a in await self._ask_serving("cluster") if a is not None]
        return {"workers": answers} if answers else None

    async def drain_target(self, api: str, target: str, grace: float | None) -> dict:
        return await self._target_op("drain_target", api=api, target=target, grace=grace)

    async def enable_target(self, api: str, target: str) -> dict:
        return await self._target_op("enable_target", api=api, target=target)

    async def _target_op(self, op: str, **args) -> dict:
        """drain_target / enable_target on every serving worker: the merged view of the
        target; KeyError (UnknownTarget) when every worker says it does not know it."""
        from fastgw.gateway import UnknownTarget
        from fastgw.observe.logs import url_without_query
        # Remembered before asking: a worker ready meanwhile is told at its "ready".
        drained = getattr(self.sup, "drained_targets", None)
        if drained is None:
            drained = set()
        key = (args["api"], url_without_query(args["target"]))
        before = key in drained
        if op == "drain_target":
            drained.add(key)
        else:
            drained.discard(key)
        answers = [a for a in await self._ask_serving(op, **args) if isinstance(a, dict)]
        views = [a["view"] for a in answers if a.get("view") is not None]
        if not views:
            if not before:
                drained.discard(key)
            if answers:
                raise UnknownTarget(answers[0].get("unknown") or "unknown target")
            raise ConnectionError("no worker answered")
        return merge_targets([views])[0]

    # ---- the supervisor's own routes ------------------------------------------------

    async def workers(self) -> list[dict]:
        """GET /workers: each worker process, with its live relayed connections (asked
        afresh; its last snapshot's count when it does not answer in time)."""
        workers = self._workers()
        answers = await asyncio.gather(*(self._ask(w, "status") for w in workers),
                                       return_exceptions=True)
        out = []
        for w, answer in zip(workers, answers):
            if isinstance(answer, dict) and "active" in answer:
                connections = int(answer["active"])
            else:
                snap = self.latest.get(w.incarnation) or self.sup.last_snapshot.get(w.incarnation)
                connections = int(snap.get("active", 0)) if snap else 0
            out.append({"index": w.index, "pid": w.pid, "started": float(w.started),
                        "connections": connections, "restarts": w.restarts})
        return out

    def restart_workers(self) -> bool:
        """POST /workers/restart: start a rolling restart; False if one is under way."""
        if self._rolling is not None and not self._rolling.done():
            return False
        if getattr(self.sup, "rolling", False):     # one started by SIGUSR2
            return False
        self._rolling = asyncio.get_running_loop().create_task(self._roll())
        return True

    async def _roll(self) -> None:
        try:
            await self.sup.rolling_restart()
        except RuntimeError as exc:          # one under way (SIGUSR2), or a worker not ready
            log.warning("rolling restart: %s", exc)
        except Exception:
            log.exception("rolling restart failed")
