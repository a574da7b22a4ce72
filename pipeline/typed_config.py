"""Frozen dataclasses built from plain (YAML) data, checked field by field.

A field carries its documentation, and optionally its allowed values (or a function that gives them, for values
from a registry) and a lower bound (`doc_field`). `build` collects every problem (an unknown key with a
did-you-mean, a wrong type, a value not among the choices or below the bound) instead of stopping at the first, so
that one error can name them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any


def doc_field(default: Any, doc: str, choices: tuple | Callable[[], tuple] | None = None,
              minimum: float | None = None) -> Any:
    """A field with its documentation (and, optionally, its allowed values, or a function giving them when
    they come from a registry, or a lower bound)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(meta) -> tuple | None:
    choices = meta.get("choices")
    return choices() if callable(choices) else choices


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending a message per problem instead of stopping."""
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping of keys, found {show(data)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint} (valid keys here: {', '.join(fields)})")
            continue
        kwargs[key] = coerce(value, hints[key], fields[key], f"{prefix}{key}", problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # an internal invariant: every key was checked above
        raise AssertionError(exc) from None


def coerce(value: Any, hint: Any, fld: dataclasses.Field, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    meta = fld.metadata if fld is not None else {}
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    default = fld.default if fld is not None and fld.default is not dataclasses.MISSING else None

    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".", problems)
    if origin is tuple:
        item_hint = args[0]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, found {show(value)}; write it as [a, b] or one '- item' per line")
            return default
        if dataclasses.is_dataclass(item_hint):
            return tuple(build(item_hint, v, f"{key}[{i}].", problems) for i, v in enumerate(value))
        return tuple(coerce(v, item_hint, None, f"{key}[{i}]", problems) for i, v in enumerate(value))

    ok = True
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        problems.append(f"{key}: expected {expected}{' or null' if optional else ''}, found {show(value)}")
        return default
    choices = choices_of(meta)
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint_text = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}{hint_text}")
        return default
    minimum = meta.get("minimum")
    if minimum is not None and value < minimum:
        problems.append(f"{key}: {value} is below the minimum {minimum}")
        return default
    return value


def show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj
