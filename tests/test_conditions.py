"""Conditional steps and skips (pgflow 0.14): ``if_`` / ``if_not``, ``when_unmet``,
``when_exhausted``, the ``skipped`` status, ``store.wait(step=)``, and ``flow.perform`` agreeing
with the runner.

Most scenarios are pgflow's own SQL tests (pkgs/core/supabase/tests/ of pgflow-dev/pgflow)
restated against the Python API; each names the file it comes from. They run on SQLite, and on
PostgreSQL with ``$PGFLOW_TEST_POSTGRES`` set (the ``store`` fixture).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from _helpers import POSTGRES_URL, drain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgflow_py as pf
from pgflow_py.cli.runs import render_run
from pgflow_py.conditions import condition_met, contains
from pgflow_py.store import TaskFailure, TaskSuccess

PGFLOW = "pgflow-dev/pgflow pkgs/core/supabase/tests/"


def run_flow(store: pf.Store, flow: pf.Flow, input: Any) -> pf.Run:
    """Start ``flow`` on ``input``, serve it until idle, and read the run back."""
    run = store.start(flow, input)
    drain(store, flow)
    return store.get_run(run.id)


def steps_of(run: pf.Run) -> dict[str, tuple[str, str | None]]:
    return {s.slug: (s.status, s.skip_reason) for s in run.steps}


def agrees_with_perform(flow: pf.Flow, input: Any, run: pf.Run) -> None:
    """``flow.perform`` gives the run's output, or raises where the run failed."""
    if run.status == pf.RunStatus.COMPLETED:
        assert flow.perform(input) == run.output
    else:
        assert run.status == pf.RunStatus.FAILED
        with pytest.raises(Exception) as raised:
            flow.perform(input)
        assert str(raised.value).endswith(run.error.split(": ")[-1])


# --- containment (PostgreSQL's @>) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "pattern", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"a": [1, 2, 3]}, {"a": [3, 1]}, True),
        ({"a": [1, 2, 3]}, {"a": [4]}, False),
        ({"a": [1, 2]}, {"a": 1}, False),  # the scalar exception holds at the top level only
        ([1, 2], 1, True),
        ([[1]], [1], False),
        ([{"a": 1, "b": 2}], [{"a": 1}], True),
        ({"a": 1}, {"a": 1.0}, True),  # numbers compare by value
        ({"a": True}, {"a": 1}, False),  # never equal to booleans
        ({"a": None}, {"a": None}, True),
        ({"a": None}, {"a": False}, False),
        ({"a": "1"}, {"a": 1}, False),
        ({}, {}, True),
        ([1], {}, False),
        ("x", {}, False),
        ({"a": []}, {"a": []}, True),
        ({"a": [1]}, {"a": []}, True),
        ({"a": {}}, {"a": []}, False),
    ],
)
def test_containment_follows_postgres(value: Any, pattern: Any, expected: bool) -> None:
    assert contains(value, pattern) is expected


def test_numbers_compare_exactly_as_numeric_does() -> None:
    # 0.1 and 0.10000000000000001 are one double but two numerics.
    assert condition_met({"x": 0.1}, None, '{"x": 0.1}')
    assert not condition_met({"x": 0.1}, None, '{"x": 0.10000000000000001}')
    assert condition_met({"x": 1}, None, '{"x": 1.0}')
    assert contains({"x": Decimal("2.50")}, {"x": Decimal("2.5")})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.5, 1.0, -2.5])
    | st.sampled_from(["a", "b", ""]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.skipif(POSTGRES_URL is None, reason="compares with a PostgreSQL server's @>")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(json_values, json_values), min_size=1, max_size=40))
def test_containment_agrees_with_postgres_jsonb(pairs: list[tuple[Any, Any]]) -> None:
    import psycopg

    assert POSTGRES_URL is not None
    with psycopg.connect(POSTGRES_URL) as conn:
        for value, pattern in pairs:
            (expected,) = conn.execute(
                "SELECT %s::jsonb @> %s::jsonb", (json.dumps(value), json.dumps(pattern))
            ).fetchone()
            assert contains(value, pattern) is expected, (value, pattern)


# --- definitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"when_unmet": "ignore"}, "when_unmet must be one of 'fail', 'skip', 'skip-cascade'"),
        ({"when_exhausted": "skip_cascade"}, "when_exhausted must be one of"),
        ({"if_": ["a"]}, "if_ must be a JSON object pattern"),
        ({"if_not": "premium"}, "if_not must be a JSON object pattern"),
        ({"if_": {"at": object()}}, "if_ must be JSON"),
        ({"if_": {"x": float("nan")}}, "if_ must be JSON"),
        ({"if_": {"x": (1, 2)}}, "does not survive a JSON round trip"),
        ({"if_": {1: "a"}}, "does not survive a JSON round trip"),
    ],
)
def test_bad_condition_options_fail_at_decoration(options: dict[str, Any], message: str) -> None:
    def handler(input, ctx):
        return input

    f = pf.flow("bad_conditions")
    with pytest.raises(pf.DefinitionError, match=message) as raised:
        f.step(**options)(handler)
    assert "flow 'bad_conditions', step 'handler'" in str(raised.value)
    with pytest.raises(pf.DefinitionError, match=message):
        pf.job(queue="bad_job", **options)(handler)
    with pytest.raises(pf.DefinitionError, match=message):
        f.map(**options)(handler)


def test_condition_options_are_in_the_definition_and_its_json() -> None:
    f = pf.flow("cond_def")
    pattern = {"plan": "premium"}

    @f.step(if_=pattern, if_not={"banned": True}, when_unmet="fail", when_exhausted="skip")
    def a(input, ctx):
        return input

    pattern["plan"] = "changed later"  # the definition keeps what it was given
    step = f.definition.step("a")
    assert (step.if_, step.if_not, step.when_unmet, step.when_exhausted) == (
        {"plan": "premium"}, {"banned": True}, "fail", "skip"
    )
    assert pf.FlowDefinition.from_json(f.definition.to_json()) == f.definition
    plain = pf.flow("cond_plain")
    plain.step("plain")(lambda i, c: i)
    s = plain.definition.steps[0]
    assert (s.if_, s.if_not, s.when_unmet, s.when_exhausted) == (None, None, "skip", "fail")


def test_the_option_lists_cannot_drift() -> None:
    """Options are declared once (``FLOW_DEFAULTS``, ``STEP_DEFAULTS``); the keywords of
    ``pf.flow``, ``pf.job``, ``.step()`` and ``.map()``, the fields of the definitions and the
    ``TypedDict`` s must name the same options with the same defaults."""
    import inspect

    import attrs

    from pgflow_py.definition import (
        CONDITION_OPTIONS,
        FLOW_DEFAULTS,
        STEP_DEFAULTS,
        FlowOptions,
        StepOptions,
    )

    def keywords(fn: Any, *besides: str) -> dict[str, Any]:
        return {
            name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in besides
        }

    def fields(cls: Any, *besides: str) -> dict[str, Any]:
        return {f.name: f.default for f in attrs.fields(cls) if f.name not in besides}

    flow_options = dict(FLOW_DEFAULTS)
    step_options = dict(STEP_DEFAULTS)
    assert set(FlowOptions.__annotations__) == set(flow_options)
    assert set(StepOptions.__annotations__) == set(step_options)
    assert keywords(pf.flow, "on_failure", "on_dead") == flow_options
    assert keywords(pf.job, "queue", "on_failure", "on_dead", *CONDITION_OPTIONS) == flow_options
    assert keywords(pf.job, *flow_options, "queue", "on_failure", "on_dead") == {
        name: step_options[name] for name in CONDITION_OPTIONS
    }
    assert fields(pf.FlowDefinition, "slug", "steps", "kind") == flow_options
    assert keywords(pf.Flow.step, "depends_on") == step_options
    assert keywords(pf.Flow.map, "array") == step_options
    assert fields(pf.StepDefinition, "slug", "step_type", "depends_on", "handler") == step_options
    assert step_options["when_unmet"] == "skip" and step_options["when_exhausted"] == "fail"


def test_an_unknown_flow_option_is_refused() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_attempt'\]"):
        pf.Flow("typo", max_attempt=3)


def test_a_changed_condition_is_a_shape_change(store: pf.Store) -> None:
    def build(when_unmet: str) -> pf.Flow:
        f = pf.flow("cond_shape")

        @f.step(if_={"go": True}, when_unmet=when_unmet)  # type: ignore[arg-type]
        def a(input, ctx):
            return 1

        return f

    first = build("skip")
    run = store.start(first, {"go": True})
    store.backend.claim("w", ["cond_shape"], 10, 30)  # started: it blocks the change
    with pytest.raises(pf.ShapeMismatch, match="changed when_unmet from 'skip' to 'fail'"):
        store.register(build("fail"))
    store.cancel(run.id)
    store.register(build("fail"))  # nothing unfinished: the new shape is stored
    assert store.backend.get_definition("cond_shape").step("a").when_unmet == "fail"


# --- condition_evaluation/ ------------------------------------------------------------------------


def premium_flow(calls: list[str], **root: Any) -> pf.Flow:
    """checked (conditional root) -> after; plus other (always runs)."""
    f = pf.flow("cond_premium")

    @f.step(**root)
    def checked(input, ctx):
        calls.append("checked")
        return {"checked": input["value"]}

    @f.step()
    def other(input, ctx):
        calls.append("other")
        return "other"

    @f.step(depends_on=["checked"])
    def after(deps, ctx):
        calls.append("after")
        return sorted(deps)

    return f


def test_root_step_condition_met(store: pf.Store) -> None:
    """From condition_evaluation/root_step_condition_met.test.sql and
    no_condition_always_executes.test.sql."""
    calls: list[str] = []
    f = premium_flow(calls, if_={"enabled": True})
    run = run_flow(store, f, {"enabled": True, "value": 42})
    assert run.status == "completed"
    assert steps_of(run) == {
        "checked": ("completed", None), "other": ("completed", None), "after": ("completed", None)
    }
    assert run.output == {"other": "other", "after": ["checked"]}
    assert sorted(calls) == ["after", "checked", "other"]
    agrees_with_perform(f, {"enabled": True, "value": 42}, run)


def test_root_step_condition_unmet_skip(store: pf.Store) -> None:
    """From condition_evaluation/root_step_condition_unmet_skip.test.sql: the step is skipped
    (never reaches a worker), its dependent runs without it, the run completes."""
    calls: list[str] = []
    f = premium_flow(calls, if_={"enabled": True})
    run = run_flow(store, f, {"enabled": False, "value": 42})
    assert steps_of(run) == {
        "checked": ("skipped", "condition_unmet"), "other": ("completed", None),
        "after": ("completed", None),
    }
    assert run.step("checked").tasks == () and run.step("checked").output is None
    assert "checked" not in calls
    assert run.output == {"other": "other", "after": []}
    agrees_with_perform(f, {"enabled": False, "value": 42}, run)


def test_root_step_condition_unmet_skip_cascade(store: pf.Store) -> None:
    """From condition_evaluation/root_step_condition_unmet_skip_cascade.test.sql."""
    calls: list[str] = []
    f = premium_flow(calls, if_={"enabled": True}, when_unmet="skip-cascade")
    run = run_flow(store, f, {"enabled": False, "value": 1})
    assert steps_of(run) == {
        "checked": ("skipped", "condition_unmet"), "other": ("completed", None),
        "after": ("skipped", "dependency_skipped"),
    }
    assert calls == ["other"]
    assert run.status == "completed" and run.output == {"other": "other"}
    agrees_with_perform(f, {"enabled": False, "value": 1}, run)


def test_root_step_condition_unmet_fail(store: pf.Store) -> None:
    """From condition_evaluation/root_step_condition_unmet_fail.test.sql: the run fails with
    pgflow's message and no task is ever created for the step."""
    calls: list[str] = []
    f = premium_flow(calls, if_={"enabled": True}, when_unmet="fail")
    run = store.start(f, {"enabled": False, "value": 42})
    run = store.get_run(run.id)  # failed at start, before any runner
    assert run.status == "failed"
    assert run.error == "Condition not met"
    assert steps_of(run)["checked"] == ("failed", None)
    assert run.step("checked").error == "Condition not met"
    assert run.step("checked").tasks == ()
    assert run.step("other").status == "cancelled"
    drain(store, f)
    assert calls == []
    with pytest.raises(pf.PgflowError, match="Condition not met"):
        f.perform({"enabled": False, "value": 42})


@pytest.mark.parametrize(
    ("input", "expected"),
    [({"banned": True, "value": 1}, ("failed", None)), ({"banned": False, "value": 1}, None)],
)
def test_ifnot_root_step_fail_mode(store: pf.Store, input: Any, expected: Any) -> None:
    """From condition_evaluation/ifnot_root_step_pattern_matches_fail.test.sql and
    ifnot_root_step_pattern_not_matches.test.sql."""
    f = premium_flow([], if_not={"banned": True}, when_unmet="fail")
    run = run_flow(store, f, input)
    if expected is None:
        assert run.status == "completed" and run.step("checked").status == "completed"
    else:
        assert run.status == "failed" and steps_of(run)["checked"] == expected
    agrees_with_perform(f, input, run)


@pytest.mark.parametrize(
    ("mode", "after"), [("skip", ("completed", None)), ("skip-cascade", ("skipped", "dependency_skipped"))]
)
def test_ifnot_root_step_skip_modes(store: pf.Store, mode: str, after: Any) -> None:
    """From condition_evaluation/ifnot_root_step_skip.test.sql and
    ifnot_root_step_skip_cascade.test.sql."""
    f = premium_flow([], if_not={"banned": True}, when_unmet=mode)
    run = run_flow(store, f, {"banned": True, "value": 3})
    assert steps_of(run)["checked"] == ("skipped", "condition_unmet")
    assert steps_of(run)["after"] == after
    assert run.status == "completed"
    agrees_with_perform(f, {"banned": True, "value": 3}, run)


@pytest.mark.parametrize(
    ("input", "runs"),
    [
        ({"role": "admin", "suspended": False}, True),
        ({"role": "admin", "suspended": True}, False),  # if_ holds, if_not does not
        ({"role": "user", "suspended": False}, False),  # if_ fails
    ],
)
def test_combined_if_and_ifnot(store: pf.Store, input: Any, runs: bool) -> None:
    """From condition_evaluation/combined_if_and_ifnot.test.sql: both must hold."""
    f = pf.flow("cond_combined")

    @f.step(if_={"role": "admin"}, if_not={"suspended": True})
    def admin_action(input, ctx):
        return "done"

    run = run_flow(store, f, input)
    assert run.status == "completed"
    expected = ("completed", None) if runs else ("skipped", "condition_unmet")
    assert steps_of(run)["admin_action"] == expected
    assert run.output == ({"admin_action": "done"} if runs else None)
    agrees_with_perform(f, input, run)


def test_dependent_step_conditions(store: pf.Store) -> None:
    """From condition_evaluation/dependent_step_condition_met.test.sql and
    dependent_step_condition_unmet_skip.test.sql: a dependent step's pattern is matched
    against ``{dep: output}``."""
    f = pf.flow("cond_dependent")

    @f.step()
    def account(input, ctx):
        return {"plan": input["plan"]}

    @f.step(depends_on=["account"], if_={"account": {"plan": "premium"}})
    def premium(deps, ctx):
        return "perks"

    for plan, expected in (("premium", ("completed", None)), ("free", ("skipped", "condition_unmet"))):
        run = run_flow(store, f, {"plan": plan})
        assert run.status == "completed"
        assert steps_of(run)["premium"] == expected
        assert run.output == ({"premium": "perks"} if plan == "premium" else None)
        agrees_with_perform(f, {"plan": plan}, run)


def test_dependent_unmet_fail_cancels_the_rest(store: pf.Store) -> None:
    """From condition_evaluation/dependent_unmet_fail_archives_active_messages.test.sql: the run
    fails, the other queued tasks are cancelled and never run, and no on_dead hook is called
    (no handler failed)."""
    calls: list[str] = []
    dead: list[str] = []
    f = pf.flow("cond_dep_fail", on_dead=lambda ctx, err: dead.append(ctx.step_slug))

    @f.step()
    def first(input, ctx):
        return {"ok": False}

    @f.step(start_delay=60)
    def slow(input, ctx):
        calls.append("slow")

    @f.step(depends_on=["first"], if_={"first": {"ok": True}}, when_unmet="fail")
    def guarded(deps, ctx):
        calls.append("guarded")

    run = run_flow(store, f, {})
    assert run.status == "failed" and run.error == "Condition not met"
    assert steps_of(run)["guarded"] == ("failed", None)
    assert run.step("slow").status == "cancelled"
    assert [t.status for t in run.step("slow").tasks] == ["cancelled"]
    assert calls == [] and dead == []


def test_branching_opposite_conditions(store: pf.Store) -> None:
    """From condition_evaluation/branching_opposite_conditions.test.sql: one of two branches
    runs."""
    f = pf.flow("cond_branch")

    @f.step(if_={"tier": "pro"})
    def pro(input, ctx):
        return "pro"

    @f.step(if_not={"tier": "pro"})
    def basic(input, ctx):
        return "basic"

    for tier in ("pro", "free"):
        run = run_flow(store, f, {"tier": tier})
        assert run.output == {tier if tier == "pro" else "basic": "pro" if tier == "pro" else "basic"}
        skipped = "basic" if tier == "pro" else "pro"
        assert steps_of(run)[skipped] == ("skipped", "condition_unmet")
        agrees_with_perform(f, {"tier": tier}, run)


def test_ifnot_empty_object_detects_an_absent_dependency(store: pf.Store) -> None:
    """From condition_evaluation/ifnot_empty_object_absent_dep.test.sql: a fallback with
    ``if_not={dep: {}}`` runs exactly when its dependency was skipped."""
    f = pf.flow("cond_fallback")

    @f.step(if_={"run_dep": True})
    def skippable_dep(input, ctx):
        return {"value": 1}

    @f.step(depends_on=["skippable_dep"], if_not={"skippable_dep": {}})
    def fallback(deps, ctx):
        return {"deps": deps}

    run = run_flow(store, f, {"run_dep": False})
    assert steps_of(run) == {
        "skippable_dep": ("skipped", "condition_unmet"), "fallback": ("completed", None)
    }
    assert run.output == {"fallback": {"deps": {}}}
    run = run_flow(store, f, {"run_dep": True})
    assert steps_of(run)["fallback"] == ("skipped", "condition_unmet")
    assert run.output is None  # no leaf completed
    agrees_with_perform(f, {"run_dep": True}, run)
    agrees_with_perform(f, {"run_dep": False}, run_flow(store, f, {"run_dep": False}))


def test_skipped_deps_are_left_out_of_the_input(store: pf.Store) -> None:
    """From condition_evaluation/skipped_deps_excluded_from_input.test.sql,
    multi_parent_skip_decrements_remaining_deps.test.sql and
    multi_parent_skip_then_complete.test.sql: the key is missing, not null, and the step waits
    for its other parent."""
    seen: list[Any] = []
    f = pf.flow("cond_diamond")

    @f.step(if_={"enabled": True})
    def step_a(input, ctx):
        return "a"

    @f.step()
    def step_b(input, ctx):
        return {"data": "from_b"}

    @f.step(depends_on=["step_a", "step_b"])
    def step_c(deps, ctx):
        seen.append(deps)
        return len(deps)

    run = run_flow(store, f, {"enabled": False})
    assert seen == [{"step_b": {"data": "from_b"}}]
    assert run.output == {"step_c": 1}
    agrees_with_perform(f, {"enabled": False}, run)


def test_plain_skips_converge_through_a_chain(store: pf.Store) -> None:
    """From condition_evaluation/plain_skip_iterates_until_convergence.test.sql: a plain skip
    readies a dependent whose own condition then fails on the missing key, and so on."""
    f = pf.flow("cond_chain")

    @f.step(if_={"go": True})
    def a(input, ctx):
        return {"ok": True}

    @f.step(depends_on=["a"], if_={"a": {"ok": True}})
    def b(deps, ctx):
        return {"ok": True}

    @f.step(depends_on=["b"], if_={"b": {"ok": True}})
    def c(deps, ctx):
        return "c"

    @f.step(depends_on=["c"])
    def d(deps, ctx):
        return deps

    run = run_flow(store, f, {"go": False})
    assert steps_of(run) == {
        "a": ("skipped", "condition_unmet"), "b": ("skipped", "condition_unmet"),
        "c": ("skipped", "condition_unmet"), "d": ("completed", None),
    }
    assert run.output == {"d": {}}
    agrees_with_perform(f, {"go": False}, run)


def test_plain_skip_propagates_to_a_map(store: pf.Store) -> None:
    """From condition_evaluation/plain_skip_propagates_to_map.test.sql: the map runs over []
    and completes with []."""
    f = pf.flow("cond_skip_map")

    @f.step(if_={"enabled": True})
    def producer(input, ctx):
        return [1, 2, 3]

    @f.map(array="producer")
    def map_consumer(item, ctx):
        return item * 2

    run = run_flow(store, f, {"enabled": False})
    assert steps_of(run) == {
        "producer": ("skipped", "condition_unmet"), "map_consumer": ("completed", None)
    }
    assert run.step("map_consumer").output == [] and run.output == {"map_consumer": []}
    agrees_with_perform(f, {"enabled": False}, run)
    assert run_flow(store, f, {"enabled": True}).output == {"map_consumer": [2, 4, 6]}


def test_a_map_step_with_a_condition(store: pf.Store) -> None:
    """A map's pattern is matched against ``{array: output}``; a root map's against the flow
    input (an array, which an object pattern never matches)."""
    f = pf.flow("cond_map")

    @f.step()
    def items(input, ctx):
        return input["items"]

    @f.map(array="items", if_={"items": [2]})
    def doubled(item, ctx):
        return item * 2

    assert run_flow(store, f, {"items": [1, 2]}).output == {"doubled": [2, 4]}
    run = run_flow(store, f, {"items": [1, 3]})
    assert steps_of(run)["doubled"] == ("skipped", "condition_unmet")
    agrees_with_perform(f, {"items": [1, 3]}, run)


# --- _cascade_force_skip_steps/ ---------------------------------------------------------------------


def cascade_flow(calls: list[str]) -> pf.Flow:
    """a (skip-cascade when unmet) -> b -> c; a -> d; x -> d (diamond with a free parent);
    free (independent)."""
    f = pf.flow("cond_cascade")

    @f.step(if_={"go": True}, when_unmet="skip-cascade")
    def a(input, ctx):
        calls.append("a")
        return 1

    @f.step()
    def x(input, ctx):
        calls.append("x")
        return 2

    @f.step(depends_on=["a"])
    def b(deps, ctx):
        calls.append("b")
        return 3

    @f.step(depends_on=["b"])
    def c(deps, ctx):
        calls.append("c")
        return 4

    @f.step(depends_on=["a", "x"])
    def d(deps, ctx):
        calls.append("d")
        return 5

    @f.step()
    def free(input, ctx):
        calls.append("free")
        return 6

    return f


def test_cascade_through_levels_and_diamonds(store: pf.Store) -> None:
    """From _cascade_force_skip_steps/cascade_through_multiple_levels.test.sql,
    cascade_to_single_dependent.test.sql, multi_dependency_partial_skip.test.sql and
    archives_task_messages_for_skipped_steps.test.sql: every step below is skipped with
    dependency_skipped, a step with another (completed) parent too, and none reaches a worker."""
    calls: list[str] = []
    f = cascade_flow(calls)
    run = run_flow(store, f, {"go": False})
    assert steps_of(run) == {
        "a": ("skipped", "condition_unmet"), "x": ("completed", None),
        "b": ("skipped", "dependency_skipped"), "c": ("skipped", "dependency_skipped"),
        "d": ("skipped", "dependency_skipped"), "free": ("completed", None),
    }
    assert sorted(calls) == ["free", "x"]
    assert all(s.tasks == () for s in run.steps if s.status == "skipped")
    assert run.status == "completed" and run.output == {"free": 6}
    agrees_with_perform(f, {"go": False}, run)
    calls.clear()
    run = run_flow(store, f, {"go": True})
    assert run.output == {"c": 4, "d": 5, "free": 6}


def test_single_step_skip_completes_a_job(store: pf.Store) -> None:
    """From _cascade_force_skip_steps/single_step_skip.test.sql: a job whose one step is
    skipped completes with output None and keeps the reason."""
    calls: list[Any] = []

    @pf.job(queue="cond_job", if_={"send": True})
    def cond_job(input, ctx):
        calls.append(input)
        return "sent"

    run = run_flow(store, cond_job, {"send": False})
    assert run.status == "completed" and run.output is None
    assert steps_of(run) == {"cond_job": ("skipped", "condition_unmet")}
    assert calls == []
    assert cond_job.perform({"send": False}) is None
    assert run_flow(store, cond_job, {"send": True}).output == "sent"
    assert cond_job.perform({"send": True}) == "sent"


def test_a_job_whose_condition_fails_the_run(store: pf.Store) -> None:
    @pf.job(queue="cond_job_fail", if_not={"blocked": True}, when_unmet="fail")
    def cond_job_fail(input, ctx):
        return "ran"

    run = run_flow(store, cond_job_fail, {"blocked": True})
    assert run.status == "failed" and run.error == "Condition not met"
    assert steps_of(run) == {"cond_job_fail": ("failed", None)}
    with pytest.raises(pf.PgflowError, match="Condition not met"):
        cond_job_fail.perform({"blocked": True})


def test_late_results_of_a_skipped_step_change_nothing(store: pf.Store) -> None:
    """From _cascade_force_skip_steps/idempotent_second_call.test.sql and
    fail_task_when_exhausted/late_fail_after_skip_does_not_double_decrement_remaining_steps.test.sql
    and replayed_fail_task_skip_is_idempotent.test.sql: once a map step is skipped at its first
    exhausted task, its sibling's late success or failure, and a replayed failure, change
    nothing."""
    f = pf.flow("cond_late")

    @f.map(when_exhausted="skip")
    def items(item, ctx):
        return item

    @f.step(depends_on=["items"])
    def after(deps, ctx):
        return deps

    backend = store.backend
    run = store.start(f, [1, 2, 3])
    tasks = backend.claim("w", ["cond_late"], 10, 30.0)
    assert len(tasks) == 3
    first, second, third = sorted(tasks, key=lambda t: t.task_index or 0)
    backend.finish([], [TaskFailure(first.id, first.attempt, "E: boom", None, first.claim)])
    after_skip = store.get_run(run.id)
    assert steps_of(after_skip)["items"] == ("skipped", "handler_failed")
    assert after_skip.step("items").error == "E: boom"
    assert sorted(t.status for t in after_skip.step("items").tasks) == [
        "cancelled", "cancelled", "failed"
    ]
    # Late results of the cancelled siblings, and the same failure again.
    backend.finish(
        [TaskSuccess(second.id, second.attempt, "2", claim=second.claim)],
        [TaskFailure(third.id, third.attempt, "E: late", None, third.claim),
         TaskFailure(first.id, first.attempt, "E: boom", None, first.claim)],
    )
    assert store.get_run(run.id).steps == after_skip.steps
    drain(store, f)
    done = store.get_run(run.id)
    assert done.status == "completed" and done.output == {"after": {}}
    assert steps_of(done)["items"] == ("skipped", "handler_failed")


# --- cascade_complete_taskless_steps/ -------------------------------------------------------------


def test_taskless_steps_cascade(store: pf.Store) -> None:
    """From cascade_complete_taskless_steps/empty_root_map_cascade_events.test.sql,
    dependent_map_cascade_events.test.sql, deep_cascade_events.test.sql and
    mixed_cascade_events.test.sql: an empty root map completes at once, and so do the maps
    fed by it, down to the first step with a task."""
    f = pf.flow("cond_taskless")

    @f.map()
    def root_map(item, ctx):
        return item

    @f.map(array="root_map")
    def second_map(item, ctx):
        return item

    @f.map(array="second_map")
    def third_map(item, ctx):
        return item

    @f.step(depends_on=["third_map"])
    def summary(deps, ctx):
        return {"n": len(deps["third_map"])}

    run = store.start(f, [])
    run = store.get_run(run.id)
    assert [s.status for s in run.steps] == ["completed", "completed", "completed", "started"]
    drain(store, f)
    assert store.get_run(run.id).output == {"summary": {"n": 0}}
    assert f.perform([]) == {"summary": {"n": 0}}


def test_no_cascade_on_a_failed_run(store: pf.Store) -> None:
    """From cascade_complete_taskless_steps/no_cascade_on_failed_run.test.sql: once the run has
    failed, nothing below completes or starts."""
    f = pf.flow("cond_failed_run")

    @f.step()
    def boom(input, ctx):
        raise ValueError("no")

    @f.step(depends_on=["boom"])
    def after(deps, ctx):
        return 1

    run = run_flow(store, f, {})
    assert run.status == "failed"
    assert steps_of(run) == {"boom": ("failed", None), "after": ("cancelled", None)}


# --- fail_task_when_exhausted/ ----------------------------------------------------------------------


def exhausted_flow(mode: str, hooks: list[tuple[str, str, bool]] | None = None) -> pf.Flow:
    """parent (fails every attempt, when_exhausted=mode) -> child; parent -> mapped (a map over
    parent's output); other -> joined <- parent."""
    hooks = hooks if hooks is not None else []
    f = pf.flow(
        "cond_exhausted",
        on_failure=lambda ctx, err: hooks.append(("failure", ctx.step_slug, ctx.will_retry)),
        on_dead=lambda ctx, err: hooks.append(("dead", ctx.step_slug, ctx.will_retry)),
    )

    @f.step(max_attempts=3, when_exhausted=mode)  # type: ignore[arg-type]
    def parent(input, ctx):
        raise RuntimeError(f"attempt {ctx.attempt} failed")

    @f.step()
    def other(input, ctx):
        return "other"

    @f.step(depends_on=["parent"])
    def child(deps, ctx):
        return {"child_saw": deps}

    @f.map(array="parent")
    def mapped(item, ctx):
        return item

    @f.step(depends_on=["parent", "other"])
    def joined(deps, ctx):
        return sorted(deps)

    return f


def test_when_exhausted_fail_fails_the_run(store: pf.Store) -> None:
    """From fail_task_when_exhausted/when_exhausted_fail_marks_run_failed.test.sql."""
    hooks: list[tuple[str, str, bool]] = []
    f = exhausted_flow("fail", hooks)
    run = run_flow(store, f, {})
    assert run.status == "failed" and run.error == "RuntimeError: attempt 3 failed"
    assert steps_of(run)["parent"] == ("failed", None)
    assert ("dead", "parent", False) in hooks
    with pytest.raises(RuntimeError, match="attempt 1 failed"):
        f.perform({})


def test_when_exhausted_skip(store: pf.Store) -> None:
    """From fail_task_when_exhausted/when_exhausted_skip_skips_step.test.sql,
    skip_verifies_handler_failed_reason.test.sql, skip_decrements_remaining_deps.test.sql,
    skip_diamond_multiple_dependents.test.sql, skip_partial_deps_waits.test.sql,
    skip_propagates_to_map_step.test.sql and skip_then_taskless_map_starts_downstream.test.sql:
    after the last attempt the step is skipped with its last error, its dependents run without
    it (a map over []), and on_failure runs for every attempt while on_dead never does."""
    hooks: list[tuple[str, str, bool]] = []
    f = exhausted_flow("skip", hooks)
    run = run_flow(store, f, {})
    assert run.status == "completed" and run.error is None
    assert steps_of(run) == {
        "parent": ("skipped", "handler_failed"), "other": ("completed", None),
        "child": ("completed", None), "mapped": ("completed", None),
        "joined": ("completed", None),
    }
    parent = run.step("parent")
    assert parent.error == "RuntimeError: attempt 3 failed" and parent.attempts == 3
    assert [h.attempt for h in run.history] == [1, 2, 3]
    assert run.output == {"child": {"child_saw": {}}, "mapped": [], "joined": ["other"]}
    assert hooks == [("failure", "parent", True), ("failure", "parent", True),
                     ("failure", "parent", False)]
    assert f.perform({}) == run.output


def test_when_exhausted_skip_cascade(store: pf.Store) -> None:
    """From fail_task_when_exhausted/when_exhausted_skip_cascade_skips_dependents.test.sql."""
    hooks: list[tuple[str, str, bool]] = []
    f = exhausted_flow("skip-cascade", hooks)
    run = run_flow(store, f, {})
    assert run.status == "completed"
    assert steps_of(run) == {
        "parent": ("skipped", "handler_failed"), "other": ("completed", None),
        "child": ("skipped", "dependency_skipped"), "mapped": ("skipped", "dependency_skipped"),
        "joined": ("skipped", "dependency_skipped"),
    }
    assert run.output is None  # no leaf completed
    assert [h for h in hooks if h[0] == "dead"] == []
    assert f.perform({}) is None


def test_skip_only_step_completes_the_run(store: pf.Store) -> None:
    """From fail_task_when_exhausted/skip_only_step_completes_run.test.sql: a job skipped when
    exhausted completes with output None; its task keeps the failure."""
    dead: list[str] = []

    @pf.job(queue="cond_job_exhausted", max_attempts=2, when_exhausted="skip",
            on_dead=lambda ctx, err: dead.append("dead"))
    def cond_job_exhausted(input, ctx):
        raise pf.PermanentFailure("not today")

    run = run_flow(store, cond_job_exhausted, {})
    assert run.status == "completed" and run.output is None
    assert steps_of(run) == {"cond_job_exhausted": ("skipped", "handler_failed")}
    step = run.step("cond_job_exhausted")
    assert "not today" in (step.error or "")
    assert [t.status for t in step.tasks] == ["failed"]
    assert dead == []
    assert cond_job_exhausted.perform({}) is None


def test_exhausted_skip_resolves_the_childs_condition_before_it_starts(store: pf.Store) -> None:
    """From fail_task_when_exhausted/skip_resolves_dependent_conditions_before_start_fail_mode
    .test.sql and ..._skip_mode.test.sql."""
    for mode, status, child_state in (
        ("fail", "failed", ("failed", None)),
        ("skip", "completed", ("skipped", "condition_unmet")),
    ):
        f = pf.flow(f"cond_resolve_{mode}")

        @f.step(when_exhausted="skip")
        def parent(input, ctx):
            raise RuntimeError("handler failed")

        @f.step(depends_on=["parent"], if_={"parent": {"success": True}}, when_unmet=mode)  # type: ignore[arg-type]
        def child(deps, ctx):
            return "ran"

        run = run_flow(store, f, {})
        assert run.status == status
        assert steps_of(run)["child"] == child_state and run.step("child").tasks == ()
        agrees_with_perform(f, {}, run)


def test_a_type_violation_always_fails_the_run(store: pf.Store) -> None:
    """From fail_task_when_exhausted/type_violation_always_hard_fails.test.sql."""
    f = pf.flow("cond_type_violation")

    @f.step(when_exhausted="skip-cascade")
    def step_a(input, ctx):
        return "not_an_array"

    @f.map(array="step_a", when_exhausted="skip")
    def step_b(item, ctx):
        return item

    run = run_flow(store, f, {})
    assert run.status == "failed" and "expected an array" in (run.error or "")
    with pytest.raises(pf.PgflowError, match="expected an array"):
        f.perform({})


def test_a_failed_run_retried_keeps_its_skipped_steps(store: pf.Store) -> None:
    """``store.retry`` leaves a step skipped when exhausted as it is (its failed task is not
    queued again) and re-runs only what failed."""
    f = pf.flow("cond_retry")
    attempts: list[str] = []

    @f.step(when_exhausted="skip")
    def optional(input, ctx):
        attempts.append("optional")
        raise RuntimeError("optional failed")

    @f.step(depends_on=["optional"])
    def needed(deps, ctx):
        attempts.append("needed")
        if len(attempts) < 3:
            raise RuntimeError("needed failed")
        return deps

    run = run_flow(store, f, {})
    assert run.status == "failed" and steps_of(run)["optional"] == ("skipped", "handler_failed")
    store.retry(run.id)
    drain(store, f)
    run = store.get_run(run.id)
    assert run.status == "completed" and run.output == {"needed": {}}
    assert attempts == ["optional", "needed", "needed"]
    assert steps_of(run)["optional"] == ("skipped", "handler_failed")


# --- store.wait(step=) and pgflow show ------------------------------------------------------------


def test_wait_on_a_step(store: pf.Store) -> None:
    f = pf.flow("cond_wait")

    @f.step(if_={"go": True})
    def maybe(input, ctx):
        return 1

    @f.step(start_delay=3600)
    def later(input, ctx):
        return 2

    run = store.start(f, {"go": False})
    waited = store.wait(run.id, step="maybe", timeout=5)
    assert waited.step("maybe").status == "skipped" and waited.status == "scheduled"
    with pytest.raises(pf.WaitTimeout, match=r"step 'later' of run .* is still started"):
        store.wait(run.id, step="later", timeout=0.05)
    with pytest.raises(pf.InputError, match=r"has no step 'nope'.*\['maybe', 'later'\]"):
        store.wait(run.id, step="nope", timeout=1)
    store.cancel(run.id)
    assert store.wait(run.id, step="later", timeout=5).step("later").status == "cancelled"


def test_wait_on_a_step_while_a_runner_serves(store: pf.Store) -> None:
    import threading

    release = threading.Event()
    f = pf.flow("cond_wait_runner")

    @f.step()
    def quick(input, ctx):
        return "quick"

    @f.step()
    def slow(input, ctx):
        release.wait(10)
        return "slow"

    run = store.start(f, {})
    runner = threading.Thread(target=drain, args=(store, f), kwargs={"concurrency": 2})
    runner.start()
    try:
        waited = store.wait(run.id, step="quick", timeout=10)
        assert waited.step("quick").status == "completed" and waited.step("quick").output == "quick"
        assert waited.step("slow").status == "started"
    finally:
        release.set()
        runner.join(20)
    assert store.wait(run.id, timeout=10).output == {"quick": "quick", "slow": "slow"}


def test_pgflow_show_names_the_skip_reason(store: pf.Store) -> None:
    calls: list[str] = []
    run = run_flow(store, cascade_flow(calls), {"go": False})
    text = "\n".join(render_run(run))
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "skipped" in lines["a"] and "(condition_unmet)" in lines["a"]
    assert "(dependency_skipped)" in lines["c"]
    from pgflow_py.ops_json import run_to_json

    steps = {s["slug"]: s for s in run_to_json(run)["steps"]}
    assert steps["d"]["skip_reason"] == "dependency_skipped"


# --- random DAGs with random conditions: the runner agrees with perform -----------------------------


@st.composite
def conditional_dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 6))
    steps: list[dict[str, Any]] = []
    for i in range(n):
        earlier = [s["slug"] for s in steps]
        is_map = bool(earlier) and draw(st.booleans()) and draw(st.booleans())
        if is_map:
            deps = [draw(st.sampled_from(earlier))]
        else:
            deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        spec: dict[str, Any] = {
            "slug": f"s{i}", "deps": deps, "map": is_map,
            "fails": draw(st.booleans()) and draw(st.booleans()),
            "when_exhausted": draw(st.sampled_from(["fail", "skip", "skip-cascade"])),
            "when_unmet": draw(st.sampled_from(["fail", "skip", "skip", "skip-cascade"])),
            "if_": None, "if_not": None,
        }
        # Patterns over what the step sees: the flow input's flags, or deps' parities.
        subject = (
            {"flag": draw(st.booleans())} if not deps
            else {draw(st.sampled_from(deps)): {"odd": draw(st.booleans())}}
        )
        kind = draw(st.sampled_from(["none", "none", "if_", "if_not", "both"]))
        if kind in ("if_", "both"):
            spec["if_"] = subject
        if kind in ("if_not", "both"):
            spec["if_not"] = {draw(st.sampled_from(deps)): {}} if deps and draw(st.booleans()) else (
                {"other": True} if not deps else subject
            )
        steps.append(spec)
    return steps


def build_dag(specs: list[dict[str, Any]]) -> pf.Flow:
    f = pf.flow("cond_random")
    for spec in specs:
        def handler(value: Any, ctx: pf.Context, spec: dict[str, Any] = spec) -> Any:
            if spec["fails"]:
                raise RuntimeError(f"{spec['slug']} fails")
            n = len(json.dumps(value, sort_keys=True))
            if spec["slug"] in {d for s in specs for d in s["deps"] if s["map"]}:
                return list(range(n % 3))  # feeds a map: an array
            return {"odd": n % 2 == 1, "n": n}

        options = {k: spec[k] for k in ("if_", "if_not", "when_unmet", "when_exhausted")}
        if spec["map"]:
            f.map(spec["slug"], array=spec["deps"][0], **options)(handler)
        else:
            f.step(spec["slug"], depends_on=spec["deps"], **options)(handler)
    return f


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(specs=conditional_dags())
def test_random_conditional_dags_agree_with_perform(
    store: pf.Store, specs: list[dict[str, Any]]
) -> None:
    """Several runs at once (so results are applied in batches as well as one by one), each
    compared with ``perform`` on its input."""
    f = build_dag(specs)
    inputs = [{"flag": flag, "copy": i} for i in range(3) for flag in (True, False)]
    started = store.start_many(f, inputs)
    drain(store, f, concurrency=8)
    for input, started_run in zip(inputs, started, strict=True):
        run = store.get_run(started_run.id)
        assert run.status in ("completed", "failed")
        try:
            expected = f.perform(input)
        except (RuntimeError, pf.PgflowError):
            # Which failure fails the run first may differ (the runner runs branches at once).
            assert run.status == "failed", (specs, run)
            continue
        assert run.status == "completed", (specs, run.error)
        assert run.output == expected
        # Every step ended completed or skipped, each skip with a reason.
        for step in run.steps:
            assert step.status in ("completed", "skipped")
            assert (step.skip_reason is None) == (step.status == "completed")


def test_the_worked_example_of_the_docs_prints_what_they_show(tmp_path: Any) -> None:
    """docs/how-to/flows.md, "Conditional steps and skips": the example runs and prints the
    output shown under it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "how-to" / "flows.md").read_text(encoding="utf-8")
    section = page[page.index("## Conditional steps and skips"):]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, re.DOTALL)[:2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown


def test_a_job_failed_by_its_condition_can_be_retried_under_a_new_condition(
    store: pf.Store,
) -> None:
    def build(pattern: dict[str, Any]) -> pf.Job:
        @pf.job(queue="cond_job_retry", if_=pattern, when_unmet="fail")
        def cond_job_retry(input, ctx):
            return "ran"

        return cond_job_retry

    run = run_flow(store, build({"tier": "gold"}), {"tier": "silver"})
    assert run.status == "failed" and run.error == "Condition not met"
    store.retry(run.id)  # the same condition fails it again
    assert store.get_run(run.id).status == "failed"
    relaxed = build({"tier": "silver"})
    store.register(relaxed)
    store.retry(run.id)
    drain(store, relaxed)
    run = store.get_run(run.id)
    assert run.status == "completed" and run.output == "ran"
    assert steps_of(run) == {"cond_job_retry": ("completed", None)}


def test_a_map_task_exhausted_under_the_runner_skips_the_map(store: pf.Store) -> None:
    """From fail_task_when_exhausted/skip_archives_sibling_messages.test.sql, under a runner:
    the first task of a map to run out of attempts skips the map; its siblings still queued are
    cancelled and never run."""
    ran: list[int] = []
    f = pf.flow("cond_map_exhausted")

    @f.map(when_exhausted="skip", max_attempts=2)
    def items(item, ctx):
        ran.append(item)
        if item == 0:
            raise RuntimeError("item 0 is bad")
        return item

    @f.step(depends_on=["items"])
    def after(deps, ctx):
        return deps

    run = run_flow(store, f, [0, 1, 2])
    assert run.status == "completed" and run.output == {"after": {}}
    step = run.step("items")
    assert (step.status, step.skip_reason, step.error) == (
        "skipped", "handler_failed", "RuntimeError: item 0 is bad"
    )
    assert step.tasks[0].status == "failed" and step.tasks[0].attempts == 2
    assert all(t.status in ("completed", "cancelled") for t in step.tasks[1:])
    assert ran.count(0) == 2


def test_a_lost_workers_last_attempt_is_exhausted_too(store: pf.Store) -> None:
    """A task whose worker vanished on its last attempt counts as exhausted: when_exhausted
    applies as to a handler failure."""
    import time

    f = pf.flow("cond_lost")

    @f.step(when_exhausted="skip-cascade")
    def fragile(input, ctx):
        return 1

    @f.step(depends_on=["fragile"])
    def below(deps, ctx):
        return 2

    @f.step(start_delay=60)  # not due when the doomed worker claims
    def fine(input, ctx):
        return 3

    run = store.start(f, {})
    backend = store.backend
    claimed = backend.claim("gone", ["cond_lost"], 10, 0.01)
    assert [t.step_slug for t in claimed] == ["fragile"]
    time.sleep(0.05)
    assert backend.reclaim_expired(["cond_lost"]) == 1
    drain(store, f)
    run = store.get_run(run.id)
    assert steps_of(run) == {
        "fragile": ("skipped", "handler_failed"), "below": ("skipped", "dependency_skipped"),
        "fine": ("completed", None),
    }
    assert "lost" in (run.step("fragile").error or "").lower()
    assert run.status == "completed" and run.output == {"fine": 3}


def test_aperform_skips_an_async_handler_that_fails() -> None:
    import asyncio

    f = pf.flow("cond_async")

    @f.step(when_exhausted="skip")
    async def flaky(input, ctx):
        raise ConnectionError("down")

    @f.step(depends_on=["flaky"])
    async def after(deps, ctx):
        return {"deps": deps}

    assert asyncio.run(f.aperform({})) == {"after": {"deps": {}}}
    assert f.perform({}) == {"after": {"deps": {}}}
    with pytest.raises(ConnectionError):  # perform_step runs the handler itself
        f.perform_step("flaky", {})


# --- where the condition is evaluated ----------------------------------------------------------------

where_flow = pf.flow("cond_where")


@where_flow.step()
def where_account(input, ctx):
    return {"plan": input["plan"], "note": input.get("note", "")}


@where_flow.step(depends_on=["where_account"], if_={"where_account": {"plan": "premium"}})
def where_perks(deps, ctx):
    return "perks"


@where_flow.step(depends_on=["where_account"], if_not={"where_account": {"plan": "premium"}})
def where_upsell(deps, ctx):
    return "upsell"


@pytest.mark.skipif(POSTGRES_URL is None, reason="needs a PostgreSQL server")
def test_postgres_decides_conditions_with_its_own_containment(
    store: pf.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pgflow_py.store.sql.steps as steps

    def not_here(*args: Any) -> bool:
        raise AssertionError("the Python containment was used")

    monkeypatch.setattr(steps, "condition_met", not_here)
    premium = run_flow(store, where_flow, {"plan": "premium"})
    free = run_flow(store, where_flow, {"plan": "free"})
    assert premium.output == {"where_perks": "perks"}
    assert free.output == {"where_upsell": "upsell"}


def test_an_output_holding_a_nul_character_is_matched_too(store: pf.Store) -> None:
    # jsonb cannot hold U+0000: on PostgreSQL such a value is decided in Python, the same way.
    run = run_flow(store, where_flow, {"plan": "premium", "note": "a\x00b"})
    assert run.status is pf.RunStatus.COMPLETED
    assert run.output == {"where_perks": "perks"}
    assert steps_of(run)["where_upsell"] == ("skipped", "condition_unmet")
