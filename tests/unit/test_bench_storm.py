"""bench/storm.py's pure part: the figures of one storm from the client's result."""

from __future__ import annotations

import storm  # noqa: E402  (bench/storm.py, on sys.path by conftest)


def _client(**kw):
    base = {"open": 10, "dropped": 10, "back": 10, "gave_up": 0, "open_failed": 0,
            "attempts": 25, "failed_attempts": {"status 502": 15}, "last_back": 13.5,
            "handshake_us": {"p50": 800, "p99": 4000, "max": 9000, "count": 10}}
    base.update(kw)
    return base


def test_all_back_time_from_restart_and_peak_rss_during_storm():
    rss = [(9.0, 50 * 2**20), (10.5, 80 * 2**20), (12.0, 60 * 2**20)]
    r = storm.aggregate(_client(), t_kill=10.0, t_restart=11.0, rss=rss, rss_before=40 * 2**20)
    assert r["ok"] and r["all_back"]
    assert r["all_back_after_restart_s"] == 2.5
    assert r["all_back_after_kill_s"] == 3.5
    assert r["peak_rss_mib"] == 80.0          # the sample before the kill is not counted
    assert r["rss_samples"] == 2
    assert r["handshake_p99_us"] == 4000
    assert r["failures"] == 0 and r["failed_attempts"] == 15


def test_missing_clients_are_failures_and_no_time():
    r = storm.aggregate(_client(back=7, gave_up=2), 10.0, 11.0, [], None)
    assert not r["ok"] and not r["all_back"]
    assert r["all_back_after_restart_s"] is None
    assert r["failures"] == 3                 # 2 gave up, 1 never reported back
    assert r["peak_rss_mib"] is None


def test_no_client_result():
    r = storm.aggregate(None, 1.0, None, [], None)
    assert not r["ok"] and r["connections"] == 0 and r["handshake_p99_us"] is None
