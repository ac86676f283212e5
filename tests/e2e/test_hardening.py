"""Defects a hostile client found (issue 9), each end to end through a real
gateway and backend: the path and Host a request is routed on, headers that must
be single, subprotocol tokens."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from wire import (exchange, frame, open_ws, read_close_code, read_frame, read_head, status_of,
                  upgrade_request)

# An open API and one behind an api-key policy; an API bound to a host, and one for any host.
SPLIT_YAML = """
listeners: [{{host: 127.0.0.1, port: 0}}]
clients: [{{id: alice, key: alice-key}}]
apis:
  - name: public
    path: /public
    assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/headers"}}]
  - name: private
    path: /private
    assembly:
      - {{policy: api-key, header: X-API-Key}}
      - {{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/headers/private"}}
  - name: secret
    path: /
    host: secret.example
    assembly:
      - {{policy: api-key, header: X-API-Key}}
      - {{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/headers/secret"}}
  - name: anyhost
    path: /
    assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/headers/any"}}]
"""


@pytest.fixture
async def split_gw(gateway_factory, echo_backend):
    return await gateway_factory(SPLIT_YAML.format(port=echo_backend))


async def backend_saw(gw, path: str, **kw) -> dict:
    async with websockets.connect(gw.url(path), **kw) as ws:
        return json.loads(await ws.recv())


@pytest.mark.parametrize("path", [
    "/public/../private", "/public/%2e%2e/private", "/public/%2E%2E/private",
    "/public/./../private", "/public//../private", "/public/x/../../private/",
])
async def test_dot_segments_route_to_the_api_they_name(split_gw, path):
    """The path is normalised before routing: it lands on `private`, whose api-key
    policy turns the keyless client away; the backend is never reached."""
    answer = await exchange(split_gw.port, upgrade_request(path))
    assert status_of(answer) == 401, answer
    assert split_gw.gw.metrics.api("private").rejected["unauthorized"] == 1


@pytest.mark.parametrize("path", [
    "/public/..%2fprivate", "/public/..%2Fprivate", "/public/..%5cprivate", "/public/a\\..\\..\\private",
    "/public/../../private", "/..", "/public/%00", "/public/%zz", "/public#x",
])
async def test_unsafe_paths_are_400(split_gw, path):
    assert status_of(await exchange(split_gw.port, upgrade_request(path))) == 400
    assert (await backend_saw(split_gw, "/public"))["path"] == "/headers"     # still serving


@pytest.mark.parametrize("path, forwarded", [
    ("//public", "/headers"),
    ("/public//a///b", "/headers/a/b"),
    ("/public/a/./b/../c", "/headers/a/c"),
    ("/public/%7Eme/%61", "/headers/~me/a"),
    ("/public/q?x=..%2F&y=1", "/headers/q?x=..%2F&y=1"),      # the query is the backend's
])
async def test_backend_gets_the_normalised_path(split_gw, path, forwarded):
    report = await backend_saw(split_gw, path)
    assert report["path"] == forwarded


async def test_private_with_key_after_normalisation(split_gw):
    report = await backend_saw(split_gw, "/public/../private/x",
                               additional_headers={"X-API-Key": "alice-key"})
    assert report["path"] == "/headers/private/x"


@pytest.mark.parametrize("host", ["secret.example.", "SECRET.Example", "Secret.Example.:8080"])
async def test_host_is_normalised(split_gw, host):
    """A trailing dot or capitals do not skip the API bound to the host."""
    answer = await exchange(split_gw.port, upgrade_request("/x", host=host))
    assert status_of(answer) == 401, answer
    # The same request with the key reaches the host's own backend.
    reader, writer = await asyncio.open_connection("127.0.0.1", split_gw.port)
    writer.write(upgrade_request("/x", host=host, extra="X-API-Key: alice-key\r\n"))
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 101"), head
    report = json.loads((await read_frame(reader)).payload)
    assert report["path"] == "/headers/secret/x"
    writer.close()


@pytest.mark.parametrize("host", ["a b", "a/b", "x:y", "[::1"])
async def test_malformed_host_400(split_gw, host):
    assert status_of(await exchange(split_gw.port, upgrade_request("/public", host=host))) == 400


@pytest.mark.parametrize("extra", [
    "Content-Length: 0\r\nContent-Length: 5\r\n",
    "Content-Length: 0\r\nContent-Length: 0\r\n",
    "Sec-WebSocket-Version: 13\r\n",
    f"Sec-WebSocket-Key: {'A' * 22}==\r\n",
    "Host: other\r\n",
])
async def test_duplicate_single_headers_400(split_gw, extra):
    answer = await exchange(split_gw.port, upgrade_request("/public", extra=extra))
    assert status_of(answer) == 400, answer
    assert b"duplicate" in answer.lower() or b"exactly one host" in answer.lower()


@pytest.mark.parametrize("value", ["chat v1", "chat/1", "a,b c", '"quoted"', "x@y"])
async def test_subprotocols_must_be_tokens(gateway, value):
    answer = await exchange(gateway.port, upgrade_request(extra=f"Sec-WebSocket-Protocol: {value}\r\n"))
    assert status_of(answer) == 400, answer
    assert b"Sec-WebSocket-Protocol" in answer


async def test_valid_subprotocol_list_with_empty_elements(gateway):
    async with websockets.connect(gateway.url("/"), subprotocols=["chat.v1"],
                                  additional_headers={"Sec-WebSocket-Protocol": ", chat.v1 ,"}) as ws:
        assert ws.subprotocol == "chat.v1"


async def test_refused_unsafe_path_is_counted_unrouted(split_gw):
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(split_gw.url("/public/..%2fprivate")):
            pass
    assert info.value.response.status_code == 400
    assert split_gw.gw.metrics.rejected_unrouted["bad_request"] == 1


async def test_one_rejection_is_counted_once(gateway_factory, echo_backend):
    """Messages that arrive after a 1008 rejection (in the same read, or before the
    client has seen the close) are not counted as rejected again."""
    gw = await gateway_factory(f"""
listeners: [{{host: 127.0.0.1, port: 0}}]
apis:
  - name: chat
    path: /
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{echo_backend}/
        request:
          - {{policy: message-rate-limit, name: chat, messages: 1/1m, burst: 1, action: reject}}
""")
    reader, writer = await open_ws(gw.port)
    writer.write(b"".join(frame(0x1, b"m%d" % i) for i in range(20)))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"".join(frame(0x1, b"late %d" % i) for i in range(5)))
    await writer.drain()
    assert await read_close_code(reader) == 1008
    writer.close()
    await gw.wait_idle()
    stats = gw.gw.metrics.api("chat").request
    assert stats.rejected == 1
    assert stats.messages >= 2


async def test_reject_events_name_the_identified_client(gateway_factory, echo_backend, tmp_path):
    """count-limit and rate-limit refusals come after identity: their events carry
    the client id (a 401 before identity carries none)."""
    from fastgw.observe.events import EventSink, RejectEvent, decode_event
    gw = await gateway_factory(f"""
listeners: [{{host: 127.0.0.1, port: 0}}]
clients: [{{id: alice, key: alice-key}}]
apis:
  - name: conn
    path: /conn
    assembly:
      - {{policy: api-key, header: X-API-Key}}
      - {{policy: count-limit, key: client-id, max: 1}}
      - {{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{echo_backend}/"}}
  - name: rate
    path: /rate
    assembly:
      - {{policy: api-key, header: X-API-Key}}
      - {{policy: rate-limit, key: client-id, rate: 1/1m, burst: 1}}
      - {{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{echo_backend}/"}}
""")
    log = tmp_path / "events.jsonl"
    gw.gw.events = EventSink(str(log))
    key = {"X-API-Key": "alice-key"}
    held = await websockets.connect(gw.url("/conn"), additional_headers=key)
    for path, expected in (("/conn", 429), ("/rate", None), ("/rate", 429), ("/rate", 401)):
        headers = key if path != "/rate" or expected != 401 else {}
        if expected is None:
            async with websockets.connect(gw.url(path), additional_headers=headers):
                pass
            continue
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(gw.url(path), additional_headers=headers):
                pass
        assert info.value.response.status_code == expected
    await held.close()
    await gw.wait_idle()
    gw.gw.events.close()
    rejects = [e for e in map(decode_event, log.read_bytes().splitlines()) if isinstance(e, RejectEvent)]
    assert [(e.api, e.reason, e.client) for e in rejects] == [
        ("conn", "count_limit", "alice"), ("rate", "rate_limit", "alice"), ("rate", "unauthorized", None)]
