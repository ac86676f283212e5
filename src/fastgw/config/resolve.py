"""What a configuration names outside itself: environment variables and files.

``check_environment`` checks that the variables named (``admin.token-env``, a jwt policy's
``secret-env``) are set. ``resolve_files`` makes every file path absolute (relative to the
configuration's directory) after checking it is readable, and ``load_clients_file`` reads the
``clients-file``, whose problems name that file.
"""

import os
from typing import Any

import msgspec

from fastgw.config.checks import ClientChecker, encoded_fields
from fastgw.config.decode import convert, name_choices, split_validation_error
from fastgw.config.errors import ConfigError, Invalid, Segments
from fastgw.config.parsers import EXTENSIONS, PARSERS, utf8_problem
from fastgw.config.schema import (
    Base,
    Client,
    ClientsFile,
    Config,
    Jwt,
    ListenerTls,
    WebsocketUpgrade,
)

__all__ = ["check_environment", "load_clients_file", "resolve_files"]


def check_environment(config: Config) -> None:
    """The environment variables the configuration names are set and not empty."""
    admin = config.admin
    if admin is not None and admin.token_env is not None and not os.environ.get(admin.token_env):
        raise Invalid(f"environment variable {admin.token_env!r} is not set or empty",
                      ("admin", "token-env"))
    for api_index, api in enumerate(config.apis):
        for index, policy in enumerate(api.assembly):
            if isinstance(policy, Jwt) and policy.secret_env is not None:
                value = os.environ.get(policy.secret_env)
                if not value:
                    state = "is not set" if value is None else "is empty"
                    raise Invalid(
                        f"Environment variable {policy.secret_env!r} {state}",
                        ("apis", api_index, "assembly", index, "secret-env"),
                    )


def _resolve_file(value: str, base_dir: str, segments: Segments) -> str:
    """Absolute path of ``value`` (relative to ``base_dir``), after checking it is readable."""
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    try:
        with open(path, "rb"):
            pass
    except (OSError, ValueError) as exc:    # ValueError: a NUL in the name
        shown = repr(value) if path == value else f"{value!r} ({path})"
        reason = exc.strerror if isinstance(exc, OSError) else "NUL in the file name"
        raise Invalid(f"Cannot read file {shown}: {reason}", segments) from None
    return path


# Attributes of policies that name files: resolved to absolute paths and checked readable.
_POLICY_FILE_FIELDS: dict[type[Base], tuple[str, ...]] = {
    Jwt: ("secret_file", "public_key", "jwks_file"),
}


def _resolve_policy_files(policy: Any, base_dir: str, here: Segments) -> Any:
    changes = {}
    for attr, encoded, value in encoded_fields(policy):
        if attr in _POLICY_FILE_FIELDS.get(type(policy), ()) and value is not None:
            changes[attr] = _resolve_file(value, base_dir, (*here, encoded))
    if isinstance(policy, WebsocketUpgrade):
        for flow in ("request", "response"):
            items = getattr(policy, flow)
            resolved = [
                _resolve_policy_files(item, base_dir, (*here, flow, index))
                for index, item in enumerate(items)
            ]
            if resolved != items:
                changes[flow] = resolved
    return msgspec.structs.replace(policy, **changes) if changes else policy


def resolve_files(config: Config, base_dir: str) -> Config:
    """Return ``config`` with every file path absolute and checked readable (certificates,
    keys, CA bundles, jwt keys; the clients-file is read by load_clients_file)."""
    listeners = []
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            here = ("listeners", index, "tls")
            tls = ListenerTls(
                cert=_resolve_file(listener.tls.cert, base_dir, (*here, "cert")),
                key=_resolve_file(listener.tls.key, base_dir, (*here, "key")),
            )
            listener = msgspec.structs.replace(listener, tls=tls)
        listeners.append(listener)

    profiles = {}
    for profile_name, profile in config.tls_profiles.items():
        changes = {}
        for field in ("ca", "cert", "key"):
            value = getattr(profile, field)
            if value is not None:
                segments = ("tls-profiles", profile_name, field)
                changes[field] = _resolve_file(value, base_dir, segments)
        profiles[profile_name] = msgspec.structs.replace(profile, **changes)

    apis = []
    for api_index, api in enumerate(config.apis):
        assembly = [
            _resolve_policy_files(policy, base_dir, ("apis", api_index, "assembly", index))
            for index, policy in enumerate(api.assembly)
        ]
        if assembly != api.assembly:
            api = msgspec.structs.replace(api, assembly=assembly)
        apis.append(api)

    return msgspec.structs.replace(
        config, listeners=listeners, tls_profiles=profiles, apis=apis
    )



def load_clients_file(config: Config, name: str, base_dir: str) -> Config:
    """Read ``config.clients_file``, check its clients together with the inline ones, and
    return the config with both in ``clients``. Problems in the file name that file."""
    if config.clients_file is None:
        return config
    path = _resolve_file(config.clients_file, base_dir, ("clients-file",))
    fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        extension = os.path.splitext(path)[1]
        shown = repr(extension) if extension else "no extension"
        raise Invalid(
            f"Unknown clients file type ({shown}; use .yaml, .yml, .toml or .json)",
            ("clients-file",),
        )
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise Invalid(f"Cannot read file {path!r}: {exc.strerror}", ("clients-file",)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, *utf8_problem(raw, exc)) from None

    data, line_of = PARSERS[fmt](text, path) if text.strip() else (None, None)
    source = (path, line_of)
    prefix: Segments = ()
    try:
        if data is None:  # empty, or only comments: no clients
            clients: list[Client] = []
        elif isinstance(data, list):
            clients = convert(data, list[Client])
        elif isinstance(data, dict):
            prefix = ("clients",)
            clients = convert(data, ClientsFile).clients
        else:
            raise Invalid(
                "The clients file must hold a list of clients or a mapping with `clients`,"
                f" not a {type(data).__name__}",
            )
    except msgspec.ValidationError as exc:
        problem = split_validation_error(exc)
        problem.source = source
        raise name_choices(problem, ClientsFile if prefix else list[Client], data) from None
    except Invalid as problem:
        problem.source = source
        raise

    checker = ClientChecker(config)
    checker.check(config.clients, ("clients",), name)
    try:
        checker.check(clients, prefix, path)
    except Invalid as problem:
        problem.source = source
        raise
    return msgspec.structs.replace(config, clients_file=path, clients=[*config.clients, *clients])

