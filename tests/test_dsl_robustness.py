"""What the decorators accept can be served, and ``perform`` does what the runtime would."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.definition import FlowDefinition as FD
from pgflow_py.definition import StepDefinition as SD
from pgflow_py.dsl import distinct_flows

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


# --- 2. perform puts inputs and outputs through the runtime's JSON round trip --------------------


def _served(store: pf.Store, flow: pf.Flow, input: Any) -> pf.Run:
    run = store.start(flow, input)
    drain(store, flow)
    return store.get_run(run.id)


def _recording_job(queue: str, seen: list[Any]) -> pf.Job:
    @pf.job(queue=queue)
    def record(input: Any, ctx: pf.Context) -> Any:
        seen.append((input, ctx.flow_input))
        return input

    return record


@attrs.define
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Box:
    items: tuple[int, ...]


ROUND_TRIPS: list[tuple[Any, Any]] = [
    ({1: "x"}, {"1": "x"}),
    ({"a": (1, 2)}, {"a": [1, 2]}),
    ({True: 1, None: 2, 1.5: 3}, {"true": 1, "null": 2, "1.5": 3}),
    (Point(1, 2), {"x": 1, "y": 2}),
    ([Box((3,))], [{"items": [3]}]),
]


@pytest.mark.parametrize(("given", "stored"), ROUND_TRIPS)
def test_job_perform_hands_the_handler_its_input_as_the_runner_does(
    store: pf.Store, given: Any, stored: Any
) -> None:
    seen: list[Any] = []
    job = _recording_job("rt", seen)
    assert job.perform(given) == stored
    assert asyncio.run(job.aperform(given)) == stored
    assert _served(store, job, given).output == stored
    assert seen == [(stored, stored)] * 3


@pytest.mark.parametrize(("given", "stored"), ROUND_TRIPS)
def test_flow_perform_and_perform_step_use_the_round_trip(
    store: pf.Store, given: Any, stored: Any
) -> None:
    seen: list[Any] = []
    f = pf.flow("rt_flow")
    f.step("first")(lambda i, c: seen.append(("first", i, c.flow_input)) or i)
    f.step("then", depends_on=["first"])(lambda d, c: seen.append(("then", d, c.flow_input)) or d)
    expected = [("first", stored, stored), ("then", {"first": stored}, stored)]

    assert f.perform(given) == {"then": {"first": stored}}
    assert seen == expected
    seen.clear()
    assert _served(store, f, given).output == {"then": {"first": stored}}
    assert seen == expected
    seen.clear()
    assert f.perform_step("first", given) == stored
    assert f.perform_step("then", {"first": given}) == {"first": stored}
    assert [s[1] for s in seen] == [stored, {"first": stored}]


def test_attrs_and_dataclass_outputs_are_stored_as_dicts(store: pf.Store) -> None:
    @pf.job(queue="point")
    def point(input: Any, ctx: pf.Context) -> Point:
        return Point(*input)

    # perform returns what the return annotation promises (after the JSON round trip); the run
    # keeps the JSON, as does an unannotated handler's perform.
    assert point.perform([1, 2]) == Point(1, 2)
    assert _served(store, point, [1, 2]).output == {"x": 1, "y": 2}
    assert pf.job(queue="point_plain")(lambda i, c: Point(*i)).perform([1, 2]) == {"x": 1, "y": 2}
    f = pf.flow("boxes")
    f.map("box")(lambda item, c: Box((item, item)))
    assert f.perform([1, 2]) == {"box": [{"items": [1, 1]}, {"items": [2, 2]}]}


NOT_STORABLE: list[tuple[Any, type[Exception], str]] = [
    (datetime(2026, 1, 1, tzinfo=timezone.utc), TypeError, "datetime is not JSON-serializable"),
    ({1: "a", "1": "b"}, ValueError, "one value would be lost"),
    ([math.nan], ValueError, "Out of range float"),
    ({"s": "\udcff"}, ValueError, "lone surrogate"),
    ({1, 2}, TypeError, "set is not JSON-serializable"),
]


@pytest.mark.parametrize(("output", "error", "detail"), NOT_STORABLE)
def test_an_output_the_runtime_cannot_store_makes_perform_raise(
    store: pf.Store, output: Any, error: type[Exception], detail: str
) -> None:
    message = "the handler returned a value that cannot be stored as JSON"

    @pf.job(queue="bad_output")
    def bad_output(input: Any, ctx: pf.Context) -> Any:
        return output

    for call in (bad_output.perform, lambda i: asyncio.run(bad_output.aperform(i))):
        with pytest.raises(error, match=message) as info:
            call(None)
        assert detail in str(info.value)
        assert "job 'bad_output'" in str(info.value)
    run = _served(store, bad_output, None)
    assert run.status == "failed"
    assert run.error is not None and message in run.error

    f = pf.flow("bad_flow")
    f.step("ok")(lambda i, c: [1, 2])
    f.map("each", array="ok")(lambda item, c: output if item == 2 else item)
    with pytest.raises(error, match=message) as info:
        f.perform(None)
    assert "step 'each', task 1" in str(info.value)
    with pytest.raises(error, match=message):
        f.perform_step("each", [2])
    assert f.perform_step("each", [1]) == [1]


@pytest.mark.parametrize(("value", "error", "detail"), NOT_STORABLE)
def test_an_input_the_store_refuses_is_an_input_error_in_perform(
    store: pf.Store, value: Any, error: type[Exception], detail: str
) -> None:
    calls: list[Any] = []
    job = _recording_job("bad_input", calls)
    f = pf.flow("bad_input_flow")
    f.step("a")(lambda i, c: calls.append(i))
    for call in (
        job.perform,
        lambda v: asyncio.run(job.aperform(v)),
        f.perform,
        lambda v: f.perform_step("a", v),
        lambda v: f.perform_step("a", 1, ctx=pf.Context(flow_slug="x", step_slug="a", flow_input=v)),
        lambda v: store.start(job, v),
    ):
        with pytest.raises(pf.InputError, match="JSON-serializable") as info:
            call(value)
        assert detail in str(info.value)
    assert calls == []


def test_exceptions_a_handler_raises_still_propagate_unchanged() -> None:
    # perform checks outputs with TypeError/ValueError: the handler's own must not be wrapped.
    error = TypeError("the handler's own")

    @pf.job(queue="raises")
    def raises(input: Any, ctx: pf.Context) -> Any:
        raise error

    with pytest.raises(TypeError) as info:
        raises.perform(None)
    assert info.value is error


# --- 3. every step decodes its own copy, as in the runtime ---------------------------------------


def _mutating_flow(slug: str, start: Any) -> pf.Flow:
    f = pf.flow(slug)

    @f.step()
    def base(input: Any, ctx: pf.Context) -> Any:
        return start

    @f.step(depends_on=["base"])
    def appender(deps: Any, ctx: pf.Context) -> int:
        value = deps["base"]
        if isinstance(value, dict):
            value["n"] += 2
            return int(value["n"])
        value.extend([2, 3])
        return len(value)

    @f.step(depends_on=["base"])
    def counter(deps: Any, ctx: pf.Context) -> int:
        value = deps["base"]
        return int(value["n"]) + 1 if isinstance(value, dict) else len(value) + 1

    return f


@pytest.mark.parametrize("start", [{"n": 1}, [1]], ids=["dict", "list"])
def test_a_step_mutating_its_dependency_does_not_change_what_another_sees(
    store: pf.Store, start: Any
) -> None:
    f = _mutating_flow("mutating", start)
    served = _served(store, f, None).output
    assert served == {"appender": 3, "counter": 2}
    assert f.perform(None) == served
    assert asyncio.run(f.aperform(None)) == served


def test_mutating_the_flow_input_does_not_change_what_other_steps_see(store: pf.Store) -> None:
    f = pf.flow("mutating_input")

    @f.step()
    def spoil(input: Any, ctx: pf.Context) -> Any:
        input["spoiled"] = True
        ctx.flow_input["spoiled"] = True
        return sorted(input)

    @f.step()
    def look(input: Any, ctx: pf.Context) -> Any:
        return {"input": sorted(input), "flow_input": sorted(ctx.flow_input)}

    @f.step(depends_on=["spoil"])
    def later(deps: Any, ctx: pf.Context) -> Any:
        return sorted(ctx.flow_input)

    data = {"a": 1}
    served = _served(store, f, data).output
    assert served == {
        "look": {"input": ["a"], "flow_input": ["a"]}, "later": ["a"],
    }
    assert f.perform(data) == served
    assert data == {"a": 1}


def test_map_tasks_mutating_their_items_do_not_change_the_array_others_see(
    store: pf.Store,
) -> None:
    f = pf.flow("mutating_map")
    f.step("src")(lambda i, c: [{"v": 1}, {"v": 2}])

    @f.map(array="src")
    def bump(item: Any, ctx: pf.Context) -> Any:
        item["v"] += 10
        return item

    @f.step(depends_on=["src", "bump"])
    def total(deps: Any, ctx: pf.Context) -> Any:
        deps["bump"][0]["v"] = -1  # the map's output, decoded for this step only
        return sum(x["v"] for x in deps["src"])

    @f.step(depends_on=["bump"])
    def bumped(deps: Any, ctx: pf.Context) -> Any:
        return [x["v"] for x in deps["bump"]]

    served = _served(store, f, None).output
    assert served == {"total": 3, "bumped": [11, 12]}
    assert f.perform(None) == served


def test_root_map_items_are_copies_of_the_flow_input(store: pf.Store) -> None:
    f = pf.flow("mutating_root_map")

    @f.map()
    def each(item: Any, ctx: pf.Context) -> Any:
        item.append("x")
        return [len(item), len(ctx.flow_input[0])]

    data = [[1], [2]]
    served = _served(store, f, data).output
    assert served == {"each": [[2, 1], [2, 1]]}
    assert f.perform(data) == served
    assert data == [[1], [2]]


# --- 4. distinct_flows ---------------------------------------------------------------------------


def send(input: Any, ctx: pf.Context) -> Any:
    return input


def other_send(input: Any, ctx: pf.Context) -> Any:
    return input


def test_distinct_flows_drops_repeats_of_one_object_and_keeps_the_order() -> None:
    a = pf.job(queue="a")(send)
    b = pf.flow("b")
    b.step()(send)
    assert distinct_flows([a, b, a, b, a]) == [a, b]
    assert distinct_flows(iter([b])) == [b]
    assert distinct_flows([]) == []


def test_distinct_flows_refuses_two_jobs_with_one_slug_naming_both_handlers() -> None:
    first = pf.job(queue="same")(send)
    second = pf.job(queue="same")(other_send)
    with pytest.raises(pf.DefinitionError) as info:
        distinct_flows([first, second])
    message = str(info.value)
    assert "'same'" in message
    assert f"{__name__}:send" in message and f"{__name__}:other_send" in message


def test_distinct_flows_names_a_flow_by_its_first_step() -> None:
    job = pf.job(queue="clash")(send)
    f = pf.flow("clash")
    f.step()(other_send)
    f.step(depends_on=["other_send"])(send)
    with pytest.raises(pf.DefinitionError) as info:
        distinct_flows([job, f])
    message = str(info.value)
    assert f"job {__name__}:send" in message
    assert f"flow with first step {__name__}:other_send" in message


def test_distinct_flows_explains_a_module_imported_twice() -> None:
    # What `python app.py` plus `import app` produce: the same function, two job objects.
    with pytest.raises(pf.DefinitionError, match="imported twice"):
        distinct_flows([pf.job(queue="twice")(send), pf.job(queue="twice")(send)])


def test_distinct_flows_is_exported_by_dsl_only() -> None:
    import pgflow_py.dsl

    assert "distinct_flows" in pgflow_py.dsl.__all__
    assert not hasattr(pf, "distinct_flows")
