"""RFC 6455 framing through the gateway's own frame parser (`Leg._parse`), end to end.

A raw TCP client (asyncio streams) writes the upgrade request and hand-built frames itself,
so that it decides exactly how the bytes are split across writes; it parses the gateway's
frames itself too. Backends: the bundled echo backend (the `gateway` fixture), and small
hand-written backends (an asyncio server that completes the upgrade by hand) to see the
exact bytes that cross the gateway and to send hostile frames from the backend side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import gateway_yaml
from wire import (BINARY, CLOSE, CONT, PING, PONG, TEXT, TIMEOUT, Frame, accept_upgrade,
                  close_payload, expect_eof, frame, read_close, read_frame, ws)

# On uvloop and on the standard library's loop (`fastgw run --loop asyncio`).
pytestmark = pytest.mark.both_loops

# Payload material: deterministic, so that a failure can be replayed.
_POOL = random.Random(6455).randbytes(300_000)
_ASCII = bytes(0x20 + b % 95 for b in _POOL[:70_000])


@dataclass(frozen=True)
class Spec:
    """A frame of a script: what the client sends (and expects back, for data frames)."""
    opcode: int
    payload: bytes
    fin: bool = True


# ---- the client's side ------------------------------------------------------------------------

async def write_chunks(writer: asyncio.StreamWriter, data: bytes, cuts) -> int:
    """Write data split at the given offsets, one write (+ drain + sleep(0)) per chunk."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    start = 0
    for p in points + [len(data)]:
        writer.write(data[start:p])
        await writer.drain()
        await asyncio.sleep(0)
        start = p
    return len(points) + 1


async def collect(reader: asyncio.StreamReader, n_data: int, n_pongs: int,
                  timeout: float = TIMEOUT) -> tuple[list[Frame], list[Frame]]:
    """Read until n_data data frames and n_pongs PONGs have come; anything else fails."""
    data: list[Frame] = []
    pongs: list[Frame] = []
    while len(data) < n_data or len(pongs) < n_pongs:
        f = await read_frame(reader, timeout)
        assert f.rsv == 0, f
        if f.opcode in (CONT, TEXT, BINARY):
            data.append(f)
        elif f.opcode == PONG:
            pongs.append(f)
        else:
            pytest.fail(f"unexpected frame {f.opcode:#x} {f.payload[:60]!r} after "
                        f"{len(data)}/{n_data} data frames and {len(pongs)}/{n_pongs} pongs")
    return data, pongs


def summary(frames) -> list[tuple[int, bool, int, bytes]]:
    """Comparable form (opcode, fin, size, digest) that prints short on failure."""
    return [(f.opcode, f.fin, len(f.payload), hashlib.sha1(f.payload).digest()[:6]) for f in frames]


async def close_cleanly(reader, writer, code: int = 1000, reason: bytes = b"") -> None:
    """Client CLOSE; the echo backend's answer comes back through the gateway; then EOF."""
    writer.write(frame(CLOSE, close_payload(code, reason)))
    f, before = await read_close(reader)
    assert before == []
    assert f.close == (code, reason)
    await expect_eof(reader)
    writer.close()


async def echo_once(reader, writer, payload: bytes = b"still here") -> None:
    writer.write(frame(TEXT, payload))
    f = await read_frame(reader)
    assert (f.opcode, f.fin, f.payload) == (TEXT, True, payload)


# ---- 1. split points ---------------------------------------------------------------------------

SCRIPT = [
    Spec(TEXT, b"hello"),
    Spec(BINARY, b"\x00\x01\xff"),
    Spec(TEXT, b""),
    Spec(BINARY, b""),
    Spec(BINARY, _POOL[:125]),
    Spec(TEXT, _ASCII[:126]),
    Spec(BINARY, _POOL[1:65536]),            # 65535: the largest 16-bit length
    Spec(BINARY, _POOL[2:65538]),            # 65536: the smallest 64-bit length
    Spec(BINARY, _POOL[3:200_003]),
    Spec(PING, b"lone ping"),
    # A fragmented text message with PINGs between its fragments.
    Spec(TEXT, b"fragment one, ", fin=False),
    Spec(PING, b"between fragments"),
    Spec(CONT, _ASCII[:126], fin=False),
    Spec(PING, b""),
    Spec(CONT, b"the end", fin=True),
    # A fragmented binary message with empty first and last fragments.
    Spec(BINARY, b"", fin=False),
    Spec(CONT, _POOL[5:70_005], fin=False),
    Spec(PING, _POOL[:125]),
    Spec(CONT, b"", fin=True),
    Spec(PONG, b"unsolicited pong: never relayed, never answered"),
    Spec(TEXT, b"after all that"),
]


def encode_script(script, keys) -> tuple[bytes, list[int]]:
    """The client's bytes for a script, and the offset where each frame starts."""
    out = bytearray()
    starts = []
    for spec, key in zip(script, keys):
        starts.append(len(out))
        out += frame(spec.opcode, spec.payload, fin=spec.fin, key=key)
    return bytes(out), starts


async def run_script(port: int, script, keys, cuts) -> int:
    data, starts = encode_script(script, keys)
    expected = [s for s in script if s.opcode in (CONT, TEXT, BINARY)]
    pings = [s.payload for s in script if s.opcode == PING]
    async with ws(port) as (reader, writer):
        reading = asyncio.create_task(collect(reader, len(expected), len(pings)))
        try:
            writes = await write_chunks(writer, data, [starts[i] + d for i, d in cuts[0]] + cuts[1])
            got, pongs = await reading
        finally:
            reading.cancel()
        want = [Frame(s.fin, 0, s.opcode, s.payload) for s in expected]
        assert summary(got) == summary(want)
        assert got == want
        assert [p.payload for p in pongs] == pings and all(p.fin for p in pongs)
        await close_cleanly(reader, writer, 1000, b"done")
    return writes


_frame_cut = st.tuples(st.integers(0, len(SCRIPT) - 1), st.integers(0, 15))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.binary(min_size=4, max_size=4), min_size=len(SCRIPT), max_size=len(SCRIPT)),
       near_headers=st.lists(_frame_cut, max_size=40),
       anywhere=st.lists(st.integers(1, 450_000), max_size=40))
async def test_split_points_anywhere(gateway, keys, near_headers, anywhere):
    """Every frame kind and length encoding, masked with arbitrary keys, split at arbitrary
    points (many of them inside or just after a frame header): the same frames come back, in
    order, unmasked, and every PING gets its PONG."""
    await run_script(gateway.port, SCRIPT, keys, (near_headers, anywhere))


async def test_one_byte_at_a_time(gateway):
    """Small frames (7- and 16-bit lengths, fragments, PINGs), then the header of a 64-bit
    length frame, written one byte per write."""
    script = [
        Spec(TEXT, b"a"), Spec(BINARY, b""), Spec(PING, b"p"),
        Spec(TEXT, b"x", fin=False), Spec(PING, b"in the middle"), Spec(CONT, _ASCII[:130], fin=False),
        Spec(CONT, b"", fin=True),
        Spec(BINARY, _POOL[:126]),
        Spec(BINARY, _POOL[:65536]),
        Spec(TEXT, b"last"),
    ]
    rng = random.Random(1)
    keys = [rng.randbytes(4) for _ in script]
    data, starts = encode_script(script, keys)
    big = starts[8]
    # Every byte alone, except the 64-bit frame's payload (its 14-byte header is split too).
    cuts = list(range(1, big + 15)) + [starts[9] + i for i in range(len(data) - starts[9])]
    writes = await run_script(gateway.port, script, keys, ([], cuts))
    assert writes > 300


# ---- 2. many frames in one write ---------------------------------------------------------------

async def test_500_frames_in_one_write(gateway):
    script = [Spec(TEXT if i % 2 else BINARY, f"message {i:03d}".encode() * (i % 7)) for i in range(500)]
    script[250:250] = [Spec(PING, b"in the crowd")]
    data, _ = encode_script(script, [os.urandom(4) for _ in script])
    async with ws(gateway.port) as (reader, writer):
        writer.write(data)
        got, pongs = await collect(reader, 500, 1)
        assert [(f.opcode, f.fin, f.payload) for f in got] == [
            (s.opcode, True, s.payload) for s in script if s.opcode != PING]
        assert [p.payload for p in pongs] == [b"in the crowd"]
        await close_cleanly(reader, writer)


# ---- 3. hostile client frames ------------------------------------------------------------------

# Invalid frames the parser sees in a frame header.
HOSTILE = {
    "rsv1": frame(TEXT, b"compressed?", rsv=0x40),
    "rsv2": frame(BINARY, b"x", rsv=0x20),
    "rsv3-on-ping": frame(PING, b"x", rsv=0x10),
    "opcode-3": frame(0x3, b"opcode 3"),
    "opcode-0xB": frame(0xB, b"opcode B"),
    "ping-fin0": frame(PING, b"p" * 10, fin=False),
    "close-fin0": frame(CLOSE, close_payload(1000), fin=False),
    "ping-126": frame(PING, b"p" * 126),
    "pong-16bit-125": frame(PONG, b"p" * 125, length_form=16),
    "unmasked": frame(TEXT, b"not masked", mask=False),
    "len16-nonminimal": frame(TEXT, b"x" * 125, length_form=16),
    "len16-zero": frame(BINARY, b"", length_form=16),
    "len64-top-bit": frame(BINARY, b"", length_form=64, declared=(1 << 63) | 5),
    "len64-nonminimal": frame(BINARY, b"y" * 200, length_form=64),
    "after-valid-frames": frame(TEXT, b"ok") + frame(PING, b"ok") + frame(BINARY, b"bad", rsv=0x40),
}
# Invalid sequences of valid frames (the message state: `Leg._accept_data`).
HOSTILE_SEQUENCE = {
    "continuation-first": frame(CONT, b"no message"),
    "text-inside-fragments": frame(TEXT, b"start", fin=False) + frame(TEXT, b"new message"),
    "binary-after-fragment-cont": (frame(BINARY, b"a", fin=False) + frame(CONT, b"b", fin=False)
                                   + frame(BINARY, b"c")),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_client_frame_1002(gateway, name):
    """The offender gets CLOSE 1002 and its TCP connection is closed without waiting for its
    CLOSE answer; another connection open at the same time keeps working."""
    async with ws(gateway.port) as (other_r, other_w):
        await echo_once(other_r, other_w, b"before")
        async with ws(gateway.port) as (reader, writer):
            writer.write(HOSTILE[name])
            f, before = await read_close(reader)
            assert f.close[0] == 1002, f.close
            assert all(b.opcode in (TEXT, PONG) for b in before), before
            await expect_eof(reader)
        await echo_once(other_r, other_w, b"after " + name.encode())
        await close_cleanly(other_r, other_w)


@pytest.mark.parametrize("name", list(HOSTILE_SEQUENCE))
async def test_hostile_client_sequence_1002(gateway, name):
    """A continuation without a message, a new message inside a fragmented one: CLOSE 1002;
    once the client answers the CLOSE the connection ends; another connection keeps working."""
    async with ws(gateway.port) as (other_r, other_w):
        async with ws(gateway.port) as (reader, writer):
            writer.write(HOSTILE_SEQUENCE[name])
            f, before = await read_close(reader)
            assert f.close[0] == 1002, f.close
            assert before == []
            writer.write(frame(TEXT, b"ignored after the close") + frame(CLOSE, close_payload(1002)))
            await expect_eof(reader)
        await echo_once(other_r, other_w, b"after " + name.encode())
        await close_cleanly(other_r, other_w)


@pytest.mark.parametrize("name", ["continuation-first", "text-inside-fragments"])
async def test_hostile_client_sequence_closes_tcp_without_answer(gateway, name):
    """RFC 6455 7.1.7: failing the connection closes it, without waiting for the client."""
    async with ws(gateway.port) as (reader, writer):
        writer.write(HOSTILE_SEQUENCE[name])
        f, _ = await read_close(reader)
        assert f.close[0] == 1002, f.close
        await expect_eof(reader, timeout=1.0)


@pytest.mark.parametrize("split", [1, 2, 3, 9])
async def test_hostile_64bit_length_split_across_writes(gateway, split):
    """The invalid length is only known once the 8 length bytes are all there."""
    bad = frame(BINARY, b"", length_form=64, declared=1 << 63)
    async with ws(gateway.port) as (reader, writer):
        writer.write(frame(TEXT, b"fine") + bad[:split])
        f = await read_frame(reader)
        assert (f.opcode, f.payload) == (TEXT, b"fine")
        await asyncio.sleep(0.05)
        writer.write(bad[split:])
        f, before = await read_close(reader)
        assert f.close[0] == 1002 and before == []
        await expect_eof(reader)


# ---- 4. max-frame-size ---------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [1024, 70_000])
async def test_max_frame_size(gateway_factory, echo_backend, limit):
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_upgrade=f"max-frame-size: {limit}"))
    at_limit = _POOL[:limit]
    async with ws(gw.port) as (reader, writer):
        # Exactly at the limit passes, also as a fragment of a longer message.
        writer.write(frame(BINARY, at_limit) + frame(TEXT, b"a", fin=False)
                     + frame(CONT, _ASCII[:limit], fin=False) + frame(CONT, b"z"))
        got, _ = await collect(reader, 4, 0)
        assert [(f.opcode, f.fin, f.payload) for f in got] == [
            (BINARY, True, at_limit), (TEXT, False, b"a"), (CONT, False, _ASCII[:limit]), (CONT, True, b"z")]
        # One byte more: 1009, the connection ends.
        writer.write(frame(BINARY, _POOL[:limit + 1]))
        f, before = await read_close(reader)
        assert f.close == (1009, b"frame too big") and before == []
        await expect_eof(reader)


async def test_max_frame_size_judged_on_the_header(gateway_factory, echo_backend):
    """A too-big frame is refused as soon as its header is in: the payload never comes."""
    gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{echo_backend}/",
                                            extra_upgrade="max-frame-size: 1KiB"))
    async with ws(gw.port) as (reader, writer):
        writer.write(frame(BINARY, b"", length_form=64, declared=1 << 40) + os.urandom(4) + b"partial")
        f, before = await read_close(reader)
        assert f.close[0] == 1009 and before == []
        await expect_eof(reader)


# ---- 5. CLOSE relay ---------------------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [(4001, b"bye"), (1000, b""), (3000, "\u00e9t\u00e9".encode()),
                                          (1003, b"r" * 123), (4999, b"")])
async def test_close_code_and_reason_round_trip(gateway, code, reason):
    """The client's CLOSE goes to the echo backend (re-masked by the gateway), which answers
    with the same code and reason; the client gets exactly that, then the connection ends."""
    async with ws(gateway.port) as (reader, writer):
        await echo_once(reader, writer)
        await close_cleanly(reader, writer, code, reason)


async def test_close_without_payload(gateway):
    """An empty CLOSE is valid; the echo backend answers 1000 (no code was given)."""
    async with ws(gateway.port) as (reader, writer):
        writer.write(frame(CLOSE, b""))
        f, before = await read_close(reader)
        assert before == [] and f.close == (1000, b"")
        await expect_eof(reader)


@pytest.mark.parametrize("payload", [b"\x03", close_payload(1005), close_payload(999),
                                     close_payload(1004), close_payload(1006), close_payload(1015),
                                     close_payload(2999), close_payload(5000),
                                     close_payload(1005, b"with a reason")],
                         ids=["1-byte", "1005", "999", "1004", "1006", "1015", "2999", "5000", "1005-reason"])
async def test_invalid_close_1002(gateway, payload):
    async with ws(gateway.port) as (reader, writer):
        writer.write(frame(CLOSE, payload))
        f, before = await read_close(reader)
        assert before == [] and f.close[0] == 1002, f.close
        await expect_eof(reader)


async def test_reply_sent_before_backend_close_is_relayed(gateway):
    """What the backend sent before it saw the client's CLOSE still reaches the client."""
    async with ws(gateway.port) as (reader, writer):
        writer.write(frame(TEXT, b"x") + frame(CLOSE, close_payload(1000, b"bye")))
        f, before = await read_close(reader)
        assert f.close == (1000, b"bye")
        assert [(b.opcode, b.payload) for b in before] == [(TEXT, b"x")]
        await expect_eof(reader)


# ---- 6. early frames ---------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["all", "mid-header", "large"])
async def test_frames_in_the_upgrade_write(gateway, split):
    """Frames written together with the upgrade request (one write) come back; also when the
    write ends inside a frame header, and when the early bytes exceed the 64 KiB early
    buffer (reading pauses until the backend has answered)."""
    script = [Spec(TEXT, b"early one"), Spec(PING, b"early ping"), Spec(BINARY, _POOL[:300]),
              Spec(TEXT, b"frag", fin=False), Spec(CONT, b"ment")]
    if split == "large":
        script += [Spec(BINARY, _POOL[:200_000]), Spec(TEXT, b"after the big one")]
    data, starts = encode_script(script, [os.urandom(4) for _ in script])
    cut = len(data) if split != "mid-header" else starts[2] + 3
    async with ws(gateway.port, first=data[:cut]) as (reader, writer):
        reading = asyncio.create_task(collect(reader, len(script) - 1, 1))
        try:
            if cut < len(data):
                await asyncio.sleep(0.05)
                writer.write(data[cut:])
            got, pongs = await reading
        finally:
            reading.cancel()
        assert summary(got) == summary(Frame(s.fin, 0, s.opcode, s.payload) for s in script if s.opcode != PING)
        assert [p.payload for p in pongs] == [b"early ping"]
        await close_cleanly(reader, writer)


@pytest.mark.parametrize("lead", [0, 100_000])
async def test_hostile_frame_in_the_upgrade_write(gateway, lead):
    """An invalid frame in the same write as the upgrade request (after `lead` bytes of valid
    frames; 100 KB: past the 64 KiB early buffer): 101, then CLOSE 1002, then the end."""
    good = frame(BINARY, _POOL[:lead]) if lead else b""
    async with ws(gateway.port, first=good + frame(TEXT, b"x", rsv=0x40)) as (reader, writer):
        f, before = await read_close(reader)
        assert f.close[0] == 1002
        # The valid frame may come back (echoed before the 1002) or not (cut before the echo).
        allowed = [[]] + ([[frame(BINARY, _POOL[:lead], mask=False)]] if lead else [])
        assert [b.raw for b in before] in allowed
        await expect_eof(reader)


# ---- hand-made backends: the exact bytes both ways, backpressure ------------------------------------

class RawBackend:
    """An asyncio server that completes the WebSocket upgrade by hand (`early` goes in the
    same write as its 101), then runs `script(reader, writer)` for each connection."""

    def __init__(self, script, early: bytes = b"", rcvbuf: int = 0):
        self.script = script
        self.early = early
        self.rcvbuf = rcvbuf
        self.tasks: list[asyncio.Task] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server = None
        self.port = 0

    async def _handle(self, reader, writer):
        self.writers.append(writer)
        self.tasks.append(asyncio.current_task())
        try:
            await accept_upgrade(reader, writer, early=self.early)
            await self.script(reader, writer)
        except Exception as exc:     # reported to the test by wait()
            if not self.failed.done():
                self.failed.set_result(exc)
        finally:
            writer.close()

    async def wait(self, fut: asyncio.Future, timeout: float = TIMEOUT):
        """fut's result, or the exception of a failed backend script."""
        await asyncio.wait({fut, self.failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.failed.done():
            raise AssertionError("the backend script failed") from self.failed.result()
        if not fut.done():
            raise TimeoutError("the backend script did not get there")
        return fut.result()

    async def __aenter__(self):
        self.failed = asyncio.get_running_loop().create_future()
        sock = socket.socket()
        if self.rcvbuf:     # inherited by the accepted sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._handle, sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        for t in self.tasks:
            if t is not asyncio.current_task() and not t.done():
                t.cancel()
        for w in self.writers:
            w.close()
        self.server.close()


async def backend_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[Frame]:
    """A backend's side of the end: frames (masked, from the gateway) up to a CLOSE, which is
    answered with the same payload; then the connection must end. Returns the frames."""
    frames = []
    while True:
        f = await read_frame(reader, masked=True)
        frames.append(f)
        if f.opcode == CLOSE:
            break
    if not writer.is_closing():
        writer.write(frame(CLOSE, f.payload, mask=False))
    await expect_eof(reader)
    return frames


async def test_bytes_unchanged_through_gateway(gateway_factory):
    """Through a recording backend: the client's data frames reach the backend byte for byte
    (still masked with the client's keys) and its PINGs stay on their hop; the backend's
    frames reach the client byte for byte, and the gateway answers the backend's PING with a
    masked PONG; both sides write in small pieces."""
    rng = random.Random(7)
    keys = [rng.randbytes(4) for _ in SCRIPT]
    client_bytes, starts = encode_script(SCRIPT, keys)
    client_data = [frame(s.opcode, s.payload, fin=s.fin, key=k) for s, k in zip(SCRIPT, keys)
                   if s.opcode <= BINARY]
    server_data = [frame(s.opcode, s.payload, fin=s.fin, mask=False) for s in SCRIPT if s.opcode <= BINARY]
    server_bytes = (b"".join(server_data[:5]) + frame(PING, _POOL[:125], mask=False)
                    + frame(PONG, b"backend pong", mask=False) + b"".join(server_data[5:]))
    server_cuts = rng.sample(range(1, len(server_bytes)), 60) + list(range(1, 40))
    client_cuts = [starts[i] + d for i in range(len(starts)) for d in (1, 2, 5)]
    at_backend = asyncio.get_running_loop().create_future()
    at_close = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        sending = asyncio.create_task(write_chunks(writer, server_bytes, server_cuts))
        data, pongs = [], []
        while len(data) < len(client_data) or not pongs:
            f = await read_frame(reader, masked=True)
            (pongs if f.opcode == PONG else data).append(f)
        await sending
        at_backend.set_result((data, pongs))
        at_close.set_result(await backend_until_close(reader, writer))

    async with RawBackend(script) as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with ws(gw.port) as (reader, writer):
            n_pings = sum(s.opcode == PING for s in SCRIPT)
            reading = asyncio.create_task(collect(reader, len(server_data), n_pings))
            await write_chunks(writer, client_bytes, client_cuts)
            data, pongs = await asyncio.wait_for(reading, TIMEOUT)
            assert [f.raw for f in data] == server_data          # the backend's bytes, unchanged
            assert [p.payload for p in pongs] == [s.payload for s in SCRIPT if s.opcode == PING]
            b_data, b_pongs = await backend.wait(at_backend)
            assert [f.raw for f in b_data] == client_data        # the client's bytes and masks
            assert [(p.fin, p.payload) for p in b_pongs] == [(True, _POOL[:125])]
            writer.write(frame(CLOSE, close_payload(4002, b"done")))
            f, before = await read_close(reader)
            assert before == [] and f.close == (4002, b"done")
            await expect_eof(reader)
            frames = await backend.wait(at_close)
    assert [(f.opcode, f.payload) for f in frames] == [(CLOSE, close_payload(4002, b"done"))]


@pytest.mark.parametrize("bad, code, backend_reason", [
    (frame(TEXT, b"bad", mask=False), 1002, b"peer protocol error"),
    (frame(BINARY, b"", rsv=0x40), 1002, b"peer protocol error"),
    (frame(CONT, b"no message"), 1002, b"peer protocol error"),
    (frame(CLOSE, b"\x03"), 1002, b"peer protocol error"),
    (frame(BINARY, _POOL[:1025]), 1009, b"client message too big"),
], ids=["unmasked", "rsv1", "continuation-first", "close-1-byte", "too-big"])
async def test_client_offence_seen_by_backend(gateway_factory, bad, code, backend_reason):
    """The client's offence: the client gets 1002 (1009 for a frame over max-frame-size); the
    backend gets what came before it, then CLOSE 1001 with the reason."""
    seen = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        seen.set_result(await backend_until_close(reader, writer))

    async with RawBackend(script) as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade="max-frame-size: 1KiB"))
        async with ws(gw.port) as (reader, writer):
            writer.write(frame(TEXT, b"ok") + bad)
            f, _ = await read_close(reader)
            assert f.close[0] == code, f.close
            writer.write(frame(CLOSE, close_payload(code)))     # harmless if already cut
            await expect_eof(reader)
            frames = await backend.wait(seen)
    assert [(f.opcode, f.payload) for f in frames] == [
        (TEXT, b"ok"), (CLOSE, close_payload(1001, backend_reason))]


# ---- 7. hostile backend frames ------------------------------------------------------------------

BACKEND_HOSTILE = {
    "masked": frame(TEXT, b"masked from a server", mask=True),
    "rsv1": frame(TEXT, b"x", rsv=0x40, mask=False),
    "opcode-3": frame(0x3, b"x", mask=False),
    "ping-fin0": frame(PING, b"x", fin=False, mask=False),
    "len16-nonminimal": frame(TEXT, b"x" * 10, length_form=16, mask=False),
    "len64-top-bit": frame(BINARY, b"", length_form=64, declared=(1 << 63) | 1, mask=False),
    "continuation-first": frame(CONT, b"x", mask=False),
    "close-1-byte": frame(CLOSE, b"\x03", mask=False),
    "close-1005": frame(CLOSE, close_payload(1005), mask=False),
}


@pytest.mark.parametrize("early", [False, True], ids=["after-101", "with-101"])
@pytest.mark.parametrize("name", list(BACKEND_HOSTILE))
async def test_hostile_backend_frame(gateway_factory, name, early):
    """The backend's offence: the client gets the frames that came before it, then CLOSE 1001
    "peer protocol error"; the backend gets CLOSE 1002. `with-101`: the frames are in the
    same write as the backend's 101 (parsed before the client has its own 101)."""
    bad = frame(TEXT, b"good first", mask=False) + BACKEND_HOSTILE[name]
    at_backend = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        if not early:
            await reader.readexactly(len(frame(TEXT, b"go")))
            writer.write(bad)
        at_backend.set_result(await backend_until_close(reader, writer))

    async with RawBackend(script, early=bad if early else b"") as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with ws(gw.port) as (reader, writer):
            if not early:
                writer.write(frame(TEXT, b"go"))
            f, before = await read_close(reader)
            assert [(b.opcode, b.payload) for b in before] == [(TEXT, b"good first")]
            assert f.close == (1001, b"peer protocol error")
            frames = await backend.wait(at_backend)
            assert [(x.opcode, x.close[0]) for x in frames] == [(CLOSE, 1002)]
            # The client answers the CLOSE; the gateway then ends the connection.
            writer.write(frame(CLOSE, close_payload(1001)))
            await expect_eof(reader)


async def test_backend_frame_over_max_frame_size(gateway_factory):
    """A backend frame one byte over max-frame-size: the backend gets 1009, the client 1001
    "backend message too big"; one at the limit passes."""
    at_backend = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        await reader.readexactly(len(frame(TEXT, b"go")))
        writer.write(frame(BINARY, _POOL[:1024], mask=False) + frame(BINARY, _POOL[:1025], mask=False))
        at_backend.set_result(await backend_until_close(reader, writer))

    async with RawBackend(script) as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/",
                                                extra_upgrade="max-frame-size: 1KiB"))
        async with ws(gw.port) as (reader, writer):
            writer.write(frame(TEXT, b"go"))
            f, before = await read_close(reader)
            assert [(b.opcode, b.payload) for b in before] == [(BINARY, _POOL[:1024])]
            assert f.close == (1001, b"backend message too big")
            frames = await backend.wait(at_backend)
            assert [x.close for x in frames] == [(1009, b"frame too big")]
            writer.write(frame(CLOSE, close_payload(1001)))
            await expect_eof(reader)


@pytest.mark.parametrize("size", [10, 400_000])
async def test_backend_frames_with_its_101(gateway_factory, size):
    """Frames the backend writes together with its 101 (parsed before the client has its own
    101) reach the client after the 101, byte for byte, and its PING is answered; 400 KB:
    more than one read of the backend, more than the shared 256 KiB read buffer."""
    frames = [frame(TEXT, b"welcome", mask=False)]
    left = size
    while left > 0:
        n = min(left, 150_000)
        frames.append(frame(BINARY, _POOL[:n], mask=False))
        left -= n
    frames.append(frame(PING, b"hello?", mask=False))
    data_frames = [f for f in frames if f[0] & 0x0F != PING]

    at_backend = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        at_backend.set_result(await backend_until_close(reader, writer))

    async with RawBackend(script, early=b"".join(frames)) as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with ws(gw.port) as (reader, writer):
            got, _ = await collect(reader, len(data_frames), 0)
            assert [f.raw for f in got] == data_frames
            writer.write(frame(CLOSE, close_payload(4003, b"thanks")))
            f, before = await read_close(reader)
            assert before == [] and f.close == (4003, b"thanks")
            await expect_eof(reader)
            frames = await backend.wait(at_backend)
    assert [(f.opcode, f.payload) for f in frames] == [
        (PONG, b"hello?"), (CLOSE, close_payload(4003, b"thanks"))]


def _frames(rng: random.Random, n: int, *, mask: bool) -> list[bytes]:
    sizes = [300_000] * 20 + [rng.choice([0, 1, 125, 126, 4000, 65535, 65536]) for _ in range(n)]
    rng.shuffle(sizes)
    return [frame(TEXT if i % 3 == 0 else BINARY, (_ASCII[:k] if i % 3 == 0 else _POOL[:k]), mask=mask,
                  key=rng.randbytes(4) if mask else None) for i, k in enumerate(sizes)]


async def test_backpressure_keeps_frames_intact(gateway_factory):
    """Both ends stop reading for a while (small receive buffers) while the other side writes
    a few MB: the gateway pauses the writing side's reads, and when reading resumes every
    frame arrives byte for byte, in order."""
    rng = random.Random(12)
    client_frames = _frames(rng, 60, mask=True)
    server_frames = _frames(rng, 60, mask=False)
    client_bytes, server_bytes = b"".join(client_frames), b"".join(server_frames)
    client_cuts = rng.sample(range(1, len(client_bytes)), 80)
    server_cuts = rng.sample(range(1, len(server_bytes)), 80)
    stall = asyncio.Event()
    at_backend = asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        sending = asyncio.create_task(write_chunks(writer, server_bytes, server_cuts))
        await stall.wait()
        got = [await read_frame(reader, masked=True) for _ in client_frames]
        await sending
        at_backend.set_result(got)
        await backend_until_close(reader, writer)

    async with RawBackend(script, rcvbuf=8192) as backend:
        gw = await gateway_factory(gateway_yaml(f"ws://127.0.0.1:{backend.port}/"))
        async with ws(gw.port, rcvbuf=8192) as (reader, writer):
            sending = asyncio.create_task(write_chunks(writer, client_bytes, client_cuts))
            relay = None
            paused = set()
            for _ in range(200):                    # up to 2 s of neither end reading
                await asyncio.sleep(0.01)
                relay = relay or next(iter(gw.gw.live.values())).relay
                paused |= {name for name, leg in (("client", relay.client), ("backend", relay.backend))
                           if leg.paused}
                if paused == {"client", "backend"}:
                    break
            assert paused == {"client", "backend"}, f"only these legs were paused: {paused}"
            stall.set()
            got, _ = await collect(reader, len(server_frames), 0)
            await sending
            assert [f.raw for f in got] == server_frames
            assert [f.raw for f in await backend.wait(at_backend)] == client_frames
            writer.write(frame(CLOSE, close_payload(1000)))
            f, before = await read_close(reader)
            assert before == [] and f.close == (1000, b"")
            await expect_eof(reader)


# ---- memory of a partial frame -----------------------------------------------------------------

async def test_a_header_alone_does_not_reserve_its_length(gateway):
    """A frame announced as 4 MiB (the default max-frame-size) whose bytes trickle in holds
    memory for what arrived, not for what was announced; the whole frame still comes back."""
    payload = os.urandom(4 << 20)
    data = frame(BINARY, payload)
    async with ws(gateway.port) as (reader, writer):
        writer.write(data[:4096])
        await writer.drain()
        (conn,) = gateway.gw.live.values()
        deadline = asyncio.get_running_loop().time() + 5
        while conn.relay.client.input_buffer[0] < 4096 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        kept, capacity = conn.relay.client.input_buffer
        assert kept == 4096
        assert capacity < 256 * 1024, capacity
        writer.write(data[4096:])
        f = await read_frame(reader)
        assert f.opcode == BINARY and f.payload == payload
        await close_cleanly(reader, writer)
