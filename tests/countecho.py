"""The bundled echo backend (fastgw.echo's EchoListener) in its own process, counting its live
connections, so that a test can count from outside the gateway what reached the backend.

    python tests/countecho.py        prints "countecho: ws PORT stats PORT" on stdout

The stats port speaks lines: `stats` answers one JSON line {"live", "peak", "total"} (live:
WebSocket connections open now, counted from the backend's 101 to its end of the connection;
peak: the most live at once since the start or the last reset; total: ever opened); `reset`
sets peak to live, then answers as `stats`. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from picows import ws_create_server

from fastgw.echo import EchoListener
from fastgw.loops import loop_runner


class Counted(set):
    """The echo listeners' registry (EchoListener adds itself once connected and discards
    itself once gone), with the most it held at once."""

    peak = 0
    total = 0

    def add(self, item) -> None:
        set.add(self, item)
        self.total += 1
        if len(self) > self.peak:
            self.peak = len(self)

    def report(self) -> bytes:
        return json.dumps({"live": len(self), "peak": self.peak, "total": self.total}).encode() + b"\n"


async def main() -> None:
    live = Counted()
    server = await ws_create_server(lambda request: EchoListener(None, live), "127.0.0.1", 0,
                                    use_aiofastnet=False, enable_auto_pong=False, backlog=4096,
                                    websocket_handshake_timeout=5, logger_name="fastgw.echo")

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async for line in reader:
                if line.strip() == b"reset":
                    live.peak = len(live)
                writer.write(live.report())
        except ConnectionError:
            pass
        finally:
            writer.close()

    stats_server = await asyncio.start_server(stats, "127.0.0.1", 0)
    ws_port = server.sockets[0].getsockname()[1]
    stats_port = stats_server.sockets[0].getsockname()[1]
    print(f"countecho: ws {ws_port} stats {stats_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    stats_server.close()
    for listener in list(live):
        listener.shutdown()


if __name__ == "__main__":
    loop_runner(prog="countecho", option=None)(main())
    sys.exit(0)
