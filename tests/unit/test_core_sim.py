"""The core's delay queue, close timer and fatal path in simulated time.

A Relay over in-memory transports with a SimClock: nothing waits on the wall
clock, time moves only in SimClock.advance, and the timers the core sets
(the hold queue's release and watch, the close timer) run there."""

from __future__ import annotations

import bisect
import itertools
import logging
import struct

import pytest

from fastgw._core import Action, RateRule, Relay, Scope
from fastgw.clock import SimClock

# While a delay holds a sender, the core looks at its connection this often (hold.pxi).
HOLD_WATCH = 1.0


class Transport:
    """What a leg asks of its transport; what it writes is kept."""

    def __init__(self, fail_write: bool = False):
        self.data = bytearray()
        self.reading = True
        self.closed = self.aborted = False
        self.fail_write = fail_write

    def write(self, data):
        if self.fail_write:
            raise RuntimeError("write failed")
        self.data += data

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return None

    def frames(self) -> list[tuple[int, bytes]]:
        """(opcode, payload) of each whole frame written, unmasked."""
        out, pos, data = [], 0, bytes(self.data)
        while pos + 2 <= len(data):
            b0, b1 = data[pos], data[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                n, head = struct.unpack_from("!H", data, pos + 2)[0], 4
            elif n == 127:
                n, head = struct.unpack_from("!Q", data, pos + 2)[0], 10
            key = b""
            if b1 & 0x80:
                key, head = data[pos + head:pos + head + 4], head + 4
            payload = data[pos + head:pos + head + n]
            if key:
                payload = bytes(c ^ key[i & 3] for i, c in enumerate(payload))
            out.append((b0 & 0x0F, payload))
            pos += head + n
        return out

    def messages(self) -> list[bytes]:
        return [p for op, p in self.frames() if op in (1, 2)]

    def close_code(self) -> int | None:
        closes = [p for op, p in self.frames() if op == 8]
        return struct.unpack("!H", closes[0][:2])[0] if closes else None


def client_frame(payload: bytes, op: int = 0x1, fin: bool = True, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked frame, as a client sends it."""
    assert len(payload) < 126
    masked = bytes(c ^ key[i & 3] for i, c in enumerate(payload))
    return bytes([(0x80 if fin else 0) | op, 0x80 | len(payload)]) + key + masked


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return client_frame(struct.pack("!H", code) + reason, op=0x8)


class Setup:
    """A relay whose client leg's request flow has one delay rule."""

    def __init__(self, clock=None, rate: float = 1.0, burst: float = 1.0, fail_write: bool = False):
        self.clock = clock or SimClock()
        self.ended = []
        self.relay = Relay(self.ended.append, clock=self.clock, close_timeout=5.0)
        self.client, self.backend = Transport(fail_write=fail_write), Transport()
        self.relay.client.set_policies(
            [RateRule("slow", Action.ACTION_DELAY, Scope.SCOPE_CONNECTION, msg_rate=rate, msg_burst=burst)])
        self.relay.backend.connection_made(self.backend)
        self.relay.client.connection_made(self.client)

    def send(self, data: bytes) -> None:
        """Bytes from the client, as one read."""
        leg = self.relay.client
        with memoryview(leg.get_buffer(len(data))) as view:
            view[:len(data)] = data
        leg.buffer_updated(len(data))

    def lose_both(self) -> None:
        for leg in (self.relay.client, self.relay.backend):
            leg.connection_lost(None)


def test_a_delayed_message_is_released_when_its_wait_ends():
    s = Setup()
    s.send(client_frame(b"one"))
    s.send(client_frame(b"two"))                 # no token: held 1 s
    assert s.backend.messages() == [b"one"]
    assert s.relay.client.paused and not s.client.reading
    assert s.relay.client.delayed == 1
    s.clock.advance(0.5)
    assert s.backend.messages() == [b"one"]
    s.clock.advance(0.5)
    assert s.backend.messages() == [b"one", b"two"]
    assert not s.relay.client.paused and s.client.reading
    assert s.clock.pending() == 0


def test_frames_behind_a_held_message_keep_their_order():
    s = Setup(burst=1.0, rate=2.0)
    s.send(client_frame(b"a") + client_frame(b"b") + client_frame(b"c"))
    assert s.backend.messages() == [b"a"]        # b waits 0.5 s, c behind it
    s.clock.advance(0.5)
    assert s.backend.messages() == [b"a", b"b"]  # c's own wait follows
    s.clock.advance(0.5)
    assert s.backend.messages() == [b"a", b"b", b"c"]
    assert s.relay.client.delayed == 2           # each message that waited, once


def test_a_long_wait_is_watched_every_hold_watch_and_judged_at_its_due_time():
    s = Setup(rate=0.1)                           # the second message waits 10 s
    s.send(client_frame(b"one") + client_frame(b"two"))
    ran = s.clock.advance(9.5)
    assert ran == 9                               # the watch woke every second
    assert s.backend.messages() == [b"one"]
    s.clock.advance(0.5)
    assert s.backend.messages() == [b"one", b"two"]


def test_a_close_behind_a_held_message_follows_it():
    s = Setup()
    s.send(client_frame(b"one") + client_frame(b"two") + close_frame(1000, b"bye"))
    assert s.backend.close_code() is None          # the CLOSE is held too
    s.clock.advance(1.0)
    assert s.backend.messages() == [b"one", b"two"]
    assert s.backend.close_code() == 1000
    assert s.relay.end_side == "client" and s.relay.end_code == 1000


def test_a_held_message_expires_with_its_connection_and_the_close_timer_cuts_it():
    s = Setup()
    s.send(client_frame(b"one") + client_frame(b"two"))
    s.relay.close(1001, "going away")             # the gateway ends it while a message is held
    assert s.client.close_code() == 1001 and s.backend.close_code() == 1001
    s.clock.advance(1.0)                          # the wait ends: the held message is not relayed
    assert s.backend.messages() == [b"one"]
    assert not (s.client.aborted or s.backend.aborted)
    s.clock.advance(4.0)                          # nobody answers the CLOSE: the close timer (5 s)
    assert s.client.aborted and s.backend.aborted
    s.lose_both()
    assert s.ended == [s.relay]


class FailingClock(SimClock):
    """A SimClock whose now() raises once `broken` is set."""

    broken = False

    def now(self):
        if self.broken:
            raise RuntimeError("clock broken")
        return super().now()


def test_a_timer_that_raises_takes_the_fatal_path(caplog):
    clock = FailingClock()
    s = Setup(clock=clock)
    s.send(client_frame(b"one") + client_frame(b"two"))
    clock.broken = True
    with caplog.at_level(logging.ERROR, logger="fastgw"):
        clock.advance(1.0)                        # the release timer reads the clock: it raises
    assert s.relay.failed and s.relay.end_code == 1011 and s.relay.end_side == "gateway"
    assert s.client.close_code() == 1011 and s.backend.close_code() == 1011
    assert s.client.aborted and s.backend.aborted
    assert [r for r in caplog.records if "internal error" in r.getMessage()].__len__() == 1
    assert s.backend.messages() == [b"one"]
    s.send(client_frame(b"late"))                 # what still arrives is ignored
    assert s.backend.messages() == [b"one"]
    assert clock.pending() == 0                   # no timer left behind
    s.lose_both()
    assert s.ended == [s.relay]                   # the end of life runs exactly once


def test_a_callback_that_raises_takes_the_fatal_path(caplog):
    s = Setup(fail_write=True)                    # writes to the client raise (no socket: TLS path)
    with caplog.at_level(logging.ERROR, logger="fastgw"):
        s.send(client_frame(b"ping", op=0x9))     # the PONG's write raises in buffer_updated
        s.send(client_frame(b"again", op=0x9))
    assert s.relay.failed and s.relay.end_code == 1011
    assert s.backend.close_code() == 1011        # best effort: the client's write fails
    assert s.client.aborted and s.backend.aborted
    assert len([r for r in caplog.records if "internal error" in r.getMessage()]) == 1
    s.lose_both()
    assert s.ended == [s.relay]


def test_on_end_runs_once_when_it_raises():
    clock = SimClock()
    calls = []

    def on_end(relay):
        calls.append(relay)
        raise RuntimeError("on_end failed")

    relay = Relay(on_end, clock=clock)
    client, backend = Transport(), Transport()
    relay.backend.connection_made(backend)
    relay.client.connection_made(client)
    relay.client.connection_lost(None)
    relay.backend.connection_lost(None)          # the last leg: on_end runs, raises, is logged
    assert calls == [relay] and relay.ended


@pytest.mark.parametrize("rate, burst, n", [(100.0, 2.0, 1001), (500.0, 1.0, 1501)])
def test_delay_paces_a_sender_to_the_rate(rate, burst, n):
    # What tests/e2e/test_policies.py measured over 10 s of wall-clock time: a client
    # sending as fast as it may is paced to the rule's rate, each held message counted.
    s = Setup(rate=rate, burst=burst)
    frames = [client_frame(b"m%d" % i) for i in range(n)]
    ends = list(itertools.accumulate(len(f) for f in frames))   # relayed unchanged
    pending = list(frames)
    arrived: list[float] = []
    while pending or len(arrived) < n:
        if pending and s.client.reading:
            batch, pending = pending[:8], pending[8:]     # several frames per read
            s.send(b"".join(batch))
        else:
            s.clock.advance(0.001)
        relayed = bisect.bisect_right(ends, len(s.backend.data))
        arrived += [s.clock.now()] * (relayed - len(arrived))
        assert s.clock.now() < 1000.0 + 2 * n / rate, "stuck"
    assert s.backend.messages() == [b"m%d" % i for i in range(n)]
    paced = (n - 1) / (arrived[-1] - arrived[0])
    assert rate * 0.98 <= paced <= rate * 1.02, f"{paced:.2f} messages/s"
    leg = s.relay.client
    assert leg.delayed >= n - 10 and leg.rule_limited() == [leg.delayed]
    assert leg.rejected == leg.dropped == 0


def test_a_leg_attached_after_the_fatal_path_is_closed_1011():
    ended = []
    relay = Relay(ended.append, clock=SimClock())
    backend, client = Transport(fail_write=True), Transport()
    relay.backend.connection_made(backend)        # dialled; the client has no 101 yet
    ping = bytes([0x89, 0x01]) + b"x"             # a backend's PING: its PONG's write raises
    leg = relay.backend
    with memoryview(leg.get_buffer(len(ping))) as view:
        view[:len(ping)] = ping
    leg.buffer_updated(len(ping))
    assert relay.failed and backend.aborted
    relay.client.connection_made(client)          # the server hands the client over anyway
    assert client.close_code() == 1011 and client.closed
    relay.backend.connection_lost(None)
    relay.client.connection_lost(None)
    assert ended == [relay]
