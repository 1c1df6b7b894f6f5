"""One frozen config per process, overridable from the CLI and the environment in one place.

A config is a frozen dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. ``add_arguments`` turns the fields into ``--kebab-case``
options; ``build`` resolves each field as CLI flag > ``PREFIX_FIELD`` environment variable >
default, checks types, and returns the frozen instance.

A field made with ``nested(SubConfig, ...)`` holds a whole sub-config (the learner's ``rm``
and ``ppo``): its knobs become ``--rm-lr`` / ``PREFIX_RM_LR``, with the sub-config's own
defaults (one default per knob, kept where the knob is defined). Names in ``shared`` (a
seed, a thread count) are not knobs of their own: the parent's field of the same name sets
them (``propagate_shared``, from the parent's ``__post_init__``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
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


def nested(cls: type, help: str, shared: tuple[str, ...] = ()) -> Any:
    """A field holding a sub-config; ``shared`` fields are set from the parent's."""
    return dataclasses.field(default_factory=cls,
                             metadata={"help": help, "nested": cls, "shared": shared})


@dataclasses.dataclass(frozen=True)
class Knob:
    """One leaf setting: ``path`` from the root config, ``name`` = flag/env stem."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: type
    optional: bool

    @property
    def name(self) -> str:
        return "_".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return self.field.default


def knobs(cls: type, _path: tuple[str, ...] = ()) -> list[Knob]:
    """Every leaf setting of ``cls``, nested configs flattened (their shared fields left out);
    a name two knobs would share is an error."""
    hints = typing.get_type_hints(cls)
    out: list[Knob] = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("nested")
        if sub is not None:
            shared = set(f.metadata.get("shared", ()))
            out += [k for k in knobs(sub, (*_path, f.name)) if k.path[len(_path) + 1] not in shared]
            continue
        tp, optional = _base_type(hints[f.name])
        out.append(Knob((*_path, f.name), f, tp, optional))
    names = [k.name for k in out]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise TypeError(f"{cls.__name__}: settings {sorted(clash)} are defined twice")
    return out


def propagate_shared(config: Any) -> None:
    """Set each nested config's ``shared`` fields from the parent (call in __post_init__ of a
    frozen parent: it replaces the nested instances in place)."""
    for f in dataclasses.fields(config):
        shared = f.metadata.get("shared", ())
        if f.metadata.get("nested") is not None and shared:
            sub = getattr(config, f.name)
            values = {name: getattr(config, name) for name in shared}
            if any(getattr(sub, k) != v for k, v in values.items()):
                object.__setattr__(config, f.name, dataclasses.replace(sub, **values))


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
    """Add one ``--field-name`` option per setting (default: not given)."""
    for knob in knobs(cls):
        helptext = knob.field.metadata.get("help", "").replace("%", "%%")  # argparse formats
        if knob.type is bool:
            parser.add_argument(knob.flag, dest=knob.name, action=argparse.BooleanOptionalAction,
                                default=None, help=helptext)
        else:
            parser.add_argument(knob.flag, dest=knob.name, type=str, default=None,
                                metavar=knob.type.__name__.upper(),
                                help=f"{helptext} (default: {knob.default!r})")


def _resolve(knob: Knob, args: argparse.Namespace | None, env: typing.Mapping[str, str],
             env_prefix: str) -> tuple[bool, Any]:
    cli = getattr(args, knob.name, None) if args is not None else None
    raw = cli if cli is not None else env.get(env_prefix + knob.name.upper())
    if raw is None:
        return False, None
    if isinstance(raw, bool) or not isinstance(raw, str):
        return True, raw
    if knob.optional and raw.strip() == "" and knob.type is not str:
        return True, None
    if typing.get_origin(knob.type) is tuple or knob.type is tuple:
        return True, tuple(part.strip() for part in raw.split(",") if part.strip())
    return True, _parse(raw, knob.type, knob.name)


def build(cls: type[T], args: argparse.Namespace | None, env_prefix: str,
          env: typing.Mapping[str, str] | None = None) -> T:
    """Resolve every setting: CLI value, else ``{env_prefix}{NAME}`` from env, else default."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for knob in knobs(cls):
        given, value = _resolve(knob, args, env, env_prefix)
        if given:
            node = values
            for part in knob.path[:-1]:
                node = node.setdefault(part, {})
            node[knob.path[-1]] = value
    return _construct(cls, values)


def from_flat(cls: type[T], values: typing.Mapping[str, Any]) -> T:
    """``cls`` from flat setting names (``{"rm_lr": 3e-3, "ppo_steps": 8}``, values typed or
    strings as on the command line); an unknown name is an error naming the known ones."""
    names = {k.name for k in knobs(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {unknown}; known: "
                         f"{', '.join(sorted(names))}")
    return build(cls, argparse.Namespace(**values), "", env={})


def _address_problem(value: str, kind: str) -> str | None:
    """Why the port in ``value`` (a URL, or host:port) is not 0..65535; None if it is."""
    try:
        if kind == "url":
            urlsplit(value).port  # noqa: B018 - the property raises on a bad port
            return None
        digits = value.rpartition(":")[2]  # e.g. unix:/path has none: nothing to check
        if digits.isdigit() and not PORT[0] <= int(digits) <= PORT[1]:
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


def _construct(cls: type[T], values: dict[str, Any]) -> T:
    kwargs = dict(values)
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("nested")
        if sub is not None and f.name in kwargs:
            kwargs[f.name] = _construct(sub, kwargs[f.name])
    _check_bounds(cls, kwargs)
    return cls(**kwargs)


def describe(config: Any) -> dict[str, Any]:
    """The config as a plain dict (nested configs as dicts), secrets masked, for logs and
    manifests."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("nested") is not None:
            out[f.name] = describe(value)
        else:
            out[f.name] = "***" if f.metadata.get("secret") and value else value
    return out


def env_value(value: Any) -> str:
    """A default as an environment variable spells it (what ``build`` parses back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def env_lines(cls: type, prefix: str, width: int = 100) -> list[str]:
    """One commented ``#PREFIX_NAME=default`` line per setting, its help wrapped above it."""
    out = []
    for knob in knobs(cls):
        secret = "[secret] " if knob.field.metadata.get("secret") else ""
        out += textwrap.wrap(secret + knob.field.metadata.get("help", ""), width,
                             initial_indent="# ", subsequent_indent="# ")
        out.append(f"#{prefix}{knob.name.upper()}={env_value(knob.default)}")
    return out
