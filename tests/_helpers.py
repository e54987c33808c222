"""Helpers shared by the test modules (importable because pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pgflow_py as pf
from pgflow_py.clock import Clock

POSTGRES_URL = os.environ.get("PGFLOW_TEST_POSTGRES")
"""A PostgreSQL server to run the store's tests on instead of SQLite files (see .ci/run)."""


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
    if version < 4:  # runs.trace_context came with version 4
        patch.setattr(SqlBackend, "_CLAIM_RUNS", "SELECT id, input, NULL FROM runs WHERE id IN ({})")
