"""What the store's JSON encoding accepts is exactly what reads back as the same value."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgflow_py import _json


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_up_to_the_limit_reads_back_and_beyond_it_is_refused() -> None:
    deepest = _nested(_json.MAX_DEPTH)
    assert _json.loads(_json.dumps(deepest)) == deepest
    for depth in (_json.MAX_DEPTH + 1, 5_000):  # the second is past the encoder's recursion
        with pytest.raises(ValueError, match=f"more than {_json.MAX_DEPTH} levels deep"):
            _json.dumps({"a": _nested(depth)})
    # Brackets inside strings are text, not nesting.
    assert _json.roundtrip({"s": "[" * 1000}) == {"s": "[" * 1000}


def test_a_cycle_is_still_called_a_cycle() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="circular"):
        _json.dumps(cycle)


@pytest.mark.parametrize(
    "value",
    [
        {1: "a", "1": "b"},
        [{"x": {1.5: 0, "1.5": 1}}],
        {"t": ({True: 1, "true": 2},)},
        {None: 1, "null": 2},
        OrderedDict([(2, "a"), ("2", "b")]),
    ],
    ids=["int", "nested-float", "bool-in-tuple", "none", "dict-subclass"],
)
def test_keys_that_collide_as_json_strings_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="one value would be lost"):
        _json.dumps(value)


def test_non_string_keys_that_do_not_collide_become_strings() -> None:
    assert _json.roundtrip({1: "a", 2.5: "b", None: "c", False: "d"}) == {
        "1": "a", "2.5": "b", "null": "c", "false": "d"
    }


def test_a_lone_surrogate_is_refused_and_printable_escapes_it() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        _json.dumps(["ok", {"name": "bad \udcff.txt"}])
    assert _json.printable("bad \udcff.txt") == "bad \\udcff.txt"
    assert _json.printable("café") == "café"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_every_json_value_reads_back_as_itself(value: Any) -> None:
    assert _json.roundtrip(value) == value
