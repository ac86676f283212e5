"""Gateway configuration: msgspec Structs, and loading from YAML, TOML or JSON.

``load(path)`` reads a configuration file (the format is chosen by the file's extension),
``loads(text, fmt)`` parses a string. Both return a frozen :class:`Config` or raise
:class:`ConfigError`, whose ``str()`` reads like a compiler message::

    gateway.yaml:14: Expected `int` >= 0 - at `$.listeners[0].port`

The package is pure: it imports nothing else of fastgw, and the rest of fastgw imports it.
Its modules, in the order a file goes through them:

``values``   durations, sizes, rates, values per plan and per side (types and parsers)
``web``      request paths and hosts, backend URLs, origins, HTTP tokens, loopback hosts: the
             rules that the configuration and the running gateway share
``schema``   the Structs (the schema), the policies by phase, the JWT algorithms
``parsers``  YAML, TOML, JSON -> plain objects, and the line of each place in the text
``decode``   plain objects -> Structs (msgspec), errors with their ``$.path``
``checks``   checks that span several fields
``resolve``  environment variables and files the configuration names; the clients-file
``load``     ``load``/``loads``: the steps in order, a problem turned into a ConfigError
``errors``   ConfigError, and a problem with its place in the document

Key names in files are kebab-case (``tls-profiles``, ``target-url``); attributes are snake_case.
"""

from fastgw.config.errors import ConfigError
from fastgw.config.load import load, loads
from fastgw.config.schema import (
    IDENTITY_POLICY_TYPES,
    MESSAGE_POLICY_TYPES,
    POLICY_TYPES,
    PRE_UPGRADE_POLICY_TYPES,
    Admin,
    Api,
    ApiKey,
    Client,
    Config,
    CountLimit,
    Events,
    HistogramLog,
    Jwt,
    Limits,
    Listener,
    ListenerTls,
    MessageRateLimit,
    MessageSizeLimit,
    Policy,
    RateLimit,
    TlsProfile,
    WebsocketUpgrade,
)
from fastgw.config.values import DEFAULT_PLAN, ByteRate, Duration, PerPlan, PerSide, Rate, Size
from fastgw.config.web import Target, parse_target

__all__ = [
    "DEFAULT_PLAN",
    "IDENTITY_POLICY_TYPES",
    "MESSAGE_POLICY_TYPES",
    "POLICY_TYPES",
    "PRE_UPGRADE_POLICY_TYPES",
    "Admin",
    "Api",
    "ApiKey",
    "ByteRate",
    "Client",
    "Config",
    "ConfigError",
    "CountLimit",
    "Duration",
    "Events",
    "HistogramLog",
    "Jwt",
    "Limits",
    "Listener",
    "ListenerTls",
    "MessageRateLimit",
    "MessageSizeLimit",
    "PerPlan",
    "PerSide",
    "Policy",
    "Rate",
    "RateLimit",
    "Size",
    "Target",
    "TlsProfile",
    "WebsocketUpgrade",
    "load",
    "loads",
    "parse_target",
]
