"""bench/report.py's issue-12 goal (a pool of 2 targets against one target, proxy CPU per
upgrade, the same process), on a synthetic result; and bench/run.py's pool scenario."""

from __future__ import annotations

import pytest

import report  # noqa: E402  (bench/report.py, on sys.path by conftest)
import run  # noqa: E402  (bench/run.py)
from fastgw.config import loads
from fastgw.routing import compile_config


def _run(scenario: str, target: str, rnd: int, us: float) -> dict:
    cpu = {"proxy_us_per_unit": us, "proxy_run_us_per_unit": us * 1.01, "busy_cpu0_pct": 60.0,
           "other_load_cpu0_pct": 1.0, "busy_cpu1_pct": 99.0, "bottleneck": "client"}
    return {"scenario": scenario, "target": target, "round": rnd, "cpu": cpu,
            "loadgen": {"ok": True, "mode": "connrate", "upgrades_per_s": 2000.0}}


@pytest.mark.parametrize(("pool_us", "ratio", "met"), [(204.0, "1.020", "yes"),
                                                       (210.0, "1.050", "no")])
def test_report_judges_the_pool_goal(pool_us, ratio, met):
    runs = []
    for rnd in (1, 2, 3):
        runs += [_run("connrate", "fastgw", rnd, 200.0),
                 _run("connrate-pool2", "fastgw", rnd, pool_us + rnd - 2)]
    scen = {s: run.SCENARIOS[s] for s in ("connrate", "connrate-pool2")}
    result = {"meta": {"targets": ["fastgw"], "proxy_cpu": 0, "load_cpu": 1,
                       "scenarios": scen}, "runs": runs}
    text = report.markdown(result)
    assert "### Goals of issue 12 (proxy CPU per upgrade, all the target's processes)" in text
    goal = next(line for line in text.splitlines()
                if line.startswith("| connrate: pool of 2 vs 1 target"))
    assert f"| {ratio} |" in goal and goal.endswith(f"| <= 1.03 | {met} |")
    assert not any(line.startswith("| connrate, 2 workers") for line in text.splitlines())


def test_the_pool_scenario_has_an_api_with_two_targets():
    assert run.SCENARIOS["connrate-pool2"]["path"] == "/pool2/"
    router = compile_config(loads(run.GATEWAY_YAML.format(backend_port=9000), "yaml", "b.yaml"))
    (api,) = [a for a in router.apis if a.name == "pool2"]
    assert [e.url for e in api.upgrade.targets] == ["ws://127.0.0.1:9000/",
                                                    "ws://127.0.0.1:9000/b/"]
    assert api.upgrade.balance == "least-connections"
