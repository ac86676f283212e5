"""A close reason of the gateway's own is cut to fit a control frame at a
character boundary (found by tests/fuzz/fuzz_frames.py: a reason of 70 'é'
was cut at byte 123, inside a character, and the client got invalid UTF-8)."""

import struct

from fastgw._core import Relay
from fastgw.clock import SimClock


class Transport:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data

    def close(self):
        pass

    def abort(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return None


def close_reason(relay_reason: str) -> bytes:
    relay = Relay(lambda r: None, clock=SimClock())
    client, backend = Transport(), Transport()
    relay.backend.connection_made(backend)
    relay.client.connection_made(client)
    relay.close(1008, relay_reason)
    frame = bytes(client.data)
    assert frame[0] == 0x88 and frame[1] < 126          # FIN + CLOSE, unmasked, short
    payload = frame[2:2 + frame[1]]
    assert struct.unpack("!H", payload[:2])[0] == 1008
    return payload[2:]


def test_long_non_ascii_reason_is_cut_at_a_character_boundary():
    reason = close_reason("é" * 70)               # 140 bytes of UTF-8
    assert reason == ("é" * 61).encode()           # 122 bytes: the 62nd 'é' would end at 124
    reason.decode("utf-8")


def test_long_ascii_reason_keeps_123_bytes():
    assert close_reason("x" * 200) == b"x" * 123


def test_short_reason_unchanged():
    assert close_reason("bye é") == "bye é".encode()
