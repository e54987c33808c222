"""JSON encoding of inputs and outputs (attrs classes and dataclasses via cattrs)."""

from __future__ import annotations

import dataclasses
import json
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


def dumps(value: Any) -> str:
    """Encode ``value`` as compact JSON; raises ``TypeError``/``ValueError`` when it cannot."""
    return _encoder.encode(value)


loads = json.loads
