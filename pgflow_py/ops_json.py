"""JSON views of what the store returns, for ``pgflow ... --json`` and the dashboard's API.

One rule for every attrs class (``pf.Run``, ``StepRun``, ``TaskRun``, ``AttemptRecord``,
``FlowStats``, ``WorkerInfo``, ...): an object with every attrs field under its own name, read
through :func:`attrs.fields`, so a field added to a model appears here without a change.
Datetimes become ISO 8601 strings, enums their value, tuples lists, timedeltas seconds. A stored
value that could not be decoded (:class:`pgflow_py.store.Undecodable`) becomes
``{"undecodable": "<Type: message>"}``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any

import attrs

from .models import Run
from .store.base import Undecodable

__all__ = ("dumps", "run_to_json", "to_json")


def to_json(value: Any) -> Any:
    """``value`` as plain JSON data (dicts, lists, strings, numbers, booleans, None)."""
    if isinstance(value, enum.Enum):  # before str: RunStatus is a str enum
        return to_json(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Undecodable):
        return {"undecodable": value.error}
    if attrs.has(type(value)):
        return {f.name: to_json(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    return str(value)


def run_to_json(run: Run) -> dict[str, Any]:
    """A run as a JSON object with :class:`pgflow_py.Run`'s field names; ``steps`` is a list of
    objects with ``StepRun``'s fields, each with ``tasks`` (``TaskRun``'s fields) whose
    ``history`` lists the failed attempts (``AttemptRecord``'s fields, traceback included)."""
    data = to_json(run)
    assert isinstance(data, dict)
    return data


def dumps(value: Any) -> str:
    """Pretty JSON text of ``value`` (converted with :func:`to_json`)."""
    return json.dumps(to_json(value), indent=2, ensure_ascii=False)
