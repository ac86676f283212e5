"""The interval histogram log (observe.histograms.IntervalLog) on simulated time: the header,
one tagged line per histogram and interval, per-interval (not cumulative) counts, and the
lines read back by hdrh's own log reader."""

from __future__ import annotations

from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader

from fastgw.clock import SimClock
from fastgw.observe.histograms import IntervalLog
from fastgw.observe.metrics import Metrics

WALL = 1_800_000_000.0


def test_lines_per_interval_on_simulated_time(tmp_path):
    m = Metrics(intervals=True)
    api = m.api("quotes")
    clock = SimClock(wall_start=WALL)
    path = tmp_path / "gw.hlog"
    log = IntervalLog(m, str(path), 1.0, clock=clock)
    for _ in range(2):
        api.record("handshake_us", 100)
    api.record("duration_ms", 5000)
    clock.advance(1.0)
    assert log.write_interval() == 5           # 3 per connection, 2 held-message histograms
    api.record("handshake_us", 300)
    clock.advance(2.5)
    log.close()                                # writes the last interval
    text = path.read_text().splitlines()
    assert text[:4] == ["#[Histogram log format version 1.3]",
                        f"#[StartTime: {WALL:.3f} (seconds since epoch)]",
                        f"#[BaseTime: {WALL:.3f} (seconds since epoch)]",
                        '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"']
    lines = [line.split(",") for line in text[4:]]
    assert [(tag, start, length) for tag, start, length, _, _ in lines] == [
        (f"Tag=quotes/{kind}", start, length)
        for start, length in (("0.000", "1.000"), ("1.000", "2.500"))
        for kind in ("duration_ms", "handshake_us", "request_held_us", "response_held_us",
                     "upstream_connect_us")]
    counts = {(line[0], line[1]): HdrHistogram.decode(line[4].encode()).get_total_count()
              for line in lines}
    assert counts[("Tag=quotes/handshake_us", "0.000")] == 2
    assert counts[("Tag=quotes/handshake_us", "1.000")] == 1          # per interval
    assert counts[("Tag=quotes/duration_ms", "1.000")] == 0
    assert [line[3] for line in lines if line[0] == "Tag=quotes/handshake_us"] == ["100.000", "300.000"]
    # The cumulative histograms are not reset by the log.
    assert api.handshake.total_count == 3
    reader = HistogramLogReader(str(path), HdrHistogram(1, 1 << 40, 2))
    tags = []
    while (h := reader.get_next_interval_histogram()) is not None:
        tags.append((h.get_tag(), h.get_total_count()))
    assert ("quotes/handshake_us", 2) in tags and ("quotes/handshake_us", 1) in tags
