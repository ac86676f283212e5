"""What a worker's Gateway does differently, in this process on real loopback sockets: ids
from `id_base`, listening sockets given by the supervisor (`sockets=`: nothing bound, a reload
cannot change the listeners), and `retire` (a rolling restart: stop accepting at once without
a 503, the shared queue left to the successor, 1001 to live connections)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import gateway_yaml
from fastgw import config as cfgmod
from fastgw.gateway import Gateway
from fastgw.workers import make_sockets


def dup(socks: list[socket.socket]) -> list[socket.socket]:
    """Another descriptor of each socket, as a forked worker holds it."""
    return [socket.socket(s.family, s.type, s.proto, os.dup(s.fileno())) for s in socks]


async def test_connection_ids_start_at_id_base(echo_backend):
    config = cfgmod.loads(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), "yaml", "t.yaml")
    gw = Gateway(config, id_base=7 << 32)
    await gw.start()
    try:
        _, host, port = gw.addresses[0]
        async with websockets.connect(f"ws://{host}:{port}/") as a, \
                websockets.connect(f"ws://{host}:{port}/") as b:
            await a.send("x")
            await a.recv()
            await b.send("x")
            await b.recv()
            assert sorted(gw.live) == [(7 << 32) + 1, (7 << 32) + 2]
    finally:
        await gw.shutdown(1.0)


async def test_given_sockets_are_used_and_listeners_cannot_change(echo_backend, tmp_path):
    text = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/")
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    config = cfgmod.load(str(path))
    held = make_sockets(config, 2)           # the supervisor's, for two workers
    port = held[0][0][0].getsockname()[1]
    assert held[1][0][0].getsockname()[1] == port     # port 0 resolved once
    for s in held.pop()[0]:                  # nobody accepts index 1's: its share would wait
        s.close()
    gw = Gateway(config, str(path), sockets=[dup(s) for s in held[0]])
    try:
        assert [a[2] for a in await gw.start()] == [port]
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        path.write_text(text.replace("port: 0", f"port: {port}"))
        error = await gw.reload()
        assert error.endswith("listeners cannot change on reload with workers > 1: restart fastgw")
        path.write_text(text.replace("path: /", "path: /v2"))
        assert await gw.reload() is None
    finally:
        await gw.shutdown(1.0)
        for per_listener in held:
            for socks in per_listener:
                for s in socks:
                    s.close()


async def test_retire_leaves_the_queue_to_the_successor(echo_backend):
    config = cfgmod.loads(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/"), "yaml", "t.yaml")
    held = make_sockets(config, 1)[0]        # one index: old and new process share it
    old = Gateway(config, sockets=[dup(s) for s in held], id_base=1 << 32)
    new = Gateway(config, sockets=[dup(s) for s in held], id_base=2 << 32)
    await old.start()
    port = held[0][0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/"
    on_old = [await websockets.connect(url) for _ in range(5)]
    assert len(old.live) == 5
    await new.start()
    failures: list = []
    served = 0
    stop = asyncio.Event()

    async def client():
        nonlocal served
        while not stop.is_set():
            try:
                async with websockets.connect(url, open_timeout=5) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
                served += 1
            except ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1001:
                    failures.append(repr(exc))
                served += 1
            except Exception as exc:
                failures.append(repr(exc))

    clients = [asyncio.create_task(client()) for _ in range(3)]
    try:
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await old.retire(2.0)
        assert time.monotonic() - t0 < 2.0       # the 1001 handshakes ended, nothing was cut
        before = served
        await asyncio.sleep(0.2)                 # the successor alone serves the queue
        assert served > before
    finally:
        stop.set()
        await asyncio.gather(*clients)
    try:
        assert not failures, failures[:3]
        assert not old.live and not old.handshakes
        assert old.refused == {}                 # nobody answered 503
        for ws in on_old:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 2)
            assert ws.close_code == 1001
        assert all(s.fileno() == -1 for listener in old.listeners for s in listener.sockets)
        assert held[0][0].fileno() >= 0          # the supervisor's copy: still listening
        async with websockets.connect(url) as ws:
            await ws.send("y")
            assert await ws.recv() == "y"
            assert all(i >> 32 == 2 for i in new.live)
    finally:
        await new.shutdown(1.0)
        for s in held[0]:
            s.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_make_sockets_one_port_per_listener_for_every_index():
    hosts = ["127.0.0.1"] + (["::1"] if ipv6_loopback() else [])
    listeners = "".join(f"  - {{host: \"{h}\", port: 0}}\n" for h in hosts)
    config = cfgmod.loads("workers: 3\nbacklog: 77\nlisteners:\n" + listeners + "apis:\n  - name: t\n"
                          "    path: /\n    assembly:\n      - {policy: websocket-upgrade, "
                          "target-url: \"ws://127.0.0.1:1/\"}\n", "yaml", "t.yaml")
    made = make_sockets(config, 3)
    try:
        assert len(made) == 3 and all(len(per) == len(hosts) for per in made)
        for li, host in enumerate(hosts):
            names = [made[i][li][0].getsockname()[:2] for i in range(3)]
            assert names[0][0] == host and names[0][1] != 0
            assert names == [names[0]] * 3                 # index 0's port, for every index
            for i in range(3):
                s = made[i][li][0]
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                assert not s.getblocking()
    finally:
        for per in made:
            for socks in per:
                for s in socks:
                    s.close()
    # A port taken by a socket without SO_REUSEPORT: the error names the listener.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = cfgmod.loads(f"listeners:\n  - {{host: 127.0.0.1, port: {port}}}\napis:\n  - name: t\n"
                           "    path: /\n    assembly:\n      - {policy: websocket-upgrade, "
                           "target-url: \"ws://127.0.0.1:1/\"}\n", "yaml", "t.yaml")
        with pytest.raises(OSError, match=rf"listeners\[0\]: cannot listen on 127.0.0.1:{port}: "):
            make_sockets(bad, 2)
