"""Observability in one place: what the gateway counts and tells.

* :mod:`fastgw.observe.metrics`: per-API counters and HDR histograms, the Prometheus text;
* :mod:`fastgw.observe.histograms`: the interval histogram log (HdrHistogram log format);
* :mod:`fastgw.observe.events`: connection events, one JSON object per line, off the loop;
* :mod:`fastgw.observe.logs`: log lines without queries, bounded, escaped and throttled;
* :mod:`fastgw.observe.admin`: the admin API (aiohttp) that serves them.
"""
