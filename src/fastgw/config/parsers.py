"""Text -> plain Python objects, and the line of each place in the text.

Each parser returns ``(data, line_of)``: ``line_of(segments)`` gives the line (1-based) of the
place a path names, or of the nearest place above it. For YAML the node tree gives the lines;
for TOML and JSON a scan of the text, made when an error needs it, gives the line of each key
(``TomlLines``, ``JsonLines``). Syntax errors and duplicate keys raise ConfigError with their
line.
"""

import bisect
import json
import re
import tomllib
from collections.abc import Callable
from typing import Any

import yaml

from fastgw.config.errors import ConfigError, LineOf, Segments, format_path

__all__ = ["EXTENSIONS", "PARSERS", "JsonLines", "TomlLines", "utf8_problem"]


def utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> tuple[str, int]:
    """The message and line of a text that is not UTF-8."""
    return f"Not valid UTF-8 (byte {exc.start})", raw.count(b"\n", 0, exc.start) + 1


_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, name: str) -> tuple[Any, LineOf | None]:
    loader = _YamlLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_yaml_duplicate_keys(root, name)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            detail = f"{exc.problem} ({exc.context})"
        line = mark.line + 1 if mark else None
        raise ConfigError(name, f"Invalid YAML: {detail}", line) from None
    except yaml.reader.ReaderError as exc:
        # "unacceptable character #x000b: ...", then a second line giving the position.
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(name, f"Invalid YAML: {str(exc).splitlines()[0]}", line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"Invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(name, "Invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()

    def line_of(segments: Segments) -> int | None:
        return _yaml_line(root, segments)

    return data, line_of


def _yaml_line(root: yaml.Node | None, segments: Segments) -> int | None:
    """Line (1-based) of the node at ``segments``, or of the deepest node on the way there.

    A key of a mapping is reported at the key's line, a list item at the item's first line.
    """
    if root is None:
        return None
    node = root
    line = node.start_mark.line + 1
    for seg in segments:
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == seg:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int):
            if seg >= len(node.value):
                return line
            node = node.value[seg]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _check_yaml_duplicate_keys(root: yaml.Node, name: str) -> None:
    """PyYAML keeps the last of duplicate keys silently; we refuse them instead."""
    seen_nodes: set[int] = set()  # anchors and aliases may share (or loop back to) nodes

    def walk(node: yaml.Node, segments: Segments) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, key_node.value) in keys:
                        path = format_path(segments)
                        raise ConfigError(
                            name,
                            f"Duplicate key {key_node.value!r} - at `{path}`",
                            key_node.start_mark.line + 1,
                            path,
                        )
                    keys.add((key_node.tag, key_node.value))
                    walk(value_node, (*segments, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*segments, index))

    walk(root, ())


def _parse_toml(text: str, name: str) -> tuple[Any, LineOf | None]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11-3.13 only give the position inside the message: "... (at line 2, column 5)".
        message = str(exc).splitlines()[0]
        line = getattr(exc, "lineno", None)
        if match := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message):
            message, line = f"{match[1]} (column {match[3]})", int(match[2])
        elif line is None and message.endswith("(at end of document)"):
            line = _last_line(text)
        raise ConfigError(name, f"Invalid TOML: {message}", line) from None
    except RecursionError:
        raise ConfigError(name, "Invalid TOML: nested too deeply") from None
    return data, _lazy_line_of(lambda: TomlLines(text).scan())


def _parse_json(text: str, name: str) -> tuple[Any, LineOf | None]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise _JsonDuplicateKey
        return result

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"Invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise ConfigError(name, "Invalid JSON: nested too deeply") from None
    except _JsonDuplicateKey:
        scan = JsonLines(text)
        scan.scan()
        if scan.duplicate is None:  # not expected: the scan sees what json.loads saw
            raise ConfigError(name, "Duplicate key") from None
        segments, key, line = scan.duplicate
        path = format_path(segments)
        raise ConfigError(name, f"Duplicate key {key!r} - at `{path}`", line, path) from None
    return data, _lazy_line_of(lambda: JsonLines(text).scan())


def _last_line(text: str) -> int:
    """The line of the last character that is not white space (1 for a blank text)."""
    return text.rstrip().count("\n") + 1


def _lazy_line_of(scan: Callable[[], dict[Segments, int]]) -> LineOf:
    """A line_of for a map path -> line that ``scan`` builds when first needed; a path not in
    the map gets the line of its nearest parent that is."""
    lines: dict[Segments, int] | None = None

    def line_of(segments: Segments) -> int | None:
        nonlocal lines
        if lines is None:
            lines = scan()
        for end in range(len(segments), -1, -1):
            if segments[:end] in lines:
                return lines[segments[:end]]
        return None

    return line_of


class _JsonDuplicateKey(Exception):
    """An object with a key given twice (the scan of JsonLines finds where)."""


class _ScanStop(Exception):
    """Text a _LineScan did not expect."""


class _LineScan:
    """The line of each key (and list item) of a document that its parser has accepted.

    ``scan()`` returns {path: line}: the line of the key for a mapping entry, of the item's
    first character for a list item, of the first content for the top level ``()``. The scan
    trusts the parser: on text it does not expect it stops and keeps what it found.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Segments, int] = {}
        self._line_starts = [0, *(match.end() for match in re.finditer("\n", text))]

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_right(self._line_starts, self.pos if pos is None else pos)

    def record(self, segments: Segments, line: int) -> None:
        """Record ``line`` for ``segments``, and for each parent that has no line yet."""
        for end in range(len(segments)):
            self.lines.setdefault(segments[:end], line)
        self.lines.setdefault(segments, line)

    def scan(self) -> dict[Segments, int]:
        try:
            self._scan()
        except (_ScanStop, RecursionError):
            pass
        return self.lines

    def _scan(self) -> None:
        raise NotImplementedError


_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


class JsonLines(_LineScan):
    """Lines of a JSON document; also finds the first duplicate key (``duplicate``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicate: tuple[Segments, str, int] | None = None

    def _scan(self) -> None:
        # The containers being read: [path, keys seen (None for a list), current key or index].
        stack: list[list[Any]] = []
        expect_key = False
        for match in _JSON_TOKEN_RE.finditer(self.text):
            token, line = match[0], self.line(match.start())
            if token == ",":
                top = stack[-1]
                if top[1] is None:
                    top[2] += 1
                else:
                    expect_key = True
            elif token == ":":
                pass
            elif token in "}]":
                stack.pop()
                expect_key = False  # "{}"
                if not stack:
                    # The end of the document. (After a duplicate key json.loads stopped
                    # inside the text: what follows need not be JSON at all.)
                    return
            elif expect_key:  # a key of the object on top
                top = stack[-1]
                if not token.startswith('"'):
                    raise _ScanStop
                try:
                    key = json.loads(token)
                except ValueError:
                    raise _ScanStop from None
                if key in top[1] and self.duplicate is None:
                    self.duplicate = (top[0], key, line)
                top[1].add(key)
                top[2] = key
                self.record((*top[0], key), line)
                expect_key = False
            else:  # a value
                segments: Segments = (*stack[-1][0], stack[-1][2]) if stack else ()
                self.record(segments, line)
                if token == "{":
                    stack.append([segments, set(), None])
                    expect_key = True
                elif token == "[":
                    stack.append([segments, None, 0])


# Pieces of TOML text.
_TOML_BLANK_RE = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_TOML_SPACE_RE = re.compile(r"[ \t]*")
_TOML_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_BASIC_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_TOML_LITERAL_RE = re.compile(r"'[^'\n]*'")
_TOML_ML_BASIC_RE = re.compile(r'"""(?:[^"\\]|\\.|"{1,2}(?!"))*""""{0,2}', re.S)
_TOML_ML_LITERAL_RE = re.compile(r"'''.*?''''{0,2}", re.S)
_TOML_SCALAR_RE = re.compile(r"[^,\]}\r\n#]+")


class TomlLines(_LineScan):
    """Lines of a TOML document: ``[table]`` and ``[[array]]`` headers, ``key = value`` lines,
    the keys of inline tables and the items of arrays."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.array_lengths: dict[Segments, int] = {}  # arrays of tables met so far

    def _scan(self) -> None:
        table: Segments = ()
        self.skip(_TOML_BLANK_RE)
        self.record((), self.line())
        while self.pos < len(self.text):
            line = self.line()
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                table = self.table(self.keys(), array=True)
                self.expect("]]")
                self.record(table, line)
            elif self.text.startswith("[", self.pos):
                self.pos += 1
                table = self.table(self.keys(), array=False)
                self.expect("]")
                self.record(table, line)
            else:
                path = (*table, *self.keys())
                self.record(path, line)
                self.expect("=")
                self.value(path)
            self.skip(_TOML_BLANK_RE)

    def table(self, keys: list[str], array: bool) -> Segments:
        """The path of a table header. A key naming an array of tables means its last item;
        the header of an array of tables (``array``) adds an item to it."""
        segments: list[str | int] = []
        for index, key in enumerate(keys):
            segments.append(key)
            length = self.array_lengths.get(tuple(segments), 0)
            if array and index == len(keys) - 1:
                length += 1
                self.array_lengths[tuple(segments)] = length
            if length:
                segments.append(length - 1)
        return tuple(segments)

    def skip(self, pattern: re.Pattern[str]) -> str:
        match = pattern.match(self.text, self.pos)
        if match is None:
            raise _ScanStop
        self.pos = match.end()
        return match[0]

    def expect(self, literal: str) -> None:
        self.skip(_TOML_SPACE_RE)
        if not self.text.startswith(literal, self.pos):
            raise _ScanStop
        self.pos += len(literal)

    def keys(self) -> list[str]:
        """A dotted key: ``a.b``, ``"a b".c``, ``'x'``."""
        keys = []
        while True:
            self.skip(_TOML_SPACE_RE)
            if self.text.startswith('"', self.pos):
                raw = self.skip(_TOML_BASIC_RE)
                keys.append(tomllib.loads(f"k = {raw}")["k"] if "\\" in raw else raw[1:-1])
            elif self.text.startswith("'", self.pos):
                keys.append(self.skip(_TOML_LITERAL_RE)[1:-1])
            else:
                keys.append(self.skip(_TOML_BARE_KEY_RE))
            self.skip(_TOML_SPACE_RE)
            if not self.text.startswith(".", self.pos):
                return keys
            self.pos += 1

    def value(self, path: Segments) -> None:
        self.skip(_TOML_SPACE_RE)
        text = self.text
        if text.startswith('"""', self.pos):
            self.skip(_TOML_ML_BASIC_RE)
        elif text.startswith("'''", self.pos):
            self.skip(_TOML_ML_LITERAL_RE)
        elif text.startswith('"', self.pos):
            self.skip(_TOML_BASIC_RE)
        elif text.startswith("'", self.pos):
            self.skip(_TOML_LITERAL_RE)
        elif text.startswith("[", self.pos):  # an array: items may be on lines of their own
            self.pos += 1
            self.items(path, "]", self.array_item)
        elif text.startswith("{", self.pos):  # an inline table
            self.pos += 1
            self.items(path, "}", self.table_entry)
        else:  # a number, a boolean, a date
            self.skip(_TOML_SCALAR_RE)

    def items(self, path: Segments, close: str, item: Callable[[Segments, int], None]) -> None:
        index = 0
        while True:
            self.skip(_TOML_BLANK_RE)
            if self.text.startswith(close, self.pos):
                self.pos += 1
                return
            item(path, index)
            self.skip(_TOML_BLANK_RE)
            if self.text.startswith(",", self.pos):
                self.pos += 1
                index += 1
            elif not self.text.startswith(close, self.pos):
                raise _ScanStop

    def array_item(self, path: Segments, index: int) -> None:
        self.record((*path, index), self.line())
        self.value((*path, index))

    def table_entry(self, path: Segments, index: int) -> None:
        line = self.line()
        keys = self.keys()
        self.record((*path, *keys), line)
        self.expect("=")
        self.value((*path, *keys))


PARSERS: dict[str, Callable[[str, str], tuple[Any, LineOf | None]]] = {
    "yaml": _parse_yaml,
    "toml": _parse_toml,
    "json": _parse_json,
}

EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
