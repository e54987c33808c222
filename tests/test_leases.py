"""Leases, reclaiming lost work, and stopping attempts whose run was cancelled or failed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import pgflow_py as pf
from pgflow_py.store.sqlite import LOST_WORKER


def _claim_as_dead_worker(store: pf.Store, slug: str, lease: float = 0.05):
    tasks = store.backend.claim("dead-worker", [slug], 100, lease)
    time.sleep(lease * 2)  # the dead worker never renews: its leases expire
    return tasks


def test_expired_lease_is_reclaimed_as_a_failed_attempt_and_rerun(store):
    calls: list[int] = []

    @pf.job(queue="victim", max_attempts=3, base_delay=5)
    def victim(input, ctx):
        calls.append(ctx.attempt)
        return "recovered"

    run = store.start(victim)
    (task,) = _claim_as_dead_worker(store, "victim")
    assert task.attempt == 1
    stats = pf.run_flows([victim], store=store, until_idle=True)

    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == "recovered"
    assert calls == [2]  # the lost attempt counted
    assert stats.completed == 1
    assert [(h.attempt, h.error) for h in done.history] == [(1, LOST_WORKER)]


def test_a_task_that_keeps_killing_its_worker_fails_after_max_attempts(store):
    @pf.job(queue="poison", max_attempts=2, base_delay=0)
    def poison(input, ctx):
        raise AssertionError("never reached: every attempt's worker dies")

    run = store.start(poison)
    for _ in range(2):
        _claim_as_dead_worker(store, "poison")
        store.backend.reclaim_expired(["poison"])
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == LOST_WORKER
    assert failed.attempts == 2


def test_a_live_slow_task_is_never_reclaimed(tmp_path):
    # Lease 0.3 s, task runs 1.2 s: only heartbeats keep it; a second runner must not take it.
    db = tmp_path / "slow.db"
    calls: list[str] = []

    @pf.job(queue="slow_but_alive", max_attempts=3, timeout=10)
    def slow_but_alive(input, ctx):
        calls.append(threading.current_thread().name)
        time.sleep(1.2)
        return "ok"

    with pf.connect(db) as store:
        run = store.start(slow_but_alive)

    results: list[pf.RunnerStats] = []

    def serve() -> None:
        with pf.connect(db) as s:
            results.append(pf.run_flows(
                [slow_but_alive], store=s, until_idle=True, lease=0.3, handle_signals=False
            ))

    first = threading.Thread(target=serve)
    first.start()
    time.sleep(0.5)  # the first runner holds the task; its original lease has expired by now
    second = threading.Thread(target=serve)
    second.start()
    first.join(10)
    second.join(10)
    assert len(calls) == 1
    with pf.connect(db) as store:
        done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.attempts == 1
    assert sum(r.completed for r in results) == 1


def test_late_result_after_reclaim_is_ignored(store):
    @pf.job(queue="late", max_attempts=3, base_delay=0)
    def late(input, ctx):
        return "second worker"

    run = store.start(late)
    (stale,) = _claim_as_dead_worker(store, "late")
    pf.run_flows([late], store=store, until_idle=True)
    # The "dead" worker comes back and reports: its attempt is no longer current.
    store.backend.finish([pf.store.TaskSuccess(stale.id, stale.attempt, '"stale"')], [])
    assert store.get_run(run.id).output == "second worker"


def test_cancel_stops_a_running_async_attempt(tmp_path):
    store = pf.connect(tmp_path / "cancel.db")
    entered = threading.Event()
    finished: list[bool] = []

    @pf.job(queue="long_async", timeout=30)
    async def long_async(input, ctx):
        entered.set()
        await asyncio.sleep(10)
        finished.append(True)

    run = store.start(long_async)

    def cancel_when_running() -> None:
        entered.wait(10)
        store.cancel(run.id)

    threading.Thread(target=cancel_when_running).start()
    stats = pf.run_flows([long_async], store=store, until_idle=True)
    assert finished == []  # stopped, not run to its end
    assert stats.cancelled == 1 and stats.completed == 0
    assert store.get_run(run.id).status is pf.RunStatus.CANCELLED
    store.close()


def test_sync_handler_sees_ctx_cancelled(tmp_path):
    store = pf.connect(tmp_path / "cancel_sync.db")
    entered = threading.Event()
    observed = threading.Event()

    @pf.job(queue="long_sync", timeout=30)
    def long_sync(input, ctx):
        assert ctx.cancelled is False
        entered.set()
        for _ in range(1000):
            if ctx.cancelled:
                observed.set()
                return "stopped early"
            time.sleep(0.01)
        return "ran to the end"

    run = store.start(long_sync)
    threading.Thread(target=lambda: (entered.wait(10), store.cancel(run.id))).start()
    stats = pf.run_flows([long_sync], store=store, until_idle=True)
    assert observed.wait(5)
    assert stats.cancelled == 1
    cancelled = store.get_run(run.id)
    assert cancelled.status is pf.RunStatus.CANCELLED
    assert cancelled.output is None
    store.close()


def test_a_run_failing_for_good_stops_its_other_running_attempts(store):
    stopped: list[int] = []
    f = pf.flow("fail_fast")

    @f.map()
    def item(x, ctx):
        if x == 0:
            time.sleep(0.1)  # let the sibling start first
            raise pf.PermanentFailure("element 0 is bad")
        for _ in range(1000):
            if ctx.cancelled:
                stopped.append(x)
                return None
            time.sleep(0.01)
        return x

    run = store.start(f, [0, 1])
    stats = pf.run_flows([f], store=store, until_idle=True, concurrency=2)
    assert stats.failed == 1 and stats.cancelled == 1
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert [t.status for t in failed.step("item").tasks] == ["failed", "cancelled"]


def test_a_step_failing_for_good_stops_the_runs_other_attempts_at_once(store):
    """Stopped promptly, not at the next regular heartbeat: with a 300 s lease that comes only
    after 100 s, long after the async sibling's 10 s sleep would have ended by itself."""
    started = {"sleeper": threading.Event(), "poller": threading.Event()}
    sleeper_cancelled = threading.Event()
    poller_saw_cancel = threading.Event()
    ran_to_the_end: list[str] = []
    f = pf.flow("fail_stops_siblings", timeout=60)

    @f.step()
    async def boom(input, ctx):
        # Async, so the one sync sibling has the handler threads to itself.
        for _ in range(2000):  # up to 10 s, to detect a hang only
            if all(event.is_set() for event in started.values()):  # both siblings are running
                raise pf.PermanentFailure("bad input")
            await asyncio.sleep(0.005)
        raise AssertionError("the sibling steps never started")

    @f.step()
    async def sleeper(input, ctx):
        started["sleeper"].set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            sleeper_cancelled.set()
            raise
        ran_to_the_end.append("sleeper")

    @f.step()
    def poller(input, ctx):
        started["poller"].set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if ctx.cancelled:
                poller_saw_cancel.set()
                return None
            time.sleep(0.005)
        ran_to_the_end.append("poller")
        return None

    run = store.start(f)
    stats = pf.run_flows([f], store=store, until_idle=True, concurrency=3, lease=300)

    assert sleeper_cancelled.is_set()
    assert poller_saw_cancel.wait(10)  # its thread notices the flag on its next look
    assert ran_to_the_end == []
    assert (stats.failed, stats.cancelled, stats.completed) == (1, 2, 0)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == "PermanentFailure: bad input"
    assert {s.slug: [t.status for t in s.tasks] for s in failed.steps} == {
        "boom": ["failed"], "sleeper": ["cancelled"], "poller": ["cancelled"],
    }


def test_heartbeat_registers_the_worker_and_forgets_it_on_exit(store):
    seen: list[list[str]] = []

    @pf.job(queue="beat")
    def beat(input, ctx):
        conn = store.backend._conn  # same process: read the workers table directly
        seen.append([r[0] for r in conn.execute("SELECT flows FROM workers").fetchall()])

    store.start(beat)
    pf.run_flows([beat], store=store, until_idle=True)
    assert seen == [["beat"]]
    assert store.backend._conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 0


def test_a_stale_result_in_a_batch_of_flow_results_is_ignored_and_the_rest_recorded(store):
    two = pf.flow("two_steps_batch")

    @two.step()
    def first(input, ctx):
        return input

    @two.step(depends_on=[first])
    def second(deps, ctx):
        return deps

    a, b = store.start_many(two, [{"run": "a"}, {"run": "b"}])
    store.register(two)
    backend = store.backend
    claimed = {t.run_id: t for t in backend.claim("w1", ["two_steps_batch"], 10, 30)}
    # b's claim is handed back and taken again: the first claim's result is now stale.
    backend.release("w1", [claimed[b.id].id])
    (again,) = backend.claim("w2", ["two_steps_batch"], 10, 30)
    assert (again.id, again.attempt) == (claimed[b.id].id, claimed[b.id].attempt)

    fresh = pf.store.TaskSuccess(claimed[a.id].id, 1, '"from w1"', a.id, "first", False,
                                 claimed[a.id].claim)
    stale = pf.store.TaskSuccess(claimed[b.id].id, 1, '"stale"', b.id, "first", False,
                                 claimed[b.id].claim)
    backend.finish([fresh, stale], [])

    steps_a = {s.slug: s for s in store.get_run(a.id).steps}
    assert steps_a["first"].output == "from w1"
    assert steps_a["second"].status == "started"  # its task is queued
    steps_b = {s.slug: s for s in store.get_run(b.id).steps}
    assert steps_b["first"].status == "started" and steps_b["first"].output is None
    assert steps_b["second"].status == "created"
    # The current claim's result still counts.
    backend.finish([pf.store.TaskSuccess(again.id, again.attempt, '"from w2"', b.id, "first",
                                         False, again.claim)], [])
    assert {s.slug: s.output for s in store.get_run(b.id).steps}["first"] == "from w2"


def _job_or_flow(kind: str) -> tuple[pf.Flow, str]:
    """A job, or a two-step flow; and the slug of the (first) step whose task is raced."""
    if kind == "job":

        @pf.job(queue="raced_job")
        def raced_job(input, ctx):
            return input

        return raced_job, "raced_job"
    flow = pf.flow("raced_flow")

    @flow.step()
    def first(input, ctx):
        return input

    @flow.step(depends_on=[first])
    def second(deps, ctx):
        return deps

    return flow, "first"


@pytest.mark.parametrize("kind", ["job", "flow"])
@pytest.mark.parametrize("stale", ["success", "final failure", "retryable failure"])
def test_a_stale_result_arriving_before_the_current_claims_result_is_ignored(
    store, clock, kind, stale
):
    """Worker A claims a task; the run is cancelled and retried, so the task's attempts start
    over and worker B claims it again at the same attempt number. A's late result, arriving
    while B still runs the task, must change nothing: only the claim tells the two apart."""
    flow, step = _job_or_flow(kind)
    run = store.start(flow, "in")
    backend = store.backend
    (a,) = backend.claim("A", [flow.slug], 1, 30)
    store.cancel(run.id)
    store.retry(run.id)
    (b,) = backend.claim("B", [flow.slug], 1, 30)
    assert (b.id, b.attempt, b.step_slug) == (a.id, a.attempt, step)
    assert b.claim != a.claim

    if stale == "success":
        backend.finish([pf.store.TaskSuccess(
            a.id, a.attempt, '"from A"', run.id, step, kind == "job", a.claim, a.started_at
        )], [])
    else:
        retry_at = clock.now() if stale == "retryable failure" else None
        backend.finish([], [pf.store.TaskFailure(a.id, a.attempt, "RuntimeError: A", retry_at,
                                                 a.claim)])

    during = store.get_run(run.id)
    assert during.status is pf.RunStatus.RUNNING
    assert (during.output, during.error) == (None, None)
    assert during.step(step).status == "started"
    assert [t.status for t in during.step(step).tasks] == ["started"]
    assert not [h for h in during.history if h.error == "RuntimeError: A"]
    assert backend.claim("C", [flow.slug], 10, 30) == []  # nothing was queued again
    assert backend.heartbeat("B", [flow.slug], [b.id], 30) == []  # B still holds the task

    # B's result, arriving after, is the one recorded.
    backend.finish([pf.store.TaskSuccess(
        b.id, b.attempt, '"from B"', run.id, step, kind == "job", b.claim, b.started_at
    )], [])
    after = store.get_run(run.id)
    assert after.step(step).status == "completed"
    assert after.step(step).output == "from B"
    if kind == "job":
        assert after.status is pf.RunStatus.COMPLETED
        assert after.output == "from B"
    else:
        (nxt,) = backend.claim("B", [flow.slug], 1, 30)
        assert (nxt.step_slug, nxt.input) == ("second", {"first": "from B"})


def _map_flow(slug: str) -> pf.Flow:
    flow = pf.flow(slug)

    @flow.map()
    def each(item, ctx):
        return item * 10

    return flow


def test_a_batch_of_map_results_completes_the_step_with_its_outputs_in_order(store):
    flow = _map_flow("map_batch_done")
    run = store.start(flow, [1, 2, 3])
    backend = store.backend
    tasks = backend.claim("w1", [flow.slug], 10, 30)
    assert sorted(t.task_index for t in tasks) == [0, 1, 2]
    backend.finish([  # in any order, in one batch
        pf.store.TaskSuccess(t.id, t.attempt, str(t.input * 10), run.id, "each", False, t.claim)
        for t in reversed(tasks)
    ], [])
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert done.output == {"each": [10, 20, 30]}
    assert done.started_at is not None


def test_a_stale_result_in_a_batch_of_map_results_is_ignored_and_the_rest_recorded(store):
    flow = _map_flow("map_batch_stale")
    run = store.start(flow, [1, 2, 3])
    backend = store.backend
    tasks = sorted(backend.claim("w1", [flow.slug], 10, 30), key=lambda t: t.task_index)
    backend.release("w1", [tasks[2].id])  # handed back and taken again: w1's result is stale
    (again,) = backend.claim("w2", [flow.slug], 10, 30)
    backend.finish([
        pf.store.TaskSuccess(t.id, t.attempt, str(t.input * 10), run.id, "each", False, t.claim)
        for t in tasks
    ], [])
    step = store.get_run(run.id).steps[0]
    assert [t.status for t in step.tasks] == ["completed", "completed", "started"]
    assert step.status == "started"
    backend.finish([pf.store.TaskSuccess(again.id, again.attempt, "300", run.id, "each", False,
                                         again.claim)], [])
    assert store.get_run(run.id).output == {"each": [10, 20, 300]}
