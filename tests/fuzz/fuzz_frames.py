"""Fuzz target: the core's frame parser, through a real Relay and its two Legs.

Each leg is attached (`connection_made`) to an in-memory transport of this
file; the fuzzer's bytes drive a script of events: bytes arriving on either
side (raw bytes, or frames built from fuzzed fields, both cut at fuzzed
points and delivered with the buffered-protocol calls `get_buffer` /
`buffer_updated`), write buffers filling and draining, timers firing, the
gateway closing the relay, either peer vanishing, the client attached late
(backend frames arriving before the client's 101, then early bytes `feed`).

Invariants:
- no exception escapes any protocol call;
- what each leg wrote is a sequence of whole, well-formed frames (an
  independent parser below): masked toward the backend, unmasked toward the
  client, minimal lengths, valid opcodes, unfragmented control frames of at
  most 125 bytes, fragmentation in order, a valid close code, nothing after
  a CLOSE; data frames are relayed byte for byte, in order; pongs answer pings;
  pings are the gateway's own liveness pings (`send_ping`);
- between events, nothing is left unflushed: every data frame a leg accepted
  (`Leg.frames`, `Leg.bytes`) is on its peer's transport once that one is
  attached, unless a CLOSE went to it first (with a rate rule: at most what
  was accepted and not dropped);
- the partial-frame buffer never holds more than one frame (its cap included);
- a leg that is gone (connection_lost) is never written to;
- after both legs are gone, `on_end` ran exactly once (and not before), and
  neither leg keeps a buffer.

    python tests/fuzz/fuzz_frames.py [libFuzzer args]     (or tests/fuzz/run_fuzz.py frames)
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

INSTRUMENT: list[str] = []       # the code under test is native: see fuzzlib.build_core

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import wire  # noqa: E402  (tests/wire.py: the tests' frame codec)

_core = None
TRACE = bool(__import__("os").environ.get("FUZZ_TRACE"))

FRAME_SIZES = (64, 300, 4096, 70000)
MESSAGE_SIZES = (100, 5000, 1 << 20)
GATEWAY_CODES = {1001, 1002, 1008, 1009, 1011, 1014, 4000}
CLOSE_CODES = (1000, 1001, 1008, 3000, 4999)
# IN_STEP in _core.pyx: a partial frame's buffer grows by at least this much.
IN_STEP = 16384


def setup() -> None:
    global _core
    from fastgw import _core as c
    _core = c


# --------------------------------------------------------------------------------------
# The test's event loop and transports
# --------------------------------------------------------------------------------------

class Handle:
    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback, args):
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop:
    """What the core asks of the event loop: call_later (close and delay timers)."""

    def __init__(self):
        self.timers: list[Handle] = []
        self.soon: list[tuple] = []

    def now(self):
        return time.monotonic()

    def call_later(self, delay, callback, *args):
        assert delay >= 0, delay
        h = Handle(callback, args)
        self.timers.append(h)
        return h

    def fire_timers(self):
        timers, self.timers = self.timers, []
        for h in timers:
            if not h.cancelled:
                h.callback(*h.args)

    def run_soon(self):
        while self.soon:
            fn, *args = self.soon.pop(0)
            fn(*args)


class Transport:
    """An in-memory transport: what the leg writes is kept, frame checks run on it."""

    def __init__(self, loop: Loop, name: str):
        self.loop = loop
        self.name = name
        self.protocol = None
        self.writes: list[bytes] = []
        self.closing = False
        self.lost = False
        self.reading = True
        self.aborted = False
        self.limits = None
        # What was written so far (tally()): data frames and their payload bytes before the
        # first CLOSE, and whether a CLOSE went out.
        self.tallied = 0
        self.data_frames = 0
        self.data_bytes = 0
        self.close_written = False

    # asyncio.Transport
    def write(self, data):
        assert isinstance(data, (bytes, bytearray, memoryview)), type(data)
        if self.lost:
            # uvloop raises here: the core must never write to a leg that is gone.
            raise RuntimeError(f"{self.name}: write after connection_lost")
        if self.aborted:
            return          # dropped, as by uvloop between abort() and connection_lost
        # After close(), what is written still goes out before the FIN: the
        # frame checks see it (nothing may follow a CLOSE).
        if data:
            self.writes.append(bytes(data))

    def writelines(self, items):
        for item in items:
            self.write(item)

    def tally(self) -> None:
        """Count the data frames of the writes not counted yet (headers only: check_output
        checks the frames themselves at the end)."""
        for write in self.writes[self.tallied:]:
            pos, n = 0, len(write)
            while n - pos >= 2 and not self.close_written:
                b1 = write[pos + 1]
                length, header = b1 & 0x7F, 2
                if length == 126:
                    if n - pos < 4:
                        break
                    length, header = struct.unpack_from("!H", write, pos + 2)[0], 4
                elif length == 127:
                    if n - pos < 10:
                        break
                    length, header = struct.unpack_from("!Q", write, pos + 2)[0], 10
                header += 4 if b1 & 0x80 else 0
                if n - pos < header + length:
                    break
                op = write[pos] & 0x0F
                if op == 8:
                    self.close_written = True
                elif op <= 2:
                    self.data_frames += 1
                    self.data_bytes += length
                pos += header + length
        self.tallied = len(self.writes)

    def _lose(self):
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def close(self):
        # The gateway closes this transport: connection_lost follows.
        if not self.closing:
            self.closing = True
            self.loop.soon.append((self._lose,))

    def remote_close(self):
        # The remote's EOF, or its connection reset: connection_lost follows.
        if not self.closing:
            self.closing = True
            self.loop.soon.append((self._lose,))

    def abort(self):
        self.aborted = True
        self.close()

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def get_write_buffer_size(self):
        return 0

    def get_extra_info(self, name, default=None):
        return None if name in ("socket", "sslcontext", "peername", "sockname") else default


# --------------------------------------------------------------------------------------
# An independent frame parser (RFC 6455 section 5.2), for what the legs write
# --------------------------------------------------------------------------------------

def parse_frames(data: bytes):
    """Yield (fin, rsv, opcode, masked, header_bytes, payload_unmasked, raw, minimal) and
    finally the number of bytes left over (a partial frame)."""
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 2:
            break
        b0, b1 = data[pos], data[pos + 1]
        masked = bool(b1 & 0x80)
        length = b1 & 0x7F
        header = 2
        minimal = True
        if length == 126:
            if n - pos < 4:
                break
            length = struct.unpack_from("!H", data, pos + 2)[0]
            header = 4
            minimal = length >= 126
        elif length == 127:
            if n - pos < 10:
                break
            length = struct.unpack_from("!Q", data, pos + 2)[0]
            header = 10
            minimal = 65536 <= length < (1 << 63)
        if masked:
            header += 4
        if n - pos < header + length:
            break
        payload = data[pos + header:pos + header + length]
        if masked:
            key = data[pos + header - 4:pos + header]
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        yield (bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, masked, payload,
               data[pos:pos + header + length], minimal)
        pos += header + length
    yield n - pos


def valid_close_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def check_output(transport: Transport, masked: bool, max_frame: int, sent_data: list[bytes],
                 sent_closes: list[bytes], sent_pings: list[bytes], own_pings: list[bytes]) -> None:
    """What a leg wrote: whole well-formed frames, each write on frame boundaries.

    `sent_data`: the raw data frames the peer leg received (candidates for the
    relay, in order); `sent_closes`: CLOSE payloads the peer sent; `sent_pings`:
    PING payloads this leg's own remote sent (answered with pongs); `own_pings`: the
    gateway's own PINGs to this leg (Leg.send_ping)."""
    in_message = False
    closed = False
    data_index = 0
    ping_index = 0
    own_ping_index = 0
    for write in transport.writes:
        for item in parse_frames(write):
            if isinstance(item, int):
                assert item == 0, f"{transport.name}: a write ends inside a frame ({item} bytes)"
                continue
            fin, rsv, op, is_masked, payload, raw, minimal = item
            where = f"{transport.name}: frame op={op:#x} len={len(payload)}"
            assert not closed, f"{where} after a CLOSE"
            assert rsv == 0, f"{where}: reserved bits {rsv}"
            assert is_masked == masked, f"{where}: masked={is_masked}"
            assert minimal, f"{where}: non-minimal length"
            assert op in (0, 1, 2, 8, 9, 10), f"{where}: opcode"
            if op >= 8:
                assert fin and len(payload) <= 125, f"{where}: control frame"
            if op in (0, 1, 2):
                assert len(payload) <= max_frame, f"{where}: over the frame size cap"
                if op == 0:
                    assert in_message, f"{where}: continuation outside a message"
                else:
                    assert not in_message, f"{where}: new message inside a message"
                in_message = not fin
                # Relayed unchanged, in order (some may be dropped by a rule).
                while data_index < len(sent_data) and sent_data[data_index] != raw:
                    data_index += 1
                assert data_index < len(sent_data), f"{where}: not a frame the peer sent, in order"
                data_index += 1
            elif op == 8:
                closed = True
                if len(payload) == 0:
                    continue
                assert len(payload) >= 2, f"{where}: 1-byte close payload"
                code = struct.unpack_from("!H", payload)[0]
                assert valid_close_code(code), f"{where}: close code {code}"
                if payload not in sent_closes:
                    # The gateway's own close: a code it documents, a UTF-8 reason.
                    assert code in GATEWAY_CODES or code in CLOSE_CODES, f"{where}: code {code}"
                    payload[2:].decode("utf-8")
            elif op == 10:
                # A pong answers a ping of this leg's remote, in order, payload unchanged.
                while ping_index < len(sent_pings) and sent_pings[ping_index] != payload:
                    ping_index += 1
                assert ping_index < len(sent_pings), f"{where}: pong without its ping"
                ping_index += 1
            else:
                # A ping of the gateway's own (send_ping), in order, payload unchanged.
                while own_ping_index < len(own_pings) and own_pings[own_ping_index] != payload:
                    own_ping_index += 1
                assert own_ping_index < len(own_pings), f"{where}: a ping the gateway never sent"
                own_ping_index += 1


# --------------------------------------------------------------------------------------
# Building frames from fuzzed fields
# --------------------------------------------------------------------------------------

def build_frame(fdp, masked_default: bool) -> bytes:
    flags = fdp.ConsumeIntInRange(0, 255)
    op = fdp.PickValueInList([0, 1, 2, 8, 9, 10, 0, 1, 2, 3, 11, 15])
    fin = not (flags & 1) or op == 8
    rsv = (flags >> 1) & 7 if flags & 0x80 else 0
    masked = masked_default != bool(flags & 0x40 and flags & 0x10)
    size_kind = fdp.ConsumeIntInRange(0, 7)
    if size_kind == 7:
        size = fdp.ConsumeIntInRange(0, 70000)
    else:
        size = fdp.ConsumeIntInRange(0, 140)
    if op == 8 and fdp.ConsumeBool():
        code = fdp.PickValueInList([1000, 1001, 1005, 1006, 1015, 999, 2999, 3000, 4999, 5000,
                                    1004, 1012, 1014, 0, 65535])
        payload = struct.pack("!H", code) + fdp.ConsumeBytes(min(size, 123))
    else:
        payload = fdp.ConsumeBytes(size)
        if len(payload) < size and size > 140:
            payload += b"\x00" * (size - len(payload))    # big frames from few bytes
    length = len(payload)
    lie = fdp.ConsumeIntInRange(0, 15)
    if lie == 1:
        length = max(0, length - fdp.ConsumeIntInRange(1, 8))   # announce less than sent
    elif lie == 2:
        length += fdp.ConsumeIntInRange(1, 8)                   # announce more
    encoding = fdp.ConsumeIntInRange(0, 15)
    if encoding == 1 or (length >= 126 and length < 65536 and encoding != 2):
        form, declared = 16, length & 0xFFFF                    # perhaps non-minimal
    elif encoding == 2 or length >= 65536:
        form, declared = 64, length | ((1 << 63) if encoding == 3 else 0)
    else:
        form, declared = 7, length
    key = fdp.ConsumeBytes(4).ljust(4, b"\x00") if masked else None
    return wire.frame(op, payload, fin=fin, rsv=rsv << 4, mask=masked, key=key,
                      length_form=form, declared=declared)


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------

class Side:
    """What the test keeps about one leg: its transport, the bytes still to
    deliver, and what its remote sent (by our own parse of its input)."""

    def __init__(self, name, leg, loop, max_frame, masked_input):
        self.name = name
        self.leg = leg
        self.transport = Transport(loop, name)
        self.transport.protocol = leg
        self.attached = False
        self.pending = bytearray()
        self.received = bytearray()        # everything delivered to the leg
        self.max_frame = max_frame
        self.fed = 0
        self.gateway_pings: list[bytes] = []
        self.masked_input = masked_input

    def deliver(self, n: int) -> None:
        """Up to n pending bytes, through the buffered-protocol calls, as the transport reads."""
        while n > 0 and self.pending and self.can_read():
            buf = self.leg.get_buffer(n)
            with memoryview(buf) as view:
                k = min(len(view), n, len(self.pending))
                assert k > 0, "get_buffer gave an empty buffer"
                view[:k] = self.pending[:k]
            self.received += self.pending[:k]
            del self.pending[:k]
            self.leg.buffer_updated(k)
            self.check_buffer()
            n -= k

    def can_read(self) -> bool:
        t = self.transport
        return self.attached and t.reading and not t.closing and not t.lost

    def check_buffer(self) -> None:
        size, cap = self.leg.input_buffer
        assert size <= self.max_frame + 14, f"{self.name}: partial frame buffer {size}"
        # Reads grow it at most to the frame being completed (or doubling while
        # a header is incomplete); early bytes fed at once are kept whole.
        bound = max(2 * (self.max_frame + 14), 4 * IN_STEP, self.fed)
        assert cap <= bound, f"{self.name}: buffer capacity {cap} > {bound}"

    def remote_frames(self):
        """The frames the remote sent, as the leg must have seen them: up to the
        first one it must refuse (the leg ignores the rest)."""
        data, closes, pings = [], [], []
        for item in parse_frames(bytes(self.received)):
            if isinstance(item, int):
                break
            fin, rsv, op, masked, payload, raw, minimal = item
            if rsv or not minimal or masked != self.masked_input or op not in (0, 1, 2, 8, 9, 10):
                break
            if op in (0, 1, 2):
                if len(payload) > self.max_frame:
                    break
                data.append(raw)
            elif op == 8:
                closes.append(payload)
            elif op == 9:
                pings.append(payload)
        return data, closes, pings


def check_flushed(relay, client: Side, backend: Side, ruled) -> None:
    """Between events, nothing a leg accepted is left unwritten: every data frame a leg
    counted (`Leg.frames`, `Leg.bytes`) is on its peer's transport once that one is attached
    and alive, unless a CLOSE went to the peer first (what follows it is not relayed). A leg
    with a rate rule relays at most what it counted and did not drop (the rest is held or
    was dropped uncounted)."""
    for leg, peer in ((relay.client, backend), (relay.backend, client)):
        t = peer.transport
        if not peer.attached or t.lost:
            continue
        t.tally()
        where = f"{peer.name}: {t.data_frames} data frames ({t.data_bytes} bytes) written"
        if leg is ruled:
            assert t.data_frames <= leg.frames - leg.dropped, \
                f"{where}, of {leg.frames} accepted, {leg.dropped} dropped"
        elif t.close_written:
            assert t.data_frames <= leg.frames and t.data_bytes <= leg.bytes, \
                f"{where}, of {leg.frames} accepted ({leg.bytes} bytes)"
        else:
            assert (t.data_frames, t.data_bytes) == (leg.frames, leg.bytes), \
                f"{where}, {leg.frames} accepted ({leg.bytes} bytes): left unflushed"


def test_one_input(data: bytes) -> None:
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    loop = Loop()
    ended = []

    def on_end(r):
        # Called once both legs are gone (the client's: or never attached, the relay aborted).
        assert client.transport.lost or (not client.attached and r.aborted), "on_end too early"
        assert backend.transport.lost, "on_end before the backend leg was gone"
        ended.append(r)
    max_frame = fdp.PickValueInList(list(FRAME_SIZES))
    max_message = fdp.PickValueInList(list(MESSAGE_SIZES))
    relay = _core.Relay(on_end, None, clock=loop, max_frame_size=max_frame,
                        max_early_bytes=fdp.PickValueInList([1, 1000, 1 << 18]))
    relay.client.set_policies([], None, max_message)
    relay.backend.set_policies([], None, max_message)
    # Message policies: none, or one rule of each action with rates so small
    # that no token comes back during a run (the verdicts do not depend on time).
    rules_kind = fdp.ConsumeIntInRange(0, 7)
    ruled = None                                # the leg with a rate rule, if any
    if rules_kind in (1, 2, 3):
        action = rules_kind - 1                 # reject, delay, drop
        burst = float(fdp.ConsumeIntInRange(1, 4))
        byte_burst = float(fdp.PickValueInList([0, 50, 5000]))
        rule = _core.RateRule("fuzz", _core.Action(action), _core.Scope.SCOPE_CONNECTION,
                              msg_rate=1e-9, msg_burst=burst, byte_rate=1e-9 if byte_burst else 0.0,
                              byte_burst=byte_burst or 1.0, msg_key=1, byte_key=2)
        leg = ruled = relay.client if fdp.ConsumeBool() else relay.backend
        leg.set_policies([rule], None, None, stats=_core.FlowStats(True, True))
    elif rules_kind == 4:
        # No rule, the API's counters on (metrics enabled): messages by size.
        relay.client.set_policies([], None, None, stats=_core.FlowStats(True, False))
        relay.backend.set_policies([], None, None, stats=_core.FlowStats(False, False))
    client = Side("to-client", relay.client, loop, max_frame, masked_input=True)
    backend = Side("to-backend", relay.backend, loop, max_frame, masked_input=False)
    sides = (client, backend)

    # The backend leg is attached when its handshake is done (upstream.Dial).
    relay.backend.connection_made(backend.transport)
    backend.attached = True

    def attach_client():
        relay.client.connection_made(client.transport)
        client.attached = True
        early = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        if fdp.ConsumeBool():
            early += build_frame(fdp, True)
        client.received += early
        client.fed = len(early)
        relay.client.feed(early)
        client.check_buffer()

    if fdp.ConsumeIntInRange(0, 3):
        attach_client()

    steps = 0
    while fdp.remaining_bytes() and steps < 200:
        steps += 1
        op = fdp.ConsumeIntInRange(0, 15)
        if TRACE:
            print(f"step {steps}: op {op}", file=sys.stderr)
        side = sides[op & 1]
        if op < 4:          # raw bytes arrive
            side.pending += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300))
        elif op < 8:        # a built frame arrives
            side.pending += build_frame(fdp, side.masked_input)
        elif op < 10:       # the transport reads up to n bytes
            side.deliver(fdp.PickValueInList([1, 2, 3, 7, 64, 1000, 70000, 1 << 20]))
        elif op < 12:       # write buffer over / under its high-water mark
            if fdp.ConsumeBool():
                side.leg.pause_writing()
            else:
                side.leg.resume_writing()
        elif op == 12:
            if fdp.ConsumeBool():
                loop.fire_timers()
            else:           # a liveness ping of the gateway's own (connection.py's timer)
                payload = fdp.ConsumeBytes(fdp.PickValueInList([0, 15, 125, 130]))
                if side.leg.send_ping(payload):
                    side.gateway_pings.append(payload[:125])
        elif op == 13:
            if not client.attached:
                attach_client()
            else:
                relay.close(fdp.PickValueInList([1001, 1008, 4000]), fdp.PickValueInList(["", "bye", "é" * 70]))
        elif op == 14:      # the remote vanishes
            if side.attached and not side.transport.lost:
                side.transport.closing = side.transport.aborted = True
                side.transport._lose()
        else:
            if side.attached and not side.transport.closing:
                assert side.leg.eof_received() is None    # the transport closes itself
                side.transport.remote_close()
        loop.run_soon()
        check_flushed(relay, client, backend, ruled)

    # The end: what is still queued arrives, timers fire, both remotes leave.
    for s in sides:
        s.deliver(len(s.pending))
    loop.run_soon()
    loop.fire_timers()
    loop.run_soon()
    if not client.attached:
        relay.abort()                 # what the server does when the client never got its 101
    for s in sides:
        if s.attached and not s.transport.lost:
            s.transport.closing = s.transport.aborted = True
            s.transport._lose()
        loop.run_soon()
    loop.fire_timers()
    loop.run_soon()

    assert len(ended) == 1, f"on_end ran {len(ended)} times"
    assert ended[0] is relay and relay.ended
    for s in sides:
        if s.attached:
            # A leg that is gone holds no partial frame.
            assert s.leg.input_buffer == (0, 0), f"{s.name}: input buffer {s.leg.input_buffer} kept"
    for s, peer in ((client, backend), (backend, client)):
        data_frames, closes, _ = peer.remote_frames()
        _, _, pings = s.remote_frames()
        check_output(s.transport, masked=s is backend, max_frame=max_frame, sent_data=data_frames,
                     sent_closes=closes, sent_pings=pings, own_pings=s.gateway_pings)


if __name__ == "__main__":
    import fuzzlib
    fuzzlib.main("frames", sys.modules[__name__])
