"""The end of life runs exactly once for every client connection, however it ends:
relayed and closed, refused before routing or at the dial, gone before its request head
was complete, gone while its backend was being dialled."""

from __future__ import annotations

import asyncio

import pytest
import websockets

import wire
from conftest import gateway_yaml
from fastgw.gateway import Gateway
from fastgw.http.handshake import Handshake

pytestmark = pytest.mark.both_loops


@pytest.fixture
def ends(monkeypatch):
    """Every connection's record, and how often its end of life ran (and did its work)."""
    conns: list = []
    runs: dict[int, int] = {}
    made, end_of_life = Handshake.connection_made, Gateway.end_of_life

    def connection_made(self, transport):
        made(self, transport)
        conns.append(self.conn)

    def counted(self, conn, refusal=None):
        if not conn.ended:
            runs[id(conn)] = runs.get(id(conn), 0) + 1
        end_of_life(self, conn, refusal)

    monkeypatch.setattr(Handshake, "connection_made", connection_made)
    monkeypatch.setattr(Gateway, "end_of_life", counted)
    return conns, runs


async def test_every_connection_ends_once(gateway_factory, echo_backend, ends):
    conns, runs = ends
    dead = wire.free_port()
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    quiet = silent.sockets[0].getsockname()[1]
    yaml = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", path="/echo", name="echo")
    for name, port in (("dead", dead), ("quiet", quiet)):
        yaml += (f"  - name: {name}\n    path: /{name}\n    assembly:\n"
                 f"      - policy: websocket-upgrade\n        target-url: ws://127.0.0.1:{port}/\n"
                 f"        timeout: 30s\n")
    gw = await gateway_factory(yaml)

    async with websockets.connect(gw.url("/echo")) as ws:           # relayed, closed
        await ws.send("x")
        assert await ws.recv() == "x"

    async def gone(data: bytes) -> None:
        _, writer = await wire.connect(gw.port)
        writer.write(data)
        writer.close()

    assert wire.status_of(await wire.exchange(gw.port, wire.upgrade_request("/nowhere"))) == 404
    assert wire.status_of(await wire.exchange(gw.port, wire.upgrade_request("/dead"))) == 502
    await gone(b"")                                                  # gone at once
    await gone(b"GET /echo HTTP/1.1\r\nHost:")                       # gone mid-head
    await gone(wire.upgrade_request("/quiet"))                       # gone during the dial
    await gw.wait_idle()
    for _ in range(100):
        if len(conns) == 6 and all(c.ended for c in conns):
            break
        await asyncio.sleep(0.02)
    silent.close()
    assert len(conns) == 6
    assert [runs.get(id(c), 0) for c in conns] == [1] * 6
    assert gw.gw.accepted == 1 and gw.gw.refused == {404: 1, 502: 1}
    assert sum(gw.gw.metrics.api("echo").closes.values()) == 1


async def test_a_backend_that_answers_after_the_gateway_closed_is_closed(gateway_factory, caplog):
    """The gateway's close refuses (503) a client whose backend is being dialled; the
    backend's 101 that comes later gets a close, and nothing else happens (no error)."""
    requested, answer, backend_got = asyncio.Event(), asyncio.Event(), []

    async def late_backend(reader, writer):
        _, headers = wire.head_fields(await wire.read_head(reader))
        requested.set()
        await answer.wait()
        writer.write(wire.answer_101(headers["sec-websocket-key"]))
        backend_got.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()

    server = await asyncio.start_server(late_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
    reader, writer = await wire.connect(gw.port)
    writer.write(wire.upgrade_request("/"))
    await asyncio.wait_for(requested.wait(), 5)
    await gw.gw.close()                                  # the client gets its 503 now
    assert wire.status_of(await asyncio.wait_for(reader.read(), 5)) == 503
    answer.set()                                         # and then the backend says 101
    for _ in range(100):
        if backend_got:
            break
        await asyncio.sleep(0.02)
    server.close()
    assert backend_got and backend_got[0][:1] == b"\x88"          # a CLOSE (masked), then EOF
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert gw.gw.refused == {503: 1} and not gw.gw.live and gw.gw.zone.counts_used() == 0
    writer.close()
