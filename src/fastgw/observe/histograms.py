"""HDR histograms: the count arrays the core keeps, and the interval histogram log.

The latency and duration histograms are HDR histograms kept as C count arrays in the core
(:class:`fastgw._core.HdrArray`, the ``hdrhistogram`` package's layout), exported with its
encoding (see README, "Metrics"). :class:`IntervalLog` writes their interval twins to a file
in the HdrHistogram log format (``histogram-log`` in the configuration).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastgw._core import HdrArray
from fastgw.clock import Clock

if TYPE_CHECKING:
    from fastgw.observe.metrics import Metrics


def new_histogram() -> HdrArray:
    """An empty HDR histogram as the metrics keep them: 1 µs .. 1 h, 3 significant digits."""
    return HdrArray(1, 3_600_000_000, 3)


class IntervalLog:
    """Writes interval histograms in the HdrHistogram log format (v1.3, tagged lines).

    Every `interval` seconds each histogram's interval twin is copied and reset
    and written as one line `Tag=API/kind_unit,start,length,max,payload`, which
    hdrh.log.HistogramLogReader and HdrHistogram's HistogramLogAnalyzer read.
    Times are seconds since the base time written in the header, read from ``clock``'s
    ``wall()`` (a test gives a ``SimClock``).
    """

    def __init__(self, metrics: Metrics, path: str, interval: float, clock: Clock | None = None):
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self.clock = clock if clock is not None else Clock()
        self.base = self.clock.wall()
        self.last = self.base
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("#[Histogram log format version 1.3]\n")
        self.file.write(f"#[StartTime: {self.base:.3f} (seconds since epoch)]\n")
        self.file.write(f"#[BaseTime: {self.base:.3f} (seconds since epoch)]\n")
        self.file.write('"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"\n')
        self.file.flush()

    def write_interval(self) -> int:
        """Write one line per histogram for the interval that just ended; returns the lines."""
        now = self.clock.wall()
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
        while True:
            await asyncio.sleep(self.interval)
            self.write_interval()

    def close(self) -> None:
        if not self.file.closed:
            self.write_interval()
            self.file.close()
