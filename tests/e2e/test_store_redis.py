"""The cluster store against a real redis-server and a real 3-master Redis Cluster: pipelined
script calls in order, NOSCRIPT handled (SCRIPT FLUSH, restart), the timeout bound with Redis
made slow (DelayProxy), the circuit breaker with Redis stopped and restarted, rediss://."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme
from redis import exceptions as rx

from fastgw.cluster.store import Store, StoreConnectionError, StoreTimeout, Unavailable
from redislib import DelayProxy, RedisCluster, RedisServer, command, delay_proxy, redis_cluster, redis_server  # noqa: F401
from wire import free_port

INCR = "return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])"
FAILS_ON_ZERO = ("if ARGV[1] == '0' then return redis.error_reply('zero') end\n"
                 "return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])")


def keys(n: int, prefix: str = "t") -> list[str]:
    """n hash-tagged keys, one slot each (spread over the slots)."""
    return [f"fgwtest:{prefix}:{{k{i}}}" for i in range(n)]


def calls(ks: list[str]) -> list[tuple[list[str], list[int]]]:
    return [([k], [i + 1]) for i, k in enumerate(ks)]


async def until(predicate, timeout: float, step: float = 0.005):
    """Await predicate() (a coroutine function) until it returns a true value, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(step)
    pytest.fail(f"not reached within {timeout} s")


async def test_pipelined_calls_come_back_in_order(redis_server):
    store = Store.from_config(url=redis_server.url, timeout=1.0)
    ks = keys(100)
    try:
        assert await store.run(INCR, calls(ks)) == [i + 1 for i in range(100)]
        t = time.perf_counter()
        assert await store.run(INCR, calls(ks)) == [2 * (i + 1) for i in range(100)]
        print(f"100 calls pipelined: {(time.perf_counter() - t) * 1000:.2f} ms")
        assert store.round_trips == 2 and store.latency.total_count == 2
        assert store.script_loads == 1, "loaded on the first NOSCRIPT"
        assert store.breaker.state == "closed" and sum(store.errors.values()) == 0
        assert await store.run(INCR, []) == []
    finally:
        await store.close()


def clients(port: int) -> int:
    """The server's connected_clients, this query's own connection not counted."""
    info = command(port, "INFO", "clients").decode()
    return int(info.split("connected_clients:")[1].split()[0]) - 1


async def test_close_closes_the_pools_connections():
    with RedisServer() as server:
        store = Store.from_config(url=server.url, timeout=1.0)
        await asyncio.gather(*(store.run(INCR, calls(keys(3, f"c{i}"))) for i in range(3)))
        assert clients(server.port) == 3, "a connection per concurrent run"
        await store.close()

        async def none_left():
            return clients(server.port) == 0
        await until(none_left, 2.0)


async def test_a_calls_own_error_is_returned_in_its_place(redis_server):
    store = Store.from_config(url=redis_server.url, timeout=1.0)
    try:
        results = await store.run(FAILS_ON_ZERO, [(["a{1}"], [1]), (["a{2}"], [0]), (["a{3}"], [3])])
        assert results[0] == 1 and results[2] == 3
        assert isinstance(results[1], rx.ResponseError) and "zero" in str(results[1])
        assert store.errors["script"] == 1 and store.breaker.state == "closed"
    finally:
        await store.close()


async def test_noscript_after_script_flush_and_after_a_restart(redis_server):
    store = Store.from_config(url=redis_server.url, timeout=1.0)
    try:
        assert await store.run(INCR, [(["b{1}"], [5])]) == [5]
        command(redis_server.port, "SCRIPT", "FLUSH")
        assert await store.run(INCR, [(["b{1}"], [5])]) == [10]
        assert store.script_loads == 2
        redis_server.stop()
        redis_server.start()               # empty: no keys, no scripts
        # The pooled connection died with the server: that run fails, the breaker opens.
        with pytest.raises(StoreConnectionError):
            await store.run(INCR, [(["b{1}"], [5])])

        async def ok():
            try:
                return await store.run(INCR, [(["b{1}"], [5])]) == [5]
            except Unavailable:
                return False
        await until(ok, 1.0)
        assert store.script_loads == 3 and store.errors["connection"] == 1
    finally:
        await store.close()


@pytest.mark.both_loops
async def test_the_timeout_holds_with_redis_made_slow(redis_server, delay_proxy):
    store = Store.from_config(url=delay_proxy.url, timeout=0.05)
    try:
        assert await store.run(INCR, [(["c{1}"], [1])]) == [1]
        delay_proxy.delay = 0.2
        t = time.perf_counter()
        with pytest.raises(StoreTimeout):
            await store.run(INCR, [(["c{1}"], [1])])
        took = time.perf_counter() - t
        print(f"timed out after {took * 1000:.1f} ms (timeout 50 ms, Redis 200 ms each way)")
        assert took < 0.05 + 0.03
        assert store.errors["timeout"] == 1
        # Open: refused at once, no connection attempt.
        accepted = delay_proxy.accepted
        t = time.perf_counter()
        with pytest.raises(Unavailable):
            await store.run(INCR, [(["c{1}"], [1])])
        assert time.perf_counter() - t < 0.005 and store.refused == 1
        # Redis fast again: the probe after the back-off succeeds, on a new connection
        # (the one that timed out may still hold the late reply: it was dropped).
        delay_proxy.delay = 0.0
        await asyncio.sleep(0.1)
        # The call that timed out may or may not have run at Redis (its request was sent).
        assert await store.run(INCR, [(["c{1}"], [1])]) in ([2], [3])
        assert delay_proxy.accepted == accepted + 1
        assert store.breaker.state == "closed"
    finally:
        await store.close()


async def test_a_slow_redis_within_the_timeout_is_waited_for(redis_server, delay_proxy):
    store = Store.from_config(url=delay_proxy.url, timeout=1.0)
    try:
        assert await store.run(INCR, [(["d{1}"], [1])]) == [1]
        delay_proxy.delay = 0.1
        t = time.perf_counter()
        assert await store.run(INCR, calls(keys(20, "d"))) == list(range(1, 21))
        assert 0.2 <= time.perf_counter() - t < 0.5, "one round trip: 100 ms each way"
    finally:
        await store.close()


async def test_redis_stopped_fails_fast_and_recovers_after_the_restart(redis_server, delay_proxy):
    store = Store.from_config(url=delay_proxy.url, timeout=0.05)
    try:
        assert await store.run(INCR, [(["e{1}"], [1])]) == [1]
        redis_server.stop()
        t = time.perf_counter()
        with pytest.raises(StoreConnectionError):
            await store.run(INCR, [(["e{1}"], [1])])
        first = time.perf_counter() - t
        # Open for 100 ms: refused at once, no connection attempt.
        accepted = delay_proxy.accepted
        refused = []
        for _ in range(10):
            t = time.perf_counter()
            with pytest.raises(Unavailable):
                await store.run(INCR, [(["e{1}"], [1])])
            refused.append(time.perf_counter() - t)
            await asyncio.sleep(0.005)
        assert delay_proxy.accepted == accepted
        assert max(refused) < 0.005
        # The probe at 100 ms fails (still stopped): open for 200 ms now.
        await asyncio.sleep(0.06)
        with pytest.raises(StoreConnectionError):
            await store.run(INCR, [(["e{1}"], [1])])
        assert delay_proxy.accepted == accepted + 1
        assert store.breaker.backoff == pytest.approx(0.4)
        redis_server.start()
        t = time.perf_counter()

        async def ok():
            try:
                return await store.run(INCR, [(["e{1}"], [1])]) == [1]
            except Unavailable:
                return False
        await until(ok, 1.0)
        recovered = time.perf_counter() - t
        print(f"failed in {first * 1000:.1f} ms, refused in {max(refused) * 1e6:.0f} us, "
              f"recovered {recovered * 1000:.0f} ms after the restart (back-off 200 ms)")
        assert recovered < 0.2 + 0.05
        assert store.errors["connection"] == 2 and store.breaker.state == "closed"
    finally:
        await store.close()


async def test_the_cluster_runs_calls_grouped_by_node_in_order(redis_cluster):
    store = Store.from_config(cluster_nodes=redis_cluster.urls, timeout=1.0)
    ks = keys(100, "cl")
    try:
        assert store.is_cluster
        assert await store.run(INCR, calls(ks)) == [i + 1 for i in range(100)]
        t = time.perf_counter()
        assert await store.run(INCR, calls(ks)) == [2 * (i + 1) for i in range(100)]
        print(f"100 calls over 3 masters: {(time.perf_counter() - t) * 1000:.2f} ms")
        owners = {store.client.nodes_manager.get_node_from_slot(store.client.keyslot(k)).name
                  for k in ks}
        assert len(owners) == 3, "the keys are spread over every master"
        # NOSCRIPT on every node after SCRIPT FLUSH: loaded on every master, run again.
        loads = store.script_loads
        for node in redis_cluster.nodes:
            command(node.port, "SCRIPT", "FLUSH")
        assert await store.run(INCR, calls(ks)) == [3 * (i + 1) for i in range(100)]
        assert store.script_loads == loads + 1
        assert sum(store.errors.values()) == 0
    finally:
        await store.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server with a TLS port, its certificate from a trustme CA; yields (server,
    tls port, ca)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("redis-tls")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    tls_port = free_port()
    with RedisServer(None, "--tls-port", str(tls_port),
                     "--tls-cert-file", str(folder / "cert.pem"),
                     "--tls-key-file", str(folder / "key.pem"),
                     "--tls-ca-cert-file", str(folder / "ca.pem"),
                     "--tls-auth-clients", "no") as server:
        yield server, tls_port, ca


async def test_rediss_with_the_given_ssl_context(tls_redis):
    server, tls_port, ca = tls_redis
    context = ssl.create_default_context()
    ca.configure_trust(context)
    store = Store.from_config(url=f"rediss://localhost:{tls_port}/0", timeout=1.0,
                              ssl_context=context)
    try:
        assert await store.run(INCR, [(["f{1}"], [7])]) == [7]
    finally:
        await store.close()
    # Without the CA the certificate is refused (verified by default).
    store = Store.from_config(url=f"rediss://localhost:{tls_port}/0", timeout=1.0,
                              ssl_context=ssl.create_default_context())
    try:
        with pytest.raises(StoreConnectionError):
            await store.run(INCR, [(["f{1}"], [7])])
    finally:
        await store.close()


async def test_connections_cut_fail_the_run_and_the_probe_reconnects(redis_server, delay_proxy):
    store = Store.from_config(url=delay_proxy.url, timeout=0.2)
    try:
        assert await store.run(INCR, [(["g{1}"], [1])]) == [1]
        delay_proxy.cut()
        await asyncio.sleep(0.02)
        with pytest.raises(StoreConnectionError):
            await store.run(INCR, [(["g{1}"], [1])])
        accepted = delay_proxy.accepted
        await asyncio.sleep(0.1)
        assert await store.run(INCR, [(["g{1}"], [1])]) == [2]
        assert delay_proxy.accepted == accepted + 1
    finally:
        await store.close()


async def test_a_cluster_node_stopped_then_restarted_empty():
    """One master stopped: its calls fail in their places (the others' results stand) and the
    breaker opens; restarted (same slots, empty, no scripts): the script is loaded again."""
    with RedisCluster() as cluster:
        store = Store.from_config(cluster_nodes=cluster.urls, timeout=0.5)
        try:
            ks = keys(30, "nf")
            assert await store.run(INCR, calls(ks)) == [i + 1 for i in range(30)]
            victim = cluster.nodes[1]
            owner = [store.client.nodes_manager.get_node_from_slot(store.client.keyslot(k)).port
                     for k in ks]
            lost = {i for i, port in enumerate(owner) if port == victim.port}
            assert 0 < len(lost) < 30
            victim.stop()
            results = await store.run(INCR, calls(ks))
            for i, result in enumerate(results):
                if i in lost:
                    assert isinstance(result, StoreConnectionError)
                else:
                    assert result == 2 * (i + 1)
            assert store.breaker.state == "open" and store.errors["connection"] == len(lost)
            loads = store.script_loads
            victim.start()
            t = time.perf_counter()

            async def converged():
                try:
                    results = await store.run(INCR, [([ks[i]], [0]) for i in sorted(lost)])
                except Unavailable:
                    return False
                return all(isinstance(r, int) for r in results) and results
            results = await until(converged, 8.0, step=0.05)
            print(f"node restarted: served again after {time.perf_counter() - t:.2f} s, "
                  f"errors {dict(store.errors)}")
            assert results == [0] * len(lost), "the restarted node is empty"
            assert store.script_loads > loads
        finally:
            await store.close()


async def test_a_tls_cluster_with_the_given_ssl_context(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp_path / "ca.pem", "key": tmp_path / "key.pem", "cert": tmp_path / "cert.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    with RedisCluster(tls={k: str(v) for k, v in files.items()}) as cluster:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        store = Store.from_config(cluster_nodes=cluster.urls[:1], timeout=1.0, ssl_context=context)
        try:
            ks = keys(30, "tls")
            assert await store.run(INCR, calls(ks)) == [i + 1 for i in range(30)]
            assert {n.port for n in store.client.get_nodes()} == set(cluster.tls_ports)
        finally:
            await store.close()
        store = Store.from_config(cluster_nodes=cluster.urls[:1], timeout=1.0,
                                  ssl_context=ssl.create_default_context())
        try:
            with pytest.raises(StoreConnectionError):
                await store.run(INCR, [(["h{1}"], [1])])
        finally:
            await store.close()
