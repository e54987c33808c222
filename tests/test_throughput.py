"""Per-flow throughput by minute (``store.throughput``): what runners completed and which
attempts failed, as the dashboard's overview chart reads it. Every test runs on SQLite and, with
``$PGFLOW_TEST_POSTGRES`` set, on PostgreSQL (the ``store`` fixture); the migration tests look at
the SQLite file, or at a PostgreSQL schema of their own."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from _helpers import POSTGRES_URL, as_schema_version, drain

import pgflow_py as pf
from pgflow_py.clock import utc_datetime

T0 = 1_800_000_000  # where the ``clock`` fixture starts: the start of a minute


@pf.job(queue="tp_ok")
def tp_ok(input: Any, ctx: pf.Context) -> Any:
    return input


@pf.job(queue="tp_bad", max_attempts=2, base_delay=0)
def tp_bad(input: Any, ctx: pf.Context) -> Any:
    raise ValueError("always")


@pf.job(queue="tp_slow")
async def tp_slow(input: float, ctx: pf.Context) -> float:
    await anyio.sleep(input)
    return input


def point(flow: str, at: float, completed: int, failed: int) -> pf.ThroughputPoint:
    return pf.ThroughputPoint(flow, utc_datetime(at), completed, failed)


def test_a_drained_runner_shows_completed_tasks_and_failed_attempts_by_flow(
    store: pf.Store,
) -> None:
    store.start_many(tp_ok, [1, 2, 3])
    store.start_many(tp_bad, [1, 2])  # two attempts each, both failing
    stats = drain(store, tp_ok, tp_bad)
    assert (stats.completed, stats.failed, stats.retried) == (3, 2, 2)

    # T0 is the start of a minute; base_delay=0 keeps the fake clock there.
    assert store.throughput() == [point("tp_bad", T0, 0, 4), point("tp_ok", T0, 3, 0)]
    assert store.throughput(flow=tp_ok) == [point("tp_ok", T0, 3, 0)]
    assert store.throughput(flow="tp_bad") == [point("tp_bad", T0, 0, 4)]
    assert store.throughput(flow="no_such_flow") == []
    [first] = store.throughput(flow=tp_ok)
    assert first.minute.tzinfo is not None and first.minute.utcoffset() == timedelta(0)


def test_counts_from_two_runners_add_up(store: pf.Store) -> None:
    store.start_many(tp_ok, [1, 2])
    drain(store, tp_ok)
    store.start_many(tp_ok, [3, 4, 5])
    store.start(tp_bad, 1)
    drain(store, tp_ok, tp_bad)
    assert store.throughput() == [point("tp_bad", T0, 0, 2), point("tp_ok", T0, 5, 0)]


def test_one_runner_counts_each_task_in_the_minute_it_completed_in(store: pf.Store) -> None:
    store.start(tp_ok, 1)
    store.start(tp_bad, 1, delay=90)  # the fake clock jumps to it: the next minute
    store.start(tp_ok, 2, delay=200)
    drain(store, tp_ok, tp_bad)
    assert store.throughput() == [
        point("tp_bad", T0 + 60, 0, 2), point("tp_ok", T0, 1, 0), point("tp_ok", T0 + 180, 1, 0),
    ]


def test_only_the_minutes_of_the_window_are_returned_oldest_first(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    store.start(tp_ok, 1)
    drain(store, tp_ok)
    clock.advance(5 * 60 + 30)  # half way through the fifth minute after
    store.start_many(tp_ok, [2, 3])
    drain(store, tp_ok)

    later = T0 + 5 * 60
    # The window ends with the current minute: 5 minutes reach back to T0 + 60 only.
    assert store.throughput(minutes=5) == [point("tp_ok", later, 2, 0)]
    assert store.throughput(minutes=6) == [point("tp_ok", T0, 1, 0), point("tp_ok", later, 2, 0)]
    assert store.throughput() == store.throughput(minutes=6)  # sparse: nothing in between
    assert store.throughput(minutes=1) == [point("tp_ok", later, 2, 0)]
    clock.advance(60 * 60)
    assert store.throughput() == []
    assert len(store.throughput(minutes=10080)) == 2


def test_prune_removes_the_throughput_of_minutes_before_its_cutoff(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    store.start(tp_ok, 1)
    drain(store, tp_ok)
    clock.advance(2 * 3600)
    store.start(tp_ok, 2)
    drain(store, tp_ok)
    assert len(store.throughput(minutes=10080)) == 2

    assert store.prune(older_than=timedelta(hours=1)) == 1  # the first run
    assert store.throughput(minutes=10080) == [point("tp_ok", T0 + 2 * 3600, 1, 0)]
    store.prune(older_than=timedelta(0))  # the current minute has not ended: it stays
    assert store.throughput(minutes=10080) == [point("tp_ok", T0 + 2 * 3600, 1, 0)]


def test_deleting_a_flow_deletes_its_throughput(store: pf.Store) -> None:
    store.start(tp_ok, 1)
    store.start(tp_bad, 1)
    drain(store, tp_ok, tp_bad)
    store.delete_flow("tp_bad")
    assert store.throughput() == [point("tp_ok", T0, 1, 0)]


def test_a_lost_workers_attempt_counts_as_failed(store: pf.Store) -> None:
    store.start(tp_ok, 1)
    store.backend.claim("dead-worker", ["tp_ok"], 10, 0.05)
    time.sleep(0.1)  # the dead worker never renews its lease
    assert store.backend.reclaim_expired(["tp_ok"]) == 1
    assert store.throughput() == [point("tp_ok", T0, 0, 1)]


def test_a_failing_flush_is_retried_at_the_next_heartbeat_without_losing_counts(
    store: pf.Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    backend = store.backend
    add = backend.add_throughput
    calls: list[list[tuple[str, int, int, int]]] = []

    def flaky(rows: Any) -> None:
        calls.append(list(rows))
        if len(calls) == 1:
            raise pf.StoreError("the database is locked")
        add(rows)

    monkeypatch.setattr(backend, "add_throughput", flaky)
    store.start_many(tp_slow, [0.0, 0.0, 1.0])  # two done at once, one that outlasts beats
    with caplog.at_level(logging.WARNING, logger="pgflow_py.runner"):
        # A heartbeat every 0.1 s: the first flush fails, the next one is retried in time.
        stats = drain(store, tp_slow, lease=0.3, concurrency=3)
    assert stats.completed == 3
    assert len(calls) >= 3  # failed, retried at a beat, the rest when the runner stopped
    assert calls[1][0][2] >= calls[0][0][2] > 0  # nothing dropped after the failure
    assert store.throughput() == [point("tp_slow", T0, 3, 0)]
    assert any(
        "could not record the throughput" in r.getMessage()
        and "retrying at the next heartbeat" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("minutes", [0, -1, 10081, 1.5, True, "60", None])
def test_minutes_out_of_range_is_refused_with_the_range(store: pf.Store, minutes: Any) -> None:
    with pytest.raises(pf.InputError, match=r"minutes must be a whole number from 1 to 10080"):
        store.throughput(minutes=minutes)


def test_a_flow_that_is_not_a_flow_or_slug_is_refused(store: pf.Store) -> None:
    with pytest.raises(pf.InputError, match="flow must be"):
        store.throughput(flow=42)  # type: ignore[arg-type]


# --- migration ------------------------------------------------------------------------------------


def test_a_version_4_sqlite_database_gains_the_throughput_table(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from pgflow_py.store.sqlite import SCHEMA_VERSION

    with monkeypatch.context() as patch:
        as_schema_version(patch, 4)
        with pf.connect(db_path) as old:
            run = old.start(tp_ok, 7)
    with pf.connect(db_path) as new:
        drain(new, tp_ok)
        assert new.get_run(run.id).output == 7
        [only] = new.throughput()
        assert (only.flow_slug, only.completed, only.failed) == ("tp_ok", 1, 0)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


@pytest.mark.skipif(POSTGRES_URL is None, reason="needs a PostgreSQL server")
def test_a_version_3_postgres_schema_gains_the_throughput_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pgflow_py.store import postgres

    assert POSTGRES_URL is not None
    schema = f"test_{uuid.uuid4().hex[:16]}"
    clock = pf.testing.FakeClock(T0)
    with monkeypatch.context() as patch:
        patch.setattr(postgres, "SCHEMA_VERSION", 3)
        # A job's run row holds its task since version 7.
        patch.setattr(postgres.PostgresBackend, "_JOB_ROWS", False)
        with pf.Store(postgres.PostgresBackend(POSTGRES_URL, clock, schema=schema)) as old:
            run = old.start(tp_ok, 7)
            assert old.backend._conn.execute(  # type: ignore[attr-defined]
                "SELECT to_regclass('throughput') IS NULL"
            ).fetchone()[0]
    backend = postgres.PostgresBackend(POSTGRES_URL, clock, schema=schema)
    try:
        with pf.Store(backend) as new:
            drain(new, tp_ok)
            assert new.get_run(run.id).output == 7
            assert new.throughput() == [point("tp_ok", T0, 1, 0)]
            version = backend._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()[0]
            assert int(version) == postgres.SCHEMA_VERSION
    finally:
        backend.drop_schema_and_close()
