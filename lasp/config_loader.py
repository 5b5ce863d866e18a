"""One typed loader for every config dataclass (``ModelConfig``, ``RunConfig`` and its sections).

A config is a dataclass whose fields carry ordinary type hints (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict``, or another config dataclass for
a nested section). :func:`build` turns a mapping read from YAML into an instance:

- an unknown key is a ``ValueError`` naming the key (with its section prefix) and the file;
- every value is coerced to its field's type by :func:`coerce` (``8.0`` -> ``8``, the YAML 1.1
  string ``"3e-4"`` -> ``3e-4``, ``"true"`` -> ``True``; never ``True`` -> ``1``), or is a
  ``ValueError`` naming the key and the file;
- the dataclass is then built with its constructor, so its ``__post_init__`` validation runs;
  an error it raises is re-raised with the file name in front.

Adding a field to a config dataclass is one line: the loader reads the fields and their hints.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

NONE_STRINGS = ("null", "none", "~")


def read_yaml(path: str | os.PathLike, what: str = "config") -> dict:
    """The mapping in YAML file ``path`` ({} for an empty file); ValueError naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``; ``ValueError("<key> must be <type>, got <value>")`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in NONE_STRINGS and str not in args):
            if len(args) == len(typing.get_args(tp)):
                raise ValueError(f"{key} must not be empty (null)")
            return None
        for a in args:
            try:
                return coerce(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"{key} must be {' or '.join(map(_type_name, args))}, got {value!r}")
    if value is None:
        raise ValueError(f"{key} must not be empty (null)")
    bad = ValueError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]") if item_tp is not Any else v for i, v in enumerate(value)]
        return origin(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def field_types(cls) -> dict[str, Any]:
    """``{field name: resolved type hint}`` of dataclass ``cls`` (init fields only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def coerce_fields(obj: Any) -> None:
    """Coerce every field of dataclass instance ``obj`` in place (for ``__post_init__``)."""
    for name, tp in field_types(type(obj)).items():
        if not dataclasses.is_dataclass(tp):
            setattr(obj, name, coerce(getattr(obj, name), tp, name))


def build(cls, data: Any, *, source: str, prefix: str = "", skip: tuple[str, ...] = (), what: str = "config"):
    """An instance of dataclass ``cls`` from mapping ``data`` (see the module docstring).

    ``prefix`` is the dotted section name put in front of keys in messages (``"train."``);
    ``skip`` lists fields the caller fills in itself (they are not accepted from ``data``).
    """
    if not isinstance(data, dict):
        where = prefix.rstrip(".")
        raise ValueError(f"{source}: {'section ' + where if where else 'a ' + what} must be a mapping, got {type(data).__name__}")
    types_ = {k: v for k, v in field_types(cls).items() if k not in skip}
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise ValueError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(prefix + k for k in types_)})")
    kwargs = {}
    for name, tp in types_.items():
        if name not in data:
            continue
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, {} if value is None else value, source=source, prefix=f"{prefix}{name}.")
        else:
            try:
                kwargs[name] = coerce(value, tp, prefix + name)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own validation (__post_init__)
        raise ValueError(f"{source}: {str(e).removeprefix(cls.__name__ + ': ')}") from None


def load(cls, path: str | os.PathLike, *, what: str = "config"):
    """:func:`build` from YAML file ``path`` (errors name the file)."""
    return build(cls, read_yaml(path, what), source=str(path), what=what)
