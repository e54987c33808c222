"""Bad conditions: a read-only or full database gives a clear error; the runner backs off and
recovers instead of spinning or crashing."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

import pgflow_py as pf


@pf.job(queue="bad_cond_echo")
def echo(input, ctx):
    return input


def test_read_only_database_is_a_clear_store_error(tmp_path):
    db = tmp_path / "ro.db"
    with pf.connect(db) as store:
        store.register(echo)
        store.backend._conn.execute("PRAGMA query_only = ON")  # what a read-only file does
        with pytest.raises(pf.StoreError) as caught:
            store.start(echo, 1)
    message = str(caught.value)
    assert str(db) in message
    assert "read-only" in message and "write access" in message
    with pf.connect(db) as store:
        assert store.runs() == []  # nothing half-written


def test_full_disk_is_a_clear_store_error(tmp_path):
    db = tmp_path / "full.db"
    with pf.connect(db) as store:
        store.register(echo)
        pages = store.backend._conn.execute("PRAGMA page_count").fetchone()[0]
        store.backend._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(pf.StoreError, match="full: free some space") as caught:
            store.start_many(echo, ["x" * 5000] * 200)
        assert str(db) in str(caught.value)
        store.backend._conn.execute("PRAGMA max_page_count = 1073741823")
        assert len(store.start_many(echo, [1, 2])) == 2  # usable again once there is room


def test_store_errors_are_pgflow_errors():
    assert issubclass(pf.StoreError, pf.PgflowError)


def test_runner_backs_off_while_the_database_is_unwritable_then_recovers(tmp_path, caplog):
    db = tmp_path / "flaky.db"
    store = pf.connect(db)
    conn = store.backend._conn
    broke = threading.Event()

    @pf.job(queue="bad_cond_breaker")
    def breaker(input, ctx):
        if not broke.is_set():  # the first task makes the database unwritable for a second
            broke.set()
            conn.execute("PRAGMA query_only = ON")
            threading.Timer(1.0, conn.execute, ("PRAGMA query_only = OFF",)).start()
        return input

    runs = store.start_many(breaker, [1, 2, 3])
    with caplog.at_level(logging.ERROR, logger="pgflow_py.runner"):
        stats = pf.run_flows(
            [breaker], store=store, until_idle=True, concurrency=1, handle_signals=False
        )
    errors = [r for r in caplog.records if "database error, retrying" in r.getMessage()]
    # Backoff doubles from 50 ms: a second of trouble costs a handful of attempts, not a spin.
    assert 1 <= len(errors) <= 8
    assert "read-only" in errors[0].getMessage()
    assert stats.completed == 3
    assert [store.get_run(r.id).output for r in runs] == [1, 2, 3]
    store.close()


def test_a_runner_that_cannot_write_at_start_fails_clearly(tmp_path):
    with pf.connect(tmp_path / "ro_start.db") as store:
        store.backend._conn.execute("PRAGMA query_only = ON")
        with pytest.raises(pf.StoreError, match="read-only"):
            pf.run_flows([echo], store=store, until_idle=True, handle_signals=False)


def test_results_are_kept_and_recorded_once_the_database_is_back(tmp_path):
    db = tmp_path / "results.db"
    store = pf.connect(db)
    conn = store.backend._conn

    @pf.job(queue="bad_cond_block")
    def block(input, ctx):
        conn.execute("PRAGMA query_only = ON")  # the database breaks while the task runs
        threading.Timer(0.5, conn.execute, ("PRAGMA query_only = OFF",)).start()
        return "kept"

    run = store.start(block)
    stats = pf.run_flows([block], store=store, until_idle=True, handle_signals=False)
    assert stats.completed == 1
    assert store.get_run(run.id).output == "kept"
    store.close()


def test_non_database_file_is_refused_with_its_path(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(pf.PgflowError) as caught:
        pf.connect(junk)
    assert str(junk) in str(caught.value)
