"""Operators' side: cancelling, retrying and pruning runs."""

from __future__ import annotations

from ...errors import InputError, ShapeMismatch
from .claims import _Claims
from .connection import Conn, placeholders


class _Control(_Claims):
    """Cancel, retry and prune runs."""

    def cancel(self, run_id: str) -> bool:
        now = self.clock.now()
        with self._write() as c:
            # Until an attempt ends, a run's start is read from its running tasks, which
            # cancelling ends: record it first.
            job_start = (
                "CASE WHEN task_status = 'started' THEN task_started_at END, "
                if self._JOB_ROWS else ""
            )
            if not c.execute(
                "UPDATE runs SET status = 'cancelled', finished_at = ?, started_at = coalesce("
                f"started_at, {job_start}"
                "(SELECT min(t.started_at) FROM step_tasks t WHERE t.run_id = runs.id "
                "AND t.status = 'started')) WHERE id = ? AND status = 'started'",
                (now, run_id),
            ).rowcount:
                return False
            self._cancel_rest(c, run_id, now)
        return True

    def retry(self, run_id: str) -> bool:
        now = self.clock.now()
        with self._write() as c:
            return self._retry(c, run_id, now)

    def _retry(self, c: Conn, run_id: str, now: float) -> bool:
        """Retry a failed or cancelled run inside the caller's transaction; ``False`` if it is
        neither. Raises (before writing anything) if it cannot be retried."""
        clash = c.execute(
            "SELECT other.id FROM runs AS this JOIN runs AS other ON other.flow_slug = "
            "this.flow_slug AND other.key = this.key AND other.id != this.id "
            "AND other.status != 'cancelled' WHERE this.id = ?",
            (run_id,),
        ).fetchone()
        if clash is not None:
            raise InputError(
                f"run {run_id} cannot be retried: its key now belongs to run {clash[0]}"
            )
        found = c.execute(
            "SELECT flow_slug FROM runs WHERE id = ? AND status IN ('failed', 'cancelled')",
            (run_id,),
        ).fetchone()
        if found is None:
            return False
        d = self._definition(found[0])
        old = c.execute(
            f"SELECT max(flow_version) FROM {self._tasks} WHERE run_id = ?", (run_id,)
        ).fetchone()[0]
        if old is not None and old != self._definitions[d.slug][0]:
            raise ShapeMismatch(
                f"run {run_id} was started before flow {d.slug!r} changed shape, so it "
                "cannot be retried; start a new run with the same input instead"
            )
        row = c.execute(
            "UPDATE runs SET status = 'started', error = NULL, output = NULL, "
            "started_at = NULL, finished_at = NULL "
            "WHERE id = ? AND status IN ('failed', 'cancelled') "
            "RETURNING flow_slug, priority",
            (run_id,),
        ).fetchone()
        # Tasks that did not complete run again with fresh attempts; history is kept. Those
        # of a skipped step (when_exhausted) stay as they are: the step ended.
        self._made_due(d.slug)
        skipped = (
            "step_slug NOT IN (SELECT s.step_slug FROM step_states s "
            "WHERE s.run_id = ? AND s.status = 'skipped')"
        )
        c.execute(
            "UPDATE step_tasks SET status = 'queued', attempts = 0, run_at = ?, "
            "finished_at = NULL WHERE run_id = ? AND status IN ('failed', 'cancelled') "
            f"AND {skipped}",
            (now, run_id, run_id),
        )
        if self._JOB_ROWS:
            c.execute(  # a job's task, in its run's row
                "UPDATE runs SET task_status = 'queued', attempts = 0, due = ? "
                f"WHERE id = ? AND task_status IN ('failed', 'cancelled') AND {skipped}",
                (now, run_id, run_id),
            )
        # Steps that had tasks go back to work; the others wait for their dependencies.
        c.execute(
            "UPDATE step_states SET status = 'started', error = NULL, finished_at = NULL, "
            "remaining_tasks = (SELECT count(*) FROM step_tasks t WHERE t.run_id = "
            "step_states.run_id AND t.step_slug = step_states.step_slug "
            "AND t.status != 'completed') "
            "WHERE run_id = ? AND status IN ('failed', 'cancelled') "
            "AND remaining_tasks IS NOT NULL",
            (run_id,),
        )
        c.execute(
            "UPDATE step_states SET status = 'created', error = NULL, finished_at = NULL "
            "WHERE run_id = ? AND status IN ('failed', 'cancelled') AND remaining_tasks IS NULL",
            (run_id,),
        )
        # Waiting steps count again the dependencies that have not ended (a step started on
        # its sole dependency never had its count decremented). A skipped dependency has
        # ended: a waiting step below it was not skipped with it, so the skip was plain.
        statuses = dict(c.execute(
            "SELECT step_slug, status FROM step_states WHERE run_id = ?", (run_id,)
        ).fetchall())
        waiting = {
            slug: sum(
                statuses.get(dep) not in ("completed", "skipped")
                for dep in d.step(slug).depends_on
            )
            for slug, status in statuses.items() if status == "created"
        }
        c.executemany(
            "UPDATE step_states SET remaining_deps = ? WHERE run_id = ? AND step_slug = ?",
            [(left, run_id, slug) for slug, left in waiting.items()],
        )
        ready = [slug for slug, left in waiting.items() if left == 0]
        for slug in ready:
            done = self._begin_step(c, d, run_id, row[1], d.step(slug), now)
            if done:
                self._complete_steps(c, d, run_id, row[1], done, now, [])
        return True

    def prune(self, before: float) -> int:
        with self._write() as c:
            ids = [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE status != 'started' AND finished_at < ?", (before,)
            ).fetchall()]
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start:chunk_start + 500]
                marks = placeholders(len(chunk))
                c.execute(f"DELETE FROM step_tasks WHERE run_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM step_states WHERE run_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM runs WHERE id IN ({marks})", chunk)
            # Minutes that ended by ``before`` (a small table: flows times minutes kept).
            c.execute("DELETE FROM throughput WHERE minute < ?", (int(before // 60),))
        return len(ids)
