"""One frozen config per process, overridable from the CLI and the environment in one place.

A config is a frozen dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. ``add_arguments`` turns the fields into ``--kebab-case``
options; ``build`` resolves each field as CLI flag > ``PREFIX_FIELD`` environment variable >
default, checks types, and returns the frozen instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


PORT = (0, 65535)  # TCP/UDP port numbers; 0 = let the OS pick a free one


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A config field carrying its help text (and flags such as ``secret=True``;
    ``bounds=(lo, hi)``: the inclusive range ``build`` accepts for a number;
    ``address="url"`` or ``"host:port"``: a string whose port ``build`` checks)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def port(default: int, help: str, lowest: int = PORT[0]) -> Any:
    """A port setting: 0..65535 (``lowest=-1`` when -1 means "off")."""
    return setting(default, help, bounds=(lowest, PORT[1]))


def _address_problem(value: str, kind: str) -> str | None:
    """Why the port in ``value`` (a URL, or host:port) is not 0..65535; None if it is."""
    try:
        if kind == "url":
            urlsplit(value).port  # noqa: B018 - the property raises on a bad port
            return None
        port = value.rpartition(":")[2]  # e.g. unix:/path has none: nothing to check
        if port.isdigit() and not PORT[0] <= int(port) <= PORT[1]:
            return f"the port must be in {PORT[0]}..{PORT[1]}"
    except ValueError as exc:
        return str(exc)
    return None


def _check_bounds(cls: type, values: dict[str, Any]) -> None:
    problems = []
    for f in dataclasses.fields(cls):
        bounds, kind = f.metadata.get("bounds"), f.metadata.get("address")
        value = values.get(f.name, f.default)
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:
            problems.append(f"{f.name}: must be between {bounds[0]} and {bounds[1]}, "
                            f"got {value}")
        why = _address_problem(value, kind) if kind and value else None
        if why:
            shown = "***" if f.metadata.get("secret") else repr(value)
            problems.append(f"{f.name}: {why} (got {shown})")
    if problems:
        raise ValueError("; ".join(problems))


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse(value: str, tp: type, name: str) -> Any:
    if tp is bool:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    try:
        return tp(value)
    except ValueError as exc:
        raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field-name`` option per dataclass field (default: not given)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)
        else:
            parser.add_argument(flag, type=str, default=None, metavar=tp.__name__.upper(),
                                help=f"{helptext} (default: {f.default!r})")


def build(cls: type[T], args: argparse.Namespace | None, env_prefix: str,
          env: typing.Mapping[str, str] | None = None) -> T:
    """Resolve every field: CLI value, else ``{env_prefix}{FIELD}`` from env, else default."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        cli = getattr(args, f.name, None) if args is not None else None
        raw = cli if cli is not None else env.get(env_prefix + f.name.upper())
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, str):
            values[f.name] = raw
        elif optional and raw.strip() == "" and tp is not str:
            values[f.name] = None
        else:
            values[f.name] = _parse(raw, tp, f.name)
    _check_bounds(cls, values)
    return cls(**values)


def describe(config: Any) -> dict[str, Any]:
    """The config as a plain dict, secrets masked, for logs and manifests."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = "***" if f.metadata.get("secret") and value else value
    return out
