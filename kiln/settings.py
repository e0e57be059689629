"""One way to read a process's settings from flags and `KILN_*` environment variables.

Why shared: the operator, the server and the trainer are configured the same two ways (a Deployment or
pod sets environment variables, a person types flags), and three hand-written readers had three
boolean parsers. A settings class is a dataclass whose fields have attribute docstrings; `option()`
names a field's flag and variable, `load()` fills it: a flag wins over its variable, a variable over
the field's default, and a bad value is a SettingsError naming the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class SettingsError(ValueError):
    """A flag or variable has a value the process cannot use."""


def parse_bool(value: str, name: str, strict: bool = True) -> bool:
    """true/false, 1/0, yes/no, on/off (any case); anything else is an error, or False when not `strict`."""
    low = value.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE or not strict:
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean (use true/false)")


def parse_duration(value: str, name: str) -> float:
    """Seconds from `30`, `30s`, `250ms`, `5m` or `1h`."""
    m = _DURATION.match(value)
    if not m:
        raise SettingsError(f"{name}={value!r} is not a duration (seconds, or a number with ms, s, m or h)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_list(value: str) -> list[str]:
    """A comma-separated list; blanks dropped."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse(kind: str, value: str, name: str) -> Any:
    """One value of a field of `kind` (int, float, duration, bool, list, str) from its text."""
    if kind == "bool":
        return parse_bool(value, name)
    if kind == "duration":
        return parse_duration(value, name)
    if kind == "list":
        return parse_list(value)
    if kind in ("int", "float"):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError as exc:
            raise SettingsError(f"{name}={value!r} is not a valid {kind}") from exc
    return value


def duration(value: str) -> float:
    """argparse type of duration flags ("invalid duration value" on a bad one)."""
    try:
        return parse_duration(value, "duration")
    except SettingsError as exc:
        raise ValueError(str(exc)) from exc


_ARG_TYPES: dict[str, Any] = {"int": int, "float": float, "duration": duration, "str": str}


def option(*flags: str, env: str | None = None, help: str = "", kind: str = "", metavar: str | None = None) -> dict[str, Any]:
    """Field metadata: the field's flags (none: environment only), its variable (default `KILN_<FIELD>`),
    its help and, when the annotation does not say it, its kind (`duration` for seconds)."""
    return {"kiln.option": {"flags": flags, "env": env, "help": help, "kind": kind, "metavar": metavar}}


@dataclasses.dataclass(frozen=True)
class _Option:
    field: str
    flags: tuple[str, ...]
    env: str
    help: str
    kind: str
    metavar: str | None


def _kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "list"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation, "")


def options(cls: type[Any]) -> list[_Option]:
    """The options of a settings dataclass, in field order (fields without metadata: environment only)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata.get("kiln.option", {})
        kind = meta.get("kind") or _kind(hints[f.name])
        if kind not in ("bool", "int", "float", "duration", "list", "str"):
            continue
        out.append(_Option(f.name, tuple(meta.get("flags", ())), meta.get("env") or f"KILN_{f.name.upper()}",
                           meta.get("help", ""), kind, meta.get("metavar")))
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add every option of `cls` that has a flag; each help names its variable."""
    for o in options(cls):
        if not o.flags:
            continue
        text = f"{o.help} [{o.env}]" if o.help else f"[{o.env}]"
        if o.kind == "bool":
            parser.add_argument(*o.flags, dest=o.field, action="store_true", default=None, help=text)
        elif o.kind == "list":
            parser.add_argument(*o.flags, dest=o.field, action="append", default=None, help=text, metavar=o.metavar)
        else:
            parser.add_argument(*o.flags, dest=o.field, default=None, help=text, metavar=o.metavar, type=_ARG_TYPES[o.kind])


def values(cls: type[Any], parsed: argparse.Namespace | None, env: Mapping[str, str]) -> dict[str, Any]:
    """Field values given by flags (in `parsed`) or variables; fields given by neither are left out.

    An empty variable counts as unset, except for booleans (where "" is false) and lists (empty list).
    """
    out: dict[str, Any] = {}
    for o in options(cls):
        value = getattr(parsed, o.field, None) if parsed is not None else None
        raw = env.get(o.env)
        if value is None and raw is not None and (raw != "" or o.kind in ("bool", "list")):
            value = _parse(o.kind, raw, o.env)
        if value is not None:
            out[o.field] = value
    return out


def load(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         parser: argparse.ArgumentParser | None = None, **overrides: Any) -> T:
    """Settings of `cls` from flags (parsed with `parser`, which `add_arguments` filled), then `env`
    (default `os.environ`), then the field defaults; `overrides` win over both."""
    import os

    parsed = parser.parse_args(list(argv or [])) if parser is not None else None
    found = values(cls, parsed, os.environ if env is None else env)
    found.update(overrides)
    return cls(**found)
