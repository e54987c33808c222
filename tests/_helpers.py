"""Helpers shared by the test modules (importable because pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import pgflow_py as pf
from pgflow_py.clock import Clock

POSTGRES_URL = os.environ.get("PGFLOW_TEST_POSTGRES")
"""A PostgreSQL server to run the store's tests on instead of SQLite files (see .ci/run)."""

BACKENDS = [  # for tests parametrised over both backends
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.skipif(
        POSTGRES_URL is None, reason="needs a PostgreSQL server: set $PGFLOW_TEST_POSTGRES"
    )),
]


def drain(store: pf.Store, *flows: pf.Flow, **options: Any) -> pf.RunnerStats:
    """Serve ``flows`` until nothing is queued, running or scheduled for them."""
    return pf.run_flows(list(flows), store=store, until_idle=True, **options)


@contextmanager
def fresh_store(path: Path, clock: Clock | None = None) -> Iterator[pf.Store]:
    """A new, empty store: the SQLite file ``path``, or with ``$PGFLOW_TEST_POSTGRES`` set, a
    schema of its own on that server (dropped afterwards)."""
    if POSTGRES_URL is None:
        with pf.connect(path, clock=clock) as store:
            yield store
        return
    from pgflow_py.store.postgres import PostgresBackend

    backend = PostgresBackend(
        POSTGRES_URL, clock or pf.testing.FakeClock(), schema=f"test_{uuid.uuid4().hex[:16]}"
    )
    try:
        with pf.Store(backend) as store:
            yield store
    finally:
        backend.drop_schema_and_close()


def as_schema_version(patch: Any, version: int) -> None:
    """Make new SQLite stores stop at schema ``version``, and read only what it has, as the
    pgflow_py of that version did (``patch``: a monkeypatch context, undone when it ends)."""
    from pgflow_py.store import sqlite
    from pgflow_py.store.sql import SqlBackend

    patch.setattr(sqlite, "SCHEMA_VERSION", version)
    if version < 8:  # a job's run row holds its task since version 8
        patch.setattr(SqlBackend, "_JOB_ROWS", False)
    if version < 6:  # step_states.skip_reason came with version 6
        patch.setattr(SqlBackend, "_SKIP_REASON", "NULL")
    if version < 4:  # runs.trace_context came with version 4
        patch.setattr(SqlBackend, "_CLAIM_RUNS", "SELECT id, input, NULL FROM runs WHERE id IN ({})")


def serve_then_stop(
    store: pf.Store, flows: list[pf.Flow], started: threading.Event,
    before_stop: Callable[[], Any] = lambda: None, **options: Any,
) -> tuple[pf.RunnerStats, float]:
    """Serve ``flows`` until a handler sets ``started``, call ``before_stop``, then stop the
    runner as SIGTERM would; return its stats and the seconds it took to stop."""
    from pgflow_py.runtime.runner import Runner

    settings = {"concurrency": 2, "until_idle": False, "resources": {}, "lease": 30.0,
                "poll_interval": 0.05, "shutdown_timeout": 20.0, **options}
    runner = Runner(store, flows, **settings)

    async def main() -> tuple[pf.RunnerStats, float]:
        result: list[pf.RunnerStats] = []
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                result.append(await runner.run())

            tg.start_soon(serve)
            await anyio.to_thread.run_sync(started.wait, 10)
            before_stop()
            await anyio.sleep(0.2)
            stopped_at = time.monotonic()
            runner.stop()
            with anyio.fail_after(30):  # detects a hang, not a speed
                while not result:
                    await anyio.sleep(0.01)
        return result[0], time.monotonic() - stopped_at

    return anyio.run(main)


def stop_process(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM a worker (or dashboard) process as a deploy would; its exit status and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@contextmanager
def shared_database(backend: str) -> Iterator[Callable[[], pf.Store]]:
    """A fresh, empty database; yields a function opening another store (connection) on it.
    Every store opened is closed, and the database deleted, afterwards."""
    opened: list[pf.Store] = []
    with tempfile.TemporaryDirectory(prefix="pgflow-shared-") as tmp:
        if backend == "sqlite":
            target = str(Path(tmp) / "shared.db")
        else:
            assert POSTGRES_URL is not None
            schema = f"test_{uuid.uuid4().hex[:16]}"
            target = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema={schema}"

        def open_store() -> pf.Store:
            store = pf.connect(target)
            opened.append(store)
            return store

        try:
            yield open_store
        finally:
            for store in opened:
                store.close()
            if backend == "postgres":
                import psycopg

                assert POSTGRES_URL is not None
                with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
                    db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
