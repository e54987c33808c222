"""A job as one row: a job's run row holds its one task (schema 8 on SQLite, 7 on PostgreSQL).

What users see does not change (the store's other tests check that); these check what is new:
existing databases move their jobs' tasks into their runs' rows and every run reads and
behaves as before, and a slug that changes kind (job to flow, flow to job) moves its queued runs.

Runs on SQLite, and on PostgreSQL with ``$PGFLOW_TEST_POSTGRES`` set (see .ci/run).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _helpers import POSTGRES_URL, as_schema_version, drain

import pgflow_py as pf
from pgflow_py.store import TaskFailure, TaskSuccess
from pgflow_py.store.sqlite import LOST_WORKER

T0 = 1_800_000_000.0


@pf.job(queue="jr_job", max_attempts=3, base_delay=10)
def jr_job(input: Any, ctx: pf.Context) -> Any:
    return input["n"] * 10


@pf.job(queue="jr_if", if_={"go": True})
def jr_if(input: Any, ctx: pf.Context) -> Any:
    return "ran"


jr_flow = pf.flow("jr_flow")


@jr_flow.step()
def first(input: Any, ctx: pf.Context) -> Any:
    return input["n"] + 1


@jr_flow.step(depends_on=[first])
def second(deps: Any, ctx: pf.Context) -> Any:
    return deps["first"] * 2


@contextmanager
def _stores(tmp_path: Path, patch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``opened(old)``: a store on one database, at the schema version before job rows
    (``old=True``) or the current one; PostgreSQL's schema is dropped at the end."""
    clock = pf.testing.FakeClock(T0)
    if POSTGRES_URL is None:
        def opened_sqlite(old: bool) -> pf.Store:
            with patch.context() as p:
                if old:
                    as_schema_version(p, 7)
                return pf.connect(tmp_path / "jobs.db", clock=clock)

        yield opened_sqlite, clock
        return
    from pgflow_py.store import postgres

    schema = f"test_{uuid.uuid4().hex[:16]}"

    def opened_postgres(old: bool) -> pf.Store:
        assert POSTGRES_URL is not None
        with patch.context() as p:
            if old:
                p.setattr(postgres, "SCHEMA_VERSION", 6)
                p.setattr(postgres.PostgresBackend, "_JOB_ROWS", False)
            return pf.Store(postgres.PostgresBackend(POSTGRES_URL, clock, schema=schema))

    try:
        yield opened_postgres, clock
    finally:
        opened_postgres(False).backend.drop_schema_and_close()  # type: ignore[attr-defined]


def _claim_one(store: pf.Store, slug: str, lease: float = 30.0) -> Any:
    [task] = store.backend.claim("w", [slug], 1, lease)
    return task


def test_a_database_from_before_job_rows_moves_its_jobs_and_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _stores(tmp_path, monkeypatch) as (opened, clock):
        old = opened(True)
        with monkeypatch.context() as p:
            # The old version's code paths (jobs' tasks in step_tasks) while its store is open.
            p.setattr(type(old.backend), "_JOB_ROWS", False)
            done = old.start(jr_job, {"n": 1})
            task = _claim_one(old, "jr_job")
            old.backend.finish([TaskSuccess(task.id, 1, "10", claim=task.claim)], [])
            retrying = old.start(jr_job, {"n": 2})
            task = _claim_one(old, "jr_job")
            old.backend.finish([], [TaskFailure(task.id, 1, "E: once", T0 + 10, task.claim)])
            running = old.start(jr_job, {"n": 3})
            lost = _claim_one(old, "jr_job", lease=0.2)  # its worker dies across the upgrade
            failed = old.start(jr_job, {"n": 4})
            task = _claim_one(old, "jr_job")
            old.backend.finish([], [TaskFailure(task.id, 1, "E: for good", None, task.claim)])
            cancelled = old.start(jr_job, {"n": 5})
            old.backend.cancel(cancelled.id)
            queued = old.start(jr_job, {"n": 6}, priority=3, key="k6")
            scheduled = old.start(jr_job, {"n": 7}, delay=60)
            unmet = old.start(jr_if, {"go": False})
            flow_run = old.start(jr_flow, {"n": 8})
            old_tasks = old.backend._conn.execute(  # type: ignore[attr-defined]
                "SELECT count(*) FROM step_tasks"
            ).fetchone()[0]
            old.close()
        assert old_tasks == 7 + 1  # a row per job task and the flow's first step

        new = opened(False)
        try:
            conn = new.backend._conn  # type: ignore[attr-defined]
            # Unfinished jobs' tasks moved into their runs' rows; finished jobs' stay in
            # step_tasks (read alike), beside the flow's task.
            assert {r[0] for r in conn.execute("SELECT run_id FROM step_tasks").fetchall()} == {
                done.id, failed.id, cancelled.id, flow_run.id}
            assert {r[0] for r in conn.execute(
                "SELECT id FROM runs WHERE task_status IS NOT NULL"
            ).fetchall()} == {retrying.id, running.id, queued.id, scheduled.id}

            def read(run: pf.Run) -> pf.Run:
                return new.get_run(run.id)

            assert (read(done).status, read(done).output, read(done).attempts) == (
                pf.RunStatus.COMPLETED, 10, 1)
            assert read(done).steps[0].status == "completed"
            r = read(retrying)
            assert (r.status, r.attempts, [h.error for h in r.history]) == (
                pf.RunStatus.RETRYING, 1, ["E: once"])
            assert read(running).status is pf.RunStatus.RUNNING
            f = read(failed)
            assert (f.status, f.error, f.steps[0].status) == (
                pf.RunStatus.FAILED, "E: for good", "failed")
            assert read(cancelled).status is pf.RunStatus.CANCELLED
            q = read(queued)
            assert (q.status, q.priority, q.key) == (pf.RunStatus.QUEUED, 3, "k6")
            assert new.start(jr_job, {"n": 0}, key="k6").id == queued.id  # the key still holds
            assert read(scheduled).status is pf.RunStatus.SCHEDULED
            u = read(unmet)
            assert (u.status, u.steps[0].status, u.steps[0].skip_reason) == (
                pf.RunStatus.COMPLETED, "skipped", "condition_unmet")
            assert read(flow_run).status is pf.RunStatus.QUEUED
            assert new.count(flow="jr_job", status="retrying") == 1
            assert new.count(flow="jr_job", status="running") == 1
            assert [x.id for x in new.runs(flow="jr_job", status="scheduled")] == [scheduled.id]

            # The old claim's result names a task id that moved: it changes nothing. Once its
            # lease runs out, the attempt counts as lost and the job runs again.
            new.backend.finish([TaskSuccess(lost.id, 1, "999", claim=lost.claim)], [])
            time.sleep(0.3)
            assert new.backend.reclaim_expired(["jr_job"]) == 1
            assert [h.error for h in read(running).history] == [LOST_WORKER]

            # Finished jobs left in step_tasks run again from there when retried.
            assert new.retry(failed.id) and new.retry(cancelled.id)
            clock.advance(60)
            drain(new, jr_job, jr_flow)
            for run, n in ((retrying, 2), (running, 3), (failed, 4), (cancelled, 5),
                           (queued, 6), (scheduled, 7)):
                assert (read(run).status, read(run).output) == (pf.RunStatus.COMPLETED, n * 10)
            assert read(running).attempts == 2
            assert read(flow_run).output == {"second": 18}
            assert conn.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('queued', 'started')"
            ).fetchone()[0] == 0
            # Jobs started now are one row each.
            fresh = new.start(jr_job, {"n": 9})
            assert conn.execute(
                "SELECT count(*) FROM step_tasks WHERE run_id = ?", (fresh.id,)
            ).fetchone()[0] == 0
        finally:
            new.close()


def _flow_of(slug: str) -> pf.Flow:
    """A flow whose root step has the slug of the job's one step (the job's slug)."""
    f = pf.flow(slug)

    @f.step(slug)
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return {"n": input["n"]}

    @f.step(depends_on=[slug])
    def double(deps: Any, ctx: pf.Context) -> Any:
        return deps[slug]["n"] * 2

    return f


def _job_of(slug: str) -> pf.Flow:
    @pf.job(queue=slug)
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return input["n"] * 3

    return fetch


def test_a_job_that_becomes_a_flow_moves_its_queued_runs(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    job, flow = _job_of("jr_becomes"), _flow_of("jr_becomes")
    now = store.start(job, {"n": 1}, key="a")
    later = store.start(job, {"n": 2}, delay=30)

    store.register(flow)  # a deploy of the new kind: nothing had started

    moved = store.get_run(later.id)
    assert moved.status is pf.RunStatus.SCHEDULED
    assert [s.slug for s in moved.steps] == ["jr_becomes", "double"]
    assert store.start(flow, {"n": 9}, key="a").id == now.id
    clock.advance(30)
    drain(store, flow)
    assert store.get_run(now.id).output == {"double": 2}
    assert store.get_run(later.id).output == {"double": 4}
    assert store.count(flow="jr_becomes", status="completed") == 2


def test_a_flow_that_becomes_a_job_moves_its_queued_runs(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    flow, job = _flow_of("jr_became"), _job_of("jr_became")
    now = store.start(flow, {"n": 1}, priority=2)
    later = store.start(flow, {"n": 2}, delay=30)

    store.register(job)

    moved = store.get_run(later.id)
    assert moved.status is pf.RunStatus.SCHEDULED
    assert [s.slug for s in moved.steps] == ["jr_became"]
    assert store.get_run(now.id).priority == 2
    clock.advance(30)
    drain(store, job)
    assert store.get_run(now.id).output == 3
    assert store.get_run(later.id).output == 6
