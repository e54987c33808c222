"""JSON encoding of inputs and outputs (attrs classes and dataclasses via cattrs)."""

from __future__ import annotations

import dataclasses
import json
import json.scanner
import re
from typing import Any

import attrs

from .payloads import converter as _converter


def _default(obj: Any) -> Any:
    if attrs.has(type(obj)) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return _converter.unstructure(obj)
    raise TypeError(f"a value of type {type(obj).__name__} is not JSON-serializable")


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default
)

# The C encoder behind json.dumps, built once: json.dumps builds one per call, which is most of
# its cost for the small values of inputs and outputs. No circular-reference bookkeeping: a
# cycle ends in RecursionError, reported as the ValueError json.dumps would raise.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # None on interpreters without it
_c_encoder = (
    _make_encoder(
        None, _default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if _make_encoder is not None
    else None
)


UNSTORABLE_OUTPUT = "the handler returned a value that cannot be stored as JSON"
"""How the runtime, and ``perform`` alike, begin the error for such an output."""

MAX_DEPTH = 256
"""How deeply arrays and objects may nest in a stored value. Decoding recurses once per level,
and a value must decode wherever it is read back (a runner's claim, ``get_run``), so the limit
stays far below Python's recursion limit."""

_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def dumps(value: Any) -> str:
    """Encode ``value`` as compact JSON that :func:`loads` reads back as the same value.

    Raises ``TypeError``/``ValueError`` when it cannot: a type JSON has no form for, NaN or
    infinity, a circular reference, object keys that collide once converted to strings
    (``{1: "a", "1": "b"}``), nesting deeper than :data:`MAX_DEPTH`, or a string with a lone
    surrogate (not UTF-8, e.g. what ``os.fsdecode`` gives for an undecodable file name).
    """
    if _c_encoder is None:
        text = _encoder.encode(value)
    else:
        try:
            text = "".join(_c_encoder(value, 0))
        except RecursionError:
            raise ValueError(
                f"the value nests arrays or objects more than {MAX_DEPTH} levels deep"
                if _too_deep(value) else "circular reference detected"
            ) from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"a string holds {text[exc.start:exc.end]!r}, a lone surrogate, which is not "
                "UTF-8 text (decode bytes with errors='replace', or pass them as base64)"
            ) from None
    if text.count("[") + text.count("{") > MAX_DEPTH:  # cheap bound first: most values pass
        _check_depth(text)
    if isinstance(value, _CONTAINERS):
        _check_keys(value)
    return text


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests deeper than :data:`MAX_DEPTH` (a cycle ends a branch)."""
    stack = [(value, 1)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, _CONTAINERS) and id(item) not in seen:
            if depth > MAX_DEPTH:
                return True
            seen.add(id(item))
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _check_depth(text: str) -> None:
    depth = 0
    for match in _BRACKETS.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(
                    f"the value nests arrays or objects more than {MAX_DEPTH} levels deep"
                )
        elif bracket in "]}":
            depth -= 1


def _json_key(key: Any) -> Any:
    # What the encoder writes for a key of each type JSON allows.
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, float):
        return float.__repr__(key)
    if isinstance(key, int):
        return int.__repr__(key)
    return key


def _check_keys(value: Any) -> None:
    """Refuse dicts whose keys collide once the encoder turns them into strings: the decoder
    would keep one of the values and silently drop the others."""
    # Set operations over map(type, ...) run in C: a flat dict of strings costs two of them.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not _STR.issuperset(map(type, item)):
                _check_dict_keys(item)
            item = item.values()
        if not _SCALARS.issuperset(map(type, item)):
            for v in item:
                if isinstance(v, _CONTAINERS):
                    stack.append(v)


def _check_dict_keys(item: dict[Any, Any]) -> None:
    seen: dict[Any, Any] = {}
    for key in item:
        name = _json_key(key)
        if name in seen:
            raise ValueError(
                f"keys {seen[name]!r} and {key!r} are both {name!r} in JSON; "
                "one value would be lost"
            )
        seen[name] = key


_CONTAINERS = (dict, list, tuple)
_STR = frozenset((str,))
_SCALARS = frozenset((str, int, float, bool, type(None)))


def roundtrip(value: Any) -> Any:
    """``value`` as the runtime stores and reads it back (``{1: "x"}`` becomes ``{"1": "x"}``,
    tuples lists, attrs classes and dataclasses dicts): what a handler sees, and what a step's
    output is once recorded. Raises as :func:`dumps` does."""
    return loads(dumps(value))


def printable(text: str) -> str:
    """``text`` with lone surrogates escaped (``\\udcff``), so it can be stored and logged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# Likewise the C scanner behind json.loads, without its whitespace handling: the store only
# decodes compact JSON it wrote itself. Anything else takes the full path (and its errors).
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def loads(text: str) -> Any:
    """Decode JSON text."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)
