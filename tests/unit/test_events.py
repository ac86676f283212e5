"""Connection events: the JSON schema, and a sink that writes them without blocking the loop."""

from __future__ import annotations

import collections
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from fastgw.observe.events import (
    REJECT_REASONS,
    CloseEvent,
    EventSink,
    RejectEvent,
    UpgradeEvent,
    decode_event,
)

SRC = Path(__file__).resolve().parents[2] / "src"


# ---------------------------------------------------------------- helpers

def upgrade(i: int = 1) -> UpgradeEvent:
    return UpgradeEvent(time=1767225600.5, id=i, api="quotes", client="acme",
                        remote="192.0.2.7:51234", subprotocol="graphql-ws",
                        handshake_ms=3.25, plan="gold")


def reject(i: int = 1) -> RejectEvent:
    return RejectEvent(time=1767225600.75, api=None, reason="not_found", status=404,
                       client=None, remote=f"192.0.2.{i % 256}:4000",
                       detail="no API at /nowhere")


def close(i: int = 1) -> CloseEvent:
    return CloseEvent(time=1767225612.0, id=i, api="quotes", client="acme", code=1000,
                      reason="bye", side="client", duration_s=11.5, messages_in=3,
                      messages_out=120, bytes_in=96, bytes_out=18230, rejected=1,
                      delayed=2, dropped=4)


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the file must end with a complete line"
    return data.splitlines()


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


class WrappedFile:
    """Stands in for the sink's file; ``hooks[n]`` decides what the n-th write call does."""

    def __init__(self, real, hooks=None):
        self.real = real
        self.hooks = hooks or {}
        self.calls = 0

    def write(self, data):
        self.calls += 1
        hook = self.hooks.get(self.calls)
        if hook is not None:
            return hook(self.real, data)
        return self.real.write(data)

    def flush(self):
        self.real.flush()

    def close(self):
        self.real.close()


# ---------------------------------------------------------------- the schema

@pytest.mark.parametrize("event", [upgrade(), reject(), close()], ids=lambda e: type(e).__name__)
def test_each_event_round_trips(event):
    line = msgspec.json.encode(event)
    assert decode_event(line) == event
    assert decode_event(line + b"\n") == event
    assert decode_event(line.decode()) == event
    assert type(decode_event(line)) is type(event)


DOCUMENTED = {
    "upgrade": ["event", "time", "id", "api", "client", "remote", "subprotocol",
                "handshake_ms", "plan"],
    "reject": ["event", "time", "api", "reason", "status", "client", "remote", "detail"],
    "close": ["event", "time", "id", "api", "client", "code", "reason", "side", "duration_s",
              "messages_in", "messages_out", "bytes_in", "bytes_out", "rejected", "delayed",
              "dropped"],
}


def test_lines_are_json_with_the_documented_fields(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    for event in (upgrade(), reject(), close()):
        sink.emit(event)
    sink.close()

    objs = [json.loads(line) for line in lines_of(path)]
    assert [o["event"] for o in objs] == ["upgrade", "reject", "close"]
    for o in objs:
        assert list(o) == DOCUMENTED[o["event"]]     # all present, in this order, no others
    up, rej, cl = objs
    assert up == {"event": "upgrade", "time": 1767225600.5, "id": 1, "api": "quotes",
                  "client": "acme", "remote": "192.0.2.7:51234", "subprotocol": "graphql-ws",
                  "handshake_ms": 3.25, "plan": "gold"}
    assert rej["api"] is None and rej["client"] is None
    assert rej["reason"] == "not_found" and rej["status"] == 404
    assert cl["code"] == 1000 and cl["side"] == "client" and cl["dropped"] == 4
    assert cl["bytes_in"] == 96 and cl["bytes_out"] == 18230


def test_time_defaults_to_now():
    before = time.time()
    event = RejectEvent(api="quotes", reason="rate_limit", status=429, client="acme",
                        remote="192.0.2.1:1", detail="rate limit exceeded: attempts")
    assert before <= event.time <= time.time()


def test_reject_reasons_are_the_documented_ones():
    assert set(REJECT_REASONS) == {
        "bad_request", "not_found", "unauthorized", "forbidden", "count_limit", "rate_limit",
        "capacity", "upstream_error", "upstream_timeout", "timeout", "internal"}
    for reason in REJECT_REASONS:
        line = msgspec.json.encode(msgspec.structs.replace(reject(), reason=reason))
        assert decode_event(line).reason == reason


@pytest.mark.parametrize("line", [
    b'{"event":"hello","time":1.0}',                                            # unknown type
    msgspec.json.encode(reject()).replace(b'"not_found"', b'"because"'),       # bad reason
    b'{"event":"close","time":1.0,"id":1}',                                     # fields missing
    msgspec.json.encode(close()).replace(b'"side":"client"', b'"side":"nobody"'),
    b"not json",
])
def test_decode_rejects_lines_off_the_schema(line):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode_event(line)


# ---------------------------------------------------------------- file and stdout sinks

def test_file_sink_writes_n_events_as_n_lines_in_order(tmp_path):
    path = tmp_path / "events.jsonl"
    n = 5000
    sink = EventSink(str(path))
    for i in range(n):
        sink.emit(close(i))
    sink.close()

    decoded = [decode_event(line) for line in lines_of(path)]
    assert [e.id for e in decoded] == list(range(n))
    assert decoded[17] == close(17)
    assert (sink.emitted, sink.written, sink.dropped) == (n, n, 0)


def test_file_sink_appends_and_creates(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"earlier":"line"}\n')
    sink = EventSink(str(path))
    sink.emit(upgrade(1))
    sink.close()
    assert lines_of(path) == [b'{"earlier":"line"}', msgspec.json.encode(upgrade(1))]

    fresh = tmp_path / "new.jsonl"
    sink = EventSink(str(fresh))
    sink.close()
    assert fresh.exists() and fresh.read_bytes() == b""


EMIT_THREE = """
import sys
from fastgw.observe.events import EventSink, UpgradeEvent
print("before", flush=False)
sink = EventSink(sys.argv[1])
for i in range(3):
    sink.emit(UpgradeEvent(time=1.0, id=i, api="a", client="c", remote="r",
                           subprotocol=None, handshake_ms=0.5, plan="default"))
sink.close()
print("after")
"""


@pytest.mark.parametrize("target", ["-", "stdout"])
def test_stdout_sink_writes_three_lines(target):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", EMIT_THREE, target], env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    lines = proc.stdout.splitlines()
    # stdout is flushed when the sink opens it, and stays open (and usable) after close
    assert lines[0] == b"before" and lines[-1] == b"after"
    events = [decode_event(line) for line in lines[1:-1]]
    assert [e.id for e in events] == [0, 1, 2]
    assert all(isinstance(e, UpgradeEvent) and e.subprotocol is None for e in events)


def test_a_file_that_cannot_be_opened_raises_oserror(tmp_path):
    with pytest.raises(OSError, match="cannot open the event file") as info:
        EventSink(str(tmp_path / "no-such-dir" / "events.jsonl"))
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "no-such-dir" / "events.jsonl")
    with pytest.raises(IsADirectoryError):
        EventSink(str(tmp_path))


def test_a_fifo_without_reader_raises_instead_of_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        EventSink(str(fifo))
    assert info.value.errno == errno.ENXIO
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------- never blocking the loop

def test_blocked_writer_keeps_emit_fast_and_counts_exactly_what_did_not_fit(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path), max_queue=100)
    entered, release = threading.Event(), threading.Event()

    def stuck(real, data):          # the first write blocks until the test releases it
        entered.set()
        release.wait(10)
        return real.write(data)

    sink._file = WrappedFile(sink._file, {1: stuck})
    sink.emit(close(0))
    assert entered.wait(5), "the writer did not pick up the first event"

    # The writer now holds event 0 and is stuck: 100 events fit in the queue, the rest not.
    n = 10_000
    events = [close(i) for i in range(1, n + 1)]
    started = time.perf_counter()
    for event in events:
        sink.emit(event)
    elapsed = time.perf_counter() - started
    assert elapsed / n < 1e-3, f"emit took {elapsed / n * 1e6:.1f} us on average"
    assert sink.queued == 100
    assert sink.dropped == n - 100
    assert sink.emitted == n + 1 and sink.written == 0

    release.set()
    sink.close()
    assert (sink.written, sink.dropped) == (101, n - 100)
    assert [decode_event(line).id for line in lines_of(path)] == list(range(101))


def test_fifo_that_nobody_reads(tmp_path):
    """A real blocked target: a pipe whose reader does not read. The writer thread blocks in
    write(); emit does not, and every event is either written or counted as dropped."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sink = EventSink(str(fifo), max_queue=50)
        n = 10_000                       # about 2.5 MB of lines: far more than a pipe holds
        events = [close(i) for i in range(n)]
        started = time.perf_counter()
        for event in events:
            sink.emit(event)
        elapsed = time.perf_counter() - started
        assert elapsed / n < 1e-3, f"emit took {elapsed / n * 1e6:.1f} us on average"
        assert sink.dropped > n // 2

        chunks: list[bytes] = []

        def drain():
            os.set_blocking(reader, True)
            while chunk := os.read(reader, 1 << 16):
                chunks.append(chunk)

        drainer = threading.Thread(target=drain)
        drainer.start()
        sink.close(timeout=5)
        drainer.join(5)
        assert not drainer.is_alive(), "the sink did not close its end of the FIFO"
    finally:
        os.close(reader)

    ids = [decode_event(line).id for line in b"".join(chunks).splitlines()]
    assert len(ids) == sink.written > 0
    assert ids == sorted(ids)                  # in order, with the dropped ones missing
    assert sink.emitted == n == sink.written + sink.dropped


def test_write_errors_count_as_dropped_and_warn_once(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    entered, release = threading.Event(), threading.Event()

    def fail_later(real, data):
        entered.set()
        release.wait(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    def fail(real, data):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    sink._file = WrappedFile(sink._file, {1: fail_later, 3: fail})
    sink.emit(close(0))                       # write 1: fails (1 line)
    assert entered.wait(5)
    for i in range(1, 5):
        sink.emit(close(i))                   # write 2: succeeds (4 lines)
    release.set()
    wait_until(lambda: sink.written == 4)
    assert sink.dropped == 1
    sink.emit(close(5))                       # write 3: fails (1 line)
    wait_until(lambda: sink.dropped == 2)
    sink.emit(close(6))                       # write 4: succeeds
    sink.close()

    assert (sink.emitted, sink.written, sink.dropped) == (7, 5, 2)
    assert [decode_event(line).id for line in lines_of(path)] == [1, 2, 3, 4, 6]
    err = capsys.readouterr().err
    assert err.count("write failed") == 1, err
    assert "No space left on device" in err


def test_a_line_cut_by_a_failed_write_does_not_spoil_the_next_ones(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    entered, release = threading.Event(), threading.Event()

    def hold(real, data):
        entered.set()
        release.wait(10)
        return real.write(data)

    def partial(real, data):      # the kernel takes the first line and part of the second
        cut = bytes(data).index(b"\n") + 11
        return real.write(data[:cut])

    def full(real, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    sink._file = WrappedFile(sink._file, {1: hold, 2: partial, 3: full})
    sink.emit(close(0))
    assert entered.wait(5)
    for i in (1, 2, 3):
        sink.emit(close(i))                   # one batch: 1 whole, 2 cut, 3 lost
    release.set()
    wait_until(lambda: sink.written + sink.dropped == 4)
    sink.emit(close(4))
    sink.close()

    assert (sink.emitted, sink.written, sink.dropped) == (5, 3, 2)
    lines = lines_of(path)
    assert len(lines) == 4
    assert [decode_event(line).id for line in lines[:2]] == [0, 1]
    with pytest.raises(msgspec.DecodeError):
        decode_event(lines[2])                # the cut line stands alone...
    assert decode_event(lines[3]) == close(4)  # ...and the next one is whole
    assert capsys.readouterr().err.count("write failed") == 1


# ---------------------------------------------------------------- disabled, close

def test_disabled_sink_does_nothing():
    threads = threading.active_count()
    sink = EventSink(None)
    assert threading.active_count() == threads      # no writer thread
    assert not sink.enabled
    sink.emit(close())
    sink.emit(object())                             # not even encoded
    assert (sink.emitted, sink.written, sink.dropped, sink.queued) == (0, 0, 0, 0)
    sink.close()
    sink.close()


async def test_disabled_sink_aclose():
    sink = EventSink(None)
    await sink.aclose()


def test_close_flushes_and_stops_the_writer(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    assert sink.enabled
    for i in range(2000):
        sink.emit(upgrade(i))
    sink.close()
    assert not sink._thread.is_alive()
    assert len(lines_of(path)) == 2000 == sink.written
    assert not sink.enabled

    sink.emit(upgrade(9999))                        # after close: counted, never written
    sink.close()                                    # twice is fine
    assert (sink.emitted, sink.written, sink.dropped) == (2001, 2000, 1)
    assert len(lines_of(path)) == 2000


async def test_aclose_flushes_from_a_coroutine(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    for i in range(10):
        sink.emit(reject(i))
    await sink.aclose()
    assert [decode_event(line) for line in lines_of(path)] == [reject(i) for i in range(10)]


def test_close_gives_up_on_a_writer_that_stays_stuck(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink(str(path))
    entered, release = threading.Event(), threading.Event()

    def stuck(real, data):
        entered.set()
        release.wait(10)
        return real.write(data)

    sink._file = WrappedFile(sink._file, {1: stuck})
    sink.emit(close(0))
    assert entered.wait(5)
    for i in range(1, 6):
        sink.emit(close(i))
    started = time.monotonic()
    sink.close(timeout=0.2)
    assert time.monotonic() - started < 2
    assert sink.dropped == 5                        # the queued ones; event 0 is in flight
    release.set()
    sink._thread.join(5)
    assert not sink._thread.is_alive()
    assert (sink.emitted, sink.written, sink.dropped) == (6, 1, 5)


def test_bad_max_queue():
    with pytest.raises(ValueError):
        EventSink(None, max_queue=0)


def test_an_idle_writer_sleeps(tmp_path):
    """The writer thread waits for work instead of polling: an idle sink uses no CPU."""
    sink = EventSink(str(tmp_path / "events.jsonl"))
    sink.emit(upgrade())
    wait_until(lambda: sink.written == 1)
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1
    sink.close()


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_lines_of_several_processes_never_interleave(tmp_path, kind):
    # Worker processes share one target. Four forked writers, each its own sink, emit
    # events of 300 bytes and more at once; a pipe accepts only PIPE_BUF bytes atomically.
    writers, n = 4, 3000
    path = tmp_path / "events.jsonl"
    if kind == "pipe":
        rfd, wfd = os.pipe()
    else:
        wfd = -1
    pids = []
    for w in range(writers):
        pid = os.fork()
        if pid == 0:                                   # the child: no pytest machinery
            try:
                if kind == "pipe":
                    os.close(rfd)
                    os.dup2(wfd, 1)
                    sys.stdout = open(1, "w", closefd=False)   # not pytest's capture
                sink = EventSink("-" if kind == "pipe" else str(path))
                for i in range(n):
                    sink.emit(RejectEvent(time=1767225600.75, api="quotes", reason="not_found",
                                          status=404, client=f"w{w}", remote="192.0.2.7:4000",
                                          detail="x" * (300 + i % 700)))
                sink.close(timeout=30.0)
                os._exit(0 if sink.written == n else 3)
            finally:
                os._exit(4)
        pids.append(pid)
    data = b""
    if kind == "pipe":
        os.close(wfd)
        chunks = []
        while True:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(rfd)
        data = b"".join(chunks)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert statuses == [0] * writers
    if kind == "file":
        data = path.read_bytes()
    lines = data.splitlines()
    assert len(lines) == writers * n
    seen = collections.Counter(decode_event(line).client for line in lines)
    assert seen == {f"w{w}": n for w in range(writers)}
