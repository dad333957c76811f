"""Typed values from text: the one coercion of ``KEY=VALUE`` options, by each field's annotation.

Command-line options arrive as strings (``-o gamma=0.5``, ``--net-option channel_mult=1,2,2``),
Python callers pass values, and JSON files give numbers and lists. :func:`coerce` turns any of them
into the value the annotation asks for, so that the same configuration has the same typed value (and
the same hash) wherever it came from. Supported annotations: ``bool``, ``int``, ``float``, ``str``,
``tuple[X, ...]`` / ``Sequence[X]`` / ``list[X]`` of those, ``X | None`` and ``Any`` (left as
given; text parsed as JSON when it is JSON).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args, get_origin, get_type_hints

from iterflow.errors import fail

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")
_SEQUENCES = (tuple, list, Sequence, typing.Sequence)


def field_types(target: Any) -> dict[str, Any]:
    """The annotated type of each keyword ``target`` takes: the ``init`` fields of a dataclass, or the
    annotated parameters of a class's ``__init__`` or of a function.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Options:
        ...     gamma: float = 0.5
        ...     hs: tuple[float, ...] = ()
        >>> field_types(Options)
        {'gamma': <class 'float'>, 'hs': tuple[float, ...]}
    """
    if dataclasses.is_dataclass(target):
        hints = get_type_hints(target)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(target) if f.init}
    fn = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    hints = get_type_hints(fn)
    hints.pop("return", None)
    return hints


def coerce_fields(
    types_: Mapping[str, Any],
    raw: Mapping[str, Any],
    argument: Callable[[str], str],
    *,
    name: str = "options",
    owner: str = "",
) -> dict[str, Any]:
    """``raw`` with each value coerced to its key's type in ``types_``.

    Arguments:
        types_: key -> annotation (:func:`field_types`).
        raw: key -> text or value.
        argument: the name errors give to a key (e.g. ``lambda k: f"option {k!r}"``).
        name: the name errors give to ``raw`` itself (when it is not a mapping).
        owner: appended to the unknown-key error (e.g. ``" for method 'fm'"``).

    Raises:
        InputError: naming ``argument(key)`` for a key outside ``types_`` or a value that is not of
            its type.
    """
    if not isinstance(raw, Mapping):
        fail(name, "must be a mapping of names to values", raw)
    out = {}
    for key, value in raw.items():
        if key not in types_:
            fail(argument(key), f"must be one of {sorted(types_)}{owner}", key)
        out[key] = coerce(value, types_[key], argument(key))
    return out


def coerce(value: Any, annotation: Any, argument: str, *, text: bool = True) -> Any:
    """``value`` (text, or a value of a compatible type) as the type ``annotation`` names.

    Text (unless ``text`` is false: then only ``str`` fields take strings): booleans from
    ``true/false/yes/no/on/off/1/0``; numbers with ``int``/``float``; sequences from ``a,b,c``
    (brackets ``[...]``/``(...)`` allowed, empty text: empty); ``none`` or ``null`` for
    ``X | None`` (``X`` not ``str``). Values: an ``int`` becomes a ``float`` where a float is asked
    (``1`` and ``1.0`` are one value), an integral ``float`` an ``int`` (only with ``text``), a list
    a tuple.

    Raises:
        InputError: naming ``argument``, when ``value`` is not of the type.

    Example:
        >>> coerce("0.5", float, "gamma"), coerce(1, float, "gamma"), coerce("1,2", tuple[int, ...], "x")
        (0.5, 1.0, (1, 2))
    """
    if annotation is Any or annotation is object:
        return _json_text(value) if text else value
    if not text and isinstance(value, str) and annotation is not str:
        if not (
            get_origin(annotation) in (typing.Union, types.UnionType)
            and str in get_args(annotation)
        ):
            fail(argument, f"must be {describe(annotation)}", value)
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            if len(args) < len(get_args(annotation)):
                return None
            fail(argument, f"must be {describe(annotation)}", value)
        if text and isinstance(value, str) and value.strip().lower() in _NONE and str not in args:
            return None
        for a in args:  # the first member that takes the value
            try:
                return coerce(value, a, argument, text=text)
            except ValueError:
                continue
        fail(argument, f"must be {describe(annotation)}", value)
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return _sequence(value, annotation, argument, text)
    if annotation is bool:
        return _bool(value, argument)
    if annotation is int:
        if not text and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            fail(argument, "must be an integer", value)
        return _int(value, argument)
    if annotation is float:
        return _float(value, argument)
    if annotation is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            fail(argument, "must be a string", value)
        return value
    return value  # another type (a dict, a class): the target validates it


def describe(annotation: Any) -> str:
    """Words for a type in an error: ``"a number"``, ``"comma-separated integers"``..."""
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in get_args(annotation) else "")
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        item = _item_type(annotation)
        words = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"comma-separated {words.get(item, 'values')} like 1,2,3"
    return getattr(annotation, "__name__", str(annotation))


def to_json_value(value: Any) -> Any:
    """``value`` with tuples turned into lists (recursively): how JSON stores it, so a value equals
    itself after a round trip through ``config.json``."""
    if isinstance(value, (tuple, list)):
        return [to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_json_value(v) for k, v in value.items()}
    return value


def _json_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _item_type(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not Ellipsis]
    return args[0] if len(args) == 1 else Any


def _sequence(value: Any, annotation: Any, argument: str, text: bool) -> Any:
    item = _item_type(annotation)
    if isinstance(value, str):  # text (values-only mode refused it before)
        body = value.strip()
        if body[:1] + body[-1:] in ("[]", "()"):
            body = body[1:-1]
        parts: Sequence[Any] = [p.strip() for p in body.split(",") if p.strip()]
    elif isinstance(value, (tuple, list)):
        parts = value
    else:
        fail(argument, f"must be {describe(annotation)}", value)
    try:
        items = [coerce(p, item, argument, text=text) for p in parts]
    except ValueError:
        fail(argument, f"must be {describe(annotation)}", value)
    return items if get_origin(annotation) is list or annotation is list else tuple(items)


def _bool(value: Any, argument: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    fail(argument, "must be true or false", value)


def _int(value: Any, argument: str) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = _number_text(value)  # "1e3" is the integer 1000
    if isinstance(value, bool):
        fail(argument, "must be an integer", value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    fail(argument, "must be an integer", value)


def _float(value: Any, argument: str) -> float:
    if isinstance(value, str):
        value = _number_text(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(argument, "must be a number", value)
    return float(value)


def _number_text(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text
