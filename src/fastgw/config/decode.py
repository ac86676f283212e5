"""Plain objects (what a parser gave) -> Structs, with msgspec.

``msgspec.convert`` checks key names, types and value limits and reports errors with a
``$.path``. Durations, sizes, rates and values per plan or side have types of their own (see
``values``) that msgspec hands to ``_dec_hook``, so their errors carry the path too. A problem
becomes an ``Invalid`` with the path as segments; a choice among fixed values (a Literal, a
policy tag) names the values allowed.
"""

import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import msgspec

from fastgw.config.errors import ANY_KEY, Invalid, Segments
from fastgw.config.schema import (
    MESSAGE_POLICY_TYPES,
    POLICY_TYPES,
    PRE_UPGRADE_POLICY_TYPES,
    Base,
    Config,
    TlsProfile,
    WebsocketUpgrade,
    policy_tag,
)
from fastgw.config.values import (
    DEFAULT_PLAN,
    ByteRate,
    Duration,
    PerPlan,
    PerSide,
    PositiveSize,
    Rate,
    Size,
    parse_byte_rate,
    parse_duration,
    parse_rate,
    parse_size,
)

__all__ = ["convert", "decode", "name_choices", "split_validation_error"]


class _SubPathError(ValueError):
    """Raised by _dec_hook for a problem below the field msgspec knows of (a plan's entry).

    msgspec keeps it as the __cause__ of its ValidationError; split_validation_error adds
    ``segments`` to the field's path. "{field}" in the message becomes the field's name.
    """

    def __init__(self, message: str, segments: tuple[str | int, ...], in_key: bool = False):
        super().__init__(message)
        self.message = message
        self.segments = segments
        self.in_key = in_key


def _convert_below(value: Any, value_type: Any, segments: Segments) -> Any:
    """Convert a value found at ``segments`` below the field _dec_hook was called for."""
    try:
        return convert(value, value_type)
    except msgspec.ValidationError as exc:
        problem = split_validation_error(exc)
        raise _SubPathError(
            problem.message, (*segments, *problem.segments), problem.in_key
        ) from None


def _decode_per_plan(value_type: Any, obj: Any) -> PerPlan[Any]:
    if not isinstance(obj, dict):
        return PerPlan({DEFAULT_PLAN: _convert_below(obj, value_type, ())})
    values = {}
    for plan, value in obj.items():
        if not isinstance(plan, str):
            got = "null" if plan is None else type(plan).__name__
            raise _SubPathError(f"Expected `str`, got `{got}`", (), in_key=True)
        values[plan] = _convert_below(value, value_type, (plan,))
    if DEFAULT_PLAN not in values:
        given = ", ".join(values) or "none"
        raise _SubPathError(
            f"{{field}} needs a {DEFAULT_PLAN!r} entry when given per plan (plans given: {given})",
            (),
        )
    return PerPlan(values)


def _decode_per_side(obj: Any) -> PerSide:
    if not isinstance(obj, dict):
        value = _convert_below(obj, Duration, ())
        return PerSide(float(value), float(value))
    sides: dict[str, float] = {}
    for side, value in obj.items():
        if side not in PerSide.SIDES:
            raise _SubPathError(f"Unknown side {side!r} - expected one of: client, backend", (),
                                in_key=True)
        sides[side] = float(_convert_below(value, Duration, (side,)))
    return PerSide(sides.get("client"), sides.get("backend"))


def _dec_hook(type_: Any, obj: Any) -> Any:
    """msgspec decoding hook for our value types; its ValueErrors get the field's $.path."""
    if type_ is Duration:
        return Duration(parse_duration(obj))
    if type_ is Size:
        return Size(parse_size(obj))
    if type_ is PositiveSize:
        size = parse_size(obj)
        if size < 1:
            raise ValueError(f"Invalid size {obj!r} (must be at least 1 byte)")
        return PositiveSize(size)
    if type_ is Rate:
        return parse_rate(obj)
    if type_ is ByteRate:
        return parse_byte_rate(obj)
    if typing.get_origin(type_) is PerPlan:
        (value_type,) = typing.get_args(type_)
        return _decode_per_plan(value_type, obj)
    if type_ is PerSide:
        return _decode_per_side(obj)
    raise NotImplementedError(f"Objects of type {type_!r} are not supported")


_PATH_SEGMENT_RE = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|(\[\.\.\.\])")
_AT_KEY_RE = re.compile(r"(.*) - at `key` in `(\$[^`]*)`", re.S)
_AT_RE = re.compile(r"(.*) - at `(\$[^`]*)`", re.S)


def _parse_path(path: str) -> Segments:
    """"$.apis[0].target-url" -> ("apis", 0, "target-url")."""
    segments: list[str | int] = []
    for name, index, any_key in _PATH_SEGMENT_RE.findall(path[1:]):
        segments.append(name if name else int(index) if index else ANY_KEY)
    return tuple(segments)


def split_validation_error(error: msgspec.ValidationError) -> Invalid:
    """Split msgspec's "message - at `$.path`" into its parts."""
    text = str(error)
    if match := _AT_KEY_RE.fullmatch(text):
        problem = Invalid(match[1], _parse_path(match[2]), in_key=True)
    elif match := _AT_RE.fullmatch(text):
        problem = Invalid(match[1], _parse_path(match[2]))
    else:
        problem = Invalid(text)  # an error at the top level has no path
    cause = error.__cause__
    if isinstance(cause, _SubPathError):  # a problem below the field (a plan's entry)
        field = next((seg for seg in reversed(problem.segments) if isinstance(seg, str)), "value")
        problem.message = cause.message.replace("{field}", f"`{field}`")
        problem.segments = (*problem.segments, *cause.segments)
        problem.in_key = cause.in_key
    return problem


# Top-level dict fields and the struct of their values. msgspec reports an error inside a dict
# value as "$.tls-profiles[...].cert"; we decode the values one by one to name the entry.
_DICT_FIELDS: dict[str, type[Base]] = {"tls-profiles": TlsProfile}


def convert(data: Any, type_: type) -> Any:
    return msgspec.convert(data, type_, dec_hook=_dec_hook, str_keys=True)


def decode(data: dict[str, Any]) -> Config:
    """Plain objects -> Config, or Invalid with the $.path of the first problem."""
    try:
        config: Config = convert(data, Config)
    except msgspec.ValidationError as exc:
        problem = split_validation_error(exc)
        segs = problem.segments
        if len(segs) >= 2 and segs[1] == ANY_KEY and segs[0] in _DICT_FIELDS:
            for key, value in data[segs[0]].items():
                try:
                    convert(value, _DICT_FIELDS[segs[0]])
                except msgspec.ValidationError as inner:
                    found = split_validation_error(inner)
                    found.segments = (segs[0], key, *found.segments)
                    raise name_choices(found, Config, data) from None
        raise name_choices(problem, Config, data) from None
    return config


def _policies_allowed_in(place: str | int) -> tuple[type[Base], ...]:
    """The policies a list of that name may hold: an assembly, or a flow of messages."""
    if place == "assembly":
        return (*PRE_UPGRADE_POLICY_TYPES, WebsocketUpgrade)
    if place in ("request", "response"):
        return MESSAGE_POLICY_TYPES
    return POLICY_TYPES


def _is_tagged_struct(type_: Any) -> bool:
    return (
        isinstance(type_, type)
        and issubclass(type_, msgspec.Struct)
        and type_.__struct_config__.tag is not None
    )


def _bare_type(type_: Any) -> Any:
    """``type_`` without Annotated metadata and without ``| None``."""
    while True:
        origin = typing.get_origin(type_)
        if origin is Annotated:
            type_ = typing.get_args(type_)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in typing.get_args(type_) if arg is not type(None)]
            if len(members) != 1:
                return type_
            type_ = members[0]
        else:
            return type_


def _choices_at(root: Any, data: Any, segments: Segments) -> tuple[str, ...] | None:
    """The values allowed at ``segments`` when that place takes one of a fixed set of strings
    (a Literal, or the ``policy`` tag of a policy list), else None. ``data`` is the document,
    which says the tag of each policy on the way."""
    type_, value = root, data
    for depth, seg in enumerate(segments):
        type_ = _bare_type(type_)
        origin = typing.get_origin(type_)
        if origin in (Union, types.UnionType):  # the policies, told apart by their tag
            members = typing.get_args(type_)
            if not all(_is_tagged_struct(member) for member in members):
                return None
            if seg == "policy":
                place = segments[depth - 2] if depth >= 2 else ""
                return tuple(policy_tag(cls) for cls in _policies_allowed_in(place))
            tag = value.get("policy") if isinstance(value, dict) else None
            matches = [cls for cls in members if policy_tag(cls) == tag]
            if not matches:
                return None
            type_ = matches[0]
        if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
            field = next(
                (f for f in msgspec.structs.fields(type_) if f.encode_name == seg), None
            )
            if field is None:
                return None
            type_ = field.type
        elif origin in (list, tuple) and isinstance(seg, int):
            type_ = typing.get_args(type_)[0]       # list[X] or tuple[X, ...]
        elif origin in (dict, PerPlan):
            type_ = typing.get_args(type_)[-1]
        else:
            return None
        if isinstance(value, dict):
            value = value.get(seg)
        elif isinstance(value, list) and isinstance(seg, int) and seg < len(value):
            value = value[seg]
        else:
            value = None
    type_ = _bare_type(type_)
    if typing.get_origin(type_) is Literal:
        return tuple(str(arg) for arg in typing.get_args(type_))
    return None


_CHOICE_ERROR_RE = re.compile(r"Invalid (?:enum )?value (.*)|Expected `str( \| null)?`, got .*")


def name_choices(problem: Invalid, root: Any, data: Any) -> Invalid:
    """Add the allowed values to msgspec's "Invalid enum value 'x'" (a Literal) and "Invalid
    value 'x'" (a policy tag): "Invalid value 'x' - expected one of: a, b"."""
    match = _CHOICE_ERROR_RE.fullmatch(problem.message)
    if match is None or problem.in_key:
        return problem
    choices = _choices_at(root, data, problem.segments)
    if not choices:
        return problem
    if match[1] is not None:
        problem.message = f"Invalid value {match[1]}"
    problem.message += f" - expected one of: {', '.join(choices)}"
    return problem

