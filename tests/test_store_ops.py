"""Operations on the store: paging, counts, stats, workers, flows, retry_all, delete_flow and
the tracebacks kept in a task's history. Every test runs on SQLite and, with
``$PGFLOW_TEST_POSTGRES`` set, on PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _helpers import as_schema_version

import pgflow_py as pf
from pgflow_py.store.base import TaskFailure, TaskSuccess
from pgflow_py.store.sql.steps import TRACEBACK_LIMIT


@pf.job(queue="ops_echo")
def ops_echo(input: Any, ctx: pf.Context) -> Any:
    return input


@pf.job(queue="ops_other", max_attempts=3)
def ops_other(input: Any, ctx: pf.Context) -> Any:
    return input


@pf.job(queue="ops_idle")
def ops_idle(input: Any, ctx: pf.Context) -> Any:
    return input


ops_pipe = pf.flow("ops_pipe")


@ops_pipe.step()
def first(input: Any, ctx: pf.Context) -> Any:
    return input


@ops_pipe.step(depends_on=["first"])
def second(deps: Any, ctx: pf.Context) -> Any:
    return deps


def fail(store: pf.Store, flow: pf.Flow, n: int = 1, **failure: Any) -> list[str]:
    """Claim ``n`` tasks of ``flow`` and fail each for good; return their run ids."""
    tasks = store.backend.claim("w", [flow.slug], n, 30)
    store.backend.finish([], [
        TaskFailure(t.id, t.attempt, failure.get("error", "ValueError: boom"), None, t.claim,
                    failure.get("traceback"))
        for t in tasks
    ])
    return [t.run_id for t in tasks]


def complete(store: pf.Store, flow: pf.Flow, n: int = 1) -> list[str]:
    tasks = store.backend.claim("w", [flow.slug], n, 30)
    store.backend.finish([TaskSuccess(t.id, t.attempt, "1", t.run_id, t.step_slug,
                                      flow.definition.kind == "job", t.claim) for t in tasks], [])
    return [t.run_id for t in tasks]


def mixed(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    """Runs of every status across three flows."""
    store.start_many(ops_echo, range(10))
    complete(store, ops_echo, 4)
    fail(store, ops_echo, 2)
    store.cancel(store.runs(ops_echo, status="queued", limit=1)[0].id)
    store.backend.claim("w", ["ops_echo"], 1, 30)  # running
    store.start(ops_echo, "later", delay=60)  # scheduled
    store.start_many(ops_other, range(3))
    retrying = store.backend.claim("w", ["ops_other"], 1, 30)[0]
    store.backend.finish([], [TaskFailure(retrying.id, 1, "E: x", clock.now() + 30, retrying.claim)])
    store.start_many(ops_pipe, range(3))
    complete(store, ops_pipe, 1)  # first step done: running, its second step queued


# --- runs(before=) ------------------------------------------------------------------------------


def test_paging_walks_every_run_once_despite_concurrent_starts(store: pf.Store) -> None:
    started = [r.id for r in store.start_many(ops_echo, range(25))]
    seen: list[str] = []
    page = store.runs(ops_echo, limit=10)
    while page:
        seen += [r.id for r in page]
        store.start_many(ops_echo, range(3))  # new runs between pages go before page one
        page = store.runs(ops_echo, limit=10, before=page[-1].id)
    assert seen == started[::-1]


def test_paging_follows_the_listing_order_and_filters(store: pf.Store) -> None:
    runs = [store.start(ops_echo, i).id for i in range(6)]
    store.start(ops_other, "x")
    everything = [r.id for r in store.runs()]
    assert [r.id for r in store.runs(before=everything[2])] == everything[3:]
    assert [r.id for r in store.runs(ops_echo, before=runs[3], limit=2)] == [runs[2], runs[1]]
    assert store.runs(ops_echo, before=runs[0]) == []


def test_paging_from_a_pruned_run_is_a_position_in_time(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    older = store.start(ops_other, 0)  # stays queued
    time.sleep(0.002)  # ids are time-ordered to the millisecond
    cursor = store.start(ops_echo, 1)
    complete(store, ops_echo)
    time.sleep(0.002)
    newer = store.start(ops_echo, 2)
    clock.advance(10)
    assert store.prune(timedelta(seconds=5)) == 1  # the cursor run
    assert [r.id for r in store.runs()] == [newer.id, older.id]
    store.start(ops_echo, 3)
    assert [r.id for r in store.runs(before=cursor.id)] == [older.id]


@pytest.mark.parametrize("before", [1, b"x", ["a"]])
def test_paging_refuses_a_cursor_that_is_no_run_id(store: pf.Store, before: Any) -> None:
    with pytest.raises(pf.InputError, match="before"):
        store.runs(before=before)


# --- count ----------------------------------------------------------------------------------------


def test_count_agrees_with_runs_for_every_status_and_flow(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    mixed(store, clock)
    for flow in (None, ops_echo, "ops_other", ops_pipe, "unknown"):
        assert store.count(flow) == len(store.runs(flow, limit=1000))
        for status in pf.RunStatus:
            assert store.count(flow, status) == len(store.runs(flow, status, limit=1000)), (
                flow, status
            )
    assert store.count(status="completed") == 4
    assert store.count(ops_echo, "failed") == 2
    assert store.count(status=pf.RunStatus.CANCELLED) == 1
    assert store.count(status="scheduled") == 1
    assert store.count(ops_other, "retrying") == 1
    assert store.count(ops_pipe, "running") == 1


def test_count_follows_the_clock_for_scheduled_runs(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    store.start(ops_echo, 1, delay=60)
    assert (store.count(status="scheduled"), store.count(status="queued")) == (1, 0)
    clock.advance(60)
    assert (store.count(status="scheduled"), store.count(status="queued")) == (0, 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [({"status": "done"}, "unknown status"), ({"flow": 3}, "flow"), ({"flow": b"x"}, "flow")],
)
def test_count_refuses_bad_arguments(store: pf.Store, args: dict[str, Any], match: str) -> None:
    with pytest.raises(pf.InputError, match=match):
        store.count(**args)


def test_runs_refuses_a_flow_of_the_wrong_type(store: pf.Store) -> None:
    with pytest.raises(pf.InputError, match="flow"):
        store.runs(flow=3)  # type: ignore[arg-type]


# --- stats ----------------------------------------------------------------------------------------


def test_stats_per_flow(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    mixed(store, clock)
    store.register(ops_idle)
    stats = {s.flow_slug: s for s in store.stats()}
    assert list(stats) == ["ops_echo", "ops_idle", "ops_other", "ops_pipe"]
    for slug, s in stats.items():
        assert set(s.counts) == {status.value for status in pf.RunStatus}
        assert s.counts == {status.value: store.count(slug, status) for status in pf.RunStatus}
    assert stats["ops_echo"].counts == {
        "scheduled": 1, "queued": 2, "running": 1, "retrying": 0,
        "completed": 4, "failed": 2, "cancelled": 1,
    }
    assert stats["ops_idle"].counts == dict.fromkeys(stats["ops_idle"].counts, 0)
    assert stats["ops_idle"].oldest_queued_age is None
    assert stats["ops_echo"].workers == 0


def test_stats_oldest_queued_age_on_the_fake_clock(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    [echo] = [s for s in store.stats() if s.flow_slug == "ops_echo"] or [None]
    assert echo is None  # not stored yet
    store.start(ops_echo, "soon", delay=10)
    assert store.stats()[0].oldest_queued_age is None  # scheduled, not queued
    clock.advance(15)
    assert store.stats()[0].oldest_queued_age == pytest.approx(5)
    store.start(ops_echo, "now")
    clock.advance(2)
    assert store.stats()[0].oldest_queued_age == pytest.approx(7)
    complete(store, ops_echo, 1)  # the oldest goes
    assert store.stats()[0].oldest_queued_age == pytest.approx(2)
    complete(store, ops_echo, 1)
    assert store.stats()[0].oldest_queued_age is None


def test_stats_counts_live_workers_serving_each_flow(store: pf.Store) -> None:
    store.register(ops_echo)
    store.register(ops_other)
    store.backend.heartbeat("h:1:a", ["ops_echo", "ops_other"], [], 30)
    store.backend.heartbeat("h:2:b", ["ops_echo"], [], 30)
    store.backend.heartbeat("h:3:c", ["ops_echo"], [], 0.01)
    time.sleep(0.05)  # h:3:c is lost
    assert {s.flow_slug: s.workers for s in store.stats()} == {"ops_echo": 2, "ops_other": 1}


# --- workers --------------------------------------------------------------------------------------


def test_workers_report_their_tasks_and_become_lost_after_their_lease(store: pf.Store) -> None:
    store.start_many(ops_echo, range(3))
    before = time.time()
    tasks = store.backend.claim("host:12:ab", ["ops_echo"], 2, 30)
    store.backend.heartbeat("host:12:ab", ["ops_echo", "ops_other"], [t.id for t in tasks], 0.2)
    [worker] = store.workers()
    assert worker.id == "host:12:ab"
    assert worker.flows == ("ops_echo", "ops_other")
    assert worker.running == 2
    assert worker.lost is False
    assert isinstance(worker.pid, int) and worker.hostname
    assert worker.started_at.tzinfo is not None and worker.last_heartbeat.tzinfo is not None
    assert before - 1 <= worker.last_heartbeat.timestamp() <= time.time() + 1
    time.sleep(0.3)
    assert store.workers()[0].lost is True
    store.backend.heartbeat("host:12:ab", ["ops_echo"], [t.id for t in tasks], 30)
    again = store.workers()[0]
    assert (again.lost, again.started_at, again.flows) == (False, worker.started_at, ("ops_echo",))
    store.backend.forget_worker("host:12:ab")
    assert store.workers() == []


def test_a_runner_shows_up_as_a_worker(store: pf.Store) -> None:
    seen: list[list[pf.WorkerInfo]] = []

    @pf.job(queue="ops_peek")
    def peek(input: Any, ctx: pf.Context) -> Any:
        seen.append(store.workers())
        return None

    store.start(peek)
    pf.run_flows([peek], store=store, until_idle=True)
    assert seen and seen[0], "the runner had not sent a heartbeat when its task ran"
    assert seen[0][0].flows == ("ops_peek",)


# --- flows ----------------------------------------------------------------------------------------


def test_flows_lists_the_stored_definitions(store: pf.Store) -> None:
    assert store.flows() == []
    store.register(ops_pipe)
    store.start(ops_echo)
    assert store.flows() == [ops_echo.definition, ops_pipe.definition]


# --- retry_all ------------------------------------------------------------------------------------


def test_retry_all_requeues_every_failed_run(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    mixed(store, clock)
    failed_other = fail(store, ops_other, 2)
    assert store.count(status="failed") == 4
    assert store.retry_all(ops_other) == 2
    assert store.count(ops_other, "failed") == 0
    assert {store.get_run(r).status for r in failed_other} == {pf.RunStatus.QUEUED}
    assert store.get_run(failed_other[0]).attempts == 0
    assert len(store.get_run(failed_other[0]).history) == 1  # kept
    assert store.retry_all() == 2
    assert store.retry_all() == 0
    assert store.count(status="failed") == 0
    assert store.count(status="cancelled") == 1  # retry_all leaves cancelled runs alone


def test_retry_all_leaves_runs_of_a_changed_shape_failed(store: pf.Store) -> None:
    def one(input: Any, ctx: pf.Context) -> Any:
        return input

    def two(deps: Any, ctx: pf.Context) -> Any:
        return deps

    old_shape = pf.flow("ops_shape")
    old_shape.step()(one)
    stale = store.start(old_shape)
    fail(store, old_shape)
    fresh = store.start(ops_echo)
    fail(store, ops_echo)
    new_shape = pf.flow("ops_shape")
    new_shape.step()(one)
    new_shape.step(depends_on=["one"])(two)
    store.register(new_shape)
    assert store.retry_all() == 1
    assert store.get_run(stale.id).status == pf.RunStatus.FAILED
    assert store.get_run(fresh.id).status == pf.RunStatus.QUEUED


# --- delete_flow ----------------------------------------------------------------------------------


def test_delete_flow_is_refused_while_runs_are_active(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    mixed(store, clock)
    with pytest.raises(pf.InputError, match=r"4 active run\(s\).*cancel them first"):
        store.delete_flow(ops_echo)
    assert store.count(ops_echo) == 11


def test_delete_flow_deletes_the_definition_and_every_run(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    mixed(store, clock)
    for run in store.runs(ops_echo, limit=1000):
        if not run.status.is_terminal:
            store.cancel(run.id)
    kept = store.runs(ops_other)
    assert store.delete_flow("ops_echo") == 11
    assert store.count(ops_echo) == 0
    assert [d.slug for d in store.flows()] == ["ops_other", "ops_pipe"]
    assert store.runs(ops_other) == kept
    with pytest.raises(pf.FlowNotFound):
        store.start("ops_echo")
    with pytest.raises(pf.FlowNotFound):
        store.delete_flow("ops_echo")
    # Started again from its object, the flow is registered again.
    run = store.start(ops_echo, "again")
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED
    assert [d.slug for d in store.flows()] == ["ops_echo", "ops_other", "ops_pipe"]
    assert complete(store, ops_echo) == [run.id]
    assert store.get_run(run.id).status == pf.RunStatus.COMPLETED


def test_delete_flow_of_a_multi_step_flow_leaves_no_rows(store: pf.Store) -> None:
    store.start_many(ops_pipe, range(2))
    complete(store, ops_pipe, 2)
    complete(store, ops_pipe, 2)
    assert store.count(ops_pipe, "completed") == 2
    assert store.delete_flow(ops_pipe) == 2
    with store.backend._read() as c:  # type: ignore[attr-defined]
        assert [c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("runs", "step_states", "step_tasks", "flows", "steps", "deps")] == [0] * 6


def test_delete_flow_refuses_bad_arguments(store: pf.Store) -> None:
    with pytest.raises(pf.InputError):
        store.delete_flow(None)  # type: ignore[arg-type]
    with pytest.raises(pf.FlowNotFound):
        store.delete_flow("never")


# --- tracebacks -----------------------------------------------------------------------------------


def test_a_failed_attempt_keeps_its_traceback(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    run = store.start(ops_other)
    task = store.backend.claim("w", ["ops_other"], 1, 30)[0]
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'
    store.backend.finish([], [TaskFailure(task.id, 1, "ValueError: boom", clock.now(), task.claim,
                                          trace)])
    task = store.backend.claim("w", ["ops_other"], 1, 30)[0]
    store.backend.finish([], [TaskFailure(task.id, 2, "KeyError: 'k'", None, task.claim)])
    got = store.get_run(run.id)
    assert [(h.attempt, h.error, h.traceback) for h in got.history] == [
        (1, "ValueError: boom", trace), (2, "KeyError: 'k'", None)
    ]
    assert got.error == "KeyError: 'k'"
    assert store.runs(status="failed")[0].history == got.history


def test_a_long_traceback_keeps_its_end(store: pf.Store) -> None:
    run = store.start(ops_echo)
    trace = "head\n" + "x" * (3 * TRACEBACK_LIMIT) + "\nValueError: the end"
    fail(store, ops_echo, traceback=trace)
    [record] = store.get_run(run.id).history
    assert record.traceback is not None
    assert record.traceback.endswith("x\nValueError: the end")
    assert record.traceback.startswith(f"[... {len(trace) - TRACEBACK_LIMIT} characters")
    assert len(record.traceback) < TRACEBACK_LIMIT + 100


def test_history_written_without_tracebacks_reads_as_none(store: pf.Store) -> None:
    run = store.start(ops_echo)
    fail(store, ops_echo)
    with store.backend._write() as c:  # type: ignore[attr-defined]
        c.execute(  # a job's task is its run's row
            "UPDATE runs SET history = ? WHERE id = ?",
            ('[{"attempt": 1, "error": "E: old", "at": 1800000000.0}]', run.id),
        )
    [record] = store.get_run(run.id).history
    assert (record.error, record.traceback) == ("E: old", None)


# --- migration ------------------------------------------------------------------------------------


def test_a_version_2_database_gains_the_operations_schema(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        as_schema_version(patch, 2)
        with pf.connect(db_path) as old:
            failed = old.start(ops_echo)
            fail(old, ops_echo)
            old.start(ops_echo)
            old.backend._conn.execute(
                "INSERT INTO workers (id, hostname, pid, flows, started_at, last_heartbeat) "
                "VALUES ('h:1:a', 'h', 1, 'ops_echo', ?, ?)",
                (time.time(), time.time()),
            )
    with pf.connect(db_path) as new:
        [worker] = new.workers()
        assert (worker.id, worker.lost) == ("h:1:a", False)  # the default lease, 30 s
        assert new.count(status="failed") == 1 and new.count(status="queued") == 1
        assert new.get_run(failed.id).history[0].traceback is None
        assert new.retry_all() == 1
