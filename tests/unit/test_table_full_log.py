"""Refusals for want of a limit-table slot: the counter's exposition and the WARNING
written at most once per interval (synthetic time)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from fastgw.observe.metrics import Metrics, TableFullWarnings


def table_full_samples(metrics: Metrics) -> dict:
    text = asyncio.run(metrics.render())
    assert "# TYPE fastgw_limit_table_full counter\n" in text
    return {s.labels["policy"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "fastgw_limit_table_full_total"}


def test_counter_has_one_sample_per_policy():
    m = Metrics()
    assert table_full_samples(m) == {"count-limit": 0, "rate-limit": 0, "message-rate-limit": 0}
    m.table_full["rate-limit"] += 2
    m.table_full["count-limit"] += 1
    m.message_table_full = lambda: 7
    assert table_full_samples(m) == {"count-limit": 1, "rate-limit": 2, "message-rate-limit": 7}


def test_warning_once_per_interval_with_the_refusals_since_the_last_line():
    m = Metrics()
    messages = [0]
    m.message_table_full = lambda: messages[0]
    w = TableFullWarnings(m, interval=10.0)
    assert w.check(0.0) is None                         # nothing refused: no line
    m.table_full["rate-limit"] += 1
    line = w.check(1.0)                                 # the first refusal: at once
    assert line is not None and "1 refusal for want" in line and "rate-limit: 1" in line
    m.table_full["rate-limit"] += 3
    messages[0] = 2
    for t in (2.0, 5.0, 10.9):                          # within 10 s of the last line: silent
        assert w.check(t) is None
    line = w.check(11.0)
    assert line is not None
    assert "5 refusals" in line and "rate-limit: 3" in line and "message-rate-limit: 2" in line
    assert "count-limit" not in line                    # only the policies that refused
    assert w.check(30.0) is None                        # nothing new since
    m.table_full["count-limit"] += 1
    line = w.check(30.5)                                # more than 10 s after the last line
    assert line is not None and "count-limit: 1" in line and "1 refusal " in line


def test_refusals_before_the_warnings_start_are_not_reported_again():
    m = Metrics()
    m.table_full["count-limit"] += 4
    w = TableFullWarnings(m, interval=10.0)
    assert w.check(0.0) is None
