"""Multi-step flows end to end: random DAGs against a reference evaluation, maps, failures,
start delays, definition changes, and ``perform`` agreeing with the runner."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _helpers import drain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgflow_py as pf
from pgflow_py.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    with pf.connect(tmp_path / "flows.db", clock=clock) as s:
        yield s



# --- random DAGs against a reference evaluation ------------------------------------------------


def digest(value: Any) -> int:
    """A deterministic number summarising any JSON value (order-sensitive for lists)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value) + 1
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return len(value) + sum(map(ord, value))
    if isinstance(value, list):
        return sum((i + 1) * digest(x) for i, x in enumerate(value)) + 7 * len(value)
    if isinstance(value, dict):
        return sum(digest(k) * (digest(v) + 3) for k, v in value.items()) + 11 * len(value)
    raise TypeError(f"not JSON: {value!r}")


def single_output(slug: str, value: Any, returns_array: bool) -> Any:
    d = digest(value) % 10007
    if returns_array:
        # 0..3 elements: some maps get an empty array and must complete at once.
        return [{"from": slug, "i": i, "d": (d + i) % 101} for i in range(d % 4)]
    return {"step": slug, "d": d, "seen": sorted(value) if isinstance(value, dict) else None}


def map_output(slug: str, item: Any) -> Any:
    d = digest(item) % 10007
    # Falsy outputs must be stored exactly, not turned into null or dropped.
    if d % 7 == 0:
        return None
    if d % 7 == 1:
        return False
    if d % 7 == 2:
        return 0
    return {"step": slug, "d": d, "item": item}


@dataclass(frozen=True)
class StepSpec:
    slug: str
    kind: str  # "single" | "map"
    deps: tuple[str, ...]
    returns_array: bool
    fails: int  # failed attempts before success (only while failures are switched on)
    fail_offset: int  # map tasks with (index + offset) even fail, the others do not
    use_retry: bool  # fail with pf.Retry(delay=...) instead of an exception
    max_attempts: int | None  # step override of the flow's max_attempts
    is_async: bool


FLOW_MAX_ATTEMPTS = 3


@st.composite
def dag_specs(draw: st.DrawFn) -> list[StepSpec]:
    n = draw(st.integers(2, 7))
    specs: list[StepSpec] = []
    for i in range(n):
        slug = f"s{i}"
        earlier = [s.slug for s in specs]
        arrays = [s.slug for s in specs if s.kind == "map" or s.returns_array]
        choices = ["root_single", "root_map"]
        if earlier:
            choices += ["single", "single", "single"]
        if arrays:
            choices += ["map", "map", "map"]
        choice = draw(st.sampled_from(choices))
        if choice == "root_single":
            kind, deps = "single", ()
        elif choice == "root_map":
            kind, deps = "map", ()
        elif choice == "single":
            kind = "single"
            deps = tuple(draw(st.lists(st.sampled_from(earlier), min_size=1, max_size=3, unique=True)))
        else:
            kind, deps = "map", (draw(st.sampled_from(arrays)),)
        specs.append(StepSpec(
            slug=slug,
            kind=kind,
            deps=deps,
            returns_array=kind == "single" and draw(st.booleans()),
            fails=draw(st.integers(0, 2)),
            fail_offset=draw(st.integers(0, 1)),
            use_retry=draw(st.booleans()),
            max_attempts=draw(st.sampled_from([None, 3, 4])),
            is_async=draw(st.booleans()),
        ))
    return specs


def flow_input_for(specs: list[StepSpec]) -> st.SearchStrategy[Any]:
    if any(s.kind == "map" and not s.deps for s in specs):
        element = st.one_of(st.integers(-5, 50), st.text("abc", max_size=3), st.none())
        return st.lists(element, max_size=5)
    return st.dictionaries(st.text("xyz", min_size=1, max_size=2), st.integers(0, 100), max_size=3)


def reference_output(specs: list[StepSpec], flow_input: Any) -> tuple[Any, dict[str, Any]]:
    """Evaluate the DAG by hand: the run output and every step's output."""
    outputs: dict[str, Any] = {}
    for spec in specs:  # declared in topological order: deps are always earlier
        if spec.kind == "map":
            source = outputs[spec.deps[0]] if spec.deps else flow_input
            outputs[spec.slug] = [map_output(spec.slug, item) for item in source]
        else:
            value = {d: outputs[d] for d in spec.deps} if spec.deps else flow_input
            outputs[spec.slug] = single_output(spec.slug, value, spec.returns_array)
    used = {d for s in specs for d in s.deps}
    return {s.slug: outputs[s.slug] for s in specs if s.slug not in used}, outputs


def build_flow(specs: list[StepSpec], failing: dict[str, bool], calls: list[tuple]) -> pf.Flow:
    """The flow under test. Handlers record (slug, task_index, attempt, max_attempts, flow_input)."""
    flow = pf.flow("random_dag", max_attempts=FLOW_MAX_ATTEMPTS, base_delay=30)

    def make_handler(spec: StepSpec):
        def body(value: Any, ctx: pf.Context) -> Any:
            calls.append((spec.slug, ctx.task_index, ctx.attempt, ctx.max_attempts, ctx.flow_input))
            index = ctx.task_index
            fails = spec.fails if index is None or (index + spec.fail_offset) % 2 == 0 else 0
            if failing["on"] and ctx.attempt <= fails:
                if spec.use_retry:
                    raise pf.Retry(delay=5, reason=f"{spec.slug} not ready")
                raise RuntimeError(f"{spec.slug}[{index}] flaked on attempt {ctx.attempt}")
            if spec.kind == "map":
                return map_output(spec.slug, value)
            return single_output(spec.slug, value, spec.returns_array)

        if spec.is_async:

            async def handler(value: Any, ctx: pf.Context) -> Any:
                return body(value, ctx)

            return handler
        return body

    for spec in specs:
        decorate = (
            flow.map(spec.slug, array=spec.deps[0] if spec.deps else None,
                     max_attempts=spec.max_attempts)
            if spec.kind == "map"
            else flow.step(spec.slug, depends_on=list(spec.deps), max_attempts=spec.max_attempts)
        )
        decorate(make_handler(spec))
    return flow


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_dags_match_perform_and_a_reference_evaluation(data: st.DataObject) -> None:
    specs = data.draw(dag_specs(), label="steps")
    flow_input = data.draw(flow_input_for(specs), label="input")
    expected, step_outputs = reference_output(specs, flow_input)
    failing = {"on": True}
    calls: list[tuple] = []
    flow = build_flow(specs, failing, calls)

    with tempfile.TemporaryDirectory() as tmp:
        clock = FakeClock()
        with pf.connect(os.path.join(tmp, "dag.db"), clock=clock) as store:
            run = store.start(flow, flow_input)
            drain(store, flow)
            done = store.get_run(run.id)

    assert done.status is pf.RunStatus.COMPLETED, done.error
    assert done.output == expected
    assert done.error is None

    by_slug = {s.slug: s for s in specs}
    # Every step's recorded output, and one task per array element for map steps.
    assert [s.slug for s in done.steps] == [s.slug for s in specs]
    for step in done.steps:
        spec = by_slug[step.slug]
        assert step.status == "completed", step
        assert step.output == step_outputs[step.slug]
        if spec.kind == "map":
            source = step_outputs[spec.deps[0]] if spec.deps else flow_input
            assert [t.index for t in step.tasks] == list(range(len(source)))
        else:
            assert [t.index for t in step.tasks] == [None]
        assert all(t.status == "completed" for t in step.tasks)

    # Each task succeeded exactly once, after exactly its scripted failures.
    for spec in specs:
        effective = spec.max_attempts or FLOW_MAX_ATTEMPTS
        indexes = {c[1] for c in calls if c[0] == spec.slug}
        for index in indexes:
            attempts = [c[2] for c in calls if c[0] == spec.slug and c[1] == index]
            fails = spec.fails if index is None or (index + spec.fail_offset) % 2 == 0 else 0
            assert attempts == list(range(1, fails + 2)), (spec.slug, index)
        assert {c[3] for c in calls if c[0] == spec.slug} <= {effective}
    # The flow input reaches every handler as ctx.flow_input.
    assert all(c[4] == flow_input for c in calls)

    # perform runs the same DAG in-process (once per task, so with failures switched off).
    failing["on"] = False
    assert flow.perform(flow_input) == expected


# --- shapes ------------------------------------------------------------------------------------


def test_diamond_step_receives_both_outputs_and_every_step_sees_the_flow_input(store):
    seen: list[tuple[str, Any, Any]] = []
    diamond = pf.flow("diamond")

    @diamond.step()
    def a(input, ctx):
        seen.append(("a", input, ctx.flow_input))
        return {"n": input["n"] + 1}

    @diamond.step(depends_on=[a])
    def b(deps, ctx):
        seen.append(("b", deps, ctx.flow_input))
        return deps["a"]["n"] * 10

    @diamond.step(depends_on=["a"])
    def c(deps, ctx):
        seen.append(("c", deps, ctx.flow_input))
        return [deps["a"]["n"]] * 2

    @diamond.step(depends_on=[b, c])
    def d(deps, ctx):
        seen.append(("d", deps, ctx.flow_input))
        return {"sum": deps["b"] + sum(deps["c"])}

    run = store.start(diamond, {"n": 1})
    drain(store, diamond)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"d": {"sum": 24}}
    got = {slug: (value, flow_input) for slug, value, flow_input in seen}
    assert sorted(got) == ["a", "b", "c", "d"]
    assert got["d"][0] == {"b": 20, "c": [2, 2]}
    assert got["b"][0] == {"a": {"n": 2}} and got["c"][0] == {"a": {"n": 2}}
    assert all(flow_input == {"n": 1} for _, flow_input in got.values())
    assert diamond.perform({"n": 1}) == done.output


def test_map_over_a_thousand_elements_keeps_element_order(store):
    big = pf.flow("big_map")

    @big.step()
    def numbers(input, ctx):
        return list(range(input["n"]))

    @big.map(array=numbers)
    def square(item, ctx):
        assert ctx.task_index == item
        return {"i": item, "sq": item * item}

    run = store.start(big, {"n": 1000})
    stats = drain(store, big)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"square": [{"i": i, "sq": i * i} for i in range(1000)]}
    assert stats.completed == 1001
    tasks = done.step("square").tasks
    assert len(tasks) == 1000
    assert [t.index for t in tasks] == list(range(1000))
    assert all(t.status == "completed" and t.attempts == 1 for t in tasks)
    assert [t.output["sq"] for t in tasks] == [i * i for i in range(1000)]


def _empty_cascade(root_is_map: bool) -> tuple[pf.Flow, list[str]]:
    calls: list[str] = []
    flow = pf.flow("empty_cascade")
    if root_is_map:
        @flow.map()
        def source(item, ctx):
            calls.append("source")
            return item
    else:
        @flow.step()
        def source(input, ctx):
            calls.append("source")
            return []

    @flow.map(array="source")
    def first(item, ctx):
        calls.append("first")
        return item

    @flow.map(array=first)
    def second(item, ctx):
        calls.append("second")
        return item

    @flow.step(depends_on=[first, second])
    def summary(deps, ctx):
        calls.append("summary")
        return {"got": deps, "count": len(deps["first"]) + len(deps["second"])}

    return flow, calls


@pytest.mark.parametrize("root_is_map", [False, True], ids=["root_returns_empty", "root_map_of_empty"])
def test_empty_arrays_cascade_through_two_maps(store, root_is_map):
    flow, calls = _empty_cascade(root_is_map)
    run = store.start(flow, [] if root_is_map else {"anything": True})
    drain(store, flow)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED, done.error
    assert done.output == {"summary": {"got": {"first": [], "second": []}, "count": 0}}
    for slug in ("first", "second"):
        step = done.step(slug)
        assert step.status == "completed"
        assert step.output == []
        assert step.tasks == ()
    assert "first" not in calls and "second" not in calls
    assert calls.count("summary") == 1
    assert flow.perform([] if root_is_map else {"anything": True}) == done.output


def test_root_map_with_a_non_list_input_is_refused_and_nothing_is_written(store):
    flow = pf.flow("root_map")

    @flow.map()
    def each(item, ctx):
        return item

    for bad in ({"a": 1}, "abc", 3, None):
        with pytest.raises(pf.InputError, match="array"):
            store.start(flow, bad)
    assert store.runs() == []
    assert store.backend.get_definition("root_map") is None
    with pytest.raises(pf.InputError):
        flow.perform({"a": 1})
    # A list is accepted.
    run = store.start(flow, [1, 2])
    drain(store, flow)
    assert store.get_run(run.id).output == {"each": [1, 2]}


def test_step_feeding_a_map_with_a_non_array_fails_the_run_without_retry(store):
    calls: list[str] = []
    flow = pf.flow("not_an_array", max_attempts=5, base_delay=1)

    @flow.step()
    def source(input, ctx):
        calls.append("source")
        return {"items": [1, 2, 3]}

    @flow.map(array=source)
    def each(item, ctx):
        calls.append("each")
        return item

    @flow.step(depends_on=[each])
    def after(deps, ctx):
        calls.append("after")
        return deps

    run = store.start(flow, {})
    drain(store, flow)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert calls == ["source"]
    assert failed.output is None
    assert "expected an array" in (failed.error or "")
    assert "each" in (failed.error or "") and "source" in (failed.error or "")
    assert failed.step("source").status == "completed"
    assert failed.step("source").attempts == 1
    assert failed.step("each").status == "failed"
    assert failed.step("after").status == "cancelled"
    with pytest.raises(pf.PgflowError, match="expected an array"):
        flow.perform({})


def test_a_step_failing_for_good_cancels_its_siblings_queued_tasks(store):
    calls: list[int] = []
    broken = {"on": True}
    item_calls = 0
    flow = pf.flow("fan_out", max_attempts=1)

    @flow.step()
    def items(input, ctx):
        nonlocal item_calls
        item_calls += 1
        return list(range(20))

    @flow.map(array=items)
    def work(item, ctx):
        calls.append(item)
        if item == 0 and broken["on"]:
            raise ValueError("element 0 is broken")
        return item

    @flow.step(depends_on=[work])
    def total(deps, ctx):
        return sum(deps["work"])

    run = store.start(flow, {})
    stats = drain(store, flow, concurrency=1)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "ValueError: element 0 is broken"
    assert calls == [0]
    assert stats.failed == 1
    tasks = failed.step("work").tasks
    assert [t.index for t in tasks] == list(range(20))
    assert tasks[0].status == "failed"
    assert [t.status for t in tasks[1:]] == ["cancelled"] * 19
    assert all(t.attempts == 0 for t in tasks[1:])
    assert failed.step("work").status == "failed"
    assert failed.step("total").status == "cancelled"
    # Nothing is left to run: a second runner pass does nothing.
    assert drain(store, flow) == pf.RunnerStats()
    assert calls == [0]

    # Once fixed, a retry runs the tasks that did not complete; the root step is not run again.
    broken["on"] = False
    calls.clear()
    store.retry(run.id)
    drain(store, flow, concurrency=1)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED, done.error
    assert done.output == {"total": sum(range(20))}
    assert calls == list(range(20))
    assert item_calls == 1


def test_a_failing_single_step_cancels_a_queued_sibling_step(store):
    calls: list[str] = []
    flow = pf.flow("siblings", max_attempts=1)

    @flow.step()
    def root(input, ctx):
        calls.append("root")
        return 1

    @flow.step(depends_on=[root])
    def breaks(deps, ctx):
        calls.append("breaks")
        raise pf.PermanentFailure("no way")

    @flow.step(depends_on=[root])
    def sibling(deps, ctx):
        calls.append("sibling")
        return 2

    run = store.start(flow, {})
    drain(store, flow, concurrency=1)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert calls == ["root", "breaks"]
    assert failed.step("sibling").status == "cancelled"
    assert failed.step("sibling").tasks[0].status == "cancelled"


# --- start_delay -------------------------------------------------------------------------------


def test_start_delay_counts_from_when_the_dependency_completed(store, clock):
    seen: dict[str, float] = {}
    flow = pf.flow("delayed")

    @flow.step()
    def first(input, ctx):
        seen["first"] = clock.now()
        return "x"

    @flow.step(depends_on=[first], start_delay=300)
    def later(deps, ctx):
        seen["later"] = clock.now()
        return deps["first"] * 2

    @flow.step(depends_on=[first])
    def sooner(deps, ctx):
        seen["sooner"] = clock.now()
        return 1

    clock.advance(1000)  # nothing started yet: the delay does not count from the run's start
    run = store.start(flow, {})
    drain(store, flow)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"later": "xx", "sooner": 1}
    assert seen["later"] - seen["first"] >= 300
    assert seen["sooner"] - seen["first"] < 300


def test_start_delay_of_a_root_step_counts_from_the_run_start(store, clock):
    """A root step's dependencies are complete when the run starts, so its delay counts from
    then (as in pgflow, whose start_flow schedules root steps with their start_delay)."""
    seen: dict[str, float] = {}
    flow = pf.flow("delayed_root")

    @flow.step(start_delay=300)
    def root(input, ctx):
        seen["root"] = clock.now()
        return 1

    started = clock.now()
    run = store.start(flow, {})
    assert store.get_run(run.id).status is pf.RunStatus.SCHEDULED
    drain(store, flow)
    assert store.get_run(run.id).status is pf.RunStatus.COMPLETED
    assert seen["root"] - started >= 300


# --- definitions change between deploys --------------------------------------------------------


def _two_versions() -> tuple[pf.Flow, pf.Flow]:
    v1 = pf.flow("evolving")

    @v1.step()
    def fetch(input, ctx):
        return {"v": 1, "n": input["n"]}

    v2 = pf.flow("evolving")

    @v2.step("fetch")
    def fetch2(input, ctx):
        return {"v": 2, "n": input["n"]}

    @v2.step(depends_on=["fetch"])
    def enrich(deps, ctx):
        return {"enriched": deps["fetch"]["n"] + 1}

    return v1, v2


def test_changed_shape_with_a_started_run_is_refused_until_it_is_cancelled(store):
    v1, v2 = _two_versions()
    old = store.start(v1, {"n": 1})
    (_task,) = store.backend.claim("w", ["evolving"], 10, 30)  # its first attempt is running

    with pytest.raises(pf.ShapeMismatch) as excinfo:
        store.register(v2)
    message = str(excinfo.value)
    assert "evolving" in message
    assert "'enrich'" in message and "added" in message
    assert f"{old.id}  running" in message
    assert f"pgflow cancel {old.id}" in message and "new slug" in message
    # Starting the new version is refused the same way, and writes nothing.
    with pytest.raises(pf.ShapeMismatch):
        store.start(v2, {"n": 2})
    assert [r.id for r in store.runs(flow="evolving")] == [old.id]
    assert store.backend.get_definition("evolving") == v1.definition

    store.cancel(old.id)
    store.register(v2)
    assert store.backend.get_definition("evolving") == v2.definition
    new = store.start(v2, {"n": 5})
    drain(store, v2)
    done = store.get_run(new.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"enrich": {"enriched": 6}}
    assert [s.slug for s in done.steps] == ["fetch", "enrich"]
    assert store.get_run(old.id).status is pf.RunStatus.CANCELLED


@pytest.mark.parametrize("second_step", ["queued", "running"])
def test_changed_shape_is_refused_while_a_run_is_halfway_through(store, second_step):
    """Not only runs still waiting for their first attempt are unfinished: a run whose first step
    completed and whose second is queued or running holds the old shape too."""
    v1 = pf.flow("halfway")

    @v1.step()
    def fetch(input, ctx):
        return {"n": input["n"]}

    @v1.step(depends_on=[fetch])
    def report(deps, ctx):
        return deps["fetch"]["n"]

    v2 = pf.flow("halfway")

    @v2.step("fetch")
    def fetch2(input, ctx):
        return {"n": input["n"]}

    @v2.step(depends_on=["fetch"])
    def enrich(deps, ctx):
        return deps["fetch"]["n"] + 1

    @v2.step(depends_on=["enrich"])
    def report2(deps, ctx):
        return deps["enrich"]

    run = store.start(v1, {"n": 1})
    backend = store.backend
    (first,) = backend.claim("w", ["halfway"], 10, 30)
    assert first.step_slug == "fetch"
    backend.finish(
        [pf.store.TaskSuccess(first.id, first.attempt, '{"n": 1}', run.id, "fetch", False,
                              first.claim)], [],
    )
    if second_step == "running":
        (second,) = backend.claim("w", ["halfway"], 10, 30)
        assert second.step_slug == "report"
    halfway = store.get_run(run.id)
    assert halfway.status is pf.RunStatus.RUNNING
    assert [(s.slug, s.status) for s in halfway.steps] == [("fetch", "completed"),
                                                         ("report", "started")]

    with pytest.raises(pf.ShapeMismatch, match="unfinished"):
        store.register(v2)
    with pytest.raises(pf.ShapeMismatch):
        store.start(v2, {"n": 2})
    assert store.backend.get_definition("halfway") == v1.definition
    assert [r.id for r in store.runs(flow="halfway")] == [run.id]

    # Once that run has finished, the new shape is accepted.
    if second_step == "queued":
        (second,) = backend.claim("w", ["halfway"], 10, 30)
    backend.finish(
        [pf.store.TaskSuccess(second.id, second.attempt, "1", run.id, "report", False,
                              second.claim)], [],
    )
    assert store.get_run(run.id).output == {"report": 1}
    store.register(v2)
    assert store.backend.get_definition("halfway") == v2.definition


def test_a_process_holding_the_old_version_cannot_serve_it_over_a_changed_shape(tmp_path, clock):
    """Two stores on one file are two processes: one still has v1 loaded, the other deployed v2.

    Serving a flow object checks it against the stored definition, so the old process must be
    refused (ShapeMismatch) rather than run v2's tasks with v1's handlers and step graph, while
    a run of v2 has started. (A run that has not started would move back to v1's shape: serving
    v1 again is how a rollback deploys; see test_shape_changes.py.)
    """
    v1, v2 = _two_versions()
    with pf.connect(tmp_path / "shared.db", clock=clock) as old_proc, \
            pf.connect(tmp_path / "shared.db", clock=clock) as new_proc:
        first = old_proc.start(v1, {"n": 1})
        drain(old_proc, v1)
        assert old_proc.get_run(first.id).output == {"fetch": {"v": 1, "n": 1}}

        new_proc.register(v2)  # no unfinished runs: the shape may change
        run = new_proc.start(v2, {"n": 5})
        (task,) = new_proc.backend.claim("w", ["evolving"], 10, 30)
        with pytest.raises(pf.ShapeMismatch):
            drain(old_proc, v1)
        new_proc.backend.finish(
            [pf.store.TaskSuccess(task.id, task.attempt, '{"v": 2, "n": 5}', run.id, "fetch",
                                  False, task.claim)], [],
        )

        drain(new_proc, v2)
        done = new_proc.get_run(run.id)
        assert done.status is pf.RunStatus.COMPLETED, (done.status, done.steps)
        assert done.output == {"enrich": {"enriched": 6}}


def test_a_process_holding_the_old_version_cannot_start_it_over_a_changed_shape(tmp_path, clock):
    """Starting a flow object checks it against the stored definition: with v2 runs unfinished,
    a process still holding v1 gets ShapeMismatch instead of writing a v1-shaped run."""
    v1, v2 = _two_versions()
    with pf.connect(tmp_path / "shared.db", clock=clock) as old_proc, \
            pf.connect(tmp_path / "shared.db", clock=clock) as new_proc:
        drain(old_proc, v1)  # the old process has registered (and checked) v1
        old_proc.start(v1, {"n": 1})
        drain(old_proc, v1)

        new_proc.register(v2)
        current = new_proc.start(v2, {"n": 5})
        with pytest.raises(pf.ShapeMismatch):
            old_proc.start(v1, {"n": 2})
        assert [r.id for r in new_proc.runs(status="queued")] == [current.id]

        drain(new_proc, v2)
        assert new_proc.get_run(current.id).output == {"enrich": {"enriched": 6}}


def test_changed_options_update_the_stored_definition_and_reach_new_runs(store):
    attempts: list[int] = []

    def build(max_attempts: int) -> pf.Flow:
        flow = pf.flow("tunable", max_attempts=max_attempts, base_delay=10)

        @flow.step()
        def flaky(input, ctx):
            attempts.append(ctx.attempt)
            if ctx.attempt < 3:
                raise RuntimeError(f"attempt {ctx.attempt}")
            return {"attempt": ctx.attempt, "of": ctx.max_attempts}

        return flow

    v1, v2 = build(1), build(4)
    pending = store.start(v1, {})  # an unfinished run does not block an options change
    store.register(v2)
    stored = store.backend.get_definition("tunable")
    assert stored is not None
    assert stored.max_attempts == 4
    assert stored.shape() == v1.definition.shape()
    assert store.get_run(pending.id).status is pf.RunStatus.QUEUED
    store.cancel(pending.id)

    run = store.start(v2, {})
    drain(store, v2)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"flaky": {"attempt": 3, "of": 4}}
    assert attempts == [1, 2, 3]
    assert done.attempts == 3


# --- perform and per-step options --------------------------------------------------------------


def test_perform_and_perform_step_agree_with_the_runner(store):
    contexts: list[tuple[str, int | None, int, datetime | None]] = []
    flow = pf.flow("orders", max_attempts=2, timeout=30)

    @flow.step()
    def load(input, ctx):
        contexts.append(("load", ctx.task_index, ctx.max_attempts, ctx.deadline))
        return [{"id": i, "qty": q} for i, q in enumerate(input["qtys"])]

    @flow.map(array=load, max_attempts=5, timeout=7)
    def price(order, ctx):
        contexts.append(("price", ctx.task_index, ctx.max_attempts, ctx.deadline))
        if ctx.deadline is not None:
            # The step's own timeout (7 s), not the flow's 30 s, bounds the attempt.
            assert ctx.deadline <= datetime.now(timezone.utc) + timedelta(seconds=7)
        return {"id": order["id"], "total": order["qty"] * 3}

    @flow.step(depends_on=[price, load])
    def report(deps, ctx):
        contexts.append(("report", ctx.task_index, ctx.max_attempts, ctx.deadline))
        return {
            "orders": len(deps["load"]),
            "revenue": sum(p["total"] for p in deps["price"]),
        }

    flow_input = {"qtys": [2, 0, 5]}
    run = store.start(flow, flow_input)
    drain(store, flow)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"report": {"orders": 3, "revenue": 21}}
    runner_contexts = list(contexts)
    assert {(s, i, m) for s, i, m, _ in runner_contexts} == {
        ("load", None, 2), ("price", 0, 5), ("price", 1, 5), ("price", 2, 5), ("report", None, 2),
    }
    assert all(deadline is not None for *_, deadline in runner_contexts)

    contexts.clear()
    assert flow.perform(flow_input) == done.output
    assert {(s, i, m) for s, i, m, _ in contexts} == {(s, i, m) for s, i, m, _ in runner_contexts}

    loaded = done.step("load").output
    assert flow.perform_step("load", flow_input) == loaded
    assert flow.perform_step("price", loaded) == done.step("price").output
    deps = {"price": done.step("price").output, "load": loaded}
    assert flow.perform_step("report", deps) == done.output["report"]
    with pytest.raises(pf.PgflowError, match="expected an array"):
        flow.perform_step("price", {"not": "a list"})


# --- the ETL example ---------------------------------------------------------------------------


def test_etl_example_extracts_transforms_and_summarises(tmp_path, capsys, monkeypatch):
    path = Path(__file__).parent.parent / "examples" / "etl_flow.py"
    spec = importlib.util.spec_from_file_location("example_etl_flow", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # As an import registers it: its TypedDict's string annotations resolve in the module.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    run = module.main(str(tmp_path / "etl.db"))
    assert isinstance(run, pf.Run)
    assert run.status is pf.RunStatus.COMPLETED, run.error
    assert run.output == module.etl.perform(run.input)
    summary = run.output["summarize"]
    kept = [r for r in module.RECORDS if r["amount_cents"] > 0]
    assert summary["records"] == len(kept)
    assert summary["total"] == round(sum(r["amount_cents"] for r in kept) / 100, 2)
    assert run.step("transform").tasks and len(run.step("transform").tasks) == len(kept)
    out = capsys.readouterr().out
    assert "completed" in out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_many_random_dag_runs_at_once_match_the_reference(data: st.DataObject) -> None:
    # Many runs drained together: results reach the store in batches mixing runs and steps,
    # the path that completes steps and starts their dependents set-wise.
    specs = data.draw(dag_specs(), label="steps")
    inputs = data.draw(st.lists(flow_input_for(specs), min_size=2, max_size=8), label="inputs")
    failing = {"on": data.draw(st.booleans(), label="flaky")}
    flow = build_flow(specs, failing, [])

    with (
        tempfile.TemporaryDirectory() as tmp,
        pf.connect(os.path.join(tmp, "dags.db"), clock=FakeClock()) as store,
    ):
        runs = store.start_many(flow, inputs)
        drain(store, flow, concurrency=50)
        done = [store.get_run(run.id) for run in runs]

    for run, flow_input in zip(done, inputs, strict=True):
        expected, step_outputs = reference_output(specs, flow_input)
        assert run.status is pf.RunStatus.COMPLETED, run.error
        assert run.output == expected
        assert {s.slug: s.output for s in run.steps} == step_outputs
