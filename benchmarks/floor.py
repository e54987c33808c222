"""What the store's SQL alone costs: the statements of an operation replayed in a bare loop.

Each figure runs the statements the SQLite backend issues for ``start``, ``start_many`` or a
drain (batches of 100 claims and completions), with their parameters prepared beforehand and
nothing else in the loop, on a connection the backend configured (same pragmas, same
background checkpoints). It is the ceiling of the matching figure: the gap between the two is
Python, and a goal above a ceiling cannot be met by work on the Python side.

The bare queue is the other yardstick: one table, one partial index, the claim and completion
of a queue that keeps nothing but a status and a payload per job.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pgflow_py as pf
from pgflow_py.clock import SystemClock
from pgflow_py.store.sql.connection import Conn
from pgflow_py.store.sqlite import SqliteBackend
from pgflow_py.store.store import new_run_ids

from . import fresh_db

BATCH = 100  # claims and completions per transaction, as a runner at concurrency 100 makes


@pf.job(queue="floor")
async def floor_job(input: object, ctx: pf.Context) -> None:
    return None


@contextmanager
def _backend(directory: Path, name: str) -> Iterator[SqliteBackend]:
    backend = SqliteBackend(str(fresh_db(directory, name)), SystemClock())
    try:
        backend.register(floor_job.definition)
        yield backend
    finally:
        backend.close()


def _rows(n: int) -> list[tuple[object, ...]]:
    """The rows of ``n`` job starts (a job's run row holds its task), as ``start_runs`` writes
    them."""
    d = floor_job.definition
    step = d.steps[0]
    now = time.time()
    # Sorted, as ids made over time are: these share one millisecond, so they would otherwise
    # land all over the index instead of at its end.
    return [
        (run_id, d.slug, f'{{"i":{i}}}', None, 0, now, now, None, step.slug, "queued", 1, 1, now)
        for i, run_id in enumerate(sorted(new_run_ids(n)))
    ]


def start(directory: Path, n: int) -> float:
    """Runs/s of ``start``'s statements, one transaction per run."""
    B = SqliteBackend
    insert = B._INSERT_JOB_RUNS + B._JOB_RUN_VALUES
    rows = _rows(n)
    with _backend(directory, "floor_start") as backend:
        began = time.perf_counter()
        for row in rows:
            with backend._write() as c:
                c.execute("PRAGMA data_version")  # the definition check
                c.execute(insert, row)
        return n / (time.perf_counter() - began)


def start_many(directory: Path, n: int) -> float:
    """Runs/s of ``start_many``'s statements: a transaction per 1,000 runs, inserted 500 rows
    per statement."""
    B = SqliteBackend
    per, batch = 500, 1000
    insert = B._INSERT_JOB_RUNS + ",".join([B._JOB_RUN_VALUES] * per)
    rows = _rows(n - n % batch)
    batches = [
        [[v for row in rows[i + k:i + k + per] for v in row] for k in range(0, batch, per)]
        for i in range(0, len(rows), batch)
    ]
    with _backend(directory, "floor_start_many") as backend:
        began = time.perf_counter()
        for chunks in batches:
            with backend._write() as c:
                c.execute("PRAGMA data_version")
                for chunk in chunks:
                    c.execute(insert, chunk)
        return len(rows) / (time.perf_counter() - began)


def drain(directory: Path, n: int) -> float:
    """Jobs/s of a drain's statements: each transaction completes the previous batch of jobs and
    claims the next (the levels CTEs of the flow's tasks and of its jobs' rows, the due range,
    the claim, which returns the runs' inputs)."""
    B = SqliteBackend
    slug = floor_job.definition.slug
    levels_sql = B._LEVELS + "SELECT p FROM levels WHERE p IS NOT NULL"
    job_levels_sql = B._JOB_LEVELS + "SELECT p FROM levels WHERE p IS NOT NULL"
    due_sql = B._JOB_DUE_AT_LEVEL.format(seq="rowid")
    complete_sql = B._COMPLETE_JOB_ROWS_FROM.format(seq="rowid", values="{}") + " RETURNING runs.id"

    def exchange(c: Conn, previous: list[int], now: float) -> list[int]:
        if previous:  # each claimed once, at its first attempt
            completed = c.execute(
                complete_sql.format(",".join([B._TASK_RESULT] * len(previous))),
                [now, *(v for t in previous for v in (t, "null", 1, 1))],
            ).fetchall()
            assert len(completed) == len(previous), (len(completed), len(previous))
        c.execute(levels_sql, {"flow": slug}).fetchall()  # the flow's tasks: none
        found: list[tuple[int, int, float]] = []
        for (level,) in c.execute(job_levels_sql, {"flow": slug}).fetchall():
            found += c.execute(due_sql, (slug, level, now, BATCH)).fetchall()
            if len(found) >= BATCH:
                break
        if not found:
            return []
        rows = c.execute(
            B._CLAIM_JOBS.format(seq="rowid", marks=",".join("?" * len(found))),
            ("floor", now + 30, now, *(-f[0] for f in found)),
        ).fetchall()
        return [row[0] for row in rows]

    rows = _rows(n)
    with _backend(directory, "floor_drain") as backend:
        with backend._write() as c:
            backend._insert(c, B._INSERT_JOB_RUNS, B._JOB_RUN_VALUES, rows)
        done = 0
        previous: list[int] = []
        began = time.perf_counter()
        while True:
            with backend._write() as c:
                claimed = exchange(c, previous, time.time())
            done += len(previous)
            previous = claimed
            if not previous:
                break
        elapsed = time.perf_counter() - began
        assert done == n, (done, n)
        return n / elapsed


def bare_queue(directory: Path, n: int) -> float:
    """Jobs/s of a queue that keeps one row per job (status, payload, lease, result): claims
    and completions in batches, as :func:`drain` makes them."""
    path = fresh_db(directory, "floor_bare")
    c = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "cache_size = -65536"):
            c.execute(f"PRAGMA {pragma}")
        c.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, "
                  "payload TEXT, lease REAL, result TEXT)")
        c.execute("CREATE INDEX jobs_queued ON jobs (id) WHERE status = 'queued'")
        c.execute("BEGIN")
        c.executemany("INSERT INTO jobs (status, payload) VALUES ('queued', ?)",
                      [(f'{{"i":{i}}}',) for i in range(n)])
        c.execute("COMMIT")
        done = 0
        previous: list[int] = []
        began = time.perf_counter()
        while True:
            c.execute("BEGIN IMMEDIATE")
            if previous:
                c.executemany("UPDATE jobs SET status = 'done', result = 'null' WHERE id = ?",
                              [(i,) for i in previous])
            rows = c.execute(
                "UPDATE jobs SET status = 'running', lease = ? WHERE id IN (SELECT id FROM jobs "
                "WHERE status = 'queued' ORDER BY id LIMIT ?) RETURNING id, payload",
                (time.time() + 30, BATCH),
            ).fetchall()
            c.execute("COMMIT")
            done += len(previous)
            previous = [row[0] for row in rows]
            if not previous:
                break
        elapsed = time.perf_counter() - began
        assert done == n, (done, n)
        return n / elapsed
    finally:
        c.close()
