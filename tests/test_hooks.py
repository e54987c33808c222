"""Failure hooks: ``on_failure(ctx, error)`` after every failed attempt, ``on_dead(ctx, error)`` once
when a run fails for good; on jobs and on flows, sync or async; a raising hook changes nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf


class Recorder:
    """Hooks that record (kind, ctx, error) in call order; thread-safe (sync hooks run in threads)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, pf.Context, BaseException]] = []
        self._lock = threading.Lock()

    def on_failure(self, ctx: pf.Context, error: BaseException) -> None:
        with self._lock:
            self.calls.append(("failure", ctx, error))

    def on_dead(self, ctx: pf.Context, error: BaseException) -> None:
        with self._lock:
            self.calls.append(("dead", ctx, error))

    def summary(self) -> list[tuple[str, int, int, bool]]:
        return [(kind, c.attempt, c.max_attempts, c.will_retry) for kind, c, _ in self.calls]

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.calls]


# --- jobs: counts and order ---------------------------------------------------------------------


def test_three_attempts_ending_in_success_call_on_failure_twice_and_never_on_dead(store):
    hooks = Recorder()
    raised: list[BaseException] = []

    @pf.job(queue="flaky", max_attempts=3, base_delay=10,
            on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    def flaky(input, ctx):
        if ctx.attempt < 3:
            exc = RuntimeError(f"attempt {ctx.attempt} broke")
            raised.append(exc)
            raise exc
        return "fine"

    run = store.start(flaky, {"id": 7})
    drain(store, flaky)

    assert hooks.summary() == [("failure", 1, 3, True), ("failure", 2, 3, True)]
    # The hook gets the very exception the handler raised.
    assert [err for _, _, err in hooks.calls] == raised
    for _, ctx, _ in hooks.calls:
        assert ctx.run_id == run.id
        assert (ctx.flow_slug, ctx.step_slug, ctx.task_index) == ("flaky", "flaky", None)
        assert ctx.flow_input == {"id": 7}
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == "fine"


def test_three_attempts_ending_in_failure_call_on_failure_three_times_then_on_dead_once(store):
    hooks = Recorder()
    raised: list[BaseException] = []

    @pf.job(queue="doomed", max_attempts=3, base_delay=10,
            on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    def doomed(input, ctx):
        exc = ValueError(f"bad {ctx.attempt}")
        raised.append(exc)
        raise exc

    run = store.start(doomed)
    drain(store, doomed)

    assert hooks.summary() == [
        ("failure", 1, 3, True),
        ("failure", 2, 3, True),
        ("failure", 3, 3, False),
        ("dead", 3, 3, False),
    ]
    assert [err for _, _, err in hooks.calls] == [*raised, raised[-1]]
    assert {ctx.run_id for _, ctx, _ in hooks.calls} == {run.id}
    assert all(ctx.step_slug == "doomed" for _, ctx, _ in hooks.calls)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "ValueError: bad 3"


def test_a_job_that_succeeds_calls_no_hook(store):
    hooks = Recorder()

    @pf.job(queue="fine", max_attempts=3, on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    def fine(input, ctx):
        return input

    store.start_many(fine, [1, 2, 3])
    assert drain(store, fine).completed == 3
    assert hooks.calls == []


def test_permanent_failure_calls_on_failure_without_retry_and_on_dead_once(store):
    hooks = Recorder()
    attempts: list[int] = []

    @pf.job(queue="perm", max_attempts=5, on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    def perm(input, ctx):
        attempts.append(ctx.attempt)
        raise pf.PermanentFailure("address does not exist")

    run = store.start(perm)
    drain(store, perm)

    assert attempts == [1]
    assert hooks.summary() == [("failure", 1, 5, False), ("dead", 1, 5, False)]
    assert all(isinstance(err, pf.PermanentFailure) for _, _, err in hooks.calls)
    assert all(ctx.run_id == run.id for _, ctx, _ in hooks.calls)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED


def test_retry_exception_on_the_last_attempt_is_dead(store):
    hooks = Recorder()

    @pf.job(queue="later", max_attempts=2, on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    def later(input, ctx):
        raise pf.Retry(delay=5, reason="not ready")

    run = store.start(later)
    drain(store, later)
    assert hooks.summary() == [("failure", 1, 2, True), ("failure", 2, 2, False), ("dead", 2, 2, False)]
    assert store.get_run(run.id).status is pf.RunStatus.FAILED


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_timeout_on_the_last_attempt_calls_on_dead_once(store, kind):
    hooks = Recorder()

    if kind == "async":

        async def handler(input, ctx):
            await asyncio.sleep(5)

    else:

        def handler(input, ctx):
            time.sleep(0.3)  # the abandoned thread ends soon after the test

    slow = pf.job(queue=f"slow_{kind}", max_attempts=2, base_delay=0, timeout=0.05,
                  on_failure=hooks.on_failure, on_dead=hooks.on_dead)(handler)
    run = store.start(slow)
    stats = drain(store, slow)

    assert stats.timed_out == 2
    assert hooks.summary() == [("failure", 1, 2, True), ("failure", 2, 2, False), ("dead", 2, 2, False)]
    assert all(isinstance(err, pf.StepTimeout) for _, _, err in hooks.calls)
    assert hooks.calls[-1][1].run_id == run.id
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error is not None and failed.error.startswith("StepTimeout")


def test_timeout_then_success_is_a_failure_hook_only(store):
    hooks = Recorder()

    @pf.job(queue="slow_once", max_attempts=2, base_delay=0, timeout=0.05,
            on_failure=hooks.on_failure, on_dead=hooks.on_dead)
    async def slow_once(input, ctx):
        if ctx.attempt == 1:
            await asyncio.sleep(5)
        return "second time lucky"

    run = store.start(slow_once)
    drain(store, slow_once)
    assert hooks.summary() == [("failure", 1, 2, True)]
    assert isinstance(hooks.calls[0][2], pf.StepTimeout)
    assert store.get_run(run.id).output == "second time lucky"


# --- async hooks --------------------------------------------------------------------------------


def test_async_hooks_are_awaited_to_completion(store):
    events: list[tuple[str, int, bool]] = []

    async def on_failure(ctx, error):
        await asyncio.sleep(0.01)  # a real await: the hook must be driven, not just created
        events.append(("failure", ctx.attempt, ctx.will_retry))

    async def on_dead(ctx, error):
        await asyncio.sleep(0.01)
        events.append(("dead", ctx.attempt, ctx.will_retry))

    @pf.job(queue="async_hooked", max_attempts=3, base_delay=1, on_failure=on_failure, on_dead=on_dead)
    async def async_hooked(input, ctx):
        raise RuntimeError("nope")

    store.start(async_hooked)
    drain(store, async_hooked)
    assert events == [
        ("failure", 1, True),
        ("failure", 2, True),
        ("failure", 3, False),
        ("dead", 3, False),
    ]


def test_mixed_sync_and_async_hooks(store):
    # The sync on_failure of attempt 1 runs in a thread beside attempt 2 (base_delay=0): the two
    # on_failure calls may finish in either order. The async on_dead comes once, after the
    # last attempt's on_failure finished.
    events: list[str] = []
    lock = threading.Lock()

    def on_failure(ctx, error):
        time.sleep(0.01)  # some work: an on_dead that did not wait for it would come first
        with lock:
            events.append(f"sync failure {ctx.attempt}")

    async def on_dead(ctx, error):
        await asyncio.sleep(0)
        with lock:
            events.append(f"async dead {ctx.attempt}")

    @pf.job(queue="mixed", max_attempts=2, base_delay=0, on_failure=on_failure, on_dead=on_dead)
    def mixed(input, ctx):
        raise RuntimeError("x")

    store.start(mixed)
    drain(store, mixed)
    assert sorted(events) == ["async dead 2", "sync failure 1", "sync failure 2"]
    assert events.index("async dead 2") > events.index("sync failure 2")


def test_on_dead_waits_for_the_last_attempts_on_failure_when_attempts_overlap(store):
    # Attempt 2 fails while attempt 1's on_failure hook is still running. The end of attempt 1's
    # hook must not release on_dead, which belongs after attempt 2's on_failure.
    events: list[str] = []

    def on_failure(ctx, error):
        events.append(f"failure {ctx.attempt} start")
        time.sleep(0.2 if ctx.attempt == 1 else 0.5)
        events.append(f"failure {ctx.attempt} end")

    def on_dead(ctx, error):
        events.append(f"dead {ctx.attempt}")

    @pf.job(queue="overlapping_hooks", max_attempts=2, base_delay=0,
            on_failure=on_failure, on_dead=on_dead)
    def overlapping(input, ctx):
        raise RuntimeError("x")

    store.start(overlapping)
    drain(store, overlapping)
    assert events.index("failure 2 start") < events.index("failure 1 end")  # they overlapped
    assert events[-2:] == ["failure 2 end", "dead 2"]
    assert events.count("dead 2") == 1


# --- raising hooks ------------------------------------------------------------------------------


def _scenario(slug: str, **hooks: Any) -> pf.Job:
    """Run 1 fails then succeeds; run 2 fails every attempt (3 of them)."""

    @pf.job(queue=slug, max_attempts=3, base_delay=10, **hooks)
    def handler(input, ctx):
        if input == "recovers" and ctx.attempt == 2:
            return {"ok": ctx.attempt}
        raise RuntimeError(f"{input} {ctx.attempt}")

    return handler


def _observable(run: pf.Run) -> tuple[Any, ...]:
    return (
        run.status,
        run.output,
        run.error,
        run.attempts,
        [(h.attempt, h.error) for h in run.history],
    )


@pytest.mark.parametrize("style", ["sync", "async"])
def test_raising_hooks_change_nothing(store, caplog, style):
    calls: list[str] = []

    if style == "sync":

        def on_failure(ctx, error):
            calls.append("failure")
            raise KeyError("bug in on_failure")

        def on_dead(ctx, error):
            calls.append("dead")
            raise ZeroDivisionError("bug in on_dead")

    else:

        async def on_failure(ctx, error):
            calls.append("failure")
            raise KeyError("bug in on_failure")

        async def on_dead(ctx, error):
            calls.append("dead")
            raise ZeroDivisionError("bug in on_dead")

    plain = _scenario("plain")
    hooked = _scenario("hooked", on_failure=on_failure, on_dead=on_dead)
    plain_runs = [store.start(plain, "recovers"), store.start(plain, "dies")]
    hooked_runs = [store.start(hooked, "recovers"), store.start(hooked, "dies")]

    plain_stats = drain(store, plain)
    with caplog.at_level(logging.ERROR, logger="pgflow_py.runner"):
        hooked_stats = drain(store, hooked)

    # The hooks did run (1 + 3 failures, 1 death) and raising in them altered nothing.
    assert sorted(calls) == ["dead", "failure", "failure", "failure", "failure"]
    assert hooked_stats == plain_stats == pf.RunnerStats(completed=1, failed=1, retried=3)
    for p, h in zip(plain_runs, hooked_runs, strict=True):
        assert _observable(store.get_run(h.id)) == _observable(store.get_run(p.id))
    assert store.get_run(hooked_runs[0].id).output == {"ok": 2}
    assert store.get_run(hooked_runs[1].id).status is pf.RunStatus.FAILED
    assert store.get_run(hooked_runs[1].id).error == "RuntimeError: dies 3"

    # Each hook error is logged on pgflow_py.runner with the run id and the hook's traceback.
    hook_records = [
        r for r in caplog.records
        if r.name == "pgflow_py.runner" and r.levelno >= logging.ERROR and "hook" in r.getMessage()
    ]
    assert len(hook_records) == 5
    dead_records = [r for r in hook_records if "on_dead" in r.getMessage()]
    failure_records = [r for r in hook_records if "on_failure" in r.getMessage()]
    assert len(dead_records) == 1 and len(failure_records) == 4
    assert hooked_runs[1].id in dead_records[0].getMessage()
    assert dead_records[0].exc_info is not None
    assert isinstance(dead_records[0].exc_info[1], ZeroDivisionError)
    logged_run_ids = {rid for rid in (r.id for r in hooked_runs) for rec in failure_records
                      if rid in rec.getMessage()}
    assert logged_run_ids == {r.id for r in hooked_runs}
    assert all(isinstance(r.exc_info[1], KeyError) for r in failure_records if r.exc_info)


def test_a_raising_on_failure_does_not_prevent_on_dead(store):
    dead: list[str] = []

    def on_failure(ctx, error):
        raise RuntimeError("hook broken")

    def on_dead(ctx, error):
        dead.append(ctx.run_id)

    @pf.job(queue="still_dead", on_failure=on_failure, on_dead=on_dead)
    def still_dead(input, ctx):
        raise ValueError("handler broken")

    run = store.start(still_dead)
    drain(store, still_dead)
    assert dead == [run.id]
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "ValueError: handler broken"  # the handler's error, not the hook's


# --- flow-level hooks ---------------------------------------------------------------------------


def test_flow_hooks_fire_for_the_failing_step_of_a_multi_step_flow(store):
    hooks = Recorder()
    ran: list[str] = []
    pipeline = pf.flow("pipeline", max_attempts=2, base_delay=5,
                       on_failure=hooks.on_failure, on_dead=hooks.on_dead)

    @pipeline.step()
    def fetch(input, ctx):
        ran.append(f"fetch {ctx.attempt}")
        if ctx.attempt == 1:
            raise ConnectionError("flaky network")
        return {"rows": input["n"]}

    @pipeline.step(depends_on=[fetch], max_attempts=3)
    def transform(deps, ctx):
        ran.append(f"transform {ctx.attempt}")
        raise ValueError(f"cannot transform {deps['fetch']['rows']} rows")

    @pipeline.step(depends_on=[transform])
    def load(deps, ctx):
        ran.append("load")

    run = store.start(pipeline, {"n": 4})
    drain(store, pipeline)

    assert ran == ["fetch 1", "fetch 2", "transform 1", "transform 2", "transform 3"]
    got = [(kind, c.step_slug, c.attempt, c.max_attempts, c.will_retry) for kind, c, _ in hooks.calls]
    assert got == [
        ("failure", "fetch", 1, 2, True),
        ("failure", "transform", 1, 3, True),  # ctx.max_attempts is the step's effective value
        ("failure", "transform", 2, 3, True),
        ("failure", "transform", 3, 3, False),
        ("dead", "transform", 3, 3, False),
    ]
    for _, ctx, _ in hooks.calls:
        assert ctx.run_id == run.id
        assert ctx.flow_slug == "pipeline"
        assert ctx.flow_input == {"n": 4}
    assert str(hooks.calls[-1][2]) == "cannot transform 4 rows"
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "ValueError: cannot transform 4 rows"


def test_flow_hooks_see_the_task_index_of_a_failing_map_task(store):
    hooks = Recorder()
    fan = pf.flow("fan", on_failure=hooks.on_failure, on_dead=hooks.on_dead)

    @fan.step()
    def split(input, ctx):
        return ["a", "b", "c"]

    @fan.map(array=split)
    def each(item, ctx):
        if item == "b":
            raise pf.PermanentFailure(f"bad item {item}")
        return item.upper()

    run = store.start(fan, None)
    drain(store, fan, concurrency=1)
    got = [(kind, c.step_slug, c.task_index, c.will_retry) for kind, c, _ in hooks.calls]
    assert got == [("failure", "each", 1, False), ("dead", "each", 1, False)]
    assert all(c.run_id == run.id for _, c, _ in hooks.calls)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED


def test_on_dead_runs_once_per_run_when_several_map_tasks_fail_for_good_together(store):
    # Three tasks of one run fail for good at about the same time: the run fails once, so
    # on_dead must run once (on_failure runs for each failed attempt). The hooks are async and
    # never await, so all three failures are handled before the runner records any of them.
    hooks = Recorder()

    async def on_failure(ctx, error):
        hooks.on_failure(ctx, error)

    async def on_dead(ctx, error):
        hooks.on_dead(ctx, error)

    fan = pf.flow("fan_all_fail", on_failure=on_failure, on_dead=on_dead)

    arrived: list[int] = []
    all_in: list[asyncio.Event] = []

    @fan.map()
    async def each(item, ctx):
        # All three attempts are running before any of them fails.
        if not all_in:
            all_in.append(asyncio.Event())
        arrived.append(item)
        if len(arrived) == 3:
            all_in[0].set()
        await asyncio.wait_for(all_in[0].wait(), 5)
        raise RuntimeError(f"bad {item}")

    run = store.start(fan, [1, 2, 3])
    drain(store, fan, concurrency=10)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED
    assert hooks.kinds().count("failure") == 3
    assert hooks.kinds().count("dead") == 1, hooks.summary()


def test_a_hook_runs_to_completion_even_when_a_sibling_task_fails_the_run_meanwhile(store):
    # Task 1 fails (and will be retried); while its on_failure hook is still running (e.g.
    # posting an alert), task 0 fails for good and fails the run. The runner then stops the
    # run's other *attempts*; the hook of an attempt that already failed must run to its end.
    started: list[int | None] = []
    ended: list[int | None] = []
    hook_running: list[asyncio.Event] = []

    async def on_failure(ctx, error):
        started.append(ctx.task_index)
        if ctx.task_index == 1:
            hook_running[0].set()  # now task 0 fails the run
            for _ in range(500):
                if store.get_run(ctx.run_id).status is pf.RunStatus.FAILED:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the hook is still busy after the run failed
        ended.append(ctx.task_index)

    fan = pf.flow("fan_slow_hook", on_failure=on_failure, max_attempts=2, base_delay=60)

    @fan.map()
    async def each(item, ctx):
        if not hook_running:
            hook_running.append(asyncio.Event())
        if item == 1:
            raise RuntimeError("item 1 hiccup")
        await asyncio.wait_for(hook_running[0].wait(), 5)
        raise pf.PermanentFailure("item 0 is bad")

    run = store.start(fan, [0, 1])
    drain(store, fan, concurrency=10)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED
    assert store.get_run(run.id).error == "PermanentFailure: item 0 is bad"
    assert sorted(started) == [0, 1]
    assert sorted(ended) == [0, 1], f"on_failure of task 1 was interrupted: started {started}, ended {ended}"


def test_a_slow_on_failure_hook_does_not_hide_the_real_error(tmp_path):
    # The failure is recorded before the hook runs, so the hook outliving the lease is harmless.
    calls: list[str] = []

    def slow_hook(ctx, error):
        time.sleep(1.0)
        calls.append(str(error))

    def on_dead(ctx, error):
        calls.append("dead")

    @pf.job(queue="slow_hook_job", on_failure=slow_hook, on_dead=on_dead)
    def slow_hook_job(input, ctx):
        raise ValueError("the real error")

    with pf.connect(tmp_path / "slow_hook.db") as store:
        run = store.start(slow_hook_job)
        pf.run_flows([slow_hook_job], store=store, until_idle=True, lease=0.3)
        failed = store.get_run(run.id)
    assert failed.error == "ValueError: the real error"
    assert [h.error for h in failed.history] == ["ValueError: the real error"]
    assert calls == ["the real error", "dead"]  # on_dead still after on_failure


def test_on_dead_when_the_store_fails_the_run_itself(tmp_path):
    # A map fed a non-array fails the run without a failing attempt: on_dead still runs once.
    dead: list[tuple[str, str, str]] = []

    def on_dead(ctx, error):
        dead.append((ctx.step_slug, type(error).__name__, str(error)))

    f = pf.flow("non_array_dead", on_dead=on_dead, max_attempts=3)

    @f.step()
    def source(input, ctx):
        return {"not": "a list"}

    @f.map(array=source)
    def each(item, ctx):
        return item

    with pf.connect(tmp_path / "non_array_dead.db") as store:
        run = store.start(f, {})
        pf.run_flows([f], store=store, until_idle=True)
        assert store.get_run(run.id).status is pf.RunStatus.FAILED
    assert len(dead) == 1
    step, kind, message = dead[0]
    assert (step, kind) == ("each", "PgflowError")
    assert "expected an array" in message


def test_on_dead_when_a_lost_worker_used_the_last_attempt(tmp_path):
    dead: list[tuple[str, int, str]] = []

    def on_dead(ctx, error):
        dead.append((ctx.run_id, ctx.attempt, str(error)))

    @pf.job(queue="lost_for_good", on_dead=on_dead)
    def lost_for_good(input, ctx):
        raise AssertionError("never runs: its only attempt's worker died")

    with pf.connect(tmp_path / "lost_dead.db") as store:
        run = store.start(lost_for_good, {"x": 1})
        store.backend.claim("dead-worker", ["lost_for_good"], 1, 0.01)
        time.sleep(0.05)
        stats = pf.run_flows([lost_for_good], store=store, until_idle=True)
        assert store.get_run(run.id).status is pf.RunStatus.FAILED
    assert stats.failed == 1
    assert [(run_id, attempt) for run_id, attempt, _ in dead] == [(run.id, 1)]
    assert dead[0][2].startswith("WorkerLost")
