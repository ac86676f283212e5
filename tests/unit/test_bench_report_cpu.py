"""bench/report.py's proxy-CPU figure and table (the proxy's own CPU per message, per MB, per
upgrade and per TLS handshake, per target), on synthetic results in the shape bench/run.py
writes. A few seconds (matplotlib renders two small PNGs)."""

from __future__ import annotations

import struct

import pytest

import report  # noqa: E402  (bench/report.py, on sys.path by conftest)
import run  # noqa: E402  (bench/run.py)

TARGETS = ["direct", "fastgw", "nginx", "nginx-64k", "haproxy"]


def _run(scenario: str, target: str, rnd: int, us: float | None, ok: bool = True) -> dict:
    """One entry of run.py's "runs": measure()'s {"scenario", "target", "loadgen", "cpu"}."""
    sc = run.SCENARIOS[scenario]
    cpu = {"wall_s": 1.0, "units": 1000, "busy_cpu0_pct": 30.0, "busy_cpu1_pct": 99.0,
           "other_load_cpu0_pct": 1.0, "bottleneck": "client"}
    if us is not None:                               # `direct` has no proxy: no proxy figures
        cpu.update(proxy_s=0.001, proxy_us_per_unit=us, proxy_run_us_per_unit=us)
        if sc["mode"] == "throughput":
            cpu["proxy_us_per_mb"] = us / sc["size"] * 1e6
    loadgen = {"ok": ok, "mode": sc["mode"]}
    if sc["mode"] == "throughput":
        loadgen.update(msgs_per_s=200000.0, mb_per_s=12.8, received_total=200000, lost=0)
    else:
        loadgen.update(upgrades_per_s=2000.0, upgrades=2000, failures=0,
                       handshake_us={"p50": 300.0, "p99": 900.0})
    return {"scenario": scenario, "target": target, "round": rnd, "cpu": cpu, "loadgen": loadgen}


def _result(us: dict[tuple[str, str], list[float]]) -> dict:
    """us: (scenario, target) -> the proxy's µs per unit of each round."""
    runs = []
    for (scenario, target), per_round in us.items():
        runs += [_run(scenario, target, rnd, v) for rnd, v in enumerate(per_round, 1)]
    scenarios = {s: run.SCENARIOS[s] for s, _ in us}
    return {"meta": {"targets": TARGETS, "rounds": 3, "proxy_cpu": 0, "load_cpu": 1,
                     "scenarios": scenarios}, "runs": runs}


BASE = {("tp-64B", "direct"): [None, None, None],
        ("tp-64B", "fastgw"): [0.50, 0.56, 0.60],
        ("tp-64B", "nginx"): [0.60, 0.58, 0.62],
        ("tp-64B", "nginx-64k"): [0.40, 0.44, 0.50],
        ("tp-64B", "haproxy"): [0.70, 0.64, 0.66],
        ("tp-64KiB", "fastgw"): [50.0, 51.0, 52.0],      # µs per message: 64 KiB each
        ("tp-64KiB", "nginx"): [130.0, 131.0, 129.0],
        ("connrate", "fastgw"): [400.0, 410.0, 390.0],
        ("connrate", "nginx"): [140.0, 130.0, 135.0],
        ("tls-hs", "fastgw"): [900.0, 1000.0, 950.0],
        ("tls-hs", "nginx"): [800.0, 700.0, 750.0]}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_panels_are_medians_of_the_rounds_and_ratios_to_the_lower_nginx():
    panels = report.proxy_cpu(_result(BASE))
    assert [p["scenario"] for p in panels] == ["tp-64B", "tp-64KiB", "connrate", "tls-hs"]
    tp, big, conn, hs = panels
    assert "direct" not in tp["targets"]                  # no proxy, no bar
    f = tp["targets"]["fastgw"]
    assert (f["median"], f["min"], f["max"], f["rounds"]) == (0.56, 0.50, 0.60, 3)
    assert tp["reference"] == "nginx-64k"                 # 0.44 < nginx's 0.60
    assert f["ratio"] == pytest.approx(0.56 / 0.44)
    assert tp["targets"]["haproxy"]["ratio"] == pytest.approx(0.66 / 0.44)
    assert big["unit"] == "µs/MB" and big["reference"] == "nginx"
    assert big["targets"]["fastgw"]["median"] == pytest.approx(51.0 / 65536 * 1e6)
    assert big["targets"]["fastgw"]["ratio"] == pytest.approx(51.0 / 130.0)
    assert conn["targets"]["fastgw"]["ratio"] == pytest.approx(400.0 / 135.0)
    assert hs["unit"] == "µs/handshake" and hs["targets"]["fastgw"]["ratio"] == pytest.approx(
        950.0 / 750.0)


def test_the_ratio_follows_the_input_and_the_reference_falls_back():
    us = dict(BASE)
    us[("tp-64B", "nginx-64k")] = [0.70, 0.80, 0.90]      # now nginx (0.60) is the lower
    tp = report.proxy_cpu(_result(us))[0]
    assert tp["reference"] == "nginx"
    assert tp["targets"]["fastgw"]["ratio"] == pytest.approx(0.56 / 0.60)
    us[("tp-64B", "fastgw")] = [1.2, 1.2, 1.2]
    assert report.proxy_cpu(_result(us))[0]["targets"]["fastgw"]["ratio"] == pytest.approx(2.0)
    del us[("tp-64B", "nginx")], us[("tp-64B", "nginx-64k")]
    tp = report.proxy_cpu(_result(us))[0]                 # no nginx: figures, no ratios
    assert tp["reference"] is None and tp["targets"]["fastgw"]["ratio"] is None


def test_a_round_whose_load_generator_failed_is_left_out():
    result = _result(BASE)
    result["runs"].append(_run("tp-64B", "fastgw", 4, 99.0, ok=False))
    f = report.proxy_cpu(result)[0]["targets"]["fastgw"]
    assert f["rounds"] == 3 and f["max"] == 0.60


def test_the_table_leads_the_report_with_the_plot_figures():
    result = _result(BASE)
    text = report.markdown(result)
    lines = text.splitlines()
    head = lines.index("### Proxy CPU per unit (lower is better)")
    assert head < lines.index("### Overview") < lines.index("### tp-64B")
    table = [line for line in lines[head:lines.index("### Overview")] if line.startswith("| ")]
    assert table[0] == ("| target | 64 B µs/msg (× nginx-64k) | 64 KiB µs/MB (× nginx) | "
                        "µs/upgrade (× nginx) | TLS full µs/handshake (× nginx) |")
    rows = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert "direct" not in rows and list(rows) == ["fastgw", "nginx", "nginx-64k", "haproxy"]
    assert rows["fastgw"] == "| fastgw | 0.56 (1.27×) | 778 (0.39×) | 400 (2.96×) | 950 (1.27×) |"
    assert rows["nginx-64k"] == "| nginx-64k | 0.44 | – | – | – |"   # the reference: no ratio
    assert rows["haproxy"] == "| haproxy | 0.66 (1.50×) | – | – | – |"
    us = dict(BASE)
    us[("connrate", "fastgw")] = [270.0, 270.0, 270.0]
    assert "| fastgw | 0.56 (1.27×) | 778 (0.39×) | 270 (2.00×) | 950 (1.27×) |" in \
        report.markdown(_result(us))


def test_the_figure_is_written_first_and_leaves_out_missing_scenarios(tmp_path):
    pytest.importorskip("matplotlib")
    full = dict(BASE)
    for s in ("tp-1KiB", "tls-hs-resume", "tls-64B", "tls-64KiB"):
        full[(s, "fastgw")], full[(s, "nginx")] = [2.0, 2.1, 2.2], [3.0, 3.1, 3.2]
    text, paths = report.render(_result(full), tmp_path / "all")
    assert paths[0] == tmp_path / "all-proxy-cpu.png"
    assert paths[1] == tmp_path / "all-throughput.png"
    w8, h8 = _png_size(paths[0])                          # 8 panels: 4 x 2
    lines = text.splitlines()
    assert lines.index("![all-proxy-cpu](all-proxy-cpu.png)") < lines.index("### Overview")
    assert lines[-1] == "![all-throughput](all-throughput.png)"

    only = {k: v for k, v in BASE.items() if k[0] in ("tp-64B", "connrate")}
    _, paths = report.render(_result(only), tmp_path / "two")
    w2, h2 = _png_size(paths[0])                          # 2 panels: 2 x 1
    assert (w2, h2) == (pytest.approx(w8 / 2, rel=0.05), pytest.approx(h8 / 2, rel=0.05))
    assert [p["scenario"] for p in report.proxy_cpu(_result(only))] == ["tp-64B", "connrate"]
    assert "tls-hs" not in report.markdown(_result(only)).split("### Overview")[0]


def test_no_proxy_figures_no_panel_and_no_table(tmp_path):
    pytest.importorskip("matplotlib")
    result = _result({("tp-64B", "direct"): [None]})
    assert report.proxy_cpu(result) == []
    assert "Proxy CPU per unit" not in report.markdown(result)
    assert not any(p.name.endswith("-proxy-cpu.png") for p in report.plots(result, tmp_path / "x"))
