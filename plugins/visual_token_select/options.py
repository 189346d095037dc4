"""Method options checked against their config field's type before anything is built.

A config dataclass checks ranges in `__post_init__`; this checks kinds first, strictly, so that `layer=1.5`,
`layer=true` or `lam="abc"` is one clear error instead of an engine that looks valid and cannot run. Every int
option travels to the TensorRT creator as an int32 field, so ints must fit int32.
"""
from __future__ import annotations

import dataclasses
import math
import typing

_INT32 = (-(1 << 31), (1 << 31) - 1)


def _kind(annotation) -> tuple[type, bool]:
    """(bool/int/float/str/tuple, whether None is allowed) of a config field's annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next(a for a in (args or (annotation,)) if a is not type(None)) if optional else annotation
    return (tuple if typing.get_origin(base) is tuple else base), optional


def _int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if _INT32[0] <= value <= _INT32[1] else None


def _coerce(kind: type, value):
    """The value as `kind`, or None when it is not one (bools are never numbers; ints are accepted as floats)."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return _int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            value = float(value)          # an int past 1e308 does not convert
        except OverflowError:
            return None
        return value if math.isfinite(value) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            return None
        items = [_int(v) for v in value]
        return tuple(items) if all(i is not None for i in items) else None
    raise TypeError(f"no option kind for {kind!r}")


_WHAT = {bool: "true or false", int: "an integer in int32 range", float: "a finite number", str: "a string",
         tuple: "a list of integers"}


def checked_options(method: str, config_cls, options: dict) -> dict:
    """`options` with each value checked (and ints widened to floats) against `config_cls`'s field types."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    out = {}
    for name, value in options.items():
        kind, optional = _kind(hints[name])
        if value is None and optional:
            out[name] = None
            continue
        coerced = _coerce(kind, value)
        if coerced is None:
            raise ValueError(f"{method} option {name}={value!r} must be {_WHAT[kind]}"
                             f"{' (or null)' if optional else ''}; e.g. --option {name}="
                             f"{_example(getattr(config_cls(), name), kind)}")
        out[name] = coerced
    return out


def _example(default, kind: type) -> str:
    if default is None:
        return "[1,3,5]" if kind is tuple else "null"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return "[" + ",".join(map(str, default)) + "]"
    return str(default)
