"""Dead letters and requeue: ``store.runs(status="failed")``, ``Run.history``, ``store.retry`` and
``store.cancel``; scheduled runs found and cancelled by key; every ``pf.RunStatus`` observed."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.store import TaskFailure
from pgflow_py.testing import FakeClock

T0 = 1_800_000_000





def at(seconds_after_t0: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds_after_t0, tz=timezone.utc)


# --- the dead-letter list -----------------------------------------------------------------------


def test_failed_runs_are_the_dead_letter_list_with_error_and_history(store, clock):
    @pf.job(queue="charge", max_attempts=2, base_delay=30)
    def charge(input, ctx):
        if input["card"] == "ok":
            return {"charged": input["amount"]}
        raise RuntimeError(f"card {input['card']} declined (attempt {ctx.attempt})")

    @pf.job(queue="notify")
    def notify(input, ctx):
        raise pf.PermanentFailure("no such user")

    good = store.start(charge, {"card": "ok", "amount": 5})
    bad1 = store.start(charge, {"card": "x1", "amount": 6})
    clock.advance(1)  # a later creation time: newest first is well defined
    bad2 = store.start(charge, {"card": "x2", "amount": 7})
    clock.advance(1)
    dead_notify = store.start(notify, {"user": 3})
    drain(store, charge, notify)

    dead = store.runs(status="failed")
    assert [r.id for r in dead] == [dead_notify.id, bad2.id, bad1.id]  # newest first
    assert [r.id for r in store.runs(status=pf.RunStatus.FAILED, flow=charge)] == [bad2.id, bad1.id]
    assert [r.id for r in store.runs(status="failed", flow="notify")] == [dead_notify.id]
    assert good.id not in {r.id for r in dead}
    assert store.get_run(good.id).status is pf.RunStatus.COMPLETED

    by_id = {r.id: r for r in dead}
    b1 = by_id[bad1.id]
    assert b1.status is pf.RunStatus.FAILED
    assert b1.input == {"card": "x1", "amount": 6}
    assert b1.output is None
    assert b1.error == "RuntimeError: card x1 declined (attempt 2)"
    assert b1.finished_at is not None
    assert b1.attempts == 2
    assert [(h.attempt, h.error) for h in b1.history] == [
        (1, "RuntimeError: card x1 declined (attempt 1)"),
        (2, "RuntimeError: card x1 declined (attempt 2)"),
    ]
    n = by_id[dead_notify.id]
    assert n.error == "PermanentFailure: no such user"
    assert [(h.attempt, h.error) for h in n.history] == [(1, "PermanentFailure: no such user")]


def test_history_records_every_attempt_with_its_error_and_aware_time(store, clock):
    @pf.job(queue="sync_crm", max_attempts=3, base_delay=60)
    def sync_crm(input, ctx):
        raise ConnectionError(f"crm down #{ctx.attempt}")

    run = store.start(sync_crm, {"contact": 1})
    drain(store, sync_crm)
    failed = store.get_run(run.id)

    history = failed.history
    assert [h.attempt for h in history] == [1, 2, 3]
    assert [h.error for h in history] == [f"ConnectionError: crm down #{i}" for i in (1, 2, 3)]
    # Attempts ran at t0, t0+60 and t0+180 (backoff 60 then 120 on the fake clock).
    assert [h.at for h in history] == [at(0), at(60), at(180)]
    for h in history:
        assert isinstance(h, pf.AttemptRecord)
        assert h.at.tzinfo is not None and h.at.utcoffset() == timedelta(0)
        assert h.step_slug == "sync_crm"
        assert h.task_index is None
    # The run's history is its task's history.
    assert failed.steps[0].tasks[0].history == history
    assert failed.error == history[-1].error


def test_history_of_a_flow_names_the_step_and_map_task(store, clock):
    etl = pf.flow("etl", max_attempts=2, base_delay=10)

    @etl.step()
    def extract(input, ctx):
        if ctx.attempt == 1:
            raise TimeoutError("source slow")
        return [1, 2, 3]

    @etl.map(array=extract)
    def load(item, ctx):
        if item == 2:
            raise ValueError(f"row {item} rejected ({ctx.attempt})")
        return item

    run = store.start(etl, None)
    drain(store, etl, concurrency=1)
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    got = [(h.step_slug, h.task_index, h.attempt, h.error) for h in failed.history]
    assert got == [
        ("extract", None, 1, "TimeoutError: source slow"),
        ("load", 1, 1, "ValueError: row 2 rejected (1)"),
        ("load", 1, 2, "ValueError: row 2 rejected (2)"),
    ]
    times = [h.at for h in failed.history]
    assert times == sorted(times)


# --- retry --------------------------------------------------------------------------------------


def test_retry_of_a_dead_run_keeps_its_history_and_can_complete(store, clock):
    calls: list[int] = []

    @pf.job(queue="webhook", max_attempts=3, base_delay=10)
    def webhook(input, ctx):
        calls.append(ctx.attempt)
        if len(calls) <= 5:  # 3 failures, then 2 more after the retry, then success
            raise RuntimeError(f"HTTP 503 (call {len(calls)})")
        return {"delivered": input["id"], "attempt": ctx.attempt}

    run = store.start(webhook, {"id": "evt_1"})
    drain(store, webhook)
    dead = store.get_run(run.id)
    assert dead.status is pf.RunStatus.FAILED
    assert [r.id for r in store.runs(status="failed")] == [run.id]
    old_history = dead.history
    assert len(old_history) == 3

    clock.advance(3600)  # an operator looks at the dead letters an hour later
    retried = store.retry(run.id)
    assert retried.id == run.id
    assert retried.status is pf.RunStatus.QUEUED
    assert retried.error is None and retried.finished_at is None and retried.output is None
    assert retried.history == old_history  # kept on retry
    assert store.runs(status="failed") == []

    drain(store, webhook)
    done = store.get_run(run.id)
    assert calls == [1, 2, 3, 1, 2, 3]  # fresh attempts
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"delivered": "evt_1", "attempt": 3}
    assert done.error is None
    assert done.attempts == 3
    assert done.input == {"id": "evt_1"}
    # The history is the old one extended by the new attempts' failures.
    assert done.history[:3] == old_history
    assert [(h.attempt, h.error) for h in done.history] == [
        (1, "RuntimeError: HTTP 503 (call 1)"),
        (2, "RuntimeError: HTTP 503 (call 2)"),
        (3, "RuntimeError: HTTP 503 (call 3)"),
        (1, "RuntimeError: HTTP 503 (call 4)"),
        (2, "RuntimeError: HTTP 503 (call 5)"),
    ]
    assert [h.at for h in done.history[3:]] == [at(3630), at(3640)]


def test_a_run_that_dies_again_after_retry_is_back_in_the_dead_letters(store, clock):
    @pf.job(queue="hopeless", max_attempts=2, base_delay=1)
    def hopeless(input, ctx):
        raise ValueError("still broken")

    run = store.start(hopeless)
    drain(store, hopeless)
    store.retry(run.id)
    drain(store, hopeless)
    dead = store.runs(status="failed")
    assert [r.id for r in dead] == [run.id]
    assert [h.attempt for h in dead[0].history] == [1, 2, 1, 2]
    assert dead[0].attempts == 2


def test_retry_of_a_flow_reruns_only_what_did_not_complete(store):
    ran: list[str] = []
    broken = {"transform": True}
    report = pf.flow("report")

    @report.step()
    def fetch(input, ctx):
        ran.append("fetch")
        return {"rows": 3}

    @report.step(depends_on=[fetch])
    def transform(deps, ctx):
        ran.append("transform")
        if broken["transform"]:
            raise RuntimeError("bug")
        return deps["fetch"]["rows"] * 2

    @report.step(depends_on=[transform])
    def publish(deps, ctx):
        ran.append("publish")
        return {"published": deps["transform"]}

    run = store.start(report, None)
    drain(store, report)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED
    assert ran == ["fetch", "transform"]

    broken["transform"] = False  # the bug is fixed and deployed
    store.retry(run.id)
    drain(store, report)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"publish": {"published": 6}}
    assert ran == ["fetch", "transform", "transform", "publish"]
    assert [(h.step_slug, h.error) for h in done.history] == [("transform", "RuntimeError: bug")]


def test_retry_of_a_cancelled_run_runs_it(store):
    calls: list[Any] = []

    @pf.job(queue="resend")
    def resend(input, ctx):
        calls.append(input)
        return "sent"

    run = store.start(resend, "mail-1", delay=600)
    store.cancel(run.id)
    drain(store, resend)
    assert calls == []
    assert store.retry(run.id).status in (pf.RunStatus.QUEUED, pf.RunStatus.SCHEDULED)
    drain(store, resend)
    assert calls == ["mail-1"]
    assert store.get_run(run.id).output == "sent"


def test_retry_of_a_run_that_is_not_failed_or_cancelled_is_refused(store):
    @pf.job(queue="echo")
    def echo(input, ctx):
        return input

    queued = store.start(echo, 1)
    scheduled = store.start(echo, 2, delay=60)
    for run in (queued, scheduled):
        with pytest.raises(pf.InputError):
            store.retry(run.id)
    drain(store, echo)
    completed = store.get_run(queued.id)
    assert completed.status is pf.RunStatus.COMPLETED
    with pytest.raises(pf.InputError, match="completed"):
        store.retry(queued.id)
    # Nothing was changed by the refused retries.
    assert store.get_run(queued.id) == completed
    with pytest.raises(pf.RunNotFound):
        store.retry("no-such-run")


# --- scheduling by key, cancel ------------------------------------------------------------------


def test_scheduled_post_is_found_by_key_and_cancelled_before_it_runs(store, clock):
    published: list[str] = []

    @pf.job(queue="publish_post")
    def publish_post(input, ctx):
        published.append(input["post"])

    post_a, post_b = str(uuid.uuid4()), str(uuid.uuid4())
    when = clock.datetime() + timedelta(hours=2)
    run_a = store.start(publish_post, {"post": post_a}, run_at=when, key=f"post:{post_a}")
    run_b = store.start(publish_post, {"post": post_b}, delay=timedelta(hours=1), key=f"post:{post_b}")

    assert run_a.status is pf.RunStatus.SCHEDULED
    assert {r.id for r in store.runs(status="scheduled")} == {run_a.id, run_b.id}

    # The user deletes post A: find its scheduled run by key, cancel it.
    (found,) = store.runs(key=f"post:{post_a}")
    assert found.id == run_a.id
    assert found.key == f"post:{post_a}"
    assert found.input == {"post": post_a}
    assert found.status is pf.RunStatus.SCHEDULED
    assert store.runs(flow=publish_post, key=f"post:{post_a}") == [found]
    assert store.runs(key="post:unknown") == []
    assert store.runs(flow="other_flow", key=f"post:{post_a}") == []
    # Starting with the same key again does not create a second run.
    assert store.start(publish_post, {"post": post_a}, run_at=when, key=f"post:{post_a}").id == run_a.id

    cancelled = store.cancel(found.id)
    assert cancelled.status is pf.RunStatus.CANCELLED
    assert [r.id for r in store.runs(status="scheduled")] == [run_b.id]
    assert [r.id for r in store.runs(status="cancelled")] == [run_a.id]

    # Well past both times, a runner publishes B and never A.
    clock.advance(timedelta(hours=3))
    stats = drain(store, publish_post)
    assert published == [post_b]
    assert stats.completed == 1
    assert store.get_run(run_a.id).status is pf.RunStatus.CANCELLED
    assert store.get_run(run_b.id).status is pf.RunStatus.COMPLETED
    assert store.runs(key=f"post:{post_a}")[0].status is pf.RunStatus.CANCELLED


def test_a_runner_waiting_for_a_scheduled_run_never_runs_it_once_cancelled(store, clock):
    ran: list[Any] = []

    @pf.job(queue="reminder")
    def reminder(input, ctx):
        ran.append(input)

    run = store.start(reminder, "call mum", delay=timedelta(days=1), key="reminder:1")
    assert store.get_run(run.id).status is pf.RunStatus.SCHEDULED
    store.cancel(run.id)
    drain(store, reminder)  # nothing left to wait for: returns without running it
    clock.advance(timedelta(days=2))
    drain(store, reminder)
    assert ran == []
    assert store.get_run(run.id).status is pf.RunStatus.CANCELLED


def test_cancel_of_a_finished_run_changes_nothing(store):
    @pf.job(queue="done_job")
    def done_job(input, ctx):
        return "out"

    run = store.start(done_job)
    drain(store, done_job)
    before = store.get_run(run.id)
    with contextlib.suppress(pf.PgflowError):  # refusing is fine; rewriting a finished run is not
        store.cancel(run.id)
    assert store.get_run(run.id) == before
    with pytest.raises(pf.RunNotFound):
        store.cancel("no-such-run")


# --- every status -------------------------------------------------------------------------------


def test_every_run_status_is_observed(store, clock):
    observed: dict[pf.RunStatus, str] = {}

    def see(run: pf.Run, expected: pf.RunStatus) -> None:
        assert run.status is expected
        assert isinstance(run.status, str) and run.status == expected.value
        # The status filter of store.runs agrees with the status of the run.
        assert run.id in {r.id for r in store.runs(status=expected.value)}
        for other in pf.RunStatus:
            if other is not expected:
                assert run.id not in {r.id for r in store.runs(status=other)}
        observed[expected] = run.id

    @pf.job(queue="status_job", max_attempts=2, base_delay=30)
    def status_job(input, ctx):
        if input == "look":
            # From inside a handler, its own run reads as running.
            see(store.get_run(ctx.run_id), pf.RunStatus.RUNNING)
            return "looked"
        if input == "fail":
            raise pf.PermanentFailure("no")
        return input

    # scheduled, then queued once its time has come (no runner involved)
    later = store.start(status_job, "later", delay=120)
    see(store.get_run(later.id), pf.RunStatus.SCHEDULED)
    assert later.status is pf.RunStatus.SCHEDULED
    clock.advance(120)
    see(store.get_run(later.id), pf.RunStatus.QUEUED)
    now = store.start(status_job, "now")
    assert now.status is pf.RunStatus.QUEUED
    see(store.get_run(now.id), pf.RunStatus.QUEUED)

    # retrying: a failed attempt waiting out its backoff
    retrying = store.start(status_job, "retrying", priority=100)  # claimed before the others
    backend = store.backend
    (task,) = backend.claim("tester", ["status_job"], 1, 30)
    assert task.run_id == retrying.id
    see(store.get_run(retrying.id), pf.RunStatus.RUNNING)
    backend.finish([], [TaskFailure(task.id, task.attempt, "RuntimeError: x", clock.now() + 30)])
    see(store.get_run(retrying.id), pf.RunStatus.RETRYING)
    see(store.get_run(now.id), pf.RunStatus.QUEUED)

    # running (seen by the handler), completed, failed, cancelled
    look = store.start(status_job, "look")
    fail = store.start(status_job, "fail")
    doomed = store.start(status_job, "cancel me", delay=60)
    store.cancel(doomed.id)
    drain(store, status_job)
    see(store.get_run(look.id), pf.RunStatus.COMPLETED)
    see(store.get_run(now.id), pf.RunStatus.COMPLETED)
    see(store.get_run(retrying.id), pf.RunStatus.COMPLETED)
    see(store.get_run(fail.id), pf.RunStatus.FAILED)
    see(store.get_run(doomed.id), pf.RunStatus.CANCELLED)

    assert set(observed) == set(pf.RunStatus)
    assert {s.value for s in pf.RunStatus} == {
        "scheduled", "queued", "running", "retrying", "completed", "failed", "cancelled",
    }
    assert {s for s in pf.RunStatus if s.is_terminal} == {
        pf.RunStatus.COMPLETED, pf.RunStatus.FAILED, pf.RunStatus.CANCELLED,
    }


def test_a_multi_step_run_between_steps_reads_running_not_queued(store):
    # Its first step completed and the next one waits to be claimed: work has started.
    two = pf.flow("two_steps")

    @two.step()
    def first(input, ctx):
        return 1

    @two.step(depends_on=[first])
    def second(deps, ctx):
        return 2

    run = store.start(two, None)
    backend = store.backend
    (task,) = backend.claim("tester", ["two_steps"], 10, 30)
    backend.finish([pf.store.TaskSuccess(task.id, task.attempt, "1")], [])
    assert store.get_run(run.id).status is pf.RunStatus.RUNNING


def test_a_retry_after_its_backoff_reads_running_then_completed(store, clock):
    @pf.job(queue="later_ok", max_attempts=2, base_delay=30)
    def later_ok(input, ctx):
        return "ok"

    run = store.start(later_ok)
    backend = store.backend
    (task,) = backend.claim("tester", ["later_ok"], 10, 30)
    backend.finish([], [TaskFailure(task.id, task.attempt, "E: first", clock.now() + 30)])
    assert store.get_run(run.id).status is pf.RunStatus.RETRYING
    assert backend.claim("tester", ["later_ok"], 10, 30) == []  # not before its backoff
    clock.advance(30)
    (again,) = backend.claim("tester", ["later_ok"], 10, 30)
    assert again.attempt == 2
    assert store.get_run(run.id).status is pf.RunStatus.RUNNING
    backend.finish([pf.store.TaskSuccess(again.id, again.attempt, '"ok"')], [])
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert [(h.attempt, h.error) for h in done.history] == [(1, "E: first")]


def test_a_run_whose_claimed_task_was_released_unstarted_reads_queued_again(store):
    # A runner hands a claimed task back without running it (shutdown, or a newer flow shape
    # deployed elsewhere): the attempt does not count and nothing of the run has started, so it
    # is "queued" (DESIGN: nothing started, due now), and store.runs(status="queued") lists it.
    @pf.job(queue="handed_back")
    def handed_back(input, ctx):
        return input

    run = store.start(handed_back, 1)
    backend = store.backend
    (task,) = backend.claim("tester", ["handed_back"], 1, 30)
    assert store.get_run(run.id).status is pf.RunStatus.RUNNING
    backend.release("tester", [task.id])
    released = store.get_run(run.id)
    assert released.attempts == 0
    assert released.status is pf.RunStatus.QUEUED
    assert [r.id for r in store.runs(status="queued")] == [run.id]


def test_a_cancelled_run_frees_its_key_for_a_new_schedule(tmp_path):
    clock = FakeClock(1_800_000_000)
    with pf.connect(tmp_path / "rekey.db", clock=clock) as store:

        @pf.job(queue="remind")
        def remind(input, ctx):
            return input

        first = store.start(remind, "v1", delay=3600, key="post:1")
        assert store.start(remind, "ignored", key="post:1").id == first.id
        store.cancel(first.id)
        second = store.start(remind, "v2", delay=60, key="post:1")
        assert second.id != first.id
        assert store.start(remind, "ignored again", key="post:1").id == second.id
        # The cancelled run cannot come back while its key belongs to the new one.
        with pytest.raises(pf.InputError, match="key now belongs to run"):
            store.retry(first.id)
        pf.run_flows([remind], store=store, until_idle=True)
        assert [(r.input, r.status) for r in store.runs(key="post:1")] == [
            ("v2", pf.RunStatus.COMPLETED), ("v1", pf.RunStatus.CANCELLED),
        ]
