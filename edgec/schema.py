"""The JSON (and YAML) form of edgec's files, checked against the dataclasses that hold them.

Each file edgec reads (a package's manifest, a recipe, a device profile, a partition plan, a
checkpoint's metadata) is a frozen dataclass, and that dataclass is its own schema: the JSON
object holds its fields, and a field's annotation says which values it takes. ``check_json``
refuses anything else with an error that names the field (``where.steps[2].share.bits``) and
says what is valid; ``Literal`` annotations are the lists of valid values, so no second list
exists to drift. Torch-free and import-light: a device checks every manifest it loads.

Why not pydantic: it is what the issue asked for, but a device pays for it. Importing pydantic
and building the manifest's models adds resident memory to every process that loads a package
(``benchmarks/schema_memory.py`` measures it), for checks these plain functions make in a few
hundred lines. Errors keep pydantic's habits: the path to the field, what was expected, what
came (never the whole of a huge value).
"""

from __future__ import annotations

import math
import types
from dataclasses import MISSING, fields, is_dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from edgec.errors import EdgecError

INT_LIMIT = 1 << 63  # integers must fit in int64, as onnxruntime and numpy take them

JSON_KINDS = {
    bool: "a boolean",
    float: "a number with a fraction or exponent",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "missing or null",
}


class _Refused(Exception):
    """A value that does not fit its annotation; ``check_json`` raises it as the caller's error."""


def check_json(
    data: Any,
    cls: type,
    where: str,
    *,
    error: type[EdgecError],
    skip: frozenset[str] = frozenset(),
) -> None:
    """Refuse ``data`` (parsed JSON or YAML) unless it is an object holding ``cls``'s fields,
    each of the form its annotation gives, every field without a default present and no unknown
    key. The error is ``error`` (the file's own: ``PackageError`` for a manifest,
    ``RecipeError`` for a recipe...), naming the field as ``where.field[index]``. ``skip``
    names fields the caller checks itself. A dataclass whose ``__json_extra__`` names one of its
    fields keeps unknown keys there instead of refusing them."""
    try:
        _check_object(data, cls, where, skip)
    except _Refused as exc:
        raise error(str(exc)) from None


def check_unicode(data: Any, where: str, *, error: type[EdgecError]) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate, which JSON's ``\\ud800``
    escape makes) anywhere in ``data``: no file name, message or output could hold it."""
    stack: list[tuple[Any, str]] = [(data, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            stack.extend((key, f"a key of {at}") for key in node)
            stack.extend((value, f"{at}.{key}") for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, f"{at}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise error(
                    f"{at} holds {node[exc.start]!r} at character {exc.start}, a lone "
                    "surrogate: not valid Unicode"
                ) from exc


def shown(value: Any) -> str:
    """``value`` for an error message: short, and never the whole of a huge one."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer too long to print, a deep nesting
        text = f"<{type(value).__name__}>"
    if len(text) <= 60:
        return text
    kinds: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    kind = kinds.get(type(value), "a value")
    return f"{kind} of {len(text)} characters ({text[:40]}...)"


def describe(hint: Any) -> str:
    """What values an annotation takes, in words: ``one of ['taylor', 'magnitude']``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        return f"a list (of {describe(args[0])})"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (of {describe(args[0])})"
        return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
    if origin is dict or is_dataclass(hint):
        return "an object"
    names = {
        bool: "true or false",
        int: "an integer in int64",
        float: "a finite number",
        str: "a string",
    }
    return names.get(hint, "null" if hint is type(None) else "any value")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a scalar value has the form of ``hint`` (bool, int, float or str)."""
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return -INT_LIMIT <= value < INT_LIMIT
    return hint is float and math.isfinite(value)


def _refuse(value: Any, hint: Any, where: str) -> _Refused:
    return _Refused(f"{where} must be {describe(hint)}, got {shown(value)}")


def _check_value(value: Any, hint: Any, where: str) -> None:
    if hint is Any:
        return
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and is_dataclass(options[0]):  # say what is wrong inside it
            _check_value(value, options[0], where)
            return
        for option in options:
            try:
                _check_value(value, option, where)
                return
            except _Refused:
                continue
        raise _refuse(value, hint, where)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise _refuse(value, hint, where)
        return
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise _refuse(value, hint, where)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            for index, item in enumerate(value):
                _check_value(item, args[0], f"{where}[{index}]")
            return
        if len(value) != len(args):
            raise _refuse(value, hint, where)
        for index, (item, item_hint) in enumerate(zip(value, args, strict=True)):
            _check_value(item, item_hint, f"{where}[{index}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise _Refused(f"{where} must be an object, got {shown(value)}")
        for key, item in value.items():
            _check_value(item, args[1], f"{where}[{key!r}]")
        return
    if isinstance(hint, type) and is_dataclass(hint):
        _check_object(value, hint, where, frozenset())
        return
    if hint not in (bool, int, float, str):
        raise TypeError(f"internal: no JSON form for {hint!r} at {where}")
    if not _conforms(value, hint):
        raise _refuse(value, hint, where)


def _check_object(data: Any, cls: type, where: str, skip: frozenset[str]) -> None:
    if not isinstance(data, dict):
        raise _Refused(f"{where} must be an object, got {shown(data)}")
    hints = _hints(cls)
    extra = getattr(cls, "__json_extra__", None)
    known = {f.name for f in fields(cls)} - {extra}
    for f in fields(cls):
        if f.name in skip or f.name == extra:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _Refused(f"{where} lacks {f.name!r}")
            continue
        _check_value(data[f.name], hints[f.name], f"{where}.{f.name}")
    if extra is None:
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise _Refused(f"{where} has unknown keys {unknown}; known: {sorted(known)}")
