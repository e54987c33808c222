"""Workers' side: claiming due tasks, recording results, leases, throughput tallies and
waiting for work."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from ... import _json
from ...backoff import retry_delay
from ..base import ClaimedTask, RunFailure, TaskFailure, TaskSuccess, Undecodable
from .connection import Conn, placeholders
from .starting import _Starting

LOST_WORKER = "WorkerLost: the worker running this attempt stopped renewing its lease"

# Adds to a flow's counts of a minute (both dialects have this upsert).
_ADD_THROUGHPUT = (
    "INSERT INTO throughput (flow_slug, minute, completed, failed) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (flow_slug, minute) DO UPDATE SET "
    "completed = throughput.completed + excluded.completed, "
    "failed = throughput.failed + excluded.failed"
)


class _Claims(_Starting):
    """What runners call: claims, results, leases, and whether work is due."""

    _CLAIM_SET = (
        "UPDATE step_tasks SET status = 'started', attempts = attempts + 1, claims = claims + 1, "
        "lease_owner = ?, lease_expires = ?, started_at = ? "
    )
    _CLAIM_RETURNING = (
        "RETURNING id, run_id, flow_slug, step_slug, task_index, attempts, max_attempts, "
        "priority, input, flow_version, claims"
    )
    # What a claim reads of its tasks' runs (a ``{}`` for the ids).
    _CLAIM_RUNS = "SELECT id, input, trace_context FROM runs WHERE id IN ({})"
    # The priority levels a flow has queued tasks at, highest first: one index seek per level.
    _LEVELS = (
        "WITH RECURSIVE levels(p) AS ("
        " SELECT (SELECT priority FROM step_tasks INDEXED BY step_tasks_queued"
        "  WHERE status = 'queued' AND flow_slug = :flow ORDER BY priority DESC LIMIT 1)"
        " UNION ALL"
        " SELECT (SELECT priority FROM step_tasks INDEXED BY step_tasks_queued"
        "  WHERE status = 'queued' AND flow_slug = :flow AND priority < levels.p"
        "  ORDER BY priority DESC LIMIT 1)"
        " FROM levels WHERE levels.p IS NOT NULL) "
    )
    # Within a flow and level, due tasks are a prefix of the index: a range, never a scan past
    # tasks that are not due yet.
    _DUE_AT_LEVEL = (
        "SELECT id, priority, run_at FROM step_tasks INDEXED BY step_tasks_queued "
        "WHERE status = 'queued' AND flow_slug = ? AND priority = ? AND run_at <= ? "
        "ORDER BY run_at, id LIMIT ?"
    )

    # The same for the tasks of jobs, held in their runs' rows (ids: minus the run's _SEQ).
    _JOB_LEVELS = _LEVELS.replace(
        "step_tasks INDEXED BY step_tasks_queued", "runs INDEXED BY runs_queued"
    ).replace("WHERE status", "WHERE task_status")
    _JOB_DUE_AT_LEVEL = (
        "SELECT -{seq}, priority, due FROM runs INDEXED BY runs_queued "
        "WHERE task_status = 'queued' AND flow_slug = ? AND priority = ? AND due <= ? "
        "ORDER BY due, {seq} LIMIT ?"
    )
    _CLAIM_JOBS = (
        "UPDATE runs SET task_status = 'started', attempts = attempts + 1, claims = claims + 1, "
        "lease_owner = ?, lease_expires = ?, task_started_at = ? WHERE {seq} IN ({marks}) "
        "RETURNING -{seq}, id, flow_slug, step_slug, NULL, attempts, max_attempts, priority, "
        "NULL, flow_version, claims, input, trace_context"
    )

    def claim(
        self, worker_id: str, flow_slugs: Sequence[str], limit: int, lease_seconds: float
    ) -> list[ClaimedTask]:
        return self.finish_and_claim((), (), None, worker_id, flow_slugs, limit, lease_seconds)[1]

    def finish(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None = None,
    ) -> list[str]:
        return self.finish_and_claim(successes, failures, failed_runs, "", (), 0, 0.0)[0]

    def finish_and_claim(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None,
        worker_id: str,
        flow_slugs: Sequence[str],
        limit: int,
        lease_seconds: float,
    ) -> tuple[list[str], list[ClaimedTask]]:
        claiming = limit > 0 and bool(flow_slugs)
        if not successes and not failures and not claiming:
            return [], []
        now = self.clock.now()

        def body(c: Conn) -> tuple[list[str], list[RunFailure], list[Any], dict[str, Any]]:
            finished: list[str] = []
            failed: list[RunFailure] = []
            rows: list[Any] = []
            of_runs: dict[str, Any] = {}
            with self._collecting_failures(failed if failed_runs is not None else None):
                if successes or failures:
                    self._lock_runs(c, successes, failures)
                    self._finish(c, successes, failures, now, finished)
                if claiming:
                    rows, of_runs = self._claim(
                        c, worker_id, flow_slugs, limit, lease_seconds, now
                    )
                    if len(rows) < limit:
                        # This claim took all that is due of these flows: nobody else to wake.
                        self._due_flows.difference_update(flow_slugs)
            return finished, failed, rows, of_runs

        finished, failed, rows, of_runs = self._transact(body, shared=True)
        if failed_runs is not None:
            failed_runs.extend(failed)
        if not rows:
            return finished, []
        rows.sort(key=lambda row: (-row[7], abs(row[0])))  # a job's id is minus its run's _SEQ
        loads = _json.loads
        tasks = []
        for (tid, run_id, flow, step, index, attempt, max_att, prio, inp, version, claim) in rows:
            # The claim is committed: a value that cannot be decoded (too deep, not JSON) is
            # handed over as Undecodable, for the runner to fail that task alone.
            run_input, trace_context = of_runs[run_id]
            try:
                flow_input = loads(run_input)
            except Exception as exc:
                flow_input = Undecodable.of(exc)
            if inp is None:
                task_input = flow_input
            else:
                try:
                    task_input = loads(inp)
                except Exception as exc:
                    task_input = Undecodable.of(exc)
            tasks.append(ClaimedTask(
                tid, run_id, flow, step, index, attempt, max_att, prio, task_input, flow_input,
                version, claim, now, trace_context,
            ))
        return finished, tasks

    def _lock_runs(
        self, c: Conn, successes: Sequence[TaskSuccess], failures: Sequence[TaskFailure]
    ) -> None:
        """In a shared transaction, lock the runs whose state these results change, so that
        results of one run apply one transaction after another (a no-op where transactions
        never run side by side)."""

    def _claim(
        self,
        c: Conn,
        worker_id: str,
        flow_slugs: Sequence[str],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[Any], dict[str, tuple[str, str | None]]]:
        """Claim inside the caller's transaction: the task rows, and their runs' input JSON and
        trace context.

        Each flow is looked up on its own, so a backlog in one queue never slows the claims of
        another, and a concurrency cap is just a smaller limit for its flow.
        """
        room = self._room(c, flow_slugs)
        wants = {slug: min(limit, room.get(slug, limit)) for slug in flow_slugs}
        return self._claim_wanted(
            c, worker_id, {slug: want for slug, want in wants.items() if want > 0}, limit,
            lease_seconds, now,
        )

    def _claim_wanted(
        self,
        c: Conn,
        worker_id: str,
        wants: dict[str, int],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[Any], dict[str, tuple[str, str | None]]]:
        """:meth:`_claim` once the room of each flow is known: up to ``wants[slug]`` tasks of
        each flow, ``limit`` in all."""
        candidates: list[tuple[int, int, float]] = []
        for slug, want in wants.items():
            candidates += self._due(c, slug, want, now)
        if not candidates:
            return [], {}
        if len(wants) > 1:  # claim order across flows: priority, then due time
            candidates.sort(key=lambda row: (-row[1], row[2], abs(row[0])))
            del candidates[limit:]
        # Leases are about liveness, so they run on real time even under a fake clock.
        expires = time.time() + lease_seconds
        tasks = [row[0] for row in candidates if row[0] > 0]
        jobs = [-row[0] for row in candidates if row[0] < 0]
        rows: list[Any] = []
        of_runs: dict[str, tuple[str, str | None]] = {}
        if tasks:
            rows = c.execute(
                self._CLAIM_SET + f"WHERE id IN ({placeholders(len(tasks))}) "
                + self._CLAIM_RETURNING,
                (worker_id, expires, now, *tasks),
            ).fetchall()
            run_ids = list({row[1] for row in rows})
            # The runs are not written here: a run's start is read from its running tasks.
            of_runs = {
                run_id: (run_input, trace_context)
                for run_id, run_input, trace_context in c.execute(
                    self._CLAIM_RUNS.format(placeholders(len(run_ids))), run_ids
                ).fetchall()
            }
        if jobs:
            # A job's row is its run: the claim returns the run's input too.
            for row in c.execute(
                self._CLAIM_JOBS.format(seq=self._SEQ, marks=placeholders(len(jobs))),
                (worker_id, expires, now, *jobs),
            ).fetchall():
                rows.append(row[:11])
                of_runs[row[1]] = (row[11], row[12])
        return rows, of_runs

    def _due(self, c: Conn, slug: str, want: int, now: float) -> list[Any]:
        """Up to ``want`` due tasks of flow ``slug`` (id, priority, due time), highest priority
        first, then earliest due."""
        found = self._due_in(c, self._LEVELS, self._DUE_AT_LEVEL, slug, want, now)
        if not self._JOB_ROWS:
            return found
        jobs = self._due_in(
            c, self._JOB_LEVELS, self._JOB_DUE_AT_LEVEL.format(seq=self._SEQ), slug, want, now
        )
        if found and jobs:  # both kinds: a flow that became a job, or back
            found += jobs
            found.sort(key=lambda row: (-row[1], row[2], abs(row[0])))
            return found[:want]
        return found or jobs

    @staticmethod
    def _due_in(
        c: Conn, levels_sql: str, due_sql: str, slug: str, want: int, now: float
    ) -> list[Any]:
        """:meth:`_due` over one table (the levels and due-range statements given)."""
        found: list[Any] = []
        levels = [row[0] for row in c.execute(
            levels_sql + "SELECT p FROM levels WHERE p IS NOT NULL", {"flow": slug}
        ).fetchall()]
        for level in levels:
            found += c.execute(due_sql, (slug, level, now, want - len(found))).fetchall()
            if len(found) >= want:
                break
        return found

    def _caps(self, flow_slugs: Sequence[str]) -> dict[str, int]:
        """The concurrency caps of those of ``flow_slugs`` that have one."""
        return {
            slug: cached[1].concurrency
            for slug in flow_slugs
            if (cached := self._definitions.get(slug)) is not None
            and cached[1].concurrency is not None
        }

    def _room(self, c: Conn, flow_slugs: Sequence[str]) -> dict[str, int]:
        """How many more tasks each capped flow may run now (read in the claim's transaction,
        so no other runner can change it meanwhile)."""
        caps = self._caps(flow_slugs)
        if not caps:
            return {}
        running = dict(c.execute(
            f"SELECT flow_slug, count(*) FROM {self._tasks} WHERE status = 'started' "
            f"AND flow_slug IN ({placeholders(len(caps))}) GROUP BY flow_slug",
            list(caps),
        ).fetchall())
        return {slug: cap - running.get(slug, 0) for slug, cap in caps.items()}

    def heartbeat(
        self, worker_id: str, flow_slugs: Sequence[str], task_ids: Sequence[int],
        lease_seconds: float,
    ) -> list[int]:
        real_now = time.time()
        held: set[int] = set()
        with self._write() as c:
            tasks = [t for t in task_ids if t > 0]
            jobs = [-t for t in task_ids if t < 0]
            for start in range(0, len(tasks), 500):
                chunk = tasks[start:start + 500]
                held.update(r[0] for r in c.execute(
                    "UPDATE step_tasks SET lease_expires = ? WHERE lease_owner = ? "
                    f"AND status = 'started' AND id IN ({placeholders(len(chunk))}) RETURNING id",
                    (real_now + lease_seconds, worker_id, *chunk),
                ).fetchall())
            seq = self._SEQ
            for start in range(0, len(jobs), 500):
                chunk = jobs[start:start + 500]
                held.update(r[0] for r in c.execute(
                    f"UPDATE runs SET lease_expires = ? WHERE lease_owner = ? "
                    f"AND task_status = 'started' AND {seq} IN ({placeholders(len(chunk))}) "
                    f"RETURNING -{seq}",
                    (real_now + lease_seconds, worker_id, *chunk),
                ).fetchall())
            c.execute(
                "INSERT INTO workers (id, hostname, pid, flows, started_at, last_heartbeat, "
                "lease_seconds) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "last_heartbeat = excluded.last_heartbeat, flows = excluded.flows, "
                "lease_seconds = excluded.lease_seconds",
                (worker_id, socket.gethostname(), os.getpid(), ",".join(flow_slugs),
                 real_now, real_now, lease_seconds),
            )
        return [task_id for task_id in task_ids if task_id not in held]

    def forget_worker(self, worker_id: str) -> None:
        with self._write() as c:
            c.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def reclaim_expired(
        self, flow_slugs: Sequence[str], failed_runs: list[RunFailure] | None = None
    ) -> int:
        if not flow_slugs:
            return 0
        real_now = time.time()
        now = self.clock.now()
        finished: list[str] = []
        with self._write() as c, self._collecting_failures(failed_runs):
            expired = c.execute(
                "SELECT id, flow_slug, flow_version, step_slug, attempts, max_attempts "
                f"FROM {self._tasks} "
                f"WHERE status = 'started' AND flow_slug IN ({placeholders(len(flow_slugs))}) "
                "AND lease_expires < ?",
                (*flow_slugs, real_now),
            ).fetchall()
            for task_id, flow_slug, version, step_slug, attempts, max_attempts in expired:
                # The lost worker's attempt counts, so a task that kills its worker cannot
                # be retried forever.
                retry_at = None
                if attempts < max_attempts:
                    o = self._definition(flow_slug, version).effective(step_slug)
                    retry_at = now + retry_delay(
                        attempts, base_delay=o.base_delay, backoff=o.backoff,
                        max_delay=o.max_delay, jitter=o.jitter,
                    )
                self._fail_task(c, TaskFailure(task_id, attempts, LOST_WORKER, retry_at), now,
                                finished)
            # The lost attempts count as failed in the throughput, in this transaction: the
            # runner that ran them is gone, with its tally.
            lost: dict[str, int] = {}
            for row in expired:
                lost[row[1]] = lost.get(row[1], 0) + 1
            if lost:
                minute = int(now // 60)
                c.executemany(_ADD_THROUGHPUT, [(slug, minute, 0, n) for slug, n in lost.items()])
        return len(expired)

    def add_throughput(self, rows: Sequence[tuple[str, int, int, int]]) -> None:
        if not rows:
            return
        with self._write() as c:
            c.executemany(_ADD_THROUGHPUT, rows)

    def release(self, worker_id: str, task_ids: Sequence[int] | None) -> None:
        if task_ids is not None and not task_ids:
            return
        unclaim = (
            "UPDATE step_tasks SET status = 'queued', attempts = attempts - 1, "
            "lease_owner = NULL, lease_expires = NULL, started_at = NULL "
            "WHERE status = 'started' AND lease_owner = ? "
        )
        unclaim_jobs = (
            "UPDATE runs SET task_status = 'queued', attempts = attempts - 1, "
            "lease_owner = NULL, lease_expires = NULL, task_started_at = NULL "
            "WHERE task_status = 'started' AND lease_owner = ? "
        )
        with self._write() as c:
            # A released claim leaves no trace: a run's start is read from its running tasks.
            if task_ids is None:
                if (c.execute(unclaim, (worker_id,)).rowcount
                        + (c.execute(unclaim_jobs, (worker_id,)).rowcount
                           if self._JOB_ROWS else 0)):
                    self._made_due("")  # back in the queue, for any runner of their flows
            else:
                c.executemany(
                    unclaim + "AND id = ?", [(worker_id, t) for t in task_ids if t > 0]
                )
                if self._JOB_ROWS:
                    c.executemany(
                        unclaim_jobs + f"AND {self._SEQ} = ?",
                        [(worker_id, -t) for t in task_ids if t < 0],
                    )
                self._made_due("")


    def next_due(self, flow_slugs: Sequence[str]) -> float | None:
        found = []
        with self._read() as conn:
            for slug in flow_slugs:
                # The earliest task of each priority level: one seek per level.
                for levels, earliest in (
                    (self._LEVELS, "SELECT run_at FROM step_tasks INDEXED BY step_tasks_queued "
                                   "WHERE status = 'queued'"),
                    (self._JOB_LEVELS, "SELECT due FROM runs INDEXED BY runs_queued "
                                       "WHERE task_status = 'queued'"),
                )[:2 if self._JOB_ROWS else 1]:
                    (due,) = conn.execute(
                        levels + f"SELECT min(({earliest} AND flow_slug = :flow "
                        "AND priority = levels.p ORDER BY 1 LIMIT 1)) "
                        "FROM levels WHERE levels.p IS NOT NULL",
                        {"flow": slug},
                    ).fetchone()
                    if due is not None:
                        found.append(float(due))
        return min(found, default=None)
