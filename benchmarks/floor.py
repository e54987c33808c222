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


def _rows(n: int) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The runs and tasks rows of ``n`` job starts, as ``start_runs`` writes them."""
    d = floor_job.definition
    step = d.steps[0]
    now = time.time()
    runs, tasks = [], []
    # Sorted, as ids made over time are: these share one millisecond, so they would otherwise
    # land all over the index instead of at its end.
    for i, run_id in enumerate(sorted(new_run_ids(n))):
        runs.append((run_id, d.slug, f'{{"i":{i}}}', None, 0, 1, now, now))
        tasks.append((run_id, d.slug, 1, step.slug, None, 1, 0, now, None, now))
    return runs, tasks


def start(directory: Path, n: int) -> float:
    """Runs/s of ``start``'s statements, one transaction per run."""
    B = SqliteBackend
    insert_run = B._INSERT_RUNS + B._RUN_VALUES
    insert_task = B._INSERT_TASKS + B._TASK_VALUES
    runs, tasks = _rows(n)
    with _backend(directory, "floor_start") as backend:
        began = time.perf_counter()
        for run, task in zip(runs, tasks, strict=True):
            with backend._write() as c:
                c.execute("PRAGMA data_version")  # the definition check
                c.execute(insert_run, run)
                c.execute(insert_task, task)
        return n / (time.perf_counter() - began)


def start_many(directory: Path, n: int) -> float:
    """Runs/s of ``start_many``'s statements: a transaction per 1,000 runs, inserted 500 rows
    per statement."""
    B = SqliteBackend
    per, batch = 500, 1000
    insert_runs = B._INSERT_RUNS + ",".join([B._RUN_VALUES] * per)
    insert_tasks = B._INSERT_TASKS + ",".join([B._TASK_VALUES] * per)
    runs, tasks = _rows(n - n % batch)

    def values(rows: list[tuple[object, ...]], at: int) -> list[object]:
        return [v for row in rows[at:at + per] for v in row]

    batches = [
        ([values(runs, i + k) for k in range(0, batch, per)],
         [values(tasks, i + k) for k in range(0, batch, per)])
        for i in range(0, len(runs), batch)
    ]
    with _backend(directory, "floor_start_many") as backend:
        began = time.perf_counter()
        for run_chunks, task_chunks in batches:
            with backend._write() as c:
                c.execute("PRAGMA data_version")
                for chunk in run_chunks:
                    c.execute(insert_runs, chunk)
                for chunk in task_chunks:
                    c.execute(insert_tasks, chunk)
        return len(runs) / (time.perf_counter() - began)


def drain(directory: Path, n: int) -> float:
    """Jobs/s of a drain's statements: each transaction completes the previous batch of jobs and
    claims the next (the levels CTE, the due range, the claim, the runs' inputs)."""
    B = SqliteBackend
    slug = floor_job.definition.slug
    levels_sql = B._LEVELS + "SELECT p FROM levels WHERE p IS NOT NULL"
    claim_sql = B._CLAIM_SET + "WHERE id IN ({}) " + B._CLAIM_RETURNING

    def exchange(c: Conn, previous: list[tuple[int, str, float]], now: float
                 ) -> list[tuple[int, str, float]]:
        if previous:
            backend._update_from(c, B._COMPLETE_TASKS_FROM, B._TASK_RESULT, (now,),
                                 [(t, "null", 1, 1) for t, _r, _s in previous])
            backend._update_from(c, B._COMPLETE_JOB_RUNS_FROM, B._RUN_RESULT, (now,),
                                 [(r, "null", s, t) for t, r, s in previous])
        found: list[tuple[int, int, float]] = []
        for (level,) in c.execute(levels_sql, {"flow": slug}).fetchall():
            found += c.execute(B._DUE_AT_LEVEL, (slug, level, now, BATCH)).fetchall()
            if len(found) >= BATCH:
                break
        if not found:
            return []
        rows = c.execute(
            claim_sql.format(",".join("?" * len(found))),
            ("floor", now + 30, now, *(f[0] for f in found)),
        ).fetchall()
        run_ids = [row[1] for row in rows]
        c.execute(
            f"SELECT id, input FROM runs WHERE id IN ({','.join('?' * len(run_ids))})", run_ids
        ).fetchall()
        return [(row[0], row[1], now) for row in rows]

    runs, tasks = _rows(n)
    with _backend(directory, "floor_drain") as backend:
        with backend._write() as c:
            backend._insert(c, B._INSERT_RUNS, B._RUN_VALUES, runs)
            backend._insert(c, B._INSERT_TASKS, B._TASK_VALUES, tasks)
        done = 0
        previous: list[tuple[int, str, float]] = []
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
