"""JSON encoding of inputs and outputs (attrs classes and dataclasses via cattrs)."""

from __future__ import annotations

import dataclasses
import json
import json.scanner
from typing import Any

import attrs
import cattrs

_converter = cattrs.Converter()


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


def dumps(value: Any) -> str:
    """Encode ``value`` as compact JSON; raises ``TypeError``/``ValueError`` when it cannot."""
    if _c_encoder is None:
        return _encoder.encode(value)
    try:
        return "".join(_c_encoder(value, 0))
    except RecursionError:
        raise ValueError("circular reference detected") from None


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
