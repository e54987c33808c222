"""The hot path on PostgreSQL, written to run side by side in several workers' transactions.

SQLite lets one writer in at a time, and the shared layers (``store/sql``) are written for that.
On PostgreSQL, claims, results and starts run in *shared* transactions instead (see
``_Connection._SHARED_WRITES``), which these overrides keep apart with row locks, as
procrastinate, River, graphile-worker and Oban fetch their jobs:

- a claim takes its tasks with ``FOR UPDATE SKIP LOCKED``: claimers never wait for each other;
- results lock their runs' rows first, in id order: one run's results apply one transaction
  after another (its counters, its dependents), other runs' alongside;
- keyed starts hold a lock per key, capped flows a lock per flow while they count;
- the rest (cancel, retry, prune, leases, registration, cron) writes alone, exclusively.

A claim is one statement per flow that also returns its runs' input, and a batch of finished
jobs one statement, where the shared layers take several (each a round trip to the server).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..base import TaskFailure, TaskSuccess
from ..sql import SqlBackend
from ..sql.claims import _Claims
from ..sql.connection import Conn, NeedsExclusive

# Locks of two int4 keys (the schema's, then a key's or a capped flow's hash) live apart from
# the one-bigint lock of the schema's exclusive writers, and from most applications' own.
_LOCK_KEYS = (
    "SELECT pg_advisory_xact_lock(CAST(? AS INT), h) FROM "
    "(SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(? AS TEXT[])) AS k ORDER BY h) AS s"
)

# The priority levels a flow has queued tasks at, highest first (the shared layer's _LEVELS),
# of its tasks in step_tasks (levels) and of its jobs' tasks in their runs' rows (job_levels).
_BOTH_LEVELS = (
    _Claims._LEVELS.rstrip() + ", "
    + _Claims._JOB_LEVELS.replace("WITH RECURSIVE levels(p)", "job_levels(p)")
    .replace("levels.p", "job_levels.p").replace("FROM levels", "FROM job_levels").rstrip()
)
# Due tasks of one flow: per level an index range, locked or skipped, pulled only until the
# limit. Jobs' tasks (in their runs' rows, ids -seq) are picked when the flow has no tasks due
# in step_tasks: a slug has rows of both kinds only in the moment a flow becomes a job (or
# back), and a plain LIMIT keeps the planner's estimate (and so its plan) that of a claim.
_PICKED = (
    "picked AS (SELECT t.id, t.priority, t.run_at FROM levels CROSS JOIN LATERAL ("
    " SELECT id, priority, run_at FROM step_tasks WHERE status = 'queued' AND flow_slug = :flow"
    " AND priority = levels.p AND run_at <= :now ORDER BY run_at, id LIMIT :want"
    " FOR UPDATE SKIP LOCKED) AS t WHERE levels.p IS NOT NULL LIMIT :want), "
    "picked_jobs AS (SELECT j.seq, j.priority, j.due FROM job_levels CROSS JOIN LATERAL ("
    " SELECT seq, priority, due FROM runs WHERE task_status = 'queued' AND flow_slug = :flow"
    " AND priority = job_levels.p AND due <= :now ORDER BY due, seq LIMIT :want"
    " FOR UPDATE SKIP LOCKED) AS j WHERE job_levels.p IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM picked) LIMIT :want)"
)
# The claim of one flow: its due tasks claimed and returned with their runs' input and trace
# context, in one statement. The rows picked are updated through an array of their keys: an
# index lookup each, whatever the planner guesses of how many a LIMIT :want returns.
_CLAIM_FLOW = (
    _BOTH_LEVELS + ", " + _PICKED + ", "
    "claimed AS (UPDATE step_tasks SET status = 'started', attempts = attempts + 1, "
    " claims = claims + 1, lease_owner = :owner, lease_expires = :lease, started_at = :now"
    " WHERE step_tasks.id = ANY(ARRAY(SELECT id FROM picked))"
    " RETURNING step_tasks.id, step_tasks.run_id, step_tasks.flow_slug, step_tasks.step_slug,"
    " step_tasks.task_index, step_tasks.attempts, step_tasks.max_attempts,"
    " step_tasks.priority, step_tasks.input, step_tasks.flow_version, step_tasks.claims), "
    "claimed_jobs AS (UPDATE runs SET task_status = 'started', attempts = attempts + 1, "
    " claims = claims + 1, lease_owner = :owner, lease_expires = :lease, task_started_at = :now"
    " WHERE runs.seq = ANY(ARRAY(SELECT seq FROM picked_jobs))"
    " RETURNING -runs.seq, runs.id, runs.flow_slug, runs.step_slug, CAST(NULL AS INTEGER),"
    " runs.attempts, runs.max_attempts, runs.priority, CAST(NULL AS TEXT), runs.flow_version,"
    " runs.claims, runs.input, runs.trace_context) "
    "SELECT claimed.*, r.input, r.trace_context FROM claimed JOIN runs r ON r.id = claimed.run_id"
    " UNION ALL SELECT * FROM claimed_jobs"
)

# The candidates of one flow when a claim spans several (ordered across them afterwards).
_DUE_LOCKED = (
    _BOTH_LEVELS + ", " + _PICKED
    + " SELECT id, priority, run_at FROM picked UNION ALL SELECT -seq, priority, due FROM picked_jobs"
)

# A batch of finished jobs (task id, output, attempt, claim, run id, start): their tasks and
# runs completed in one statement. The guard on the task makes a late result change nothing,
# as in the shared layer; the runs completed are returned.
_COMPLETE_JOBS = (
    "WITH v(task_id, output, attempt, claim, run_id, started) AS (VALUES {}), "
    "t AS (UPDATE step_tasks SET status = 'completed', output = v.output, finished_at = ?, "
    " lease_owner = NULL, lease_expires = NULL FROM v WHERE step_tasks.id = v.task_id"
    " AND step_tasks.attempts = v.attempt"
    " AND step_tasks.claims = coalesce(v.claim, step_tasks.claims)"
    " AND step_tasks.status = 'started' RETURNING step_tasks.id, step_tasks.started_at) "
    "UPDATE runs SET status = 'completed', remaining_steps = 0, output = v.output,"
    " finished_at = ?, started_at = coalesce(runs.started_at, v.started, t.started_at)"
    " FROM v JOIN t ON t.id = v.task_id WHERE runs.id = v.run_id AND runs.status = 'started'"
    " RETURNING runs.id"
)
_JOB_RESULT = (
    "(CAST(? AS BIGINT), ?, CAST(? AS BIGINT), CAST(? AS BIGINT), ?, "
    "CAST(? AS DOUBLE PRECISION))"
)


_MOST_KEY_LOCKS = 64  # per transaction (see _lock_keys)


class SharedWrites(SqlBackend):
    """The shared layers with the hot path's PostgreSQL statements (see the module's text)."""

    _SHARED_WRITES = True
    _lock_space: int  # the schema's int4 lock key: hashtext('pgflow:' || schema)
    _keys_locked = 0  # key locks taken by the current transaction (reset as it begins)

    def _lock_runs(
        self, c: Conn, successes: Sequence[TaskSuccess], failures: Sequence[TaskFailure]
    ) -> None:
        if not self._shared_tx:
            return
        # A job's result touches only its own task and run, which nobody else writes in a
        # shared transaction: only flows' results and failures (which may fail a run, retry
        # or cancel its other tasks) lock.
        run_ids = sorted({s.run_id for s in successes if s.run_id and not s.job})
        task_ids = [s.task_id for s in successes if not s.run_id and not s.job]
        task_ids += [f.task_id for f in failures if f.task_id > 0]
        if not run_ids and not task_ids:
            return
        # Locked in id order (the sort happens below the lock), so two transactions that
        # share runs never wait for each other in a cycle.
        c.execute(
            "SELECT id FROM runs WHERE id = ANY(CAST(? AS TEXT[]) || "
            "ARRAY(SELECT run_id FROM step_tasks WHERE id = ANY(CAST(? AS BIGINT[])))) "
            "ORDER BY id FOR UPDATE",
            (run_ids, task_ids),
        )

    def _lock_keys(self, c: Conn, flow_slug: str, keys: list[str]) -> None:
        if not keys:
            return
        # Each is an entry in the server's lock table, which holds max_locks_per_transaction
        # (64 by default) per connection: a transaction that would take many more (a group
        # commit of hundreds of keyed starts) writes alone instead, where keys need no lock.
        self._keys_locked += len(keys)
        if self._keys_locked > _MOST_KEY_LOCKS:
            raise NeedsExclusive
        c.execute(_LOCK_KEYS, (self._lock_space, [f"{flow_slug}\x1f{k}" for k in keys]))

    def _room(self, c: Conn, flow_slugs: Sequence[str]) -> dict[str, int]:
        capped = sorted(self._caps(flow_slugs))
        if capped and self._shared_tx:
            # Held to the commit: the next claimer of these flows counts this one's claims.
            c.execute(_LOCK_KEYS, (self._lock_space, [f"\x1fcap\x1f{s}" for s in capped]))
        return super()._room(c, flow_slugs)

    def _claim_wanted(
        self,
        c: Conn,
        worker_id: str,
        wants: dict[str, int],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[Any], dict[str, tuple[str, str | None]]]:
        if not self._JOB_ROWS:
            # A schema from before job rows (no task columns on runs; tests of upgrades
            # write with it): the shared layer's claim, which locks no rows, written alone.
            if self._shared_tx:
                raise NeedsExclusive
            return super()._claim_wanted(c, worker_id, wants, limit, lease_seconds, now)
        if len(wants) != 1:
            # Several flows: each one's candidates (locked, see _due), ordered across them.
            # Those cut by the order stay locked until the commit; other claimers skip them.
            return super()._claim_wanted(c, worker_id, wants, limit, lease_seconds, now)
        ((slug, want),) = wants.items()
        # Leases are about liveness, so they run on real time even under a fake clock.
        found = c.execute(_CLAIM_FLOW, {
            "flow": slug, "now": now, "want": want, "owner": worker_id,
            "lease": time.time() + lease_seconds,
        }).fetchall()
        return [row[:11] for row in found], {row[1]: (row[11], row[12]) for row in found}

    def _due(self, c: Conn, slug: str, want: int, now: float) -> list[Any]:
        if not self._JOB_ROWS:
            return super()._due(c, slug, want, now)
        return list(c.execute(_DUE_LOCKED, {"flow": slug, "now": now, "want": want}).fetchall())

    def _complete_jobs(
        self, c: Conn, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        rows = [s for s in batch if s.task_id < 0]
        if rows:  # jobs whose run rows hold their tasks: one statement, as on SQLite
            self._complete_job_rows(c, rows, now, finished)
            batch = [s for s in batch if s.task_id > 0]
            if not batch:
                return []
        if len({s.task_id for s in batch}) != len(batch):
            # Two results for one task (a late one beside the current one): the first that
            # still fits wins, which the one-by-one path decides.
            return super()._complete_jobs(c, batch, now, finished)
        for start in range(0, len(batch), 500):
            chunk = batch[start:start + 500]
            params: list[Any] = []
            for s in chunk:
                params += (s.task_id, s.output_json, s.attempt, s.claim, s.run_id, s.started_at)
            params += (now, now)
            rows = c.execute(
                _COMPLETE_JOBS.format(",".join([_JOB_RESULT] * len(chunk))), params
            ).fetchall()
            finished.extend(row[0] for row in rows)
        # A late result (its task no longer started at that attempt) changed nothing, as the
        # one-by-one path would: nothing is left for it.
        return []
