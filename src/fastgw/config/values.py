"""Value types of the configuration: durations, sizes, rates, values per plan, per side.

Each has a parser that raises ValueError with a readable message; the decoder
(``fastgw.config.decode``) calls them for fields of these types, so their errors carry the
field's ``$.path``. The types are immutable and compare by value.
"""

import math
import re
import types
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

__all__ = [
    "DEFAULT_PLAN",
    "MAX_DURATION",
    "ByteRate",
    "Duration",
    "PerPlan",
    "PerSide",
    "PositiveSize",
    "Rate",
    "Size",
    "parse_byte_rate",
    "parse_duration",
    "parse_rate",
    "parse_size",
]




# --------------------------------------------------------------------------------------------
# Durations and sizes
# --------------------------------------------------------------------------------------------

class Duration(float):
    """Seconds. In a file: a number of seconds, or a string such as "250ms", "10s", "2m", "1h".

    A float subclass, so that msgspec hands these fields to the decoder's hook; use the values as
    floats. (msgspec's encoders need ``enc_hook=float`` for them.)
    """


class Size(int):
    """Bytes. In a file: an int, or a string such as "512B", "64KiB", "1MiB", "10KB".

    An int subclass, so that msgspec hands these fields to the decoder's hook; use the values as
    ints. (msgspec's encoders need ``enc_hook=int`` for them.)
    """


class PositiveSize(Size):
    """A Size of at least 1 byte (decoded to a plain Size)."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A plain number ("10", "1.5", "1e3": PyYAML reads 1e3 as a string) with an optional unit.
_DURATION_RE = re.compile(r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(ms|s|m|h)?")

_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_DURATION = 365 * 86400.0
"""The longest duration a file may give (365 days, 8760h): every timer the gateway arms
stays within what the event loop's clock handles."""


def parse_duration(value: object) -> float:
    """Return ``value`` (a number of seconds, or a string such as "250ms") as float seconds.

    Raises ValueError for anything else, including negative and non-finite numbers and
    durations longer than ``MAX_DURATION``.
    """
    seconds: float | None = None
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if seconds is None or seconds < 0:
        raise ValueError(
            f"Invalid duration {value!r} (use a number of seconds, or 250ms, 10s, 2m, 1h)"
        )
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"Invalid duration {value!r} (must be finite and at most 365 days: 8760h)")
    return seconds


def parse_size(value: object) -> int:
    """Return ``value`` (an int of bytes, or a string such as "64KiB") as int bytes.

    Raises ValueError for anything else, including negative numbers, floats and fractions
    of a byte ("1.5KiB" is fine, "0.5B" is not).
    """
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            # Exact arithmetic on the digits: "1.5KiB" -> 1536 without float rounding.
            whole, _, fraction = match[1].partition(".")
            scale = 10 ** len(fraction)
            numerator = int(whole + fraction) * _SIZE_UNITS[match[2] or "B"]
            if numerator % scale == 0:
                size = numerator // scale
    if size is None or size < 0:
        raise ValueError(
            f"Invalid size {value!r} (use a number of bytes, or 512B, 64KiB, 1MiB, 1GiB, 10KB, 1MB)"
        )
    return size


# --------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class _Frozen:
    """Immutable value object: attributes are set once, in __init__, with object.__setattr__."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


class Rate(_Frozen):
    """``count`` events per ``period`` seconds. In a file: "100/1s", "5/s", "10/250ms", "1000/1m".

    ``count`` (> 0) is also the default burst of the limits that take a Rate.
    """

    __slots__ = ("count", "period")
    count: float
    period: float

    def __init__(self, count: float, period: float) -> None:
        object.__setattr__(self, "count", float(count))
        object.__setattr__(self, "period", float(period))

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        other_values = (other.count, other.period)  # type: ignore[attr-defined]
        return (self.count, self.period) == other_values

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.count, self.period))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.count!r}, {self.period!r})"

    def __str__(self) -> str:
        """The form of a file, which parse_rate reads back: "100/1s"."""
        return f"{_format_number(self.count)}/{_format_number(self.period)}s"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.count, self.period))


class ByteRate(_Frozen):
    """``size`` bytes per ``period`` seconds. In a file: "1MiB/1s", "64KiB/100ms", "1000/s".

    ``size`` (> 0) is also the default byte burst.
    """

    __slots__ = ("size", "period")
    size: int
    period: float

    def __init__(self, size: int, period: float) -> None:
        object.__setattr__(self, "size", int(size))
        object.__setattr__(self, "period", float(period))

    @property
    def per_second(self) -> float:
        return self.size / self.period

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        other_values = (other.size, other.period)  # type: ignore[attr-defined]
        return (self.size, self.period) == other_values

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.size, self.period))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size!r}, {self.period!r})"

    def __str__(self) -> str:
        """The form of a file, which parse_byte_rate reads back: "1048576/1s"."""
        return f"{self.size}/{_format_number(self.period)}s"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size, self.period))


def _parse_period(text: str) -> float | None:
    """ "1s", "250ms", "2m", "1h", "10" (seconds) or a bare unit "s" -> seconds > 0, else None."""
    text = text.strip()
    if text in _DURATION_UNITS:
        return _DURATION_UNITS[text]
    try:
        period = parse_duration(text)
    except ValueError:
        return None
    return period if period > 0 else None


def _split_rate(value: object) -> tuple[str, float] | None:
    if not isinstance(value, str) or value.count("/") != 1:
        return None
    amount, _, period_text = value.partition("/")
    period = _parse_period(period_text)
    return None if period is None else (amount.strip(), period)


def parse_rate(value: object) -> Rate:
    """Parse "count/period" ("100/1s", "5/s", "0.5/1m"); raise ValueError if it is bad."""
    if parts := _split_rate(value):
        amount, period = parts
        if _NUMBER_RE.fullmatch(amount):
            count = float(amount)
            if count > 0 and math.isfinite(count):
                return Rate(count, period)
    raise ValueError(f"Invalid rate {value!r} (use count/period, e.g. 100/1s)")


def parse_byte_rate(value: object) -> ByteRate:
    """Parse "size/period" ("1MiB/1s", "512KiB/250ms"); raise ValueError if it is bad."""
    if parts := _split_rate(value):
        amount, period = parts
        try:
            size = parse_size(amount)
        except ValueError:
            size = 0
        if size > 0:
            return ByteRate(size, period)
    raise ValueError(f"Invalid byte rate {value!r} (use size/period, e.g. 1MiB/1s)")


# --------------------------------------------------------------------------------------------
# Values per plan
# --------------------------------------------------------------------------------------------

DEFAULT_PLAN = "default"
"""The plan every configuration has; clients without a plan are on it."""

_T = TypeVar("_T")


class PerPlan(_Frozen, Generic[_T]):
    """A value that may differ per plan. In a file either one value (for every plan) or a
    mapping ``{default: 5, gold: 50}``, which must have a "default" entry.

    ``values`` is a read-only mapping plan -> value that always holds "default";
    ``for_plan(plan)`` gives the plan's value, or the default one for a plan not listed.
    """

    __slots__ = ("values",)
    values: Mapping[str, _T]

    def __init__(self, values: "Mapping[str, _T] | _T") -> None:
        if not isinstance(values, Mapping):
            values = {DEFAULT_PLAN: values}
        if DEFAULT_PLAN not in values:
            raise ValueError(f"PerPlan values need a {DEFAULT_PLAN!r} entry")
        object.__setattr__(self, "values", types.MappingProxyType(dict(values)))

    def for_plan(self, plan: str) -> _T:
        return self.values.get(plan, self.values[DEFAULT_PLAN])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerPlan):
            return NotImplemented
        return dict(self.values) == dict(other.values)

    def __hash__(self) -> int:
        return hash(frozenset(self.values.items()))

    def __repr__(self) -> str:
        return f"PerPlan({dict(self.values)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerPlan, (dict(self.values),))


class PerSide(_Frozen):
    """A duration for each side of a relayed connection. In a file either one duration (both
    sides) or a mapping ``{client: 30s, backend: 10s}`` (a side left out has none).

    ``client`` and ``backend`` are seconds (floats) or None.
    """

    __slots__ = ("client", "backend")
    client: "float | None"
    backend: "float | None"
    SIDES = ("client", "backend")

    def __init__(self, client: "float | None", backend: "float | None") -> None:
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "backend", backend)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerSide):
            return NotImplemented
        return (self.client, self.backend) == (other.client, other.backend)

    def __hash__(self) -> int:
        return hash((self.client, self.backend))

    def __repr__(self) -> str:
        return f"PerSide(client={self.client!r}, backend={self.backend!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerSide, (self.client, self.backend))
