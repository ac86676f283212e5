"""The Grafana dashboard (deploy/grafana/fastgw.json) queries only what fastgw exports: every
metric name in every panel's PromQL and in its variables' queries, and every label those
queries select on or group by, is in the /metrics scrape of a real `fastgw run` with traffic.

The gateway: `workers: 2` (the supervisor's fastgw_workers and fastgw_worker_restarts_total)
with a `cluster` section on a real redis-server (fastgw_cluster_*), an API with an api-key and
a message-rate-limit that drops, in front of the counting echo backend (tests/countecho.py).
The traffic: two upgrades, messages both ways, a 401 and a 404, dropped messages, closes.
The names are read out of the expressions by `promql_names` (tested on its own below), so a
made-up name or label in a panel fails the test."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
import websockets
import yaml
from websockets.exceptions import InvalidStatus

from redislib import RedisServer
from workerlib import KEYS, CountingBackend, WorkersGateway

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "fastgw.json"

# ---- PromQL: the metric names and labels an expression uses ---------------------------------

# Words of PromQL that are not metric names (an identifier followed by "(" is a function).
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "atan2", "inf", "nan"}
# Labels Prometheus adds to every series it scrapes (the target's), not in /metrics.
TARGET_LABELS = {"instance", "job"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?")


def promql_names(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: labels its selectors match on}, labels named in by/without/on/ignoring/
    group_* clauses) of one PromQL expression (Grafana variables such as $api and
    $__rate_interval allowed in strings and ranges)."""
    text = _STRING.sub('""', expr)           # label values, whatever they hold
    text = _RANGE.sub("", text)              # [5m], [$__rate_interval], subqueries' [1h:1m]
    grouped: set[str] = set()

    def grouping(m: re.Match) -> str:
        grouped.update(n.strip() for n in m[2].split(",") if n.strip())
        return " "                           # `sum by (le) (x)` reads as `sum (x)`

    text = _GROUPING.sub(grouping, text)
    metrics: dict[str, set[str]] = {}

    def selector(m: re.Match) -> str:
        labels = set(_MATCHER_LABEL.findall(m[2]))
        name = m[1]
        if name is None:                     # {__name__="..."}: not used by the dashboard
            raise ValueError(f"a selector without a metric name in {expr!r}")
        metrics.setdefault(name, set()).update(labels)
        return " "

    text = _SELECTOR.sub(selector, text)
    for m in _IDENT.finditer(text):
        word, call = m[1], m[2]
        if call or word.lower() in KEYWORDS:
            continue
        metrics.setdefault(word, set())
    return metrics, grouped


EXAMPLE = ('histogram_quantile(0.99, sum by (le, api) (rate(fastgw_handshake_seconds_bucket'
           '{api=~"$api", x!="a{b}"}[$__rate_interval]))) / on (api) group_left '
           'max without (le) (fastgw_connections_active) > bool 0 or vector(1) '
           'and fastgw_up:ratio offset 5m')


def test_promql_names_reads_names_labels_and_groupings():
    names, grouped = promql_names(EXAMPLE)
    assert names == {"fastgw_handshake_seconds_bucket": {"api", "x"},
                     "fastgw_connections_active": set(), "fastgw_up:ratio": set()}
    assert grouped == {"le", "api"}
    assert promql_names('sum(rate(fastgw_made_up_total[1m])) * 1e3')[0] == {"fastgw_made_up_total": set()}


def ast_names(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """promql_names by a real PromQL parser (promql-parser: the Rust crate Greptime's
    database uses), with Grafana's interval variables given a value; ValueError if the
    expression is not PromQL."""
    import promql_parser as pp
    text = re.sub(r"\$__(?:rate_)?interval\b|\$__range\b", "5m", expr)
    metrics: dict[str, set[str]] = {}
    grouped: set[str] = set()

    def visit(node) -> bool:
        if isinstance(node, pp.VectorSelector):
            metrics.setdefault(node.name, set()).update(
                m.name for m in node.matchers.matchers if m.name != "__name__")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            grouped.update(node.modifier.labels)
        elif isinstance(node, pp.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouped.update(node.modifier.matching.labels)
            grouped.update(node.modifier.group_labels or ())
        return True

    pp.walk(pp.parse(text), visit)
    return metrics, grouped


def test_the_regex_reads_what_a_promql_parser_reads():
    """The regex and the parser agree on the example and on every query of the dashboard,
    and every query of the dashboard is PromQL."""
    for expr in [EXAMPLE] + [e for _, e in dashboard_queries(json.loads(DASHBOARD.read_text()))
                             if not e.startswith("label_values(")]:
        assert promql_names(expr) == ast_names(expr), expr
    with pytest.raises(ValueError):
        ast_names("sum by (api (fastgw_connections_active)")


# ---- the dashboard against a scrape ---------------------------------------------------------

def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target (rows' nested panels too) and every variable of
    type query."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']!r}", q))
    return out


def scraped_labels(text: str) -> dict[str, set[str]]:
    """{sample name: the label names its samples carry} of a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def problems(dashboard: dict, scrape: dict[str, set[str]]) -> list[str]:
    """What the dashboard queries that the scrape does not have."""
    found = []
    for where, expr in dashboard_queries(dashboard):
        m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
        if m:
            metrics, grouped = {m[1]: {m[2]}}, set()
        else:
            metrics, grouped = promql_names(expr)
        if not metrics:
            found.append(f"{where}: no metric in {expr!r}")
        for name, labels in metrics.items():
            if name not in scrape:
                found.append(f"{where}: {name} is not in /metrics")
                continue
            for label in sorted(labels - scrape[name]):
                found.append(f"{where}: {name} has no label {label!r}")
        known = set().union(*(scrape.get(n, set()) for n in metrics)) | TARGET_LABELS
        for label in sorted(grouped - known):
            found.append(f"{where}: no metric of {expr!r} has the label {label!r}")
    return found


def test_problems_names_a_made_up_metric_and_label():
    scrape = {"fastgw_messages_total": {"api", "direction"},
              "fastgw_handshake_seconds_bucket": {"api", "le"}}
    board = {"panels": [{"title": "t", "type": "row", "panels": [
        {"title": "ok", "targets": [{"refId": "A", "expr":
            'histogram_quantile(0.5, sum by (le, instance) (rate(fastgw_handshake_seconds_bucket[5m])))'}]},
        {"title": "name", "targets": [{"refId": "A", "expr": 'rate(fastgw_mesages_total[5m])'}]},
        {"title": "label", "targets": [{"refId": "B", "expr": 'fastgw_messages_total{dirction="request"}'}]},
        {"title": "group", "targets": [{"refId": "C", "expr": 'sum by (reason) (fastgw_messages_total)'}]}]}],
        "templating": {"list": [{"name": "api", "type": "query",
                                 "query": {"query": "label_values(fastgw_messages_total, code)"}}]}}
    assert problems(board, scrape) == [
        "panel 'name' A: fastgw_mesages_total is not in /metrics",
        "panel 'label' B: fastgw_messages_total has no label 'dirction'",
        "panel 'group' C: no metric of 'sum by (reason) (fastgw_messages_total)' has the label 'reason'",
        "variable 'api': fastgw_messages_total has no label 'code'",
    ]


def gateway_config(backend_port: int, redis_url: str) -> str:
    echo = f"ws://127.0.0.1:{backend_port}/"
    doc = {
        "workers": 2,
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain-time": "1s",
        "clients": [{"id": cid, "key": key} for cid, key in KEYS.items()],
        "limits": {"max-handshakes-per-ip": 0},
        "cluster": {"redis": {"url": redis_url, "timeout": "100ms"}, "lease": "2s",
                    "refresh": "200ms"},
        "apis": [
            {"name": "chat", "path": "/chat", "assembly": [
                {"policy": "api-key", "header": "X-API-Key"},
                {"policy": "websocket-upgrade", "target-url": echo,
                 "request": [{"policy": "message-rate-limit", "name": "chat",
                              "messages": "2/10s", "burst": 2, "scope": "connection",
                              "action": "drop"}]}]},
            # A cluster-wide budget, for fastgw_cluster_share: a node's share of a key is
            # shown while the key is in use (a live connection under it).
            {"name": "quota", "path": "/quota", "assembly": [
                {"policy": "websocket-upgrade", "target-url": echo,
                 "request": [{"policy": "message-rate-limit", "messages": "1000/1s",
                              "scope": "api", "action": "drop"}]}]},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


async def traffic(gw: WorkersGateway) -> None:
    key = {"X-API-Key": KEYS["alice"]}
    for path, headers, status in (("/chat", {}, 401), ("/nowhere", key, 404)):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(gw.url(path), additional_headers=headers, open_timeout=5)
        assert refused.value.response.status_code == status
    for _ in range(2):
        async with websockets.connect(gw.url("/chat"), additional_headers=key, open_timeout=5) as ws:
            for i in range(5):               # 2 pass (burst 2), 3 are dropped
                await ws.send(f"hello {i}")
            assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)] == ["hello 0", "hello 1"]


def total(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` with these labels (and any others)."""
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def counted(text: str) -> list[str]:
    """What the traffic should have been counted as and is not (yet) in this scrape."""
    want = [("fastgw_connections_total", {"api": "chat"}, 2),
            ("fastgw_upgrades_rejected_total", {"api": "chat", "reason": "unauthorized"}, 1),
            ("fastgw_upgrades_rejected_total", {"api": "", "reason": "not_found"}, 1),
            ("fastgw_messages_total", {"api": "chat", "direction": "request"}, 4),
            ("fastgw_messages_total", {"api": "chat", "direction": "response"}, 4),
            ("fastgw_messages_limited_total", {"api": "chat", "direction": "request", "action": "drop"}, 6),
            ("fastgw_closes_total", {"api": "chat", "code": "1000", "side": "client"}, 2),
            ("fastgw_handshake_seconds_count", {"api": "chat"}, 2),
            ("fastgw_upstream_connect_seconds_count", {"api": "chat"}, 2),
            ("fastgw_workers", {}, 2),
            ("fastgw_cluster_renewals_total", {}, 1)]
    missing = [f"{name}{labels} {total(text, name, **labels)} < {n}" for name, labels, n in want
               if total(text, name, **labels) < n]
    if "fastgw_cluster_share{" not in text:
        missing.append("no fastgw_cluster_share series")
    return missing


@pytest.fixture
def backend():
    b = CountingBackend()
    yield b
    b.stop()


async def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(tmp_path, backend):
    dashboard = json.loads(DASHBOARD.read_text())
    with RedisServer() as redis:
        gw = WorkersGateway(tmp_path, gateway_config(backend.port, redis.url), 2)
        try:
            async with websockets.connect(gw.url("/quota"), open_timeout=5) as held:
                # Relayed, or dropped while Redis is new (its keys learn for a lease): either
                # way the key is in use while this connection lives.
                await held.send("x")
                await traffic(gw)
                deadline = time.monotonic() + 10
                while missing := counted(text := await gw.aget("/metrics")):
                    assert time.monotonic() < deadline, f"the traffic was not counted: {missing}"
                    await asyncio.sleep(0.1)
            scrape = scraped_labels(text)
        finally:
            left = gw.stop()
    assert not left, left
    found = problems(dashboard, scrape)
    assert not found, "\n".join(found)
    # And the other way round: every family of the scrape has a panel.
    queried = set()
    for _, expr in dashboard_queries(dashboard):
        queried |= set(promql_names(expr)[0])
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in scrape}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert families - shown == set(), f"families with no panel: {sorted(families - shown)}"
