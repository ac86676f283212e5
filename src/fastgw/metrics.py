"""Metrics: per-API counters and HDR histograms, in the Prometheus text format.

Counting happens in the core: each API has one FlowStats per flow, shared by
its connections and updated on the frame path, so a scrape reads a handful of
numbers per API and never walks the live connections. Connection-level
counts (accepted, refused, closed) are kept here, once per connection.

Metric names and labels are a contract (see README, "Metrics").
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.exposition import generate_latest

from fastgw._core import FlowStats

REJECT_REASONS = ("bad_request", "not_found", "unauthorized", "forbidden", "count_limit",
                  "rate_limit", "capacity", "upstream_error", "upstream_timeout")

# Bucket bounds (seconds) of the latency histograms derived from HDR data.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0)


def default_histogram_factory():
    """HDR histograms kept in the core (1 µs .. 1 h, 3 significant digits), if it has them."""
    try:
        from fastgw._core import HdrArray
    except ImportError:
        return None
    return lambda: HdrArray(1, 3_600_000_000, 3)


class ApiMetrics:
    """What is counted for one API (kept across reloads while the API exists)."""

    def __init__(self, name: str, histogram_factory=None, intervals: bool = False):
        self.name = name
        self.request = FlowStats(histogram_factory is not None, intervals)
        self.response = FlowStats(histogram_factory is not None, intervals)
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.closes: Counter[tuple[int, str]] = Counter()
        # Latencies in microseconds; durations in milliseconds.
        make = histogram_factory
        self.handshake = make() if make else None
        self.upstream_connect = make() if make else None
        self.duration = make() if make else None
        iv = bool(make and intervals)
        self.interval = {"handshake_us": make() if iv else None,
                         "upstream_connect_us": make() if iv else None,
                         "duration_ms": make() if iv else None}

    def record(self, kind: str, value: int) -> None:
        """Record a per-connection value (handshake_us, upstream_connect_us, duration_ms)."""
        arr = self.histograms()[kind]
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


class Metrics:
    def __init__(self, histogram_factory=None, intervals: bool = False, enabled: bool = True):
        self.apis: dict[str, ApiMetrics] = {}
        self.enabled = enabled
        self._factory = (histogram_factory or default_histogram_factory()) if enabled else None
        self._intervals = intervals and enabled
        self.rejected_unrouted: Counter[str] = Counter()   # refusals before an API was known
        self.events_dropped = lambda: 0
        self.active = lambda: {}                           # api -> live connections

    def api(self, name: str) -> ApiMetrics:
        m = self.apis.get(name)
        if m is None:
            m = self.apis[name] = ApiMetrics(name, self._factory, self._intervals)
        return m

    def count_reject(self, api: str | None, reason: str) -> None:
        if api is None:
            self.rejected_unrouted[reason] += 1
        else:
            self.api(api).rejected[reason] += 1

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)


class IntervalLog:
    """Writes interval histograms in the HdrHistogram log format (v1.3, tagged lines).

    Every `interval` seconds each histogram's interval twin is copied and reset
    and written as one line `Tag=API/kind_unit,start,length,max,payload`, which
    hdrh.log.HistogramLogReader and HdrHistogram's HistogramLogAnalyzer read.
    Times are seconds since the base time written in the header.
    """

    def __init__(self, metrics: "Metrics", path: str, interval: float):
        import time
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self.base = time.time()
        self.last = self.base
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("#[Histogram log format version 1.3]\n")
        self.file.write(f"#[StartTime: {self.base:.3f} (seconds since epoch)]\n")
        self.file.write(f"#[BaseTime: {self.base:.3f} (seconds since epoch)]\n")
        self.file.write('"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"\n')
        self.file.flush()

    def write_interval(self) -> int:
        """Write one line per histogram for the interval that just ended; returns the lines."""
        import time
        now = time.time()
        lines = []
        for api, am in sorted(self.metrics.apis.items()):
            for kind, arr in sorted(am.interval_histograms().items()):
                if arr is None:
                    continue
                hdr = arr.copy_and_reset()
                lines.append(f"Tag={api}/{kind},{self.last - self.base:.3f},{now - self.last:.3f},"
                             f"{float(hdr.get_max_value()):.3f},{hdr.encode().decode()}\n")
        self.last = now
        self.file.write("".join(lines))
        self.file.flush()
        return len(lines)

    async def run(self) -> None:
        import asyncio
        while True:
            await asyncio.sleep(self.interval)
            self.write_interval()

    def close(self) -> None:
        if not self.file.closed:
            self.write_interval()
            self.file.close()


def _histogram_buckets(arr, bounds, scale):
    """Cumulative (le, count) pairs and the sum in seconds, from an HdrArray in units of 1/scale s."""
    counts, total = arr.cumulative([b * scale for b in bounds])
    out = [(repr(b), c) for b, c in zip(bounds, counts)]
    out.append(("+Inf", arr.total_count))
    return out, total / scale


class _Collector(Collector):
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        m = self.m
        active = m.active()
        g = GaugeMetricFamily("fastgw_connections_active", "Live relayed connections.", labels=["api"])
        c_total = CounterMetricFamily("fastgw_connections", "Accepted upgrades.", labels=["api"])
        rej = CounterMetricFamily("fastgw_upgrades_rejected", "Refused upgrades.", labels=["api", "reason"])
        msgs = CounterMetricFamily("fastgw_messages", "Relayed data messages.", labels=["api", "direction"])
        byts = CounterMetricFamily("fastgw_bytes", "Relayed payload bytes.", labels=["api", "direction"])
        lim = CounterMetricFamily("fastgw_messages_limited", "Messages limited by a message-rate-limit.",
                                  labels=["api", "direction", "action"])
        closes = CounterMetricFamily("fastgw_closes", "Ended connections, by close code and who ended it.",
                                     labels=["api", "code", "side"])
        for name, a in sorted(m.apis.items()):
            g.add_metric([name], active.get(name, 0))
            c_total.add_metric([name], a.accepted)
            for reason in sorted(set(REJECT_REASONS) | set(a.rejected)):
                rej.add_metric([name, reason], a.rejected.get(reason, 0))
            for direction, flow in (("request", a.request), ("response", a.response)):
                msgs.add_metric([name, direction], flow.messages)
                byts.add_metric([name, direction], flow.bytes)
                lim.add_metric([name, direction, "reject"], flow.rejected)
                lim.add_metric([name, direction, "delay"], flow.delayed)
                lim.add_metric([name, direction, "drop"], flow.dropped)
            for (code, side), n in sorted(a.closes.items()):
                closes.add_metric([name, str(code), side], n)
        for reason, n in sorted(m.rejected_unrouted.items()):
            rej.add_metric(["", reason], n)
        yield from (g, c_total, rej, msgs, byts, lim, closes)
        ev = CounterMetricFamily("fastgw_events_dropped", "Events dropped because the sink was behind.")
        ev.add_metric([], m.events_dropped())
        yield ev
        for metric, attr, bounds, scale, help_ in (
                ("fastgw_handshake_seconds", "handshake", LATENCY_BUCKETS, 1e6,
                 "Time from the request head read to the 101 sent."),
                ("fastgw_upstream_connect_seconds", "upstream_connect", LATENCY_BUCKETS, 1e6,
                 "Time to dial the backend and complete its handshake."),
                ("fastgw_connection_duration_seconds", "duration", DURATION_BUCKETS, 1e3,
                 "Lifetime of ended connections.")):
            fam = HistogramMetricFamily(metric, help_, labels=["api"])
            for name, a in sorted(m.apis.items()):
                arr = getattr(a, attr)
                if arr is None:
                    continue
                buckets, total = _histogram_buckets(arr, bounds, scale)
                fam.add_metric([name], buckets, total)
            yield fam
        sizes = HistogramMetricFamily("fastgw_message_size_bytes",
                                      "Relayed message sizes (buckets are powers of 4).",
                                      labels=["api", "direction"])
        for name, a in sorted(m.apis.items()):
            for direction, flow in (("request", a.request), ("response", a.response)):
                buckets = [(("+Inf" if le is None else str(le)), n) for le, n in flow.size_buckets()]
                sizes.add_metric([name, direction], buckets, float(flow.bytes))
        yield sizes
