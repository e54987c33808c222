"""What the decorators accept can be served, and ``perform`` does what the runtime would."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.definition import FlowDefinition as FD
from pgflow_py.definition import StepDefinition as SD

YEAR = 365 * 24 * 3600


def h(input: Any, ctx: pf.Context) -> Any:
    return input


# --- 1. numeric options are bounded at decoration ------------------------------------------------

# (option, value, the bound the message must state)
FLOW_OUT_OF_RANGE: list[tuple[str, object, str]] = [
    ("timeout", 10**12, "<= 31536000"),  # the runner's deadline would be in the year 33715
    ("timeout", YEAR + 1, "<= 31536000"),
    ("timeout", YEAR + 0.5, "<= 31536000"),
    ("timeout", -math.inf, "> 0"),
    ("base_delay", 10 * YEAR + 1, "<= 315360000"),
    ("base_delay", 1e300, "<= 315360000"),
    ("max_delay", 10 * YEAR + 1, "<= 315360000"),
    ("max_delay", math.inf, "<= 315360000"),
    ("max_attempts", 10**6 + 1, "<= 1000000"),
    ("max_attempts", 10**30, "<= 1000000"),
    ("max_attempts", math.nan, "integer"),
    ("concurrency", 0, ">= 1"),
    ("concurrency", 10**6 + 1, "<= 1000000"),
    ("concurrency", True, "integer"),
    ("concurrency", 2.0, "integer"),
    ("concurrency", math.nan, "integer"),
]


def _assert_names(exc: pf.DefinitionError, name: str, value: object, bound: str) -> None:
    message = str(exc)
    assert f"{name} must be" in message
    assert bound in message
    assert f"got {value!r}" in message


@pytest.mark.parametrize(("name", "value", "bound"), FLOW_OUT_OF_RANGE)
def test_out_of_range_flow_option_is_refused_naming_option_value_and_range(
    name: str, value: object, bound: str
) -> None:
    with pytest.raises(pf.DefinitionError) as info:
        pf.job(queue="q", **{name: value})(h)  # type: ignore[call-overload]
    _assert_names(info.value, name, value, bound)
    with pytest.raises(pf.DefinitionError) as info:
        pf.flow("f", **{name: value})  # type: ignore[arg-type]
    _assert_names(info.value, name, value, bound)
    with pytest.raises(pf.DefinitionError) as info:
        FD(slug="f", steps=(SD("s"),), **{name: value})  # type: ignore[arg-type]
    _assert_names(info.value, name, value, bound)


STEP_OUT_OF_RANGE: list[tuple[str, object, str]] = [
    ("timeout", 10**12, "<= 31536000"),
    ("base_delay", 10 * YEAR + 1, "<= 315360000"),
    ("start_delay", 10 * YEAR + 1, "<= 315360000"),
    ("start_delay", 1e18, "<= 315360000"),
    ("start_delay", True, "number"),
    ("max_attempts", 10**6 + 1, "<= 1000000"),
    ("max_attempts", False, "integer"),
]


@pytest.mark.parametrize(("name", "value", "bound"), STEP_OUT_OF_RANGE)
def test_out_of_range_step_option_is_refused_by_step_and_map(
    name: str, value: object, bound: str
) -> None:
    f = pf.flow("f")
    for decorator in (f.step, f.map):
        with pytest.raises(pf.DefinitionError) as info:
            decorator("s", **{name: value})(h)  # type: ignore[arg-type]
        _assert_names(info.value, name, value, bound)
        assert "step 's'" in str(info.value)
    with pytest.raises(pf.DefinitionError) as info:
        FD(slug="f", steps=(SD("s", **{name: value}),))  # type: ignore[arg-type]
    _assert_names(info.value, name, value, bound)


def test_a_huge_value_is_shortened_in_the_message() -> None:
    with pytest.raises(pf.DefinitionError, match=r"max_delay must be .* got 1000") as info:
        pf.flow("f", max_delay=10**400)
    assert len(str(info.value)) < 200


def test_cron_input_must_survive_the_json_round_trip() -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape("cron_input")):
        pf.flow("f", cron="* * * * *", cron_input={1: "a", "1": "b"})


def test_the_largest_accepted_options_are_served(store: pf.Store) -> None:
    f = pf.flow(
        "edge", max_attempts=10**6, base_delay=10 * YEAR, max_delay=10 * YEAR, timeout=YEAR,
        concurrency=10**6,
    )

    @f.step(start_delay=10 * YEAR)
    def first(input: Any, ctx: pf.Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails, so the 10-year backoff is waited out")
        return ctx.attempt

    run = store.start(f, None)
    drain(store, f)
    done = store.get_run(run.id)
    assert (done.status, done.output) == ("completed", {"first": 2})
