"""Log lines that are safe to write when clients control part of their text.

Three rules hold for every log line of the package:

* no query string: a request target or a URL is logged by :func:`url_without_query`
  (API keys and tokens travel in queries);
* every value a client or a backend controls goes through :func:`clean`: control
  characters escaped (a line stays one line), at most :data:`MAX_FIELD` characters;
* a line that one request can cause is written through a :class:`Throttle`: one line per
  key and interval, and the next one says how many were suppressed in between, so that a
  flood of bad requests cannot flood the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable

from fastgw.clock import Clock

__all__ = ["MAX_FIELD", "LOG_INTERVAL", "Throttle", "clean", "url_without_query"]

#: Characters of one client-controlled value kept in a log line.
MAX_FIELD = 200

#: Seconds during which a throttled line is written once per key.
LOG_INTERVAL = 10.0

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object, limit: int = MAX_FIELD) -> str:
    """``value`` as one bounded line: control characters escaped (``\\n``, ``\\x1b``),
    at most ``limit`` characters kept, then ``...(N chars)`` giving the whole length."""
    text = value if isinstance(value, str) else str(value)
    total = len(text)
    cut = total > limit
    text = _CONTROL.sub(_escape, text[:limit] if cut else text)
    if len(text) > limit:           # the escapes made it longer
        text, cut = text[:limit], True
    return f"{text}...({total} chars)" if cut else text


def url_without_query(url: str) -> str:
    """A URL or a request target without its query (and fragment), bounded by :func:`clean`."""
    return clean(url.split("?", 1)[0].split("#", 1)[0])


class Throttle:
    """Lets one line per key through per ``interval`` seconds.

    A line whose key was seen less than ``interval`` ago is counted, not written; the next
    line of that key that is written ends with ``(N similar suppressed)``. Keys are few and
    chosen by the caller (an API name and a status, never a client's text); at most
    ``max_keys`` are remembered, the oldest forgotten first (its count, if any, is written
    then). Time is read from ``clock`` (:class:`fastgw.clock.Clock`; a test gives a
    ``SimClock``).
    """

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL,
                 clock: Clock | None = None, max_keys: int = 256):
        self.logger = logger
        self.interval = interval
        self.clock = clock if clock is not None else Clock()
        self.max_keys = max_keys
        self._keys: dict[Hashable, list] = {}       # key -> [next due time, suppressed, msg]

    def log(self, level: int, key: Hashable, msg: str, *args: object, exc_info=None) -> bool:
        """Log ``msg % args`` at ``level`` unless a line of ``key`` was written less than
        ``interval`` ago. Returns whether the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock.now()
        entry = self._keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return False
        suppressed = 0
        if entry is not None:
            suppressed = entry[1]
            del self._keys[key]                      # re-inserted last: the newest
        elif len(self._keys) >= self.max_keys:
            self._forget_oldest(level)
        self._keys[key] = [now + self.interval, 0, msg]
        if suppressed:
            msg = f"{msg} (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def _forget_oldest(self, level: int) -> None:
        key = next(iter(self._keys))
        _, suppressed, msg = self._keys.pop(key)
        if suppressed:
            self.logger.log(level, "suppressed %d line(s) like %r", suppressed, clean(msg))
