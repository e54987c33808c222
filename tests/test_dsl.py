"""The decorators and in-process execution: @pf.job, @pf.perform, pf.flow().step/.map, perform."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import pgflow_py as pf

# --- @pf.job / @pf.perform: slugs and options ----------------------------------------------------


def test_job_with_options_and_named_perform() -> None:
    @pf.job(queue="send_email", max_attempts=3, base_delay=5, timeout=60)
    @pf.perform("send")
    def send_email(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
        return {"sent": True}

    assert isinstance(send_email, pf.Job)
    assert isinstance(send_email, pf.Flow)
    assert send_email.slug == "send_email"
    d = send_email.definition
    assert isinstance(d, pf.FlowDefinition)
    assert d.slug == "send_email"
    assert d.kind == "job"
    assert len(d.steps) == 1
    step = d.steps[0]
    assert isinstance(step, pf.StepDefinition)
    assert step.slug == "send"
    assert step.step_type == "single"
    assert step.depends_on == ()
    assert (d.max_attempts, d.base_delay, d.timeout) == (3, 5, 60)
    eff = d.effective("send")
    assert (eff.max_attempts, eff.base_delay, eff.timeout) == (3, 5, 60)


def test_job_extra_options_reach_the_definition() -> None:
    @pf.job(queue="j", backoff="fixed", max_delay=90, jitter=True)
    def j(input: Any, ctx: pf.Context) -> Any:
        return input

    d = j.definition
    assert (d.backoff, d.max_delay, d.jitter) == ("fixed", 90, True)


def test_job_defaults_are_pgflow_job_defaults() -> None:
    @pf.job(queue="j")
    def j(input: Any, ctx: pf.Context) -> Any:
        return input

    d = j.definition
    assert (d.max_attempts, d.base_delay, d.timeout) == (1, 1, 30)


def test_job_without_perform_uses_the_queue_as_step_slug() -> None:
    @pf.job(queue="send_email")
    def handler(input: Any, ctx: pf.Context) -> Any:
        return input

    assert handler.slug == "send_email"
    assert handler.definition.step_slugs == ("send_email",)


def test_perform_with_empty_parentheses_uses_the_queue() -> None:
    @pf.job(queue="send_email")
    @pf.perform()
    def handler(input: Any, ctx: pf.Context) -> Any:
        return input

    assert handler.definition.step_slugs == ("send_email",)


def test_bare_perform_uses_the_queue() -> None:
    @pf.job(queue="send_email")
    @pf.perform
    def handler(input: Any, ctx: pf.Context) -> Any:
        return input

    assert handler.definition.step_slugs == ("send_email",)
    assert handler.perform({"x": 1}) == {"x": 1}


def test_bare_job_uses_the_function_name() -> None:
    @pf.job
    def cleanup(input: Any, ctx: pf.Context) -> Any:
        return "done"

    assert isinstance(cleanup, pf.Job)
    assert cleanup.slug == "cleanup"
    assert cleanup.definition.step_slugs == ("cleanup",)
    assert cleanup.definition.kind == "job"
    assert cleanup.perform(None) == "done"


def test_bare_job_over_named_perform() -> None:
    @pf.job
    @pf.perform("work")
    def nightly(input: Any, ctx: pf.Context) -> Any:
        return ctx.step_slug

    assert nightly.slug == "nightly"
    assert nightly.definition.step_slugs == ("work",)
    assert nightly.perform(None) == "work"


def test_perform_placed_above_job_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="below @job"):

        @pf.perform("send")
        @pf.job(queue="send_email")
        def handler(input: Any, ctx: pf.Context) -> Any:
            return input


def test_job_applied_twice_is_refused() -> None:
    @pf.job(queue="a")
    def handler(input: Any, ctx: pf.Context) -> Any:
        return input

    with pytest.raises(pf.DefinitionError):
        pf.job(queue="b")(handler)


def test_job_on_a_non_callable_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="function"):
        pf.job(queue="j")(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["run", "bad name", "1x", "a" * 129])
def test_perform_name_is_validated(name: str) -> None:
    with pytest.raises(pf.DefinitionError):
        pf.perform(name)


def test_job_hooks_must_be_callable() -> None:
    with pytest.raises(pf.DefinitionError, match="on_failure"):
        pf.job(queue="j", on_failure="nope")(lambda i, c: i)  # type: ignore[arg-type]
    with pytest.raises(pf.DefinitionError, match="on_dead"):
        pf.flow("f", on_dead=3)  # type: ignore[arg-type]


def test_job_records_its_hooks() -> None:
    def on_failure(ctx: pf.Context, err: BaseException) -> None: ...
    def on_dead(ctx: pf.Context, err: BaseException) -> None: ...

    @pf.job(queue="j", on_failure=on_failure, on_dead=on_dead)
    def j(input: Any, ctx: pf.Context) -> Any:
        return input

    assert j.on_failure is on_failure
    assert j.on_dead is on_dead


# --- Job.perform / aperform ----------------------------------------------------------------------


def make_recording_job(**options: Any) -> tuple[pf.Job, list[pf.Context]]:
    seen: list[pf.Context] = []

    @pf.job(queue="send_email", **options)
    @pf.perform("send")
    def send_email(input: Any, ctx: pf.Context) -> Any:
        seen.append(ctx)
        return {"sent": True, "to": input["to"]}

    return send_email, seen


def test_perform_returns_the_handler_output() -> None:
    job, seen = make_recording_job()
    assert job.perform({"to": "a@b"}) == {"sent": True, "to": "a@b"}
    assert len(seen) == 1


@pytest.mark.parametrize("value", [False, 0, "", None, [], {}, 0.0, [1, "x", None]])
def test_job_output_is_returned_exactly_and_unwrapped(value: Any) -> None:
    @pf.job(queue="j")
    @pf.perform("step")
    def j(input: Any, ctx: pf.Context) -> Any:
        return value

    out = j.perform({})
    assert out == value
    assert type(out) is type(value)


def test_async_handler_is_run_to_completion() -> None:
    @pf.job(queue="async_job")
    async def async_job(input: Any, ctx: pf.Context) -> Any:
        await asyncio.sleep(0)
        return {"doubled": input * 2, "step": ctx.step_slug}

    assert async_job.perform(21) == {"doubled": 42, "step": "async_job"}


def test_perform_builds_a_test_context() -> None:
    job, seen = make_recording_job(max_attempts=4)
    data = {"to": "a@b"}
    job.perform(data)
    job.perform(data)
    ctx1, ctx2 = seen
    for ctx in (ctx1, ctx2):
        assert isinstance(ctx, pf.Context)
        assert ctx.attempt == 1
        assert ctx.max_attempts == 4
        assert ctx.flow_input == data
        assert ctx.flow_slug == "send_email"
        assert ctx.step_slug == "send"
        assert ctx.task_index is None
        assert isinstance(ctx.run_id, str)
        assert ctx.run_id
        assert ctx.logger is not None
    assert ctx1.run_id != ctx2.run_id


def test_perform_context_max_attempts_defaults_to_one() -> None:
    job, seen = make_recording_job()
    job.perform({"to": "x"})
    assert seen[0].max_attempts == 1


def test_perform_uses_a_given_context() -> None:
    job, seen = make_recording_job(max_attempts=3)
    mailer = object()
    given = pf.Context(
        run_id="run-123",
        flow_slug="send_email",
        step_slug="send",
        attempt=2,
        max_attempts=3,
        flow_input={"to": "a@b"},
        resources={"mailer": mailer},
    )
    job.perform({"to": "a@b"}, ctx=given)
    (ctx,) = seen
    assert ctx.run_id == "run-123"
    assert ctx.attempt == 2
    assert ctx.max_attempts == 3
    assert ctx.resources["mailer"] is mailer
    assert ctx.flow_input == {"to": "a@b"}


def test_perform_passes_ctx_positionally_too() -> None:
    job, seen = make_recording_job()
    given = pf.Context(run_id="r", flow_slug="send_email", step_slug="send", attempt=5,
                       max_attempts=1)
    job.perform({"to": "z"}, given)
    assert seen[0].run_id == "r"
    assert seen[0].attempt == 5


@pytest.mark.parametrize("is_async", [False, True])
def test_handler_exceptions_propagate_unchanged(is_async: bool) -> None:
    error = KeyError("missing")

    if is_async:

        async def handler(input: Any, ctx: pf.Context) -> Any:
            raise error

    else:

        def handler(input: Any, ctx: pf.Context) -> Any:
            raise error

    j = pf.job(queue="failing")(handler)
    with pytest.raises(KeyError) as info:
        j.perform({})
    assert info.value is error


def test_control_flow_exceptions_propagate_from_perform() -> None:
    @pf.job(queue="j")
    def j(input: Any, ctx: pf.Context) -> Any:
        if input == "retry":
            raise pf.Retry(delay=30)
        raise pf.PermanentFailure("bad input")

    with pytest.raises(pf.Retry) as info:
        j.perform("retry")
    assert info.value.delay == 30
    with pytest.raises(pf.PermanentFailure, match="bad input"):
        j.perform("other")


def test_perform_of_sync_handlers_works_inside_a_running_loop() -> None:
    # perform calls a sync handler directly, in this thread, as the contract says.
    job, seen = make_recording_job()
    f = pf.flow("f")
    f.step("a")(lambda i, c: i + 1)

    async def main() -> None:
        assert job.perform({"to": "a"}) == {"sent": True, "to": "a"}
        assert f.perform(1) == {"a": 2}
        assert f.perform_step("a", 1) == 2

    asyncio.run(main())
    assert len(seen) == 1


def test_perform_of_an_async_handler_inside_a_running_loop_points_at_aperform() -> None:
    ran: list[int] = []

    @pf.job(queue="async_in_loop")
    async def async_in_loop(input: Any, ctx: pf.Context) -> Any:
        ran.append(input)
        return input

    async def main() -> None:
        with pytest.raises(RuntimeError, match="aperform"):
            async_in_loop.perform(1)
        assert await async_in_loop.aperform(2) == 2

    asyncio.run(main())
    assert ran == [2]  # the handler did not run for perform


def test_perform_of_a_sync_handler_that_runs_its_own_event_loop() -> None:
    @pf.job(queue="own_loop")
    def own_loop(input: Any, ctx: pf.Context) -> Any:
        async def inner() -> int:
            return input * 2

        return asyncio.run(inner())

    assert own_loop.perform(21) == 42


def test_aperform_inside_an_event_loop() -> None:
    @pf.job(queue="j")
    async def j(input: Any, ctx: pf.Context) -> Any:
        await asyncio.sleep(0)
        return {"got": input, "attempt": ctx.attempt}

    @pf.job(queue="s")
    def s(input: Any, ctx: pf.Context) -> Any:
        return input + 1

    async def main() -> tuple[Any, Any]:
        return await j.aperform("x"), await s.aperform(1)

    assert asyncio.run(main()) == ({"got": "x", "attempt": 1}, 2)


def test_calling_the_job_is_the_plain_function_call() -> None:
    calls: list[tuple[Any, Any]] = []

    @pf.job(queue="send_email")
    def send_email(input: Any, ctx: Any) -> Any:
        calls.append((input, ctx))
        return "plain"

    sentinel = object()
    assert send_email({"to": "a"}, sentinel) == "plain"
    assert calls == [({"to": "a"}, sentinel)]


def test_job_keeps_the_function_and_its_docstring() -> None:
    def send_email(input: Any, ctx: pf.Context) -> Any:
        """Send one email."""
        return input

    j = pf.job(queue="q")(send_email)
    assert j.fn is send_email
    assert j.__wrapped__ is send_email
    assert j.__doc__ == "Send one email."


# --- pf.flow: building ---------------------------------------------------------------------------


def test_flow_options_and_defaults() -> None:
    f = pf.flow("analyze_website", max_attempts=3, base_delay=1, timeout=30)
    f.step()(lambda_free_root)
    d = f.definition
    assert d.kind == "flow"
    assert (d.max_attempts, d.base_delay, d.timeout) == (3, 1, 30)
    g = pf.flow("g")
    g.step("s")(lambda_free_root)
    assert (g.definition.max_attempts, g.definition.base_delay, g.definition.timeout) == (1, 1, 30)


def lambda_free_root(input: Any, ctx: pf.Context) -> Any:
    return input


def test_step_slug_is_the_function_name_unless_given() -> None:
    f = pf.flow("f")

    @f.step()
    def website(input: Any, ctx: pf.Context) -> Any:
        return input

    @f.step("custom", depends_on=["website"])
    def summary(deps: Any, ctx: pf.Context) -> Any:
        return deps

    @f.map(array="website")
    def pages(item: Any, ctx: pf.Context) -> Any:
        return item

    assert isinstance(website, pf.Step)
    assert (website.slug, summary.slug, pages.slug) == ("website", "custom", "pages")
    assert f.definition.step_slugs == ("website", "custom", "pages")


def test_step_without_parentheses_is_refused() -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match="parentheses"):

        @f.step  # type: ignore[arg-type]
        def a(input: Any, ctx: pf.Context) -> Any:
            return input

    with pytest.raises(pf.DefinitionError, match="parentheses"):

        @f.map  # type: ignore[arg-type]
        def b(input: Any, ctx: pf.Context) -> Any:
            return input


def test_calling_a_step_is_the_plain_function_call() -> None:
    f = pf.flow("f")

    @f.step()
    def double(input: Any, ctx: Any) -> Any:
        return input * 2

    assert double(4, None) == 8
    assert double.fn(5, None) == 10


def test_depends_on_accepts_slugs_step_objects_and_a_single_value() -> None:
    f = pf.flow("f")
    a = f.step("a")(lambda_free_root)
    b = f.step("b")(lambda_free_root)
    f.step("by_slug", depends_on=["a", "b"])(lambda_free_root)
    f.step("by_object", depends_on=[a, b])(lambda_free_root)
    f.step("mixed", depends_on=(a, "b"))(lambda_free_root)
    f.step("single_slug", depends_on="a")(lambda_free_root)
    f.step("single_object", depends_on=b)(lambda_free_root)
    f.map("map_by_object", array=a)(lambda_free_root)
    f.map("map_by_slug", array="b")(lambda_free_root)
    d = f.definition
    assert d.step("by_slug").depends_on == ("a", "b")
    assert d.step("by_object").depends_on == ("a", "b")
    assert d.step("mixed").depends_on == ("a", "b")
    assert d.step("single_slug").depends_on == ("a",)
    assert d.step("single_object").depends_on == ("b",)
    assert d.step("map_by_object").depends_on == ("a",)
    assert d.step("map_by_slug").depends_on == ("b",)
    assert d.step("map_by_slug").step_type == "map"


def test_depends_on_rejects_other_values() -> None:
    f = pf.flow("f")
    f.step("a")(lambda_free_root)
    with pytest.raises(pf.DefinitionError, match="depends_on"):
        f.step("b", depends_on=[42])(lambda_free_root)  # type: ignore[list-item]


def test_flow_definition_requires_a_step() -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match="no steps"):
        f.definition  # noqa: B018


def test_step_options_are_recorded() -> None:
    f = pf.flow("f", max_attempts=2)
    f.step("a", max_attempts=5, base_delay=3, timeout=7, start_delay=11)(lambda_free_root)
    s = f.definition.step("a")
    assert (s.max_attempts, s.base_delay, s.timeout, s.start_delay) == (5, 3, 7, 11)


# --- pf.flow: perform ----------------------------------------------------------------------------


def build_analyze() -> tuple[pf.Flow, list[tuple[str, Any, pf.Context]]]:
    calls: list[tuple[str, Any, pf.Context]] = []
    analyze = pf.flow("analyze_website", max_attempts=3)

    @analyze.step()
    def website(input: Any, ctx: pf.Context) -> Any:
        calls.append(("website", input, ctx))
        return [f"{input['url']}/a", f"{input['url']}/b", f"{input['url']}/c"]

    @analyze.map(array=website, max_attempts=5)
    def pages(item: Any, ctx: pf.Context) -> Any:
        calls.append(("pages", item, ctx))
        return len(item)

    @analyze.step(depends_on=[website])
    async def count(deps: Any, ctx: pf.Context) -> Any:
        calls.append(("count", deps, ctx))
        await asyncio.sleep(0)
        return len(deps["website"])

    @analyze.step(depends_on=[pages, "count"])
    def summary(deps: Any, ctx: pf.Context) -> Any:
        calls.append(("summary", deps, ctx))
        return {"total": sum(deps["pages"]), "count": deps["count"]}

    return analyze, calls


def test_flow_perform_runs_the_dag() -> None:
    analyze, calls = build_analyze()
    data = {"url": "http://x"}
    out = analyze.perform(data)
    assert out == {"summary": {"total": 3 * len("http://x/a"), "count": 3}}

    by_step: dict[str, list[tuple[Any, pf.Context]]] = {}
    for slug, value, ctx in calls:
        by_step.setdefault(slug, []).append((value, ctx))
    # Root gets the flow input; a single step gets {dep: output}; map tasks get elements in order.
    assert [v for v, _ in by_step["website"]] == [data]
    assert [v for v, _ in by_step["pages"]] == ["http://x/a", "http://x/b", "http://x/c"]
    assert [c.task_index for _, c in by_step["pages"]] == [0, 1, 2]
    assert by_step["count"][0][0] == {"website": ["http://x/a", "http://x/b", "http://x/c"]}
    assert by_step["summary"][0][0] == {"pages": [10, 10, 10], "count": 3}
    # Every step sees the flow input and its effective max_attempts.
    for slug, _, ctx in calls:
        assert ctx.flow_input == data
        assert ctx.flow_slug == "analyze_website"
        assert ctx.step_slug == slug
        assert ctx.attempt == 1
        assert ctx.max_attempts == (5 if slug == "pages" else 3)
    # Dependencies ran before dependents.
    order = [slug for slug, _, _ in calls]
    assert order.index("website") < order.index("pages") < order.index("summary")
    assert order.index("count") < order.index("summary")


def test_flow_perform_diamond() -> None:
    f = pf.flow("diamond")

    @f.step()
    def a(input: Any, ctx: pf.Context) -> Any:
        return input + 1

    @f.step(depends_on=[a])
    def b(deps: Any, ctx: pf.Context) -> Any:
        return deps["a"] * 10

    @f.step(depends_on=["a"])
    async def c(deps: Any, ctx: pf.Context) -> Any:
        return deps["a"] * 100

    @f.step(depends_on=[b, c])
    def d(deps: Any, ctx: pf.Context) -> Any:
        return {"deps": deps, "input": ctx.flow_input}

    assert f.perform(1) == {"d": {"deps": {"b": 20, "c": 200}, "input": 1}}


def test_run_output_has_every_leaf_and_only_leaves() -> None:
    f = pf.flow("leaves")
    f.step("root")(lambda i, c: i)
    f.step("left", depends_on=["root"])(lambda d, c: ("left", d["root"]))
    f.step("right", depends_on=["root"])(lambda d, c: None)
    f.step("other_root")(lambda i, c: False)
    # The tuple comes back as the list the runtime stores.
    assert f.perform(7) == {"left": ["left", 7], "right": None, "other_root": False}


def test_single_step_flow_output_is_wrapped_but_job_output_is_not() -> None:
    f = pf.flow("one")
    f.step("only")(lambda i, c: {"v": i})
    assert f.perform(1) == {"only": {"v": 1}}

    @pf.job(queue="one_job")
    @pf.perform("only")
    def j(input: Any, ctx: pf.Context) -> Any:
        return {"v": input}

    assert j.perform(1) == {"v": 1}


def test_root_map_over_the_flow_input() -> None:
    f = pf.flow("squares")
    indexes: list[int | None] = []

    @f.map()
    def square(item: Any, ctx: pf.Context) -> Any:
        indexes.append(ctx.task_index)
        assert ctx.flow_input == [1, 2, 3, 4]
        return item * item

    @f.step(depends_on=[square])
    def total(deps: Any, ctx: pf.Context) -> Any:
        return sum(deps["square"])

    assert f.definition.step("square").depends_on == ()
    assert f.perform([1, 2, 3, 4]) == {"total": 30}
    assert indexes == [0, 1, 2, 3]


def test_root_map_output_keeps_task_order() -> None:
    f = pf.flow("m")

    @f.map()
    async def echo(item: Any, ctx: pf.Context) -> Any:
        await asyncio.sleep(0)
        return {"i": ctx.task_index, "item": item}

    items = ["c", "a", "b", "a"]
    assert f.perform(items) == {"echo": [{"i": i, "item": x} for i, x in enumerate(items)]}


def test_map_over_an_empty_array_completes_with_empty_list() -> None:
    f = pf.flow("empty")
    calls: list[Any] = []
    f.step("src")(lambda i, c: [])
    f.map("each", array="src")(lambda item, c: calls.append(item))
    f.step("after", depends_on=["each"])(lambda d, c: d)
    assert f.perform(None) == {"after": {"each": []}}
    assert calls == []


@pytest.mark.parametrize("bad", [{"a": 1}, "abc", 5, None])
def test_root_map_with_non_list_input_is_an_input_error(bad: Any) -> None:
    f = pf.flow("m")
    calls: list[Any] = []
    f.map("each")(lambda item, c: calls.append(item))
    with pytest.raises(pf.InputError, match="array") as info:
        f.perform(bad)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pf.PgflowError)
    assert calls == []


def test_root_map_over_a_tuple_is_accepted_as_by_store_start() -> None:
    f = pf.flow("m")
    f.map("each")(lambda item, c: item * 2)
    assert f.perform((1, 2)) == {"each": [2, 4]}


def test_root_map_input_is_checked_before_any_step_runs() -> None:
    f = pf.flow("m")
    calls: list[str] = []
    f.step("first")(lambda i, c: calls.append("first"))
    f.map("each")(lambda item, c: calls.append("each"))
    with pytest.raises(pf.InputError):
        f.perform({"not": "a list"})
    assert calls == []


def test_map_over_a_non_array_output_fails_saying_an_array_was_expected() -> None:
    f = pf.flow("m")
    f.step("src")(lambda i, c: {"not": "a list"})
    f.map("each", array="src")(lambda item, c: item)
    with pytest.raises(pf.PgflowError, match="array"):
        f.perform(None)


def test_flow_perform_propagates_the_step_exception_unchanged() -> None:
    error = RuntimeError("step b broke")
    calls: list[str] = []
    f = pf.flow("f")
    f.step("a")(lambda i, c: calls.append("a"))

    @f.step(depends_on=["a"])
    def b(deps: Any, ctx: pf.Context) -> Any:
        raise error

    f.step("c", depends_on=["b"])(lambda d, c: calls.append("c"))
    with pytest.raises(RuntimeError) as info:
        f.perform(None)
    assert info.value is error
    assert calls == ["a"]


def test_flow_perform_with_a_given_context() -> None:
    seen: list[pf.Context] = []
    f = pf.flow("f", max_attempts=2)
    f.step("a")(lambda i, c: seen.append(c) or i)
    f.step("b", depends_on=["a"])(lambda d, c: seen.append(c) or d)
    res = {"db": object()}
    given = pf.Context(run_id="r-9", flow_slug="f", step_slug="a", resources=res)
    assert f.perform(3, ctx=given) == {"b": {"a": 3}}
    assert [c.run_id for c in seen] == ["r-9", "r-9"]
    assert [c.step_slug for c in seen] == ["a", "b"]
    assert all(c.resources["db"] is res["db"] for c in seen)
    assert all(c.flow_input == 3 for c in seen)


def test_flow_perform_without_context_uses_one_fresh_run_id_per_run() -> None:
    # Same semantics as the runtime: every step and map task of one run sees the run's id.
    seen: list[pf.Context] = []
    f = pf.flow("f")
    f.step("a")(lambda i, c: seen.append(c) or [1, 2])
    f.map("m", array="a")(lambda item, c: seen.append(c))
    f.step("z", depends_on=["a"])(lambda d, c: seen.append(c))
    f.perform(None)
    first = {c.run_id for c in seen}
    seen.clear()
    f.perform(None)
    second = {c.run_id for c in seen}
    assert all(isinstance(r, str) and r for r in first | second)
    assert len(first) == 1, f"one run, several run ids: {sorted(first)}"
    assert len(second) == 1
    assert first != second


def test_aperform_of_a_flow_inside_an_event_loop() -> None:
    f = pf.flow("f")

    @f.step()
    async def a(input: Any, ctx: pf.Context) -> Any:
        await asyncio.sleep(0)
        return input * 2

    f.map("m", array=None)(lambda item, c: item)

    async def main() -> Any:
        return await f.aperform([1, 2])

    assert asyncio.run(main()) == {"a": [1, 2, 1, 2], "m": [1, 2]}


# --- perform_step --------------------------------------------------------------------------------


def test_perform_step_runs_one_step() -> None:
    analyze, calls = build_analyze()
    out = analyze.perform_step("summary", {"pages": [1, 2], "count": 2})
    assert out == {"total": 3, "count": 2}
    assert [c[0] for c in calls] == ["summary"]
    ctx = calls[0][2]
    assert ctx.step_slug == "summary"
    assert ctx.max_attempts == 3
    assert ctx.attempt == 1


def test_perform_step_of_a_root_step_gets_the_flow_input() -> None:
    analyze, calls = build_analyze()
    out = analyze.perform_step("website", {"url": "u"})
    assert out == ["u/a", "u/b", "u/c"]
    assert calls[0][2].flow_input == {"url": "u"}


def test_perform_step_of_an_async_step() -> None:
    analyze, _ = build_analyze()
    assert analyze.perform_step("count", {"website": [1, 2, 3, 4]}) == 4


def test_perform_step_of_a_map_step_runs_each_element() -> None:
    analyze, calls = build_analyze()
    assert analyze.perform_step("pages", ["ab", "abc"]) == [2, 3]
    assert [c[1] for c in calls] == ["ab", "abc"]
    assert [c[2].task_index for c in calls] == [0, 1]
    assert [c[2].max_attempts for c in calls] == [5, 5]


def test_perform_step_uses_a_given_context() -> None:
    analyze, calls = build_analyze()
    given = pf.Context(
        run_id="r1", flow_slug="analyze_website", step_slug="count", attempt=3,
        max_attempts=3, flow_input={"url": "orig"},
    )
    analyze.perform_step("count", {"website": []}, ctx=given)
    ctx = calls[0][2]
    assert (ctx.run_id, ctx.attempt) == ("r1", 3)
    assert ctx.flow_input == {"url": "orig"}


def test_perform_step_exception_propagates_unchanged() -> None:
    error = ValueError("nope")
    f = pf.flow("f")

    @f.step()
    def a(input: Any, ctx: pf.Context) -> Any:
        raise error

    with pytest.raises(ValueError) as info:
        f.perform_step("a", 1)
    assert info.value is error
