"""Plain data (YAML, ``key=value`` strings) into typed dataclass schemas: coercion, did-you-mean.

Generic: the recipe schema itself is :mod:`riemann_zero.train.recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

__all__ = ["RecipeError", "build_dataclass", "set_dotted", "yaml_problem", "OFF_WORDS"]

# What switches a section off, besides YAML's null and false.
OFF_WORDS = ("null", "none", "~", "false", "off", "no")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and what would be valid."""


def yaml_problem(err: Exception) -> str:
    """A YAML syntax error in one line: where (line and column, 1-based) and what."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"YAML syntax error at {where}{what}" + (f" ({context})" if context else "")


def _yaml_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}={raw}: {yaml_problem(err)}; quote the value or fix "
                          f"its syntax") from None


def _unknown_key(path: str, key: str, known: list[str]) -> RecipeError:
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    where = f"{path}.{key}" if path else key
    extra = f"; did you mean {(path + '.' if path else '') + hint[0]!r}?" if hint else ""
    return RecipeError(f"unknown recipe key {where!r}{extra} Valid keys here: {sorted(known)}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    base, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise RecipeError(f"{key} cannot be null (expected {getattr(base, '__name__', base)})")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key} must be a list, but got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, but got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise RecipeError(f"{key} must be true or false, but got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise RecipeError(f"{key} must be an integer, but got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key} must be an integer, but got {value!r}") from None
        if as_float != int(as_float):
            raise RecipeError(f"{key} must be an integer, but got {value!r}")
        return int(as_float)
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key} must be a number, but got {value!r}") from None
    if base is str:
        return str(value)
    return value


def _switched_off(value: Any) -> bool:
    return value is False or value is None or (
        isinstance(value, str) and value.strip().lower() in OFF_WORDS)


def build_dataclass(cls: type, data: dict[str, Any], path: str = "", *,
                    switchable: tuple[str, ...] = ()) -> Any:
    """``cls(**data)`` for a (nested) dataclass schema, values coerced to the field types.

    A section left empty (``key:`` with no value) takes its defaults. A section named in
    ``switchable`` (dotted path) may also be ``false``/``off``: it then takes its defaults, which
    must be its switched-off state; other sections given ``false`` are an error.

    Raises:
        RecipeError: an unknown key (with a did-you-mean), or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'} must be a mapping, but got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(path, str(key), list(fields))
        sub = f"{path}.{key}" if path else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None or (sub in switchable and _switched_off(value)):
                value = {}
            elif not isinstance(value, dict):
                raise _section_error(sub, tp, switchable)
            kwargs[key] = build_dataclass(tp, value, sub, switchable=switchable)
        else:
            kwargs[key] = _coerce(sub, value, tp)
    return cls(**kwargs)


def _section_error(key: str, tp: type, switchable: tuple[str, ...]) -> RecipeError:
    first = dataclasses.fields(tp)[0].name
    if key in switchable:
        return RecipeError(f"{key} is a section: set one of its keys (e.g. {key}.{first}=...) or "
                           f"switch it off with {key}=null")
    return RecipeError(f"{key} is a section and cannot be switched off; set one of its keys, "
                       f"e.g. {key}.{first}=...")


def set_dotted(root: type, data: dict[str, Any], dotted: str, raw: str, *,
               switchable: tuple[str, ...] = ()) -> None:
    """Set ``data[a][b]...`` from ``a.b...=raw``, checking keys against the ``root`` schema.

    Free mappings (dict-typed fields such as ``deepspeed`` or ``optimizer.options``) take any key
    and a YAML value. A section in ``switchable`` set to ``null``/``false``/``off`` is switched
    off (see :func:`build_dataclass`).
    """
    parts = dotted.split(".")
    cls: Any = root
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if cls is None:  # inside a free mapping (the deepspeed block): any key, YAML value
            if i == len(parts) - 1:
                node[part] = _yaml_value(dotted, raw) if raw != "" else ""
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            continue
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(prefix, part, names)
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if dotted in switchable and _switched_off(raw):
                    node[part] = False
                    return
                raise _section_error(dotted, tp, switchable)
            try:  # not YAML (e.g. a path starting with @): the raw string, coerced to the field
                parsed = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                parsed = raw
            node[part] = parsed if not isinstance(parsed, str) else raw
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
