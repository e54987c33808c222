"""The runner: retries and backoff, timeouts, priorities, scheduling, resources, loading."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
from _helpers import drain

import pgflow_py as pf


def test_fails_twice_then_succeeds_with_exponential_waits(store, clock):
    seen: list[tuple[int, float]] = []

    @pf.job(queue="flaky", max_attempts=3, base_delay=60)
    def flaky(input, ctx):
        seen.append((ctx.attempt, clock.now()))
        if ctx.attempt < 3:
            raise RuntimeError(f"boom {ctx.attempt}")
        return {"attempt": ctx.attempt}

    run = store.start(flaky, {"x": 1})
    t0 = clock.now()
    stats = drain(store, flaky)

    assert [a for a, _ in seen] == [1, 2, 3]
    # base_delay * 2**(n-1): 60 s after the first failure, 120 s after the second.
    assert [round(t - t0, 6) for _, t in seen] == [0, 60, 180]
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"attempt": 3}
    assert done.attempts == 3
    assert stats == pf.RunnerStats(completed=1, failed=0, retried=2, timed_out=0)
    history = done.steps[0].tasks[0].history
    assert [(h.attempt, h.error) for h in history] == [
        (1, "RuntimeError: boom 1"),
        (2, "RuntimeError: boom 2"),
    ]


def test_fixed_backoff_waits_base_delay_each_time(store, clock):
    seen: list[float] = []

    @pf.job(queue="fixed", max_attempts=4, base_delay=10, backoff="fixed")
    def fixed(input, ctx):
        seen.append(clock.now())
        raise ValueError("nope")

    store.start(fixed)
    drain(store, fixed)
    assert [round(b - a, 6) for a, b in itertools.pairwise(seen)] == [10, 10, 10]


def test_the_runner_caps_its_waits_at_max_delay(store, clock):
    seen: list[float] = []

    @pf.job(queue="capped", max_attempts=4, base_delay=60, max_delay=90)
    def capped(input, ctx):
        seen.append(clock.now())
        raise RuntimeError(f"attempt {ctx.attempt}")

    run = store.start(capped)
    drain(store, capped)
    # 60 * 2**(n-1) = 60, 120, 240, each capped at 90.
    assert [round(b - a, 6) for a, b in itertools.pairwise(seen)] == [60, 90, 90]
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    # The store recorded each failed attempt at those times too.
    assert [round((b.at - a.at).total_seconds(), 3) for a, b in itertools.pairwise(failed.history)] \
        == [60, 90, 90]


def test_the_runner_spreads_its_waits_with_jitter(store, clock):
    seen: dict[str, list[float]] = {}

    @pf.job(queue="jittered", max_attempts=4, base_delay=60, max_delay=200, jitter=True)
    def jittered(input, ctx):
        seen.setdefault(ctx.run_id, []).append(clock.now())
        raise RuntimeError("again")

    runs = store.start_many(jittered, range(8))
    drain(store, jittered)
    assert sorted(seen) == sorted(r.id for r in runs)
    nominal = [60, 120, 200]  # 60 * 2**(n-1), capped at 200
    ratios = []
    for times in seen.values():
        assert len(times) == 4
        waits = [b - a for a, b in itertools.pairwise(times)]
        ratios += [wait / full for wait, full in zip(waits, nominal, strict=True)]
    # Each wait lies in [0.5, 1.0] of its nominal value (DESIGN section 2) ...
    assert all(0.5 - 1e-6 <= r <= 1.0 + 1e-6 for r in ratios), ratios
    # ... and is drawn at random: 24 draws are not all the full delay, nor all alike.
    assert min(ratios) < 0.99
    assert len({round(r, 6) for r in ratios}) > 12


def test_always_failing_ends_failed_with_last_error(store):
    @pf.job(queue="doomed", max_attempts=3, base_delay=1)
    def doomed(input, ctx):
        raise ValueError(f"bad attempt {ctx.attempt}")

    run = store.start(doomed, {"n": 1})
    stats = drain(store, doomed)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "ValueError: bad attempt 3"
    assert failed.output is None
    assert failed.attempts == 3
    assert failed.finished_at is not None
    assert stats.failed == 1 and stats.retried == 2
    assert [r.id for r in store.runs(status="failed")] == [run.id]


def test_permanent_failure_stops_after_one_attempt(store):
    attempts: list[int] = []

    @pf.job(queue="perm", max_attempts=5)
    def perm(input, ctx):
        attempts.append(ctx.attempt)
        raise pf.PermanentFailure("invalid address")

    run = store.start(perm)
    drain(store, perm)
    assert attempts == [1]
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "PermanentFailure: invalid address"


def test_retry_exception_waits_exactly_its_delay(store, clock):
    seen: list[float] = []

    @pf.job(queue="later", max_attempts=3, base_delay=1000)
    def later(input, ctx):
        seen.append(clock.now())
        if ctx.attempt == 1:
            raise pf.Retry(delay=7)
        return "ok"

    run = store.start(later)
    drain(store, later)
    assert round(seen[1] - seen[0], 6) == 7
    assert store.get_run(run.id).output == "ok"


def test_retry_exception_still_counts_as_an_attempt(store):
    @pf.job(queue="again", max_attempts=2)
    def again(input, ctx):
        raise pf.Retry(delay=1, reason="not yet")

    run = store.start(again)
    drain(store, again)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.attempts == 2
    assert "not yet" in (failed.error or "")


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_timeouts_are_enforced_and_retried(store, kind):
    attempts: list[int] = []
    first_over = threading.Event()  # set when the first attempt's handler has ended

    if kind == "async":

        async def handler(input, ctx):
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                try:
                    await asyncio.sleep(10)
                finally:
                    first_over.set()
            return (ctx.attempt, first_over.is_set())
    else:

        def handler(input, ctx):
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                time.sleep(1.5)
                first_over.set()
            return (ctx.attempt, first_over.is_set())

    slow = pf.job(queue=f"slow_{kind}", max_attempts=2, base_delay=0, timeout=0.2)(handler)
    run = store.start(slow)
    stats = drain(store, slow)

    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert stats.timed_out == 1 and stats.retried == 1
    history = done.steps[0].tasks[0].history
    assert history[0].error.startswith("StepTimeout: ")
    assert "timed out after 0.2s" in history[0].error
    if kind == "async":
        # The first attempt was cancelled at its deadline, before the second began.
        assert done.output == [2, True]
    else:
        # Its thread could not be stopped: the second attempt ran while it still slept.
        assert done.output == [2, False]
        assert first_over.wait(5)


def test_a_sync_handler_sees_ctx_cancelled_at_its_deadline(store):
    # Its thread cannot be killed, but a long loop can notice the timeout and return.
    noticed = threading.Event()

    @pf.job(queue="polite_sync", timeout=0.2)
    def polite(input, ctx):
        give_up = time.monotonic() + 5
        while time.monotonic() < give_up:
            if ctx.cancelled:
                noticed.set()
                return "stopped early"
            time.sleep(0.01)
        return "ran to the end"

    run = store.start(polite)
    drain(store, polite)
    assert noticed.wait(5)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert (failed.error or "").startswith("StepTimeout:")


def test_timeout_on_last_attempt_fails_run_with_step_timeout(store):
    @pf.job(queue="too_slow", timeout=0.1)
    async def too_slow(input, ctx):
        await asyncio.sleep(10)

    run = store.start(too_slow)
    drain(store, too_slow)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error is not None and failed.error.startswith("StepTimeout:")


def test_priority_order_with_concurrency_one(store):
    order: list[str] = []

    @pf.job(queue="prio")
    def prio(input, ctx):
        order.append(input["name"])

    store.start(prio, {"name": "low"}, priority=-5)
    store.start(prio, {"name": "first_default"})
    store.start(prio, {"name": "high"}, priority=10)
    store.start(prio, {"name": "second_default"})
    store.start(prio, {"name": "higher"}, priority=20)
    drain(store, prio, concurrency=1)
    assert order == ["higher", "high", "first_default", "second_default", "low"]


def test_delay_and_run_at_are_respected(store, clock):
    ran_at: dict[str, float] = {}

    @pf.job(queue="sched")
    def sched(input, ctx):
        ran_at[input] = clock.now()

    t0 = clock.now()
    store.start(sched, "in_an_hour", delay=timedelta(hours=1))
    store.start(sched, "at_ten_min", run_at=clock.datetime() + timedelta(minutes=10))
    store.start(sched, "now")
    drain(store, sched, concurrency=1)
    assert list(ran_at) == ["now", "at_ten_min", "in_an_hour"]
    assert ran_at["now"] == t0
    assert ran_at["at_ten_min"] >= t0 + 600
    assert ran_at["in_an_hour"] >= t0 + 3600


def test_resources_and_context_reach_the_handler(store):
    seen: list[pf.Context] = []
    mailer = object()

    @pf.job(queue="ctxjob", max_attempts=4, timeout=12)
    def ctxjob(input, ctx):
        seen.append(ctx)
        return None

    run = store.start(ctxjob, {"to": "a@b"})
    drain(store, ctxjob, resources={"mailer": mailer})
    (ctx,) = seen
    assert ctx.resources["mailer"] is mailer
    assert ctx.run_id == run.id
    assert (ctx.flow_slug, ctx.step_slug, ctx.task_index) == ("ctxjob", "ctxjob", None)
    assert (ctx.attempt, ctx.max_attempts) == (1, 4)
    assert ctx.flow_input == {"to": "a@b"}
    assert ctx.deadline is not None and ctx.deadline.tzinfo is not None
    assert ctx.will_retry is False
    ctx.logger.info("the logger is bound and usable")
    assert store.get_run(run.id).status is pf.RunStatus.COMPLETED


def test_sync_and_async_handlers_both_work(store):
    @pf.job(queue="sync_job")
    def sync_job(input, ctx):
        return {"sync": input}

    @pf.job(queue="async_job")
    async def async_job(input, ctx):
        await asyncio.sleep(0)
        return {"async": input}

    runs = store.start_many(sync_job, [1, 2, 3]) + store.start_many(async_job, [4, 5])
    stats = drain(store, sync_job, async_job)
    assert stats.completed == 5
    outputs = sorted(
        (store.get_run(r.id).output for r in runs), key=lambda o: next(iter(o.values()))
    )
    assert outputs == [{"sync": 1}, {"sync": 2}, {"sync": 3}, {"async": 4}, {"async": 5}]


def test_output_that_is_not_json_fails_the_attempt_clearly(store):
    @pf.job(queue="bad_output")
    def bad_output(input, ctx):
        return {"when": object()}

    run = store.start(bad_output)
    drain(store, bad_output)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert "not JSON-serializable" in (failed.error or "")


def test_concurrency_runs_tasks_in_parallel(store):
    running = 0
    peak = 0

    @pf.job(queue="parallel")
    async def parallel(input, ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    store.start_many(parallel, range(12))
    drain(store, parallel, concurrency=4)
    assert peak == 4


def test_until_idle_returns_when_nothing_is_left(store):
    @pf.job(queue="idle")
    def idle(input, ctx):
        return input

    assert drain(store, idle) == pf.RunnerStats()
    store.start_many(idle, range(5))
    assert drain(store, idle).completed == 5
    assert drain(store, idle).completed == 0


def test_flows_none_imports_handlers_by_recorded_path(tmp_path, monkeypatch, clock):
    module = tmp_path / "pgflow_test_jobs_mod.py"
    module.write_text(textwrap.dedent("""
        import pgflow_py as pf

        @pf.job(queue="imported_job")
        def imported_job(input, ctx):
            return {"doubled": input * 2, "from": __name__}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import pgflow_test_jobs_mod

    db = tmp_path / "byname.db"
    with pf.connect(db, clock=clock) as store:
        run = store.start(pgflow_test_jobs_mod.imported_job, 21)
    # A fresh process would not have the module imported: the runner must import it itself.
    monkeypatch.delitem(sys.modules, "pgflow_test_jobs_mod")
    with pf.connect(db, clock=clock) as store:
        stats = pf.run_flows(None, store=store, until_idle=True)
        assert stats.completed == 1
        assert store.get_run(run.id).output == {"doubled": 42, "from": "pgflow_test_jobs_mod"}


def test_flows_none_skips_unimportable_handlers(store, caplog):
    @pf.job(queue="local_only")
    def local_only(input, ctx):
        return 1

    store.start(local_only)
    with caplog.at_level("ERROR", logger="pgflow_py.runner"):
        stats = pf.run_flows(None, store=store, until_idle=True)
    assert stats.completed == 0
    assert "cannot serve flow 'local_only'" in caplog.text
    assert "defined inside a function" in caplog.text


def test_failure_hooks_every_attempt_and_once_dead(store):
    # With base_delay=0 a sync on_failure hook runs in a thread beside the next attempt, so the
    # hooks of different attempts may finish in any order. What is promised: on_failure once
    # per failed attempt with its ctx, and on_dead once, after the last attempt's on_failure
    # has finished.
    events: list[tuple[str, int, bool, str]] = []
    lock = threading.Lock()

    def on_failure(ctx, error):
        time.sleep(0.01)  # some work: an on_dead that did not wait for it would come first
        with lock:
            events.append(("failure", ctx.attempt, ctx.will_retry, str(error)))

    async def on_dead(ctx, error):
        with lock:
            events.append(("dead", ctx.attempt, ctx.will_retry, str(error)))

    @pf.job(queue="hooked", max_attempts=3, base_delay=0, on_failure=on_failure, on_dead=on_dead)
    def hooked(input, ctx):
        raise RuntimeError("x")

    store.start(hooked)
    drain(store, hooked)
    assert sorted(e for e in events if e[0] == "failure") == [
        ("failure", 1, True, "x"),
        ("failure", 2, True, "x"),
        ("failure", 3, False, "x"),
    ]
    assert [e for e in events if e[0] == "dead"] == [("dead", 3, False, "x")]
    assert events.index(("dead", 3, False, "x")) > events.index(("failure", 3, False, "x"))


def test_raising_hook_changes_nothing(store, caplog):
    def on_failure(ctx, error):
        raise KeyError("hook bug")

    @pf.job(queue="hook_bug", max_attempts=2, base_delay=0, on_failure=on_failure)
    def hook_bug(input, ctx):
        if ctx.attempt == 1:
            raise RuntimeError("first")
        return "second"

    run = store.start(hook_bug)
    with caplog.at_level("ERROR", logger="pgflow_py.runner"):
        drain(store, hook_bug)
    assert store.get_run(run.id).output == "second"
    assert run.id in caplog.text and "on_failure hook" in caplog.text


def test_in_process_start_wakes_an_idle_runner_immediately(tmp_path):
    # Real clock; the runner polls only every 10 s, so a prompt pick-up proves the wake-up.
    store = pf.connect(tmp_path / "wake.db")
    picked = threading.Event()

    @pf.job(queue="wake")
    async def wake(input, ctx):
        picked.set()

    async def main() -> bool:
        runner = asyncio.create_task(
            pf.arun_flows([wake], store=store, poll_interval=10, handle_signals=False)
        )
        await asyncio.sleep(0.3)  # the runner is idle now
        store.start(wake)
        # Picked up without waiting out the 10 s poll interval.
        woke = await asyncio.to_thread(picked.wait, 5)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        return woke

    assert asyncio.run(main())
    store.close()


def test_start_from_another_thread_wakes_the_runner(tmp_path):
    store = pf.connect(tmp_path / "thread.db")

    @pf.job(queue="threaded")
    def threaded(input, ctx):
        return input + 1

    results: list[pf.Run] = []

    def producer() -> None:
        time.sleep(0.2)
        run = store.start(threaded, 41)
        results.append(store.wait(run.id, timeout=5))

    thread = threading.Thread(target=producer)

    async def main() -> None:
        runner = asyncio.create_task(
            pf.arun_flows([threaded], store=store, poll_interval=10, handle_signals=False)
        )
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    asyncio.run(main())
    store.close()
    assert results[0].output == 42


class _WakeOnlyCondition(threading.Condition):
    """A condition whose ``wait`` ignores its timeout: only a notify ends it (until released),
    so ``store.wait`` cannot fall back on polling."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.released = False

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout if self.released else None)

    def release_waiters(self) -> None:
        with self:
            self.released = True
            self.notify_all()


def test_wait_is_woken_when_a_runner_in_this_process_finishes_the_run(store, monkeypatch):
    @pf.job(queue="awaited")
    def awaited(input, ctx):
        return input * 2

    run = store.start(awaited, 21)
    condition = _WakeOnlyCondition()
    monkeypatch.setattr(store, "_finished", condition)  # store.wait's timed poll, made endless
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(store.wait(run.id, timeout=60))
        except Exception as exc:  # reported below instead of lost in the thread
            outcome.append(exc)

    waiting = threading.Thread(target=waiter, daemon=True)
    waiting.start()
    try:
        assert condition.waiting.wait(10)  # it saw the run unfinished and sleeps on the condition
        serving = threading.Thread(target=lambda: drain(store, awaited, handle_signals=False))
        serving.start()
        serving.join(30)
        assert not serving.is_alive()
        waiting.join(10)  # generous: only a missing wake-up leaves it waiting
        assert not waiting.is_alive(), "store.wait was not woken when the run finished"
    finally:
        condition.release_waiters()
        waiting.join(10)
    (done,) = outcome
    assert isinstance(done, pf.Run), done
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == 42


def test_retrying_status_while_waiting_out_a_backoff(store, clock):
    @pf.job(queue="backing_off", max_attempts=2, base_delay=30)
    def backing_off(input, ctx):
        raise RuntimeError("later")

    run = store.start(backing_off)
    backend = store.backend
    (task,) = backend.claim("test-worker", ["backing_off"], 10, 30)
    assert store.get_run(run.id).status is pf.RunStatus.RUNNING
    backend.finish([], [pf.store.TaskFailure(task.id, task.attempt, "E: x", clock.now() + 30)])
    assert store.get_run(run.id).status is pf.RunStatus.RETRYING
    assert backend.claim("test-worker", ["backing_off"], 10, 30) == []
    clock.advance(30)
    assert [t.id for t in backend.claim("test-worker", ["backing_off"], 10, 30)] == [task.id]


def test_late_result_of_a_cancelled_run_is_ignored(store):
    @pf.job(queue="cancel_me")
    def cancel_me(input, ctx):
        return "late"

    run = store.start(cancel_me)
    backend = store.backend
    (task,) = backend.claim("w", ["cancel_me"], 1, 30)
    store.cancel(run.id)
    backend.finish([pf.store.TaskSuccess(task.id, task.attempt, '"late"')], [])
    cancelled = store.get_run(run.id)
    assert cancelled.status is pf.RunStatus.CANCELLED
    assert cancelled.output is None


def test_runner_takes_a_url(tmp_path):
    @pf.job(queue="by_url")
    def by_url(input, ctx):
        return input

    db = str(tmp_path / "url.db")
    with pf.connect(db) as store:
        run = store.start(by_url, "x")
    assert pf.run_flows([by_url], store=db, until_idle=True).completed == 1
    with pf.connect(db) as store:
        assert store.get_run(run.id).output == "x"


def test_bad_concurrency_is_rejected(store):
    @pf.job(queue="cc")
    def cc(input, ctx):
        return None

    with pytest.raises(ValueError, match="concurrency"):
        pf.run_flows([cc], store=store, concurrency=0, until_idle=True)


def test_sigterm_finishes_running_tasks_and_exits_zero(tmp_path):
    db = tmp_path / "signal.db"
    marker = tmp_path / "started"
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""
        import time, pathlib
        import pgflow_py as pf

        @pf.job(queue="long_job", timeout=30)
        def long_job(input, ctx):
            pathlib.Path({str(marker)!r}).write_text("x")
            time.sleep(0.5)
            return "finished"

        store = pf.connect({str(db)!r})
        store.start(long_job)
        stats = pf.run_flows([long_job], store=store)
        print("STATS", stats.completed)
    """))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no start"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "STATS 1" in out
    with pf.connect(db) as store:
        (run,) = store.runs()
        assert run.status is pf.RunStatus.COMPLETED
        assert run.output == "finished"


def test_a_sync_handler_abandoned_at_its_timeout_does_not_hold_a_worker_slot(store):
    # concurrency=1: the stuck first attempt's thread runs on, yet the other runs are served
    # at once by a new thread instead of waiting for it.
    release = threading.Event()
    done_while_stuck: list[int] = []

    @pf.job(queue="stuck_sync", timeout=0.2)
    def stuck(input, ctx):
        if input == 0:
            release.wait(10)
            return "late"
        if not release.is_set():
            done_while_stuck.append(input)
        return input

    runs = [store.start(stuck, i) for i in range(4)]
    try:
        drain(store, stuck, concurrency=1)
    finally:
        release.set()
    assert store.get_run(runs[0].id).status is pf.RunStatus.FAILED
    assert [store.get_run(r.id).output for r in runs[1:]] == [1, 2, 3]
    assert done_while_stuck == [1, 2, 3]


def test_sync_handlers_see_the_callers_context_variables(store):
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[str] = []

    @pf.job(queue="ctxvars_sync")
    def reads(input, ctx):
        seen.append(request_id.get())

    async def main() -> None:
        request_id.set("req-42")
        await pf.arun_flows([reads], store=store, until_idle=True, handle_signals=False)

    store.start(reads)
    asyncio.run(main())
    assert seen == ["req-42"]


def test_a_program_exits_after_run_flows_even_with_an_abandoned_sync_handler(tmp_path):
    # The runner's handler threads are daemons: the one stuck in a timed-out handler does not
    # keep Python waiting at exit.
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import pgflow_py as pf

        @pf.job(queue="stuck_forever", timeout=0.2)
        def stuck_forever(input, ctx):
            time.sleep(120)

        store = pf.connect({str(tmp_path / "stuck.db")!r})
        run = store.start(stuck_forever)
        pf.run_flows([stuck_forever], store=store, until_idle=True)
        print("STATUS", store.get_run(run.id).status.value)
    """))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "STATUS failed" in done.stdout
