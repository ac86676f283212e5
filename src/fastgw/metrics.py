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

    def __init__(self, name: str, histogram_factory=None):
        self.name = name
        self.request = FlowStats()
        self.response = FlowStats()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.closes: Counter[tuple[int, str]] = Counter()
        # Latencies in microseconds; durations in milliseconds.
        make = histogram_factory
        self.handshake = make() if make else None
        self.upstream_connect = make() if make else None
        self.duration = make() if make else None


class Metrics:
    def __init__(self, histogram_factory=None):
        self.apis: dict[str, ApiMetrics] = {}
        self._factory = histogram_factory or default_histogram_factory()
        self.rejected_unrouted: Counter[str] = Counter()   # refusals before an API was known
        self.events_dropped = lambda: 0
        self.active = lambda: {}                           # api -> live connections

    def api(self, name: str) -> ApiMetrics:
        m = self.apis.get(name)
        if m is None:
            m = self.apis[name] = ApiMetrics(name, self._factory)
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


def _histogram_buckets(hdr, bounds, scale):
    """Cumulative (le, count) pairs and the sum, from an HdrHistogram in units of 1/scale s."""
    total = hdr.get_total_count()
    out = []
    if total:
        limits = [int(b * scale) for b in bounds]
        counts = [0] * len(limits)
        for item in hdr.get_recorded_iterator():
            value = hdr.get_highest_equivalent_value(item.value_iterated_to)
            for i, limit in enumerate(limits):
                if value <= limit:
                    counts[i] += item.count_at_value_iterated_to
                    break
        running = 0
        for b, c in zip(bounds, counts):
            running += c
            out.append((repr(b), running))
    else:
        out = [(repr(b), 0) for b in bounds]
    out.append(("+Inf", total))
    return out, (hdr.get_mean_value() * total / scale) if total else 0.0


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
                buckets, total = _histogram_buckets(arr.to_hdr(), bounds, scale)
                fam.add_metric([name], buckets, total)
            yield fam
