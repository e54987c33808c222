"""Operators' views and bulk actions: counts, per-flow stats, throughput, workers, retry_all,
delete_flow."""

from __future__ import annotations

import time
from typing import Any

from ...clock import utc_datetime
from ...errors import FlowNotFound, InputError, ShapeMismatch
from ...models import FlowStats, RunStatus, WorkerInfo
from .connection import _STATUS_SQL, Conn
from .reading import _Reading

# A worker that never said its lease (a row written before schema version 3): the default.
_DEFAULT_LEASE = 30.0


class _Operations(_Reading):
    """What operators read and do across runs; every count goes through indexes.

    Completed runs have no index of their own: they are all runs less the unfinished, failed
    and cancelled ones, each counted through an index (the new ones, for failed and cancelled
    runs, are partial: completing a run, the hot path, never touches them). The finer
    statuses of unfinished runs agree with :meth:`runs` (the store's state machine test
    checks it) but are counted from small sets: see ``_UNFINISHED_SQL``.
    """

    def count(self, flow_slug: str | None, status: str | None) -> int:
        flow = "" if flow_slug is None else " AND flow_slug = :flow"
        params: dict[str, Any] = {"flow": flow_slug}
        if status is None:
            sql = "SELECT count(*) FROM runs" + ("" if flow_slug is None else " WHERE flow_slug = :flow")
        elif status in ("failed", "cancelled"):
            sql = (f"SELECT count(*) FROM runs INDEXED BY runs_{status} "
                   f"WHERE status = '{status}'{flow}")
        elif status == "completed":
            sql = (
                "SELECT (SELECT count(*) FROM runs"
                + ("" if flow_slug is None else " WHERE flow_slug = :flow") + ")"
                + "".join(
                    f" - (SELECT count(*) FROM runs INDEXED BY {index} "
                    f"WHERE status = '{value}'{flow})"
                    for index, value in (("runs_unfinished", "started"),
                                         ("runs_failed", "failed"),
                                         ("runs_cancelled", "cancelled"))
                )
            )
        else:
            with self._read() as c:
                return self._unfinished(c, flow_slug, self.clock.now())[status]
        if flow_slug is None:
            del params["flow"]
        with self._read() as c:
            return int(c.execute(sql, params or ()).fetchone()[0])

    # The finer statuses of unfinished runs, as _STATUS_SQL derives them run by run, counted
    # from small sets instead: S, runs with a running task; R, the others with a task waiting
    # out a backoff; B, the others whose first attempt has ended (running between steps).
    # The rest are queued, or scheduled when every queued task of theirs is due later: those
    # are found from the tasks due later, so a backlog of due runs is counted, not read.
    # Jobs' tasks are in their runs' rows: each set takes those too (a job has one task).
    _UNFINISHED_SQL = (
        "WITH s(id) AS (SELECT DISTINCT t.run_id FROM step_tasks t "
        " INDEXED BY step_tasks_running WHERE t.status = 'started'{tf}"
        " UNION ALL SELECT id FROM runs INDEXED BY runs_running WHERE task_status = 'started'{f}), "
        "rr(id) AS (SELECT DISTINCT t.run_id FROM step_tasks t INDEXED BY step_tasks_retrying "
        " WHERE t.status = 'queued' AND t.attempts > 0{tf} AND t.run_id NOT IN (SELECT id FROM s)"
        " UNION ALL SELECT id FROM runs INDEXED BY runs_retrying "
        "  WHERE task_status = 'queued' AND attempts > 0{f}), "
        "busy(id) AS (SELECT id FROM s UNION ALL SELECT id FROM rr) "
        "SELECT (SELECT count(*) FROM runs INDEXED BY runs_unfinished "
        " WHERE status = 'started'{f}), "
        "(SELECT count(*) FROM runs r JOIN s ON r.id = s.id WHERE r.status = 'started'), "
        "(SELECT count(*) FROM runs r JOIN rr ON r.id = rr.id WHERE r.status = 'started'), "
        "(SELECT count(*) FROM runs INDEXED BY runs_begun WHERE status = 'started' "
        " AND started_at IS NOT NULL{f} AND id NOT IN (SELECT id FROM busy)), "
        "(SELECT count(*) FROM (SELECT DISTINCT t.run_id FROM step_tasks t "
        "  INDEXED BY step_tasks_queued WHERE t.status = 'queued'{tf} AND t.run_at > :now) later "
        " JOIN runs r ON r.id = later.run_id WHERE r.status = 'started' "
        " AND r.started_at IS NULL AND later.run_id NOT IN (SELECT id FROM busy) "
        " AND NOT EXISTS (SELECT 1 FROM step_tasks d WHERE d.run_id = later.run_id "
        "  AND d.status = 'queued' AND d.run_at <= :now)) "
        "+ (SELECT count(*) FROM runs INDEXED BY runs_queued WHERE task_status = 'queued'{f} "
        " AND due > :now AND attempts = 0 AND started_at IS NULL AND status = 'started')"
    )

    def _unfinished(self, c: Conn, flow_slug: str | None, now: float) -> dict[str, int]:
        """Unfinished runs (of a flow) by their finer status, in one statement."""
        by_flow = flow_slug is not None
        sql = self._UNFINISHED_SQL.format(
            f=" AND flow_slug = :flow" if by_flow else "",
            tf=" AND t.flow_slug = :flow" if by_flow else "",
        )
        params: dict[str, Any] = {"now": now}
        if by_flow:
            params["flow"] = flow_slug
        unfinished, running, retrying, between, scheduled = (
            int(n) for n in c.execute(sql, params).fetchone()
        )
        return {
            "scheduled": scheduled,
            "queued": unfinished - running - retrying - between - scheduled,
            "running": running + between,
            "retrying": retrying,
        }

    def _oldest_queued(self, c: Conn, flow_slug: str, now: float) -> float | None:
        """When the oldest queued run of a flow became due: the first due task, in due order
        per priority level, of a run whose status is queued (one index seek per level, as a
        rule: a backlog's first task is a queued run's)."""
        found: list[float] = []
        for levels, first_at_level in (
            (self._LEVELS,
             "SELECT t.run_at FROM step_tasks t INDEXED BY step_tasks_queued "
             "WHERE t.status = 'queued' AND t.flow_slug = :flow AND t.priority = :p "
             "AND t.run_at <= :now AND EXISTS (SELECT 1 FROM runs r WHERE r.id = t.run_id "
             f"AND r.status = 'started' AND ({_STATUS_SQL}) = 'queued') "
             "ORDER BY t.run_at LIMIT 1"),
            # A job's task is its run's row: queued unless it has run before.
            (self._JOB_LEVELS,
             "SELECT due FROM runs INDEXED BY runs_queued WHERE task_status = 'queued' "
             "AND flow_slug = :flow AND priority = :p AND due <= :now AND attempts = 0 "
             "AND started_at IS NULL ORDER BY due LIMIT 1"),
        )[:2 if self._JOB_ROWS else 1]:
            for (level,) in c.execute(
                levels + "SELECT p FROM levels WHERE p IS NOT NULL", {"flow": flow_slug}
            ).fetchall():
                row = c.execute(
                    first_at_level, {"flow": flow_slug, "p": level, "now": now}
                ).fetchone()
                if row is not None:
                    found.append(float(row[0]))
        return min(found, default=None)

    def stats(self) -> list[FlowStats]:
        now = self.clock.now()
        with self._read() as c:
            # One statement, one snapshot: the terminal counts agree with each other.
            totals = c.execute(
                "SELECT f.flow_slug, "
                "(SELECT count(*) FROM runs WHERE flow_slug = f.flow_slug), "
                "(SELECT count(*) FROM runs INDEXED BY runs_unfinished "
                " WHERE status = 'started' AND flow_slug = f.flow_slug), "
                "(SELECT count(*) FROM runs INDEXED BY runs_failed "
                " WHERE status = 'failed' AND flow_slug = f.flow_slug), "
                "(SELECT count(*) FROM runs INDEXED BY runs_cancelled "
                " WHERE status = 'cancelled' AND flow_slug = f.flow_slug) "
                "FROM flows f ORDER BY f.flow_slug"
            ).fetchall()
            unfinished = {slug: self._unfinished(c, slug, now) for slug, *_ in totals}
            oldest = {slug: self._oldest_queued(c, slug, now) for slug, *_ in totals}
        workers = [w for w in self.workers() if not w.lost]
        result = []
        for slug, total, started, failed, cancelled in totals:
            counts = {s.value: 0 for s in RunStatus}
            counts.update(unfinished[slug])
            counts["completed"] = max(0, int(total) - int(started) - int(failed) - int(cancelled))
            counts["failed"] = int(failed)
            counts["cancelled"] = int(cancelled)
            due = oldest.get(slug)
            result.append(FlowStats(
                flow_slug=slug,
                counts=counts,
                oldest_queued_age=None if due is None else max(0.0, now - due),
                workers=sum(slug in w.flows for w in workers),
            ))
        return result

    def unserved(self, older_than: float) -> list[tuple[str, float]]:
        now = self.clock.now()
        served = {f for w in self.workers() if not w.lost for f in w.flows}
        with self._read() as c:
            slugs = [row[0] for row in c.execute("SELECT flow_slug FROM flows").fetchall()]
            oldest = {
                slug: self._oldest_queued(c, slug, now) for slug in slugs if slug not in served
            }
        return sorted(
            (slug, now - due) for slug, due in oldest.items()
            if due is not None and now - due > older_than
        )

    def workers(self) -> list[WorkerInfo]:
        with self._read() as c:
            rows = c.execute(
                "SELECT id, hostname, pid, flows, started_at, last_heartbeat, lease_seconds "
                "FROM workers ORDER BY started_at, id"
            ).fetchall()
            running: dict[str, int] = {}
            for owner, n in c.execute(
                "SELECT lease_owner, count(*) FROM step_tasks INDEXED BY step_tasks_running "
                "WHERE status = 'started' GROUP BY lease_owner "
                "UNION ALL SELECT lease_owner, count(*) FROM runs INDEXED BY runs_running "
                "WHERE task_status = 'started' GROUP BY lease_owner"
            ).fetchall():
                running[owner] = running.get(owner, 0) + int(n)
        # Heartbeats and leases run on real time, even under a fake clock.
        real_now = time.time()
        return [
            WorkerInfo(
                id=worker_id,
                hostname=hostname,
                pid=pid,
                flows=tuple(f for f in (flows or "").split(",") if f),
                started_at=utc_datetime(started),
                last_heartbeat=utc_datetime(beat),
                running=int(running.get(worker_id, 0)),
                lost=real_now - beat > (_DEFAULT_LEASE if lease is None else lease),
            )
            for worker_id, hostname, pid, flows, started, beat, lease in rows
        ]

    def throughput(
        self, since_minute: int, flow_slug: str | None
    ) -> list[tuple[str, int, int, int]]:
        # Through the primary key, a range per stored flow; a deleted flow's rows are not read.
        flow = "" if flow_slug is None else " WHERE f.flow_slug = ?"
        params = (since_minute,) if flow_slug is None else (since_minute, flow_slug)
        with self._read() as c:
            return [
                (slug, int(minute), int(completed), int(failed))
                for slug, minute, completed, failed in c.execute(
                    "SELECT t.flow_slug, t.minute, t.completed, t.failed FROM flows f "
                    "JOIN throughput t ON t.flow_slug = f.flow_slug AND t.minute >= ?"
                    f"{flow} ORDER BY t.flow_slug, t.minute",
                    params,
                ).fetchall()
            ]

    def retry_all(self, flow_slug: str | None) -> int:
        now = self.clock.now()
        retried = 0
        with self._write() as c:
            ids = [r[0] for r in c.execute(
                "SELECT id FROM runs INDEXED BY runs_failed WHERE status = 'failed'"
                + ("" if flow_slug is None else " AND flow_slug = ?"),
                () if flow_slug is None else (flow_slug,),
            ).fetchall()]
            for run_id in ids:
                try:
                    retried += self._retry(c, run_id, now)
                except (InputError, ShapeMismatch):
                    # Raised before anything was written: its key belongs to a newer run, or
                    # its flow changed shape. It stays failed.
                    continue
        return retried

    def delete_flow(self, flow_slug: str) -> int:
        with self._write() as c:
            known = c.execute("SELECT 1 FROM flows WHERE flow_slug = ?", (flow_slug,)).fetchone()
            if known is None:
                raise FlowNotFound(f"no flow {flow_slug!r} in {self.location}")
            active = c.execute(
                "SELECT count(*) FROM runs INDEXED BY runs_unfinished "
                "WHERE status = 'started' AND flow_slug = ?",
                (flow_slug,),
            ).fetchone()[0]
            if active:
                raise InputError(
                    f"flow {flow_slug!r} has {active} active run(s) (scheduled, queued, running "
                    "or retrying), so it cannot be deleted: cancel them first (store.cancel for "
                    f"each of store.runs(flow={flow_slug!r}, status=...)) or let them finish"
                )
            of_flow = "run_id IN (SELECT id FROM runs WHERE flow_slug = ?)"
            c.execute(f"DELETE FROM step_tasks WHERE {of_flow}", (flow_slug,))
            c.execute(f"DELETE FROM step_states WHERE {of_flow}", (flow_slug,))
            deleted = int(c.execute("DELETE FROM runs WHERE flow_slug = ?", (flow_slug,)).rowcount)
            for table in ("deps", "steps", "flows", "throughput"):
                c.execute(f"DELETE FROM {table} WHERE flow_slug = ?", (flow_slug,))
            for cache in (self._definitions, self._verified, self._json_cache, self._graphs):
                cache.pop(flow_slug, None)
        return deleted
