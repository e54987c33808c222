"""Conditional steps (pgflow 0.14): JSON containment as PostgreSQL's ``@>``, and skip modes.

Pure functions, shared by ``flow.perform`` and the SQLite store (which evaluates a step's
condition in the transaction that finds the step ready; PostgreSQL's store asks ``@>`` itself).
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

import attrs

from . import _json

__all__ = (
    "CONDITION_NOT_MET",
    "SKIP_MODES",
    "SKIP_REASONS",
    "Skip",
    "SkipMode",
    "SkipReason",
    "condition_met",
    "contains",
)

SkipMode = Literal["fail", "skip", "skip-cascade"]
"""What ``when_unmet`` and ``when_exhausted`` do: fail the run, skip the step (its dependents
run without it), or skip the step and every step downstream of it."""
SKIP_MODES: tuple[str, ...] = ("fail", "skip", "skip-cascade")

SkipReason = Literal["condition_unmet", "handler_failed", "dependency_skipped"]
"""Why a step was skipped (``StepRun.skip_reason``)."""
SKIP_REASONS: tuple[str, ...] = ("condition_unmet", "handler_failed", "dependency_skipped")

CONDITION_NOT_MET = "Condition not met"
"""The error of a run failed by an unmet condition with ``when_unmet="fail"`` (pgflow's)."""


def contains(value: Any, pattern: Any) -> bool:
    """Whether JSON ``value`` contains JSON ``pattern``, as PostgreSQL's ``jsonb @> jsonb``.

    Objects contain an object whose every key they hold with a containing value; arrays contain
    an array whose every element some element of theirs contains; other values contain only an
    equal value (numbers compare by value, never equal to booleans). At the top level an array
    also contains a scalar it holds, as in PostgreSQL.
    """
    if isinstance(value, list) and not isinstance(pattern, (list, dict)):
        return any(_equal_scalars(item, pattern) for item in value)
    return _contains(value, pattern)


def _contains(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            key in value and _contains(value[key], sub) for key, sub in pattern.items()
        )
    if isinstance(pattern, list):
        if not isinstance(value, list):
            return False
        return all(any(_contains(item, sub) for item in value) for sub in pattern)
    if isinstance(value, (dict, list)):
        return False
    return _equal_scalars(value, pattern)


def _equal_scalars(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return bool(a == b)  # numbers: ints and Decimals compare exactly


def _exact(text: str) -> Any:
    """JSON read with exact decimals, so numbers compare as PostgreSQL's ``numeric`` does."""
    return json.loads(text, parse_float=Decimal)


@lru_cache(maxsize=256)
def _pattern(pattern_json: str) -> Any:
    return _exact(pattern_json)


def condition_met(if_: Any, if_not: Any, value_json: str) -> bool:
    """Whether a step with patterns ``if_`` / ``if_not`` (``None``: none) runs on ``value_json``
    (the flow input of a root step, ``{dep: output}`` of a dependent one)."""
    value = _exact(value_json)
    if if_ is not None and not contains(value, _pattern(_json.dumps(if_))):
        return False
    return if_not is None or not contains(value, _pattern(_json.dumps(if_not)))


@attrs.frozen
class Skip:
    """A step ends skipped instead of completing: why, and whether its dependents go too."""

    reason: SkipReason
    cascade: bool
    error: str | None = None
    """The last error, for a step skipped by ``when_exhausted``."""
