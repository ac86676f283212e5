"""Round trips of the cluster store (fastgw.cluster.store.Store): one script call, and 100
calls pipelined (on one Redis, and spread over a 3-master Redis Cluster), on this machine's
loopback. Starts its own redis-server processes (tests/redislib.py) and stops them by pid.

    python bench/store.py [--runs 2000]

Prints the HDR percentiles of each case's round trips (microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redislib import RedisCluster, RedisServer  # noqa: E402

from fastgw.cluster.store import Store  # noqa: E402

INCR = "return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])"


async def measure(store: Store, n_calls: int, runs: int) -> str:
    calls = [([f"bench:{{k{i}}}"], [1]) for i in range(n_calls)]
    for _ in range(50):                              # warm up (connections, script loaded)
        await store.run(INCR, calls)
    store.latency.reset()
    for _ in range(runs):
        await store.run(INCR, calls)
    h = store.latency.to_hdr()
    return " ".join(f"p{p:g}={h.get_value_at_percentile(p)}" for p in (50, 90, 99, 99.9))


async def main(runs: int) -> None:
    with RedisServer() as server, RedisCluster() as cluster:
        for name, store in (("redis", Store.from_config(url=server.url, timeout=1.0)),
                            ("cluster", Store.from_config(cluster_nodes=cluster.urls, timeout=1.0))):
            for n in (1, 100):
                fresh = Store(store.client, store.timeout)
                print(f"{name:8} {n:3} call(s) per run, {runs} runs: us "
                      f"{await measure(fresh, n, runs)}")
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    import uvloop
    uvloop.run(main(args.runs))
