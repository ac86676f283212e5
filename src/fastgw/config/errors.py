"""What a configuration problem is: ``ConfigError`` (what callers catch) and ``Invalid``
(a problem found while decoding or checking, with its place in the document as path
segments; loading turns it into a ConfigError with the file and the line)."""

from collections.abc import Callable

__all__ = ["ANY_KEY", "MAX_MESSAGE", "ConfigError", "Invalid", "LineOf", "Segments", "format_path"]

# A ConfigError message longer than this (it quotes a long value or key) loses its middle.
MAX_MESSAGE = 400


def _one_bounded_line(message: str) -> str:
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) > MAX_MESSAGE:
        half = MAX_MESSAGE // 2 - 2
        message = f"{message[:half]} ... {message[-half:]}"
    return message


class ConfigError(Exception):
    """A configuration that cannot be used.

    ``str(error)`` is ``"{file}:{line}: {message}"``, or ``"{file}: {message}"`` when the line is
    unknown. ``message`` ends with `` - at `$.path` `` when the problem has a place in the
    document; ``path`` holds that ``$.path`` alone (or None). The message is one line (line
    breaks of quoted values escaped) of at most MAX_MESSAGE characters.
    """

    def __init__(
        self, file: str, message: str, line: int | None = None, path: str | None = None
    ) -> None:
        message = _one_bounded_line(message)
        super().__init__(file, message, line, path)
        self.file = file
        self.message = message
        self.line = line
        self.path = path

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


# A path is a tuple of segments: str for a key, int for a list index, ANY_KEY for msgspec's
# "[...]" (some value of a dict, msgspec does not say which).
ANY_KEY = "[...]"
Segments = tuple[str | int, ...]
LineOf = Callable[[Segments], "int | None"]


class Invalid(Exception):
    """A problem found while decoding or checking; turned into a ConfigError by loads()."""

    def __init__(
        self,
        message: str,
        segments: Segments = (),
        *,
        in_key: bool = False,
        source: "tuple[str, LineOf | None] | None" = None,
    ) -> None:
        super().__init__(message, segments)
        self.message = message
        self.segments = segments
        self.in_key = in_key  # msgspec's "at `key` in `$.x`": a bad key of the mapping at $.x
        self.source = source  # (file name, line_of) when not the main configuration file


def format_path(segments: Segments) -> str:
    """("apis", 0, "target-url") -> "$.apis[0].target-url"."""
    out = ["$"]
    for seg in segments:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif seg == ANY_KEY:
            out.append(ANY_KEY)
        else:
            out.append(f".{seg}")
    return "".join(out)
