"""The report of `bench/run.py`: medians over rounds, a Markdown table, the goals, PNG plots.

    python bench/report.py bench/results/latest.json     # rewrite the .md and plots from a JSON

Every figure is the median over the rounds of one (target, scenario). Ratios are taken within
the same run: to ``direct`` (the echo backend without a proxy) and to ``nginx``.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

PEERS = ("nginx", "nginx-64k", "haproxy", "caddy")      # the C and Go proxies
SUBJECT = "fastgw-governed"                             # the target the goals are judged on
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _mode(values: list[Any]) -> str | None:
    vals = [v for v in values if v]
    return collections.Counter(vals).most_common(1)[0][0] if vals else None


def summarize(result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> target -> figure -> median over the rounds."""
    meta = result["meta"]
    pc, lc = meta.get("proxy_cpu"), meta.get("load_cpu")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in result["runs"]:
        groups[(r["scenario"], r["target"])].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (scenario, target), runs in groups.items():
        lg = [r["loadgen"] for r in runs]
        cpu = [r.get("cpu", {}) for r in runs]
        f: dict[str, Any] = {"rounds": len(runs), "ok": all(x.get("ok") for x in lg)}
        mode = (meta.get("scenarios", {}).get(scenario) or {}).get("mode")
        if mode == "throughput":
            f["msg/s"] = _med([x.get("msgs_per_s") for x in lg])
            f["MB/s"] = _med([x.get("mb_per_s") for x in lg])
            f["client CPU %"] = _med([x["client_cpu"] * 100 if "client_cpu" in x else None
                                      for x in lg])
            f["proxy CPU µs/msg"] = _med([c.get("proxy_us_per_unit") for c in cpu])
            f["proxy CPU µs/MB"] = _med([c.get("proxy_us_per_mb") for c in cpu])
            f["lost"] = sum(int(x.get("lost") or 0) for x in lg)
        elif mode == "latency":
            for p in ("p50", "p90", "p99", "p99.9", "max"):
                f[f"{p} µs"] = _med([x.get("latency_us", {}).get(p) for x in lg])
            f["proxy CPU µs/msg"] = _med([c.get("proxy_us_per_unit") for c in cpu])
            f["lost"] = sum(int(x.get("lost") or 0) for x in lg)
        elif mode == "connrate":
            f["upgrades/s"] = _med([x.get("upgrades_per_s") for x in lg])
            f["handshake p50 µs"] = _med([x.get("handshake_us", {}).get("p50") for x in lg])
            f["handshake p99 µs"] = _med([x.get("handshake_us", {}).get("p99") for x in lg])
            f["client CPU %"] = _med([x.get("client_cpu_pct") for x in lg])
            f["proxy CPU µs/upgrade"] = _med([c.get("proxy_us_per_unit") for c in cpu])
            f["failures"] = sum(int(x.get("failures") or 0) for x in lg)
        elif mode == "idle":
            f["connections"] = _med([(r.get("holding") or {}).get("open") for r in runs])
            f["alive"] = _med([x.get("alive") for x in lg])
            f["PSS before MiB"] = _med([r["pss_before"] / 2**20 if r.get("pss_before") else None
                                        for r in runs])
            f["PSS held MiB"] = _med([r["pss_held"] / 2**20 if r.get("pss_held") else None
                                      for r in runs])
            f["KiB/connection"] = _med([r.get("kib_per_connection") for r in runs])
        elif mode == "storm":
            f["connections"] = _med([r.get("connections") for r in runs])
            f["all back s"] = _med([r.get("all_back_after_restart_s") for r in runs])
            f["peak RSS MiB"] = _med([r.get("peak_rss_mib") for r in runs])
            f["RSS before MiB"] = _med([r.get("rss_before_mib") for r in runs])
            f["handshake p99 ms"] = _med([r["handshake_p99_us"] / 1000
                                          if r.get("handshake_p99_us") is not None else None
                                          for r in runs])
            f["failures"] = sum(int(r.get("failures") or 0) for r in runs)
            f["attempts"] = _med([r.get("attempts") for r in runs])
            f["proxy CPU s"] = _med([c.get("proxy_s") for c in cpu])
            f["client CPU s"] = _med([r.get("client_cpu_s") for r in runs])
            f["backend CPU s"] = _med([c.get("backend_s") for c in cpu])
        if mode != "idle":
            f["proxy core busy %"] = _med([c.get(f"busy_cpu{pc}_pct") for c in cpu])
            f["client core busy %"] = _med([c.get(f"busy_cpu{lc}_pct") for c in cpu])
            f["bottleneck"] = _mode([c.get("bottleneck") for c in cpu])
            f["proxy run µs/unit"] = _med([c.get("proxy_run_us_per_unit") for c in cpu])
            f["proxy core other load %"] = _med([c.get(f"other_load_cpu{pc}_pct") for c in cpu])
        brks = [c["breakdown"] for c in cpu if c.get("breakdown")]
        if brks:
            f.update(_workers(brks, cpu))
        out.setdefault(scenario, {})[target] = f
    return out


def _workers(brks: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a proxy with workers: each process's CPU per unit and share of a core."""
    f: dict[str, Any] = {}
    names = sorted({r["name"] for b in brks for r in b["processes"]},
                   key=lambda n: (n != "supervisor", n == "other", len(n), n))
    for name in names:
        rows = [next((r for r in b["processes"] if r["name"] == name), None) for b in brks]
        f[f"{name} µs/unit"] = _med([r["us_per_unit"] if r else None for r in rows])
        f[f"{name} % of a core"] = _med([r["pct_of_wall"] if r else None for r in rows])
        f[f"{name} connections"] = _med([r.get("connections") if r else None for r in rows])
    f["process names"] = names
    f["busiest worker % of a core"] = _med([b.get("busiest_worker_pct") for b in brks])
    f["exited during runs"] = sum(len(b.get("exited") or ()) for b in brks)
    # which core ran out (the most frequent verdict of the rounds), and a worker that used
    # >= 90 % of a core (median over the rounds) would be the bottleneck on a core of its own
    core = _mode([c.get("bottleneck") for c in cpu]) or "?"
    sat = [n for n in names if n.startswith("w") and (f.get(f"{n} % of a core") or 0) >= 90]
    if sat and core in ("client", "neither", "?"):
        core = "worker " + ",".join(sat)
    elif sat and core == "both":
        core = "client and worker " + ",".join(sat)
    elif core == "proxy":
        core = "worker " + ",".join(sat) if sat else "the workers' shared core"
    f["bottleneck detail"] = core
    return f


# ---------------------------------------------------------------------------------------------
# The proxy's own CPU per unit: what the proxy costs, whichever core ran out

# (scenario, key of run.py's "cpu" figures, unit, column name, panel title) of the proxy-CPU
# figure and of its table, in their order; a scenario missing from the result is left out
CPU_UNITS = (("tp-64B", "proxy_us_per_unit", "µs/msg", "64 B", "per 64 B message"),
             ("tp-1KiB", "proxy_us_per_unit", "µs/msg", "1 KiB", "per 1 KiB message"),
             ("tp-64KiB", "proxy_us_per_mb", "µs/MB", "64 KiB", "per MB, 64 KiB messages"),
             ("connrate", "proxy_us_per_unit", "µs/upgrade", "", "per upgrade"),
             ("tls-hs", "proxy_us_per_unit", "µs/handshake", "TLS full",
              "per TLS handshake (full)"),
             ("tls-hs-resume", "proxy_us_per_unit", "µs/handshake", "TLS resumed",
              "per TLS handshake (resumed)"),
             ("tls-64B", "proxy_us_per_unit", "µs/msg", "TLS 64 B", "per 64 B message, TLS"),
             ("tls-64KiB", "proxy_us_per_mb", "µs/MB", "TLS 64 KiB", "per MB, 64 KiB, TLS"))
REFERENCES = ("nginx", "nginx-64k")     # the ratio is to the lower of the two (as the goals)


def proxy_cpu(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One panel per scenario of CPU_UNITS that has figures: the proxy's CPU per unit of each
    target (median, min and max over the rounds whose load generator reported ok), the
    reference (the lower of nginx and nginx-64k) and each target's ratio to it."""
    vals: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    keys = {sc: key for sc, key, *_ in CPU_UNITS}
    for r in result.get("runs", ()):
        key = keys.get(r.get("scenario"))
        v = (r.get("cpu") or {}).get(key) if key else None
        if v is not None and (r.get("loadgen") or {}).get("ok"):
            vals[(r["scenario"], r["target"])].append(v)
    targets = result["meta"].get("targets") or sorted({t for _, t in vals})
    panels = []
    for sc, _, unit, short, title in CPU_UNITS:
        rows = {t: {"median": statistics.median(v), "min": min(v), "max": max(v),
                    "rounds": len(v)} for t in targets if (v := vals.get((sc, t)))}
        if not rows:
            continue
        refs = [(rows[t]["median"], t) for t in REFERENCES if t in rows]
        ref = min(refs)[1] if refs else None
        for f in rows.values():
            f["ratio"] = f["median"] / rows[ref]["median"] if ref and rows[ref]["median"] else None
        panels.append({"scenario": sc, "unit": unit, "short": short, "title": title,
                       "reference": ref, "targets": rows})
    return panels


def proxy_cpu_table(panels: list[dict[str, Any]], targets: list[str]) -> list[str]:
    """The figures of the proxy-CPU plot as a table: one column per unit, median µs (ratio to
    the column's reference)."""
    if not panels:
        return []
    names = [t for t in targets if any(t in p["targets"] for p in panels)]
    names += sorted({t for p in panels for t in p["targets"]} - set(names))
    rounds = sorted({f["rounds"] for p in panels for f in p["targets"].values()})
    span = f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]}"
    head = [f"{p['short']} {p['unit']}".strip() + (f" (× {p['reference']})" if p["reference"]
                                                  else "") for p in panels]
    out = ["### Proxy CPU per unit (lower is better)", "",
           "The proxy's own CPU (utime + stime of all its processes) per echoed message, per MB "
           "echoed, per upgrade or per TLS handshake (+ upgrade, one echo, close): what the "
           "proxy costs, whichever core ran out first (on this machine mostly the client's). "
           f"Median over {span} round(s) with an ok load generator; in brackets the ratio to "
           "the lower of nginx and nginx-64k, named in the column's head (the reference itself "
           "has none). Scenarios: "
           + ", ".join(f"{p['short'] or p['unit']} = {p['scenario']}" for p in panels) + ".", "",
           "| target | " + " | ".join(head) + " |", "|---|" + "---:|" * len(panels)]
    for t in names:
        cells = []
        for p in panels:
            f = p["targets"].get(t)
            cells.append("–" if f is None else fmt(f["median"]) + (
                "" if f["ratio"] is None or t == p["reference"] else f" ({f['ratio']:.2f}×)"))
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    return out + [""]


# ---------------------------------------------------------------------------------------------
# Markdown

# scenario mode -> (figures shown, figure -> the targets it is also given as a ratio to)
COLUMNS = {
    "throughput": (["msg/s", "MB/s", "proxy CPU µs/msg", "proxy CPU µs/MB", "client CPU %",
                    "proxy core busy %", "client core busy %", "bottleneck"],
                   {"msg/s": ("direct", "nginx"), "proxy CPU µs/msg": ("nginx",),
                    "proxy CPU µs/MB": ("nginx",)}),
    "latency": (["p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "added p99 µs",
                 "proxy CPU µs/msg", "bottleneck"],
                {"p99 µs": ("direct", "nginx"), "added p99 µs": ("nginx",)}),
    "connrate": (["upgrades/s", "handshake p50 µs", "handshake p99 µs", "proxy CPU µs/upgrade",
                  "client CPU %", "proxy core busy %", "client core busy %", "bottleneck"],
                 {"upgrades/s": ("direct", "nginx"), "proxy CPU µs/upgrade": ("nginx",)}),
    "idle": (["connections", "alive", "PSS before MiB", "PSS held MiB", "KiB/connection"],
             {"KiB/connection": ("nginx",)}),
}


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "–"
    return f"{a / b:.2f}"


def _with_added(scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Latency rows get 'added p99 µs': p99 minus direct's p99 of the same run."""
    base = (scenario.get("direct") or {}).get("p99 µs")
    out = {}
    for t, f in scenario.items():
        f = dict(f)
        if "p99 µs" in f and base is not None and f["p99 µs"] is not None and t != "direct":
            f["added p99 µs"] = f["p99 µs"] - base
        out[t] = f
    return out


def markdown(result: dict[str, Any], lead_images: Sequence[Path] = ()) -> str:
    """The report; `lead_images` (the proxy-CPU figure) go right below its table, first."""
    meta = result["meta"]
    summary = result.get("summary") or summarize(result)
    targets = meta.get("targets") or []
    lines = [f"## fastgw bench: {meta.get('rounds')} round(s), {meta.get('duration')} s runs "
             f"after {meta.get('warmup')} s warm-up", ""]
    lines.append(f"- command: `{meta.get('command')}` ({meta.get('started')}, "
                 f"{meta.get('elapsed_s')} s)")
    lines.append(f"- {meta.get('pinning')}; every figure is the median over the rounds, ratios "
                 "within this run")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in
                                              (meta.get("versions") or {}).items()))
    for t, why in (meta.get("skipped") or {}).items():
        lines.append(f"- skipped {t}: {why}")
    lines.append(f"- throughput: {meta.get('connections')} connections x {meta.get('inflight')} "
                 "messages in flight (pipelined echo); msg/s = echoed messages/s, MB/s = echoed "
                 "payload, one direction (10^6 B)")
    lines.append("- proxy CPU: utime + stime of the proxy's processes (/proc/PID/stat) over the "
                 "run / echoed messages (each crosses the proxy twice), / MB echoed, or / upgrade")
    lines.append("- bottleneck: the core that was >= 90 % busy (/proc/stat): `proxy` = the "
                 "proxy's core, `client` = the core of the load generator and the backend")
    lines.append("- latency: 64 B request/response at a fixed total rate, µs from the intended "
                 "send time (coordinated omission corrected); added p99 = p99 - direct's p99")
    lines.append("- idle: connections held open through the proxy; KiB/connection = (PSS while "
                 "held - PSS before) / connections, both legs, all the proxy's processes")
    lines.append("")
    lines += proxy_cpu_table(proxy_cpu(result), targets)
    lines += [f"![{p.stem}]({p.name})\n" for p in lead_images]
    lines += overview(summary, targets)
    lines += tls_table(result)
    for scenario, per_target in summary.items():
        mode = (meta.get("scenarios", {}).get(scenario) or {}).get("mode")
        if mode not in COLUMNS:
            continue
        per_target = _with_added(per_target)
        shown, ratioed = COLUMNS[mode]
        shown = [c for c in shown if any(c in f for f in per_target.values())]
        head = ["target"]
        for c in shown:
            head.append(c)
            head += [f"{c} /{b}" for b in ratioed.get(c, ())]
        lines += [f"### {scenario}", "", "| " + " | ".join(head) + " |",
                  "|---|" + "---:|" * (len(head) - 1)]
        for t in targets:
            f = per_target.get(t)
            if f is None:
                continue
            row = [t + ("" if f.get("ok", True) else " (NOT OK)")]
            for c in shown:
                row.append(fmt(f.get(c)))
                row += [_ratio(f.get(c), (per_target.get(b) or {}).get(c))
                        for b in ratioed.get(c, ())]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += storm_table(summary, targets, meta)
    lines += workers_table(summary, targets)
    lines += goals_workers(result, summary)
    goals_ = goals(summary)
    if goals_:
        lines += [f"### Goals ({SUBJECT}: a request and a response message-rate-limit that never "
                  "trigger, metrics and events on)", "",
                  "| goal | fastgw | reference | ratio | limit | met |", "|---|---:|---:|---:|---:|---|"]
        for g in goals_:
            lines.append(f"| {g['goal']} | {fmt(g['value'])} | {fmt(g['reference'])} "
                         f"({g['ref_name']}) | {fmt(g['ratio'])} | {g['limit']} | "
                         f"{'yes' if g['met'] else 'no' if g['met'] is False else '–'} |")
        lines.append("")
    return "\n".join(lines)


# (scenario, figure, column title) of the overview table
OVERVIEW = (("tp-64B", "msg/s", "64 B msg/s"), ("tp-64B", "proxy CPU µs/msg", "64 B CPU µs/msg"),
            ("tp-1KiB", "msg/s", "1 KiB msg/s"), ("tp-1KiB", "proxy CPU µs/msg", "1 KiB CPU µs/msg"),
            ("tp-64KiB", "MB/s", "64 KiB MB/s"), ("tp-64KiB", "proxy CPU µs/MB", "64 KiB CPU µs/MB"),
            ("lat-5k/s", "p50 µs", "5k/s p50 µs"), ("lat-5k/s", "p99 µs", "5k/s p99 µs"),
            ("connrate", "upgrades/s", "upgrades/s"), ("connrate", "proxy CPU µs/upgrade", "CPU µs/upgrade"),
            ("idle", "KiB/connection", "idle KiB/conn"))


TLS_COLUMNS = (("tls-hs", "proxy_us_per_unit", "µs/handshake (full)"),
               ("tls-hs-resume", "proxy_us_per_unit", "µs/handshake (resumed)"),
               ("tls-64B", "proxy_us_per_unit", "µs/msg 64 B"),
               ("tls-64KiB", "proxy_us_per_mb", "µs/MB 64 KiB"))


def tls_table(result: dict[str, Any]) -> list[str]:
    """Proxy CPU over wss (TLS 1.3): per full and resumed handshake (+ upgrade, one echo,
    close), per 64 B message, per MB at 64 KiB; medians over the rounds, ratio to nginx."""
    vals: dict[tuple[str, str], list[float]] = {}
    resumed: dict[tuple[str, str], list[float]] = {}
    for r in result.get("runs", []):
        for sc, key, _ in TLS_COLUMNS:
            v = (r.get("cpu") or {}).get(key)
            if r.get("scenario") == sc and v is not None and (r.get("loadgen") or {}).get("ok"):
                vals.setdefault((sc, r["target"]), []).append(v)
                tls = r["loadgen"].get("tls") or {}
                if tls.get("cycles"):
                    resumed.setdefault((sc, r["target"]), []).append(
                        tls["resumed"] / tls["cycles"] * 100)
    if not vals:
        return []
    targets = [t for t in (result["meta"].get("targets") or []) if any(k[1] == t for k in vals)]
    lines = ["### TLS (wss, TLS 1.3, ECDSA P-256): proxy CPU, median (ratio to nginx)", "",
             "| target | " + " | ".join(c[2] for c in TLS_COLUMNS) + " | resumed % |",
             "|---" * (len(TLS_COLUMNS) + 2) + "|"]
    for t in targets:
        row = [t]
        for sc, _, _ in TLS_COLUMNS:
            v, n = _med(vals.get((sc, t), [])), _med(vals.get((sc, "nginx"), []))
            row.append("" if v is None else f"{fmt(v)}" + (f" ({v / n:.2f}×)" if n else ""))
        row.append(fmt(_med(resumed.get(("tls-hs-resume", t), []))))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def overview(summary: dict[str, dict[str, dict[str, Any]]], targets: list[str]) -> list[str]:
    """One row per target, the headline figure of every scenario (medians; the tables below
    give the ratios, the cores' load and the bottleneck)."""
    cols = [c for c in OVERVIEW if c[0] in summary]
    if not cols:
        return []
    out = ["### Overview", "", "| target | " + " | ".join(c[2] for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for t in targets:
        row = [fmt(((summary.get(s) or {}).get(t) or {}).get(f)) for s, f, _ in cols]
        out.append(f"| {t} | " + " | ".join(row) + " |")
    return out + [""]


def goals(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The goals of issue 5, judged on SUBJECT against the peers of the same run."""
    out: list[dict[str, Any]] = []

    def fig(scenario: str, target: str, name: str) -> Any:
        return ((summary.get(scenario) or {}).get(target) or {}).get(name)

    def add(goal: str, value: Any, ref_name: str, reference: Any, limit: float,
            lower_is_better: bool = True, subtract: float = 0.0) -> None:
        ratio = None
        met = None
        if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference:
            ratio = value / reference
            met = ratio <= limit if lower_is_better else ratio >= limit
        out.append({"goal": goal, "value": value, "reference": reference, "ref_name": ref_name,
                    "ratio": ratio, "limit": ("<= " if lower_is_better else ">= ") + f"{limit:g}",
                    "met": met})

    def best_nginx(scenario: str, name: str) -> tuple[str, Any]:
        cands = [(t, fig(scenario, t, name)) for t in ("nginx", "nginx-64k")]
        cands = [c for c in cands if c[1] is not None]
        return min(cands, key=lambda c: c[1]) if cands else ("nginx", None)

    for scenario, name, limit in (("tp-64B", "proxy CPU µs/msg", 1.0),
                                  ("tp-1KiB", "proxy CPU µs/msg", 1.0),
                                  ("tp-64KiB", "proxy CPU µs/MB", 1.2)):
        ref_name, ref = best_nginx(scenario, name)
        add(f"{scenario}: {name}", fig(scenario, SUBJECT, name), ref_name, ref, limit)
    for scenario in ("tp-64B", "tp-1KiB", "tp-64KiB"):
        cands = [(t, fig(scenario, t, "msg/s")) for t in PEERS]
        cands = [c for c in cands if c[1] is not None]
        if cands:
            ref_name, ref = max(cands, key=lambda c: c[1])
            add(f"{scenario}: msg/s vs the best peer", fig(scenario, SUBJECT, "msg/s"),
                ref_name, ref, 1.0, lower_is_better=False)
    d99 = fig("lat-5k/s", "direct", "p99 µs")
    if d99 is not None:
        mine, ng = fig("lat-5k/s", SUBJECT, "p99 µs"), fig("lat-5k/s", "nginx", "p99 µs")
        add("lat-5k/s: added p99 µs", None if mine is None else mine - d99, "nginx",
            None if ng is None else ng - d99, 1.25)
    ref_name, ref = best_nginx("connrate", "proxy CPU µs/upgrade")
    add("connrate: proxy CPU µs/upgrade", fig("connrate", SUBJECT, "proxy CPU µs/upgrade"),
        ref_name, ref, 1.5)
    kib = fig("idle", SUBJECT, "KiB/connection")
    if kib is not None:
        add("idle: KiB/connection", kib, "8 KiB", 8.0, 1.0)
    add("tp-64B: msg/s vs the plain Python proxy", fig("tp-64B", SUBJECT, "msg/s"), "pyproxy",
        fig("tp-64B", "pyproxy", "msg/s"), 20.0, lower_is_better=False)
    return out


def storm_table(summary: dict[str, dict[str, dict[str, Any]]], targets: list[str],
                meta: dict[str, Any]) -> list[str]:
    """The reconnect storm (bench/storm.py), one row per proxy: the connections held, the time
    from the backend's restart until the last client echoed again (and its ratio to nginx's),
    the proxy's peak RSS during the storm, the reconnect handshakes' p99, failures."""
    per = summary.get("storm") or {}
    names = [t for t in targets if t in per] + sorted(set(per) - set(targets))
    if not names:
        return []
    ref = (per.get("nginx") or {}).get("all back s")
    out = ["### Reconnect storm", "",
           "The connections held through the proxy (one 64 B echo each), then the echo backend "
           f"killed (SIGKILL) and a new one started on its port {meta.get('storm_down_s') or 1:g} "
           "s later; every client the proxy dropped reconnects after a random 50-100 ms pause, "
           "again until one upgrade and echo succeed (at most 60 s). All back: s from the "
           "restart until the last client echoed again (– if some never did). Peak RSS: VmRSS "
           "of the proxy's processes, sampled every 50 ms from the kill on (before: just before "
           "it). Handshake p99: TCP connect to 101 of the successful reconnects. Failures: "
           "connections that could not open, gave up or never reported back. CPU s of the "
           "proxy, the client and the backend (these two share a core; the new backend's "
           "since its start) and bottleneck (the core >= 90 % busy): from the kill until the "
           "client's result."
           + (f" {meta['storm_cap'][0].upper()}{meta['storm_cap'][1:]}."
              if meta.get("storm_cap") else ""), "",
           "| target | N | all back s | × nginx | peak RSS MiB | RSS before MiB | "
           "handshake p99 ms | failures | attempts | CPU s proxy / client / backend | "
           "bottleneck |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in names:
        f = per[t]
        back = f.get("all back s")
        ratio = "–" if t == "nginx" else _ratio(back, ref)
        out.append(f"| {t}{'' if f.get('ok', True) else ' (NOT OK)'} | "
                   f"{fmt(f.get('connections'))} | {fmt(back)} | {ratio} | "
                   f"{fmt(f.get('peak RSS MiB'))} | {fmt(f.get('RSS before MiB'))} | "
                   f"{fmt(f.get('handshake p99 ms'))} | {f.get('failures', 0)} | "
                   f"{fmt(f.get('attempts'))} | {fmt(f.get('proxy CPU s'))} / "
                   f"{fmt(f.get('client CPU s'))} / {fmt(f.get('backend CPU s'))} | "
                   f"{f.get('bottleneck') or '–'} |")
    return out + [""]


def workers_table(summary: dict[str, dict[str, dict[str, Any]]], targets: list[str]) -> list[str]:
    """One row per (scenario, target with workers): the CPU of the supervisor and of each worker
    per unit (message or upgrade) and as a share of a core, and which core ran out."""
    rows = [(s, t, f) for s, per in summary.items() for t in targets
            if (f := per.get(t)) and f.get("process names")]
    if not rows:
        return []
    names: list[str] = []
    for _, _, f in rows:
        names += [n for n in f["process names"] if n not in names]
    ws = [n for n in names if n.startswith("w")]
    head = (["scenario", "target", "total µs/unit"] + [f"{n} µs/unit" for n in names] +
            [f"{n} % of a core" for n in ws] + [f"{n} conn" for n in ws] +
            ["proxy core busy %", "of it not ours %", "client core busy %", "bottleneck"])
    out = ["### Workers: CPU of each process (utime + stime, /proc/PID/stat)", "",
           "Every process of the target is pinned to the proxy's core. A unit is an echoed "
           "message (an upgrade for connrate); the total is the supervisor plus every worker; "
           "conn: the client connections each worker held halfway through the run (the "
           "kernel's reuseport hash spreads them); not ours: the proxy core's busy time that "
           "is neither the target's CPU nor interrupts (other processes of the machine).",
           "", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for s, t, f in rows:
        total = f.get("proxy CPU µs/msg", f.get("proxy CPU µs/upgrade"))
        cells = ([s, t, fmt(total)] + [fmt(f.get(f"{n} µs/unit")) for n in names] +
                 [fmt(f.get(f"{n} % of a core")) for n in ws] +
                 [fmt(f.get(f"{n} connections")) for n in ws] +
                 [fmt(f.get("proxy core busy %")), fmt(f.get("proxy core other load %")),
                  fmt(f.get("client core busy %")),
                  f.get("bottleneck detail") or f.get("bottleneck") or "–"])
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


# (goal, scenario of the value, target of the value, scenario of the reference, its target)
WORKER_GOALS = (
    ("tp-64B: 2 workers vs 1, proxy CPU µs/msg", "tp-64B", "fastgw-2w", "tp-64B", "fastgw"),
    ("tp-1KiB: 2 workers vs 1, proxy CPU µs/msg", "tp-1KiB", "fastgw-2w", "tp-1KiB", "fastgw"),
    ("64 B, 2 workers: client-scoped vs connection-scoped limits", "lim-client-64B",
     "fastgw-2w", "lim-conn-64B", "fastgw-2w"),
    ("64 B, 1 worker: client-scoped vs connection-scoped limits", "lim-client-64B",
     "fastgw", "lim-conn-64B", "fastgw"),
)
WORKER_LIMIT = 1.05

# Issue 12: a pool of 2 targets against one target, CPU per upgrade, the same process.
POOL_GOALS = (
    ("connrate: pool of 2 vs 1 target, proxy CPU µs/upgrade", "connrate-pool2", "fastgw",
     "connrate", "fastgw"),
    ("connrate, 2 workers: pool of 2 vs 1 target, proxy CPU µs/upgrade", "connrate-pool2",
     "fastgw-2w", "connrate", "fastgw-2w"),
)
POOL_LIMIT = 1.03


def goals_workers(result: dict[str, Any],
                  summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The goals of issue 11 (proxy CPU per message) and of issue 12 (per upgrade)."""
    return (_ratio_goals(result, summary, WORKER_GOALS, "proxy CPU µs/msg", WORKER_LIMIT,
                         "### Goals of issue 11 (proxy CPU per echoed message, all the "
                         "target's processes)", "µs/msg")
            + _ratio_goals(result, summary, POOL_GOALS, "proxy CPU µs/upgrade", POOL_LIMIT,
                           "### Goals of issue 12 (proxy CPU per upgrade, all the target's "
                           "processes)", "µs/upgrade"))


def _ratio_goals(result: dict[str, Any], summary: dict[str, dict[str, dict[str, Any]]],
                 table: tuple, figure: str, limit: float, title: str, unit: str) -> list[str]:
    """Ratios of `figure` (proxy CPU per unit), medians over the rounds, with the ratio of
    each round (the runs of one round are minutes apart at most) and the same ratio from the
    threads' run time (schedstat, ns) as a check of the clock-tick figure."""
    per_round: dict[tuple[str, str], dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in result.get("runs", ()):
        per_round[(r["scenario"], r["target"])][r.get("round", 1)] = r.get("cpu") or {}
    rows = []
    for goal, vs, vt, rs, rt in table:
        v = ((summary.get(vs) or {}).get(vt) or {})
        ref = ((summary.get(rs) or {}).get(rt) or {})
        a, b = v.get(figure), ref.get(figure)
        if a is None and b is None:
            continue
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        ra, rb = v.get("proxy run µs/unit"), ref.get("proxy run µs/unit")
        run_ratio = ra / rb if ra and rb else None
        rounds = []
        for rnd, c in sorted(per_round[(vs, vt)].items()):
            c2 = per_round[(rs, rt)].get(rnd) or {}
            x, y = c.get("proxy_us_per_unit"), c2.get("proxy_us_per_unit")
            if x and y:
                rounds.append(f"{x / y:.3f}")
        met = None if ratio is None else ratio <= limit
        rows.append(f"| {goal} | {fmt(a)} ({vt}, {vs}) | {fmt(b)} ({rt}, {rs}) | "
                    f"{'–' if ratio is None else f'{ratio:.3f}'} | "
                    f"{', '.join(rounds) or '–'} | "
                    f"{'–' if run_ratio is None else f'{run_ratio:.3f}'} | <= {limit:g} | "
                    f"{'yes' if met else 'no' if met is False else '–'} |")
    if not rows:
        return []
    return [title, "",
            f"| goal | value {unit} | reference {unit} | ratio | ratio per round | ratio "
            "(schedstat) | limit | met |", "|---|---:|---:|---:|---|---:|---:|---|",
            *rows, ""]


# ---------------------------------------------------------------------------------------------
# plots


def _merged_histograms(result: dict[str, Any], scenario: str) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram
    merged: dict[str, Any] = {}
    for r in result["runs"]:
        enc = r["loadgen"].get("histogram") if r["scenario"] == scenario else None
        if not enc:
            continue
        h = HdrHistogram.decode(enc)
        if r["target"] in merged:
            merged[r["target"]].add(h)
        else:
            merged[r["target"]] = h
    return merged


def proxy_cpu_plot(plt: Any, panels: list[dict[str, Any]], path: Path) -> None:
    """One panel per unit: a bar per target, its median over the rounds, min-max whiskers,
    labelled with its value and its ratio to the reference (the lower of nginx and nginx-64k).

    A bar more than 5x the median of its panel (the plain Python proxy) is cut at the top of
    the panel, its value still written on it, so that it does not flatten the others."""
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, p in zip(axes.flat, panels):
        names = list(p["targets"])
        fs = [p["targets"][t] for t in names]
        meds = [f["median"] for f in fs]
        typical = statistics.median(meds)
        top = max([f["max"] for f, m in zip(fs, meds) if m <= 5 * typical] or [0.0]) * 1.3
        top = top or max(f["max"] for f in fs) * 1.3 or 1.0
        colors = ["#d62728" if t.startswith("fastgw") else "#1f77b4" for t in names]
        xs = range(len(names))
        bars = ax.bar(xs, [min(m, top) for m in meds], color=colors)
        if p["reference"]:
            bars[names.index(p["reference"])].set_hatch("//")
        if any(f["rounds"] > 1 for f in fs):
            lo = [m - f["min"] if m <= top else 0 for f, m in zip(fs, meds)]
            hi = [f["max"] - m if m <= top else 0 for f, m in zip(fs, meds)]
            ax.errorbar(xs, meds, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
        for x, t, f, m in zip(xs, names, fs, meds):
            label = fmt(m) + ("\n(ref)" if t == p["reference"] else "" if f["ratio"] is None
                              else f"\n{f['ratio']:.2f}×")
            if m > top:                 # cut: the value written inside, below the cut
                ax.text(x, top * 0.97, "↑\n" + label, ha="center", va="top", fontsize=8,
                        color="white", fontweight="bold")
            else:
                ax.text(x, min(f["max"], top * 0.88) + top * 0.01, label, ha="center",
                        va="bottom", fontsize=8)
        ax.set_ylim(0, top)
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(p["unit"])
        mine = p["targets"].get("fastgw")
        vs = (f"\nfastgw {mine['ratio']:.2f}× {p['reference']}"
              if mine and mine["ratio"] is not None and p["reference"] else "")
        ax.set_title(f"{p['title']} ({p['scenario']}){vs}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    n = max(f["rounds"] for p in panels for f in p["targets"].values())
    fig.suptitle("The proxy's own CPU per unit, lower is better (median of "
                 f"{n} round(s){', min-max whiskers' if n > 1 else ''}; × = ratio to "
                 "the hatched bar, the lower of nginx and nginx-64k)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plots(result: dict[str, Any], prefix: Path) -> list[Path]:
    """The proxy's CPU per unit (first), throughput bars per message size and latency
    percentile curves, as PNG files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    summary = result.get("summary") or summarize(result)
    targets = result["meta"].get("targets") or []
    written: list[Path] = []

    panels = proxy_cpu(result)
    if panels:
        path = Path(f"{prefix}-proxy-cpu.png")
        proxy_cpu_plot(plt, panels, path)
        written.append(path)

    tps = [s for s in ("tp-64B", "tp-1KiB", "tp-64KiB") if s in summary]
    if tps:
        fig, axes = plt.subplots(1, len(tps), figsize=(5 * len(tps), 4.5), squeeze=False)
        for ax, s in zip(axes[0], tps):
            key = "MB/s" if s == "tp-64KiB" else "msg/s"
            names = [t for t in targets if t in summary[s]]
            vals = [summary[s][t].get(key) or 0 for t in names]
            colors = ["#d62728" if t.startswith("fastgw") else "#7f7f7f" if t == "direct"
                      else "#1f77b4" for t in names]
            ax.bar(range(len(names)), vals, color=colors)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{s}: {key}")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("Throughput seen by the client (median of rounds)")
        fig.tight_layout()
        path = Path(f"{prefix}-throughput.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    lat = [s for s in summary if s.startswith("lat")]
    for s in lat:
        hists = _merged_histograms(result, s)
        if not hists:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        grid = [0, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99]
        for t in targets:
            h = hists.get(t)
            if h is None:
                continue
            xs = [1 / (1 - p / 100) for p in grid]
            ys = [max(1, h.get_value_at_percentile(p)) for p in grid]
            style = "-" if t.startswith("fastgw") else "--" if t == "direct" else ":"
            ax.plot(xs, ys, style, marker=".", label=t)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1 / (1 - p / 100) for p in grid[1:]],
                      [f"{p:g}%" for p in grid[1:]], fontsize=8)
        ax.set_xlabel("percentile")
        ax.set_ylabel("round trip µs (coordinated omission corrected)")
        ax.set_title(f"{s}: latency percentile distribution (all rounds merged)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(f"{prefix}-{s.replace('/', '')}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def render(result: dict[str, Any], prefix: Path) -> tuple[str, list[Path]]:
    """The plots and the Markdown that shows them: the proxy-CPU figure below its table at the
    top, the others at the end."""
    ps = plots(result, prefix)
    lead = [p for p in ps if p.name.endswith("-proxy-cpu.png")]
    text = markdown(result, lead)
    rest = [p for p in ps if p not in lead]
    if rest:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in rest) + "\n"
    return text, ps


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).parent / "results" / "latest.json")
    result = json.loads(path.read_text())
    result["summary"] = summarize(result)
    text, _ = render(result, path.with_suffix(""))
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
