"""Metrics: per-API counters and HDR histograms, in the Prometheus text format.

Counting happens in the core: each API has one FlowStats per flow, shared by
its connections and updated on the frame path, so a scrape reads a handful of
numbers per API and never walks the live connections. Connection-level
counts (accepted, refused, closed) are kept here, once per connection; the
live connections of an API are the accepted ones not yet closed.

Metric names and labels are a contract (see README, "Metrics").
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from fastgw._core import FlowStats
from fastgw.observe.histograms import new_histogram
from fastgw.pool import DIAL_FAILURE_REASONS, HEALTH_RESULTS
from fastgw.verdicts import REJECT_REASONS

# The `policy` label of fastgw_limit_table_full_total.
TABLE_FULL_POLICIES = ("count-limit", "rate-limit", "message-rate-limit")

# Bucket bounds (seconds) of the latency histograms derived from HDR data.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0)


class ApiMetrics:
    """What is counted for one API (kept for the process's life: an API that a reload
    removes keeps its series, and its connections are counted until they end)."""

    def __init__(self, histograms: bool = True, intervals: bool = False):
        self.request = FlowStats(histograms, intervals)
        self.response = FlowStats(histograms, intervals)
        self.accepted = 0                                   # counted at attach
        self.rejected: Counter[str] = Counter()
        self.closes: Counter[tuple[int, str]] = Counter()   # counted at the end of life
        # Latencies in microseconds; durations in milliseconds.
        self.handshake = new_histogram() if histograms else None
        self.upstream_connect = new_histogram() if histograms else None
        self.duration = new_histogram() if histograms else None
        iv = histograms and intervals
        self.interval = {"handshake_us": new_histogram() if iv else None,
                         "upstream_connect_us": new_histogram() if iv else None,
                         "duration_ms": new_histogram() if iv else None}
        # What `record` records into, by kind (these histograms are never replaced).
        self._recorded = {"handshake_us": self.handshake, "upstream_connect_us": self.upstream_connect,
                          "duration_ms": self.duration}
        self._encoded: dict[str, tuple[int, bytes]] = {}    # kind -> (total_count, encoding)
        self.pool = None                                    # pool.Pool (the gateway sets it)
        self.now = time.monotonic                           # the clock of the pool's times (idem)

    @property
    def active(self) -> int:
        """Live connections: accepted ones (counted once at attach) not yet closed (counted
        once at the end of life). A few numbers per API, whatever the connection count."""
        return self.accepted - sum(self.closes.values())

    def record(self, kind: str, value: int) -> None:
        """Record a per-connection value (handshake_us, upstream_connect_us, duration_ms)."""
        arr = self._recorded[kind]
        if arr is not None:
            arr.record_py(max(1, int(value)))
            twin = self.interval[kind]
            if twin is not None:
                twin.record_py(max(1, int(value)))

    def interval_histograms(self) -> dict:
        """The histograms kept for the interval log, by name."""
        return {**{k: v for k, v in self.interval.items() if v is not None},
                "request_held_us": self.request.held_interval,
                "response_held_us": self.response.held_interval}

    def histograms(self) -> dict:
        """Every histogram of the API by name; the suffix is the unit."""
        return {"handshake_us": self.handshake, "upstream_connect_us": self.upstream_connect,
                "duration_ms": self.duration,
                "request_held_us": self.request.held, "response_held_us": self.response.held}

    def encoded_histograms(self) -> dict[str, bytes]:
        """Every histogram's HdrHistogram encoding by name (b"": empty). These histograms
        are only ever added to, so one whose count has not changed is the one encoded last
        time: its encoding is kept (a worker's snapshot each second costs ~0.15 ms per
        histogram that changed, nothing for the others)."""
        out = {}
        for kind, arr in self.histograms().items():
            if arr is None:
                continue
            n = arr.total_count
            kept = self._encoded.get(kind)
            if kept is None or kept[0] != n:
                kept = self._encoded[kind] = (n, arr.to_hdr().encode() if n else b"")
            out[kind] = kept[1]
        return out


class Metrics:
    """Every counter of the process: per API, and those not tied to one (see README, "Metrics")."""

    def __init__(self, intervals: bool = False, enabled: bool = True):
        self.apis: dict[str, ApiMetrics] = {}
        self.enabled = enabled
        self._intervals = intervals and enabled
        self.rejected_unrouted: Counter[str] = Counter()   # refusals before an API was known
        self.rejected_status: Counter[int] = Counter()     # refusals by HTTP status (status line)
        self.table_full: Counter[str] = Counter()          # upgrades refused for want of a slot, by policy
        self.message_table_full = lambda: 0                # messages limited for want of a slot (the zone)
        self.events_dropped = lambda: 0
        self.accept_errors: Counter[str] = Counter()       # errno name -> failed accept() calls
        self.max_connections = lambda: 0                   # the listeners' cap (0: none)
        self.cluster = None                                # with a cluster: its sample()

    def api(self, name: str) -> ApiMetrics:
        m = self.apis.get(name)
        if m is None:
            m = self.apis[name] = ApiMetrics(self.enabled, self._intervals)
        return m

    def count_reject(self, api: str | None, reason: str, status: int | None = None) -> None:
        if status is not None:
            self.rejected_status[status] += 1
        if api is None:
            self.rejected_unrouted[reason] += 1
        else:
            self.api(api).rejected[reason] += 1

    def table_full_counts(self) -> dict[str, int]:
        """Refusals for want of a limit-table slot so far, by policy (every policy listed)."""
        counts = {policy: self.table_full[policy] for policy in TABLE_FULL_POLICIES}
        counts["message-rate-limit"] = int(self.message_table_full())     # counted by the core
        return counts

    async def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4) of every metric."""
        return await render_async(self)


class TableFullWarnings:
    """The WARNING about a full limit table: at most one line every `interval` seconds,
    with the refusals since the last line by policy (never a key or a client)."""

    def __init__(self, metrics: Metrics, interval: float = 10.0):
        self.metrics = metrics
        self.interval = interval
        self.reported = metrics.table_full_counts()
        self.last: float | None = None          # when the last line was written

    def check(self, now: float) -> str | None:
        """The line to log at monotonic time `now`, or None (nothing new, or too soon)."""
        if self.last is not None and now - self.last < self.interval:
            return None
        counts = self.metrics.table_full_counts()
        new = {p: n - self.reported.get(p, 0) for p, n in counts.items()}
        total = sum(new.values())
        if total <= 0:
            return None
        self.reported, self.last = counts, now
        parts = ", ".join(f"{p}: {n}" for p, n in new.items() if n)
        plural = "" if total == 1 else "s"
        return (f"the limit table is full: {total} refusal{plural} for want of a slot since the "
                f"last report ({parts}); raise limits.max-keys")


# Families in the order they are written: (name, type, help).
_FAMILIES = (
    ("fastgw_connections_active", "gauge", "Live relayed connections."),
    ("fastgw_connections_total", "counter", "Accepted upgrades."),
    ("fastgw_upgrades_rejected_total", "counter", "Refused upgrades."),
    ("fastgw_messages_total", "counter", "Relayed data messages."),
    ("fastgw_bytes_total", "counter", "Relayed payload bytes."),
    ("fastgw_messages_limited_total", "counter", "Messages limited by a message-rate-limit."),
    ("fastgw_closes_total", "counter", "Ended connections, by close code and who ended it."),
    ("fastgw_handshake_seconds", "histogram", "Time from the request head read to the 101 sent."),
    ("fastgw_upstream_connect_seconds", "histogram", "Time to dial the backend and complete its handshake."),
    ("fastgw_connection_duration_seconds", "histogram", "Lifetime of ended connections."),
    ("fastgw_message_size_bytes", "histogram", "Relayed message sizes (buckets are powers of 4)."),
    ("fastgw_events_dropped_total", "counter", "Events dropped because the sink was behind."),
    ("fastgw_limit_table_full_total", "counter",
     "Upgrades refused (503) and messages limited because the limit table had no slot for the key."),
    ("fastgw_accept_errors_total", "counter", "Failed accept() calls on the listeners, by errno."),
    ("fastgw_connections_max", "gauge", "Client connections held at most (limits.max-connections; 0: no cap)."),
    ("fastgw_target_connections_active", "gauge",
     "Dials under way and live connections through a backend target."),
    ("fastgw_target_up", "gauge",
     "1 if a backend target is up (healthy by its health checks, not ejected as an outlier), else 0."),
    ("fastgw_target_dial_failures_total", "counter", "Failed dials of a backend target, by reason."),
    ("fastgw_target_health_checks_total", "counter", "Active health checks of a backend target, by result."),
)

# Always written, so that a dashboard finds the series before the first error.
ACCEPT_ERRNOS = ("EMFILE", "ENFILE")
_LATENCY = (("fastgw_handshake_seconds", "handshake", LATENCY_BUCKETS, 1e6),
            ("fastgw_upstream_connect_seconds", "upstream_connect", LATENCY_BUCKETS, 1e6),
            ("fastgw_connection_duration_seconds", "duration", DURATION_BUCKETS, 1e3))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    return repr(float(v))


def _flow_sample(flow: FlowStats) -> dict:
    return {"messages": flow.messages, "bytes": flow.bytes, "rejected": flow.rejected,
            "delayed": flow.delayed, "dropped": flow.dropped,
            "sizes": [n for _, n in flow.size_buckets()]}


def _latency_sample(arr, bounds, scale) -> dict | None:
    if arr is None:
        return None
    counts, total = arr.cumulative([b * scale for b in bounds])
    return {"buckets": counts, "sum": total, "count": arr.total_count}


def _targets_sample(a: ApiMetrics) -> list[dict]:
    if a.pool is None:
        return []
    now = a.now()
    return [{"target": t.label, "active": t.active, "up": int(t.up(now)),
             "dial_failures": dict(t.dial_failures), "health_checks": dict(t.health_checks)}
            for t in a.pool.targets]


def api_sample(a: ApiMetrics) -> dict:
    """One API's numbers as plain data (str keys, ints, floats, lists): what the renderer
    writes, and what a worker process sends its supervisor (fastgw.observe.aggregate).
    `active` is a gauge; everything else is a counter. Latency sums are in the histogram's
    unit (µs, ms), bucket counts cumulative, in the order of the family's bounds.
    `targets`: the pool's, in its order, each {"target" (label), "active" and "up" (0/1)
    (gauges), "dial_failures" {reason: n}, "health_checks" {result: n}}."""
    return {
        "active": a.active,
        "accepted": a.accepted,
        "rejected": dict(a.rejected),
        "closes": [[code, side, n] for (code, side), n in sorted(a.closes.items())],
        "flows": {"request": _flow_sample(a.request), "response": _flow_sample(a.response)},
        "latency": {attr: _latency_sample(getattr(a, attr), bounds, scale)
                    for _, attr, bounds, scale in _LATENCY},
        "targets": _targets_sample(a),
    }


def process_sample(metrics: "Metrics") -> dict:
    """The numbers not tied to one API, as plain data (`connections_max` is a gauge; with a
    cluster, `cluster` is fastgw.cluster.node.ClusterNode.sample(), its `shares` gauges)."""
    out = {
        "rejected_unrouted": dict(metrics.rejected_unrouted),
        "events_dropped": int(metrics.events_dropped()),
        "table_full": metrics.table_full_counts(),
        "accept_errors": dict(metrics.accept_errors),
        "connections_max": int(metrics.max_connections()),
    }
    cluster = metrics.cluster() if metrics.cluster is not None else None
    if cluster is not None:
        out["cluster"] = cluster
    return out


# Written only with a `cluster` section: (name, type, help).
CLUSTER_FAMILIES = (
    ("fastgw_cluster_errors_total", "counter",
     "Failed calls to the cluster store, by kind (refused: by the open circuit breaker)."),
    ("fastgw_cluster_share", "gauge",
     "This node's shares of a cluster-wide policy's keys (slots, or per second), summed."),
    ("fastgw_cluster_renewals_total", "counter", "Lease renewals answered by the cluster store."),
    ("fastgw_cluster_redis_seconds", "histogram", "Round trips to the cluster store."),
)
CLUSTER_ERROR_KINDS = ("timeout", "connection", "script", "cluster", "refused")


def cluster_families(c: dict) -> tuple:
    """The cluster's families for Exposition.text(extra) from a process sample's `cluster`."""
    errors = c["errors"]
    kinds = [*CLUSTER_ERROR_KINDS, *sorted(set(errors) - set(CLUSTER_ERROR_KINDS))]
    h = c["redis"]
    redis = [f'fastgw_cluster_redis_seconds_bucket{{le="{_num(b)}"}} {_num(n)}'
             for b, n in zip(LATENCY_BUCKETS, h["buckets"])]
    redis += [f'fastgw_cluster_redis_seconds_bucket{{le="+Inf"}} {_num(h["count"])}',
              f"fastgw_cluster_redis_seconds_sum {_num(h['sum'] / 1e6)}",
              f"fastgw_cluster_redis_seconds_count {_num(h['count'])}"]
    lines = (
        [f'fastgw_cluster_errors_total{{kind="{_label(k)}"}} {_num(errors.get(k, 0))}' for k in kinds],
        [f'fastgw_cluster_share{{policy="{_label(p)}"}} {_num(v)}' for p, v in sorted(c["shares"].items())],
        [f"fastgw_cluster_renewals_total {_num(c['renewals'])}"],
        redis,
    )
    return tuple((*f, ls) for f, ls in zip(CLUSTER_FAMILIES, lines))


# The bounds of fastgw_message_size_bytes (those of FlowStats.size_buckets; None: +Inf).
SIZE_BOUNDS = tuple(le for le, _ in FlowStats(False).size_buckets())


class Exposition:
    """The one renderer of the Prometheus text: fed plain samples (api_sample,
    process_sample), by one process for its own Metrics and by the supervisor of worker
    processes for their sum, so that both write the same families, labels and order."""

    def __init__(self):
        self.families: dict[str, list[str]] = {f[0]: [] for f in _FAMILIES}

    def add_api(self, name: str, s: dict) -> None:
        """The samples of one API (add them in the order of the API names)."""
        api = f'api="{_label(name)}"'
        out = self.families
        out["fastgw_connections_active"].append(f"fastgw_connections_active{{{api}}} {_num(s['active'])}")
        out["fastgw_connections_total"].append(f"fastgw_connections_total{{{api}}} {_num(s['accepted'])}")
        rej = out["fastgw_upgrades_rejected_total"]
        rejected = s["rejected"]
        for reason in sorted(set(REJECT_REASONS) | set(rejected)):
            rej.append(f'fastgw_upgrades_rejected_total{{{api},reason="{_label(reason)}"}} '
                       f"{_num(rejected.get(reason, 0))}")
        for direction in ("request", "response"):
            flow = s["flows"][direction]
            d = f'{api},direction="{direction}"'
            out["fastgw_messages_total"].append(f"fastgw_messages_total{{{d}}} {_num(flow['messages'])}")
            out["fastgw_bytes_total"].append(f"fastgw_bytes_total{{{d}}} {_num(flow['bytes'])}")
            for action, key in (("reject", "rejected"), ("delay", "delayed"), ("drop", "dropped")):
                out["fastgw_messages_limited_total"].append(
                    f'fastgw_messages_limited_total{{{d},action="{action}"}} {_num(flow[key])}')
            sizes = out["fastgw_message_size_bytes"]
            for le, n in zip(SIZE_BOUNDS, flow["sizes"]):
                le_s = "+Inf" if le is None else str(le)
                sizes.append(f'fastgw_message_size_bytes_bucket{{{d},le="{le_s}"}} {_num(n)}')
            sizes.append(f"fastgw_message_size_bytes_sum{{{d}}} {_num(flow['bytes'])}")
            sizes.append(f"fastgw_message_size_bytes_count{{{d}}} {_num(flow['messages'])}")
        for code, side, n in sorted(s["closes"]):
            out["fastgw_closes_total"].append(
                f'fastgw_closes_total{{{api},code="{code}",side="{_label(side)}"}} {_num(n)}')
        for metric, attr, bounds, scale in _LATENCY:
            h = s["latency"].get(attr)
            if h is None:
                continue
            lines = out[metric]
            for b, c in zip(bounds, h["buckets"]):
                lines.append(f'{metric}_bucket{{{api},le="{_num(b)}"}} {_num(c)}')
            lines.append(f'{metric}_bucket{{{api},le="+Inf"}} {_num(h["count"])}')
            lines.append(f"{metric}_sum{{{api}}} {_num(h['sum'] / scale)}")
            lines.append(f"{metric}_count{{{api}}} {_num(h['count'])}")
        for t in s.get("targets", ()):
            at = f'{api},target="{_label(t["target"])}"'
            out["fastgw_target_connections_active"].append(
                f"fastgw_target_connections_active{{{at}}} {_num(t['active'])}")
            if t["up"] is not None:     # None: known to retired workers only
                out["fastgw_target_up"].append(f"fastgw_target_up{{{at}}} {_num(t['up'])}")
            failures = t["dial_failures"]
            for reason in (*DIAL_FAILURE_REASONS, *sorted(set(failures) - set(DIAL_FAILURE_REASONS))):
                out["fastgw_target_dial_failures_total"].append(
                    f'fastgw_target_dial_failures_total{{{at},reason="{_label(reason)}"}} '
                    f"{_num(failures.get(reason, 0))}")
            checks = t["health_checks"]
            for result in HEALTH_RESULTS:
                out["fastgw_target_health_checks_total"].append(
                    f'fastgw_target_health_checks_total{{{at},result="{result}"}} '
                    f"{_num(checks.get(result, 0))}")

    def add_process(self, s: dict) -> None:
        """The samples not tied to one API (once, after the APIs)."""
        families = self.families
        rej = families["fastgw_upgrades_rejected_total"]
        for reason, n in sorted(s["rejected_unrouted"].items()):
            rej.append(f'fastgw_upgrades_rejected_total{{api="",reason="{_label(reason)}"}} {_num(n)}')
        families["fastgw_events_dropped_total"].append(f"fastgw_events_dropped_total {_num(s['events_dropped'])}")
        for policy in TABLE_FULL_POLICIES:
            families["fastgw_limit_table_full_total"].append(
                f'fastgw_limit_table_full_total{{policy="{policy}"}} {_num(s["table_full"].get(policy, 0))}')
        errors = s["accept_errors"]
        for name in sorted(set(ACCEPT_ERRNOS) | set(errors)):
            families["fastgw_accept_errors_total"].append(
                f'fastgw_accept_errors_total{{errno="{_label(name)}"}} {_num(errors.get(name, 0))}')
        families["fastgw_connections_max"].append(f"fastgw_connections_max {_num(s['connections_max'])}")

    def text(self, extra: tuple = ()) -> str:
        """The exposition: every family of _FAMILIES in order, then `extra` families, each
        (name, type, help, [sample lines])."""
        text = []
        every = [(name, kind, help_, self.families[name]) for name, kind, help_ in _FAMILIES]
        for name, kind, help_, lines in (*every, *extra):
            base = name[:-6] if kind == "counter" and name.endswith("_total") else name
            text.append(f"# HELP {base} {help_}\n# TYPE {base} {kind}\n")
            text.extend(line + "\n" for line in lines)
        return "".join(text)


async def render_async(metrics: "Metrics") -> str:
    """The exposition, one API at a time, giving the event loop a turn between APIs so
    that a scrape never holds the relay for longer than one API's lines take (~0.1 ms)."""
    ex = Exposition()
    for name in sorted(metrics.apis):
        ex.add_api(name, api_sample(metrics.apis[name]))
        await asyncio.sleep(0)
    process = process_sample(metrics)
    ex.add_process(process)
    return ex.text(cluster_families(process["cluster"]) if "cluster" in process else ())
