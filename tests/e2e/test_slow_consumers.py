"""1,000 slow consumers at once: clients that never read, behind a backend that sends as
fast as it can. The gateway stops reading each backend once its client's transport holds
bytes, so its memory stays bounded (at most about one read per connection) and flat, and
other clients are served meanwhile (issue 9, "the suite")."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import websockets

import wire
from wire import upgrade_request

N = 1000

# A backend that completes the upgrade by hand and then sends 64 KiB binary frames to each
# connection as fast as its transport takes them (drain), until it is killed.
FLOODER = r"""
import asyncio, sys, uvloop
sys.path.insert(0, sys.argv[1])
from wire import BINARY, accept_upgrade, frame
FRAME = frame(BINARY, bytes(65536), mask=False)
async def handle(reader, writer):
    await accept_upgrade(reader, writer)
    try:
        while True:
            writer.write(FRAME)
            await writer.drain()
    except ConnectionError:
        pass
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
"""


async def test_a_thousand_slow_consumers_bounded_memory(gateway_process, echo_backend):
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(Path(wire.__file__).parent)],
                               stdout=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(flooder.stdout.readline), 15))
        gp = gateway_process(f"""
listeners: [{{host: 127.0.0.1, port: 0}}]
backlog: 2048
apis:
  - {{name: flood, path: /flood, assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{port}/"}}]}}
  - {{name: echo, path: /, assembly: [{{policy: websocket-upgrade, target-url: "ws://127.0.0.1:{echo_backend}/"}}]}}
""")
        idle = gp.rss_kib()
        socks = await asyncio.to_thread(_open_silent_clients, gp.port, N)
        # Let every connection fill up: the flooder writes until the gateway stops reading.
        samples = []
        for _ in range(20):
            await asyncio.sleep(0.5)
            samples.append(gp.rss_kib())
        assert gp.status()["active"] == N
        peak = max(samples)
        per_conn = (peak - idle) / N
        print(f"\n{N} slow consumers: gateway RSS {idle // 1024} MiB idle -> {peak // 1024} MiB "
              f"({per_conn:.0f} KiB per connection); last samples {samples[-4:]}")
        # Bounded: about one 256 KiB read per connection at the very most (the rest waits in
        # the kernel's socket buffers), and flat once every backend has been paused.
        assert per_conn < 300, f"{per_conn:.0f} KiB per slow consumer"
        assert max(samples[-4:]) - min(samples[-4:]) < 0.05 * peak
        async with websockets.connect(gp.url("/")) as ws:         # others are served
            await ws.send("unharmed")
            assert await asyncio.wait_for(ws.recv(), 10) == "unharmed"
    finally:
        for s in socks:
            s.close()
        flooder.kill()
        flooder.wait()


def _open_silent_clients(port: int, n: int) -> list[socket.socket]:
    """n upgraded connections that read their 101 and then never read again."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.connect(("127.0.0.1", port))
        s.sendall(upgrade_request("/flood"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)                 # byte by byte: nothing after the head is read
        assert head.startswith(b"HTTP/1.1 101"), head
        socks.append(s)
    return socks
