"""Loading: a file or a text -> a checked ``Config``, or ``ConfigError`` with file and line.

1. the text is parsed into plain Python objects (``parsers``), with a function giving the line
   of each place;
2. the objects are decoded into Structs (``decode``): key names, types, value limits;
3. checks that span several fields run on the Structs (``checks``);
4. the environment variables and files the configuration names are checked and the file paths
   made absolute (``resolve``), and the ``clients-file``, if any, is read and its clients
   appended to ``Config.clients``.

A problem found in steps 2 to 4 has a ``$.path``; its line is looked up here.
"""

import os
import re

from fastgw.config.checks import check, check_api_key_clients
from fastgw.config.decode import decode
from fastgw.config.errors import ConfigError, Invalid, format_path
from fastgw.config.parsers import EXTENSIONS, PARSERS, utf8_problem
from fastgw.config.resolve import check_environment, load_clients_file, resolve_files
from fastgw.config.schema import Config

__all__ = ["load", "loads"]


def loads(
    text: str | bytes, fmt: str, name: str = "<string>", *, base_dir: str | None = None
) -> Config:
    """Parse a configuration from ``text`` in ``fmt`` ("yaml", "toml" or "json").

    ``name`` is the file name used in error messages. Relative file paths in the configuration
    are resolved against ``base_dir`` (default: the current directory), checked to be
    readable, and stored as absolute paths. Raises ConfigError on any problem.
    """
    parser = PARSERS.get(fmt)
    if parser is None:
        raise ConfigError(name, f"Unknown configuration format {fmt!r} (use yaml, toml or json)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(name, *utf8_problem(text, exc)) from None
    if not text.strip():
        raise ConfigError(name, "The configuration is empty")

    data, line_of = parser(text, name)
    if data is None:  # a YAML file holding only comments, or "---", or "null"
        raise ConfigError(name, "The configuration is empty")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(
            name,
            f"The top level must be a mapping of settings, not {kind}",
            line_of(()) if line_of else None,
        )

    base_dir = base_dir if base_dir is not None else os.getcwd()
    try:
        config = decode(data)
        config = check(config, name)
        check_environment(config)
        config = resolve_files(config, base_dir)
        config = load_clients_file(config, name, base_dir)
        check_api_key_clients(config)
    except RecursionError:
        raise ConfigError(name, "The configuration is nested too deeply") from None
    except Invalid as problem:
        file, file_line_of = problem.source if problem.source else (name, line_of)
        path = format_path(problem.segments)
        where = f"`key` in `{path}`" if problem.in_key else f"`{path}`"
        line_segments = problem.segments
        if match := re.fullmatch(r"Object contains unknown field `(.*)`", problem.message):
            line_segments = (*line_segments, match[1])  # point at the unknown key itself
        line = file_line_of(line_segments) if file_line_of else None
        raise ConfigError(file, f"{problem.message} - at {where}", line, path) from None
    return config


def load(path: str | os.PathLike[str]) -> Config:
    """Read the configuration file at ``path``; the extension (.yaml, .yml, .toml, .json)
    gives the format. Relative file paths inside are resolved against the file's directory.
    Raises ConfigError on any problem."""
    name = os.fspath(path)
    extension = os.path.splitext(name)[1].lower()
    fmt = EXTENSIONS.get(extension)
    if fmt is None:
        shown = repr(extension) if extension else "no extension"
        raise ConfigError(
            name, f"Unknown configuration file type ({shown}; use .yaml, .yml, .toml or .json)"
        )
    try:
        with open(name, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(name, f"Cannot read the configuration: {exc.strerror}") from None
    base_dir = os.path.dirname(os.path.abspath(name))
    return loads(text, fmt, name, base_dir=base_dir)
