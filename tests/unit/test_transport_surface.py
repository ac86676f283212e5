"""What the core relies on in uvloop's transports (real sockets on loopback).

A leg writes with send() on the socket itself while the transport holds nothing,
and through transport.write() otherwise. With write buffer limits (0, 0) the
transport must call pause_writing() as soon as it holds a byte and
resume_writing() only once it holds none: the core's write_paused flag is that.
"""

from __future__ import annotations

import asyncio

import uvloop


class Recorder(asyncio.Protocol):
    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.transport = None
        self.resumed = asyncio.Event()

    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self.events.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self):
        self.events.append(("resume", self.transport.get_write_buffer_size()))
        self.resumed.set()


class Sink(asyncio.Protocol):
    """Reads nothing until told to, then everything."""

    def __init__(self, got: list[int]):
        self.got = got

    def connection_made(self, transport):
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data):
        self.got[0] += len(data)


def test_zero_limits_pause_on_any_buffered_byte_and_resume_when_empty():
    async def main():
        loop = asyncio.get_running_loop()
        got = [0]
        sinks: list[Sink] = []

        def make_sink():
            sinks.append(Sink(got))
            return sinks[-1]

        server = await loop.create_server(make_sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, proto = await loop.create_connection(Recorder, "127.0.0.1", port)
        transport.set_write_buffer_limits(0, 0)
        assert transport.get_write_buffer_limits() == (0, 0)
        total = 0
        chunk = b"x" * (1 << 20)
        while not proto.events and total < (256 << 20):   # until the kernel buffers are full
            transport.write(chunk)
            total += len(chunk)
        assert proto.events and proto.events[0][0] == "pause" and proto.events[0][1] > 0
        sinks[0].transport.resume_reading()
        await asyncio.wait_for(proto.resumed.wait(), 20)
        assert proto.events[-1] == ("resume", 0)
        assert transport.get_write_buffer_size() == 0
        while got[0] < total:
            await asyncio.sleep(0.01)
        assert got[0] == total
        transport.close()
        server.close()

    uvloop.run(main())
