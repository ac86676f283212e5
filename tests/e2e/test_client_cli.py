"""`fastgw client URL` as a subprocess, through a real gateway to the real echo backend (and to
a websockets backend where the echo backend cannot say what is needed)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import pytest
import trustme
from websockets.asyncio.server import serve as ws_serve

from conftest import gateway_yaml
from wire import free_port

TIMEOUT = 30


async def client(*args: str, stdin: bytes | None = b"", keep_stdin_open: bool = False):
    """Run `fastgw client ARGS`, feed it stdin (then EOF, unless keep_stdin_open); return
    (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastgw", "client", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        if keep_stdin_open:
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            out, err = await asyncio.wait_for(
                asyncio.gather(proc.stdout.read(), proc.stderr.read()), TIMEOUT)
            await asyncio.wait_for(proc.wait(), TIMEOUT)
            proc.stdin.close()
        else:
            out, err = await asyncio.wait_for(proc.communicate(stdin), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_lines_in_echoes_out_and_a_normal_close(gateway):
    lines = ["hello", "second line", "", "héllo ✓ ünïcode", "x" * 70_000]
    rc, out, err = await client(gateway.url("/chat"), stdin="".join(l + "\n" for l in lines).encode())
    assert rc == 0, err
    assert out.split("\n") == lines + [""]
    assert err.splitlines()[0] == f"connected: {gateway.url('/chat')}"
    # End of input: close 1000, answered by the backend (through the gateway) before exit.
    assert err.splitlines()[-1] == "closed: 1000"
    assert "Traceback" not in err


async def test_last_line_without_newline_and_crlf(gateway):
    rc, out, err = await client(gateway.url("/"), stdin=b"one\r\ntwo")
    assert rc == 0, err
    assert out == "one\ntwo\n"


async def test_header_reaches_the_backend(gateway):
    rc, out, err = await client(gateway.url("/headers"), "-H", "X-Demo: hello there",
                                "-H", "X-Demo:two", "-H", "User-Agent: my-agent/1")
    assert rc == 0, err
    report = json.loads(out.splitlines()[0])
    assert report["headers"]["x-demo"] == "hello there, two"
    assert report["headers"]["user-agent"] == "my-agent/1"
    assert [v for k, v in report["raw_headers"] if k == "user-agent"] == ["my-agent/1"]


async def test_subprotocol_chosen(gateway):
    # The echo backend speaks chat.v2 and chat.v1; the first offered that it knows is chosen.
    rc, out, err = await client(gateway.url("/headers"), "--subprotocol", "nope",
                                "--subprotocol", "chat.v1", "--subprotocol", "chat.v2")
    assert rc == 0, err
    assert err.splitlines()[0] == f"connected: {gateway.url('/headers')} (subprotocol: chat.v1)"
    report = json.loads(out.splitlines()[0])
    assert report["headers"]["sec-websocket-protocol"] == "nope, chat.v1, chat.v2"


API_KEY_TOP = """
clients:
  - {id: alice, key: alice-secret}
"""
API_KEY_POLICY = """
      - policy: api-key
        header: X-API-Key
"""


async def test_refused_upgrade_shows_status_and_body(gateway_factory, echo_backend):
    text = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/", extra_top=API_KEY_TOP)
    text = text.replace("    assembly:\n", "    assembly:\n" + API_KEY_POLICY.strip("\n") + "\n", 1)
    gw = await gateway_factory(text)
    rc, out, err = await client(gw.url("/"), stdin=b"never sent\n")
    assert rc == 1
    assert out == ""
    line, = err.splitlines()
    assert line.startswith("fastgw client: upgrade refused: HTTP 401 Unauthorized: ")
    assert "API key" in line or "api key" in line.lower()
    assert "Traceback" not in err
    # The same with the key: the header reaches the policy, and the echo comes back.
    rc, out, err = await client(gw.url("/"), "-H", "X-API-Key: alice-secret", stdin=b"with key\n")
    assert rc == 0, err
    assert out == "with key\n"


async def test_gateway_refusal_426_shown(gateway):
    # A header given with -H replaces nothing but Host: a second Sec-WebSocket-Version is sent.
    rc, out, err = await client(gateway.url("/"), "-H", "Sec-WebSocket-Version: 8")
    assert rc == 1
    assert err.startswith("fastgw client: upgrade refused: HTTP 4"), err
    assert "Traceback" not in err


async def test_wss_to_a_plain_listener(gateway_factory, echo_backend):
    # The gateway waits for a request head that a ClientHello never completes, then answers
    # 408 in plain HTTP: the client's TLS handshake fails on that answer.
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_top="handshake-timeout: 300ms"))
    rc, out, err = await client(gw.url("/").replace("ws://", "wss://"))
    assert rc == 1
    assert err.startswith("fastgw client: TLS handshake failed: "), err


async def test_server_close_code_and_reason_shown(gateway_factory):
    """A backend that sends a binary message, a text with terminal escapes, then closes with
    4000 "custom bye" while the client's stdin is still open."""
    async def handler(conn):
        await conn.send(b"\x00\x01\xfe\xff")
        await conn.send("\x1b[31mred\x07")
        await conn.close(4000, "custom bye")

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{port}/"))
        rc, out, err = await client(gw.url("/"), stdin=None, keep_stdin_open=True)
    assert rc == 1
    assert out.splitlines() == ["[binary 4 bytes] 0001feff", "\\x1b[31mred\\x07"]
    assert err.splitlines()[-1] == "closed: 4000 custom bye"


async def test_wss_with_ca_and_insecure(gateway_factory, echo_backend, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    yaml_text = gateway_yaml(f"ws://127.0.0.1:{echo_backend}/").replace(
        "    port: 0\n", f"    port: 0\n    tls: {{cert: {tmp_path}/gw.pem, key: {tmp_path}/gw.key}}\n", 1)
    gw = await gateway_factory(yaml_text)
    assert gw.url("/").startswith("wss://")
    rc, out, err = await client(gw.url("/"), "--ca", str(tmp_path / "ca.pem"), stdin=b"over tls\n")
    assert (rc, out) == (0, "over tls\n"), err
    rc, out, err = await client(gw.url("/"), "--insecure", stdin=b"unchecked\n")
    assert (rc, out) == (0, "unchecked\n"), err
    # Neither: the system store does not know trustme's CA.
    rc, out, err = await client(gw.url("/"), stdin=b"refused\n")
    assert rc == 1 and out == ""
    assert "certificate" in err and "--ca" in err and "Traceback" not in err


async def test_connection_refused():
    port = free_port()
    rc, out, err = await client(f"ws://127.0.0.1:{port}/")
    assert rc == 1
    assert err == f"fastgw client: cannot connect to ws://127.0.0.1:{port}/: Connection refused\n"
    assert "Traceback" not in err


@pytest.mark.parametrize("args, words", [
    (["http://127.0.0.1:1/"], "scheme"),
    (["ws://127.0.0.1:99999/"], "out of range"),
    (["ws://127.0.0.1:1/", "-H", "no colon"], "Name: value"),
    (["ws://127.0.0.1:1/", "-H", "Bad Name: x"], "Name: value"),
    (["ws://127.0.0.1:1/", "--subprotocol", "a b"], "token"),
])
async def test_bad_arguments_exit_2(args, words):
    rc, out, err = await client(*args)
    assert rc == 2
    assert words in err and err.startswith("fastgw client: ") and "Traceback" not in err


async def test_stdin_from_a_file_many_lines_in_order(gateway, tmp_path):
    lines = [f"line {i} " + "y" * (i % 300) for i in range(3000)]
    path = tmp_path / "input.txt"
    path.write_text("".join(l + "\n" for l in lines))
    with path.open("rb") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastgw", "client", gateway.url("/"), stdin=f,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err
    assert out.decode().split("\n") == lines + [""]


async def test_sigint_closes_with_1000(gateway):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastgw", "client", gateway.url("/"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        proc.stdin.write(b"ping\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT) == b"ping\n"
        proc.send_signal(signal.SIGINT)
        err = await asyncio.wait_for(proc.stderr.read(), TIMEOUT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 130
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        proc.stdin.close()
    assert err.decode().splitlines()[-1] == "closed: 1000"
