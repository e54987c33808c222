"""Acceptance: real `pgflow worker` processes sharing one SQLite file (or, with
``$PGFLOW_TEST_POSTGRES``, one PostgreSQL schema).

These prove the crash-safety promises: nothing started is lost when a worker is killed, no task
completes twice, and several workers can share one database without errors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import POSTGRES_URL

import pgflow_py as pf

pytestmark = pytest.mark.acceptance

JOBS = textwrap.dedent("""
    import asyncio, os
    import pgflow_py as pf

    LOG = os.environ["ACCEPTANCE_LOG"]

    def record(run_id, attempt):
        # O_APPEND writes of one short line are atomic, so processes can share the file.
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{run_id} {attempt} {os.getpid()}\\n".encode())
        finally:
            os.close(fd)

    @pf.job(queue="acc_work", max_attempts=3, base_delay=0, timeout=30)
    async def acc_work(input, ctx):
        record(ctx.run_id, ctx.attempt)
        await asyncio.sleep(input["sleep"] if ctx.attempt == 1 else 0)
        return {"n": input["n"]}
""")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "acc_jobs.py").write_text(JOBS)
    return tmp_path


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    """Where the workers meet: a SQLite file, or a PostgreSQL schema of its own."""
    if POSTGRES_URL is None:
        yield str(tmp_path / "acceptance.db")
        return
    import psycopg

    schema = f"acc_{uuid.uuid4().hex[:16]}"
    yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema={schema}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _rows(db: str, sql: str, *params: object) -> list[Any]:
    """The result of ``sql`` (``?`` parameters) on a connection of its own."""
    if POSTGRES_URL is None:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    url, schema = db.rsplit("schema=", 1)
    with psycopg.connect(url.rstrip("?&"), autocommit=True) as conn:
        conn.execute(f"SET search_path TO {schema}")
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


def _worker(project: Path, db: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "ACCEPTANCE_LOG": str(project / "effects.log"), "PYTHONPATH": str(project)}
    # Its log goes to a file, not a pipe: nobody reads a pipe while the worker runs, and a full
    # one (64 KiB, a few hundred log lines) would block the worker.
    log = project / f"worker-{uuid.uuid4().hex[:8]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgflow_py", "worker", "acc_jobs", "--database", str(db), *args],
            cwd=project, env=env, text=True, stdout=out, stderr=subprocess.STDOUT,
        )
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def _stop(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """SIGTERM each worker; their exit codes and logs."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    results = []
    for proc in procs:
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results.append((proc.returncode, proc.log_path.read_text()))  # type: ignore[attr-defined]
    return results


def _count(db: str, sql: str, *params: object) -> int:
    return int(_rows(db, sql, *params)[0][0])


def _wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def _effects(project: Path) -> Counter[tuple[str, int]]:
    lines = (project / "effects.log").read_text().splitlines()
    return Counter((run_id, int(attempt)) for run_id, attempt, _pid in (ln.split() for ln in lines))


def _load_jobs(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The job object as the workers define it (same module name, so the same definition)."""
    monkeypatch.setenv("ACCEPTANCE_LOG", str(project / "effects.log"))
    spec = importlib.util.spec_from_file_location("acc_jobs", project / "acc_jobs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_with_50_running_tasks_loses_nothing(project, database, monkeypatch):
    jobs = _load_jobs(project, monkeypatch)
    db = database
    lease = 2.0
    with pf.connect(db) as store:
        # The first worker gets through 100 quick runs, then all its 50 slots hold slow ones.
        store.start_many(jobs.acc_work, [
            {"n": i, "sleep": 30 if 100 <= i < 150 else 0.01} for i in range(1000)
        ])

    first = _worker(project, db, "--concurrency", "50", "--lease", str(lease))
    try:
        _wait_for(
            lambda: _count(db, "SELECT count(*) FROM tasks WHERE status = 'started'") == 50
            and _count(db, "SELECT count(*) FROM tasks WHERE status = 'completed'") == 100
            # and every claimed task has entered its handler (a task claimed but not yet
            # started when the worker dies would rightly have no first-attempt effect)
            and (project / "effects.log").exists() and len(_effects(project)) == 150,
            30, "the first worker to hold 50 running tasks",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    held = {r[0] for r in _rows(db, "SELECT run_id FROM tasks WHERE status = 'started'")}
    assert len(held) == 50
    marks = ",".join("?" * len(held))

    second = _worker(project, db, "--concurrency", "50", "--lease", str(lease))
    try:
        recovery = _wait_for(
            lambda: _count(
                db, "SELECT count(*) FROM tasks WHERE status = 'completed' "
                f"AND run_id IN ({marks})", *held,
            ) == 50,
            60, "the killed tasks to be completed by the second worker",
        )
        _wait_for(
            lambda: _count(db, "SELECT count(*) FROM runs WHERE status = 'completed'") == 1000,
            60, "every run to complete",
        )
    finally:
        ((code, err),) = _stop([second])
    print(f"\nrecovery after kill -9 (second worker start to killed tasks done): {recovery:.2f}s "
          f"with lease {lease}s")
    assert code == 0, err

    with pf.connect(db) as store:
        runs = store.runs(limit=2000)
    assert len(runs) == 1000
    assert all(r.status is pf.RunStatus.COMPLETED for r in runs)
    assert sorted(r.output["n"] for r in runs) == list(range(1000))
    assert {r.id for r in runs if r.attempts == 2} == held  # exactly the killed tasks re-ran
    for run in runs:
        if run.id in held:
            assert [h.error.split(":")[0] for h in run.history] == ["WorkerLost"]
    effects = _effects(project)
    assert all(effects[(run_id, 2)] == 1 for run_id in held)  # once each
    assert all(effects[(r.id, 1)] == 1 for r in runs)


def test_four_workers_ten_thousand_runs_each_completed_exactly_once(project, database, monkeypatch):
    jobs = _load_jobs(project, monkeypatch)
    db = database
    with pf.connect(db) as store:
        store.register(jobs.acc_work)
    workers = [_worker(project, db, "--concurrency", "20") for _ in range(4)]
    try:
        _wait_for(lambda: _count(db, "SELECT count(*) FROM workers") == 4, 30, "4 workers up")
        with pf.connect(db) as store:
            for chunk in range(0, 10_000, 500):  # starts arrive while the workers run
                store.start_many(jobs.acc_work, [{"n": i, "sleep": 0} for i in range(chunk, chunk + 500)])
        _wait_for(
            lambda: _count(db, "SELECT count(*) FROM runs WHERE status = 'completed'") == 10_000,
            120, "10,000 runs to complete",
        )
    finally:
        stopped = _stop(workers)
    for code, err in stopped:
        assert code == 0, err
        assert "ERROR" not in err and "Traceback" not in err, err
    assert _count(db, "SELECT count(*) FROM runs") == 10_000
    assert _count(db, "SELECT count(*) FROM tasks WHERE status = 'completed'") == 10_000
    assert _count(db, "SELECT count(DISTINCT run_id) FROM tasks WHERE status = 'completed'") == 10_000
    attempts = dict(_rows(db, "SELECT run_id, attempts FROM tasks"))
    effects = _effects(project)
    per_run = Counter(run_id for run_id, _attempt in effects.elements())
    assert set(per_run) == set(attempts)  # every run's handler ran at least once
    assert all(per_run[run_id] <= attempts[run_id] for run_id in attempts)  # at most once per attempt
    duplicates = sum(n - 1 for n in per_run.values())
    print(f"\n4 workers, 10,000 runs: {duplicates} duplicate executions, 0 lost")
    # No worker died and no lease ran out (30 s, renewed), so at-least-once delivery has no
    # reason to deliver twice: each run's one task ran once, in one attempt, and completed once.
    assert duplicates == 0, [run_id for run_id, n in per_run.items() if n > 1][:10]
    assert set(attempts.values()) == {1}
    assert all(effects[(run_id, 1)] == 1 for run_id in attempts)
    # The workers' own counts agree: 10,000 completions between them, nothing retried or failed.
    stats = [re.search(r"stopped: RunnerStats\((.*?)\)", err) for _code, err in stopped]
    assert all(stats), [err[-500:] for _code, err in stopped]
    counts = [dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))) for m in stats]
    assert sum(c["completed"] for c in counts) == 10_000, counts
    assert sum(c["retried"] + c["failed"] + c["cancelled"] for c in counts) == 0, counts
    served_by = Counter(pid for _run, _attempt, pid in (
        ln.split() for ln in (project / "effects.log").read_text().splitlines()
    ))
    assert len(served_by) == 4  # all four workers took part
