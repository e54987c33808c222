"""Reading runs back as models, with the finer status of unfinished runs derived from their tasks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ... import _json
from ...clock import utc_datetime
from ...errors import SchemaError
from ...models import AttemptRecord, Run, RunStatus, StepRun, TaskRun
from ..base import Undecodable
from .connection import _STATUS_SQL, placeholders
from .control import _Control

# runs.started_at is written when the first attempt ends; until then it is the running attempts'.
_STARTED_SQL = """coalesce(r.started_at,
         CASE WHEN r.task_status = 'started' THEN r.task_started_at END,
         (SELECT min(t.started_at) FROM step_tasks t
          WHERE t.run_id = r.id AND t.status = 'started'))"""

_RUN_COLUMNS = f"""r.id, r.flow_slug, {_STATUS_SQL} AS status, r.input, r.output, r.error, r.key,
r.priority, r.created_at, {_STARTED_SQL}, r.finished_at"""


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else utc_datetime(ts)


def _decode(text: str | None) -> Any:
    """A stored value, ``None`` for none, or :class:`Undecodable` if it cannot be read (so one
    bad row, written by hand or by an older version, cannot hide the others)."""
    if text is None:
        return None
    try:
        return _json.loads(text)
    except Exception as exc:
        return Undecodable.of(exc)


class _Reading(_Control):
    """Runs read back as :class:`~pgflow_py.models.Run` models."""

    # Newest first: rows are appended in creation order, so the rowid is that order too, and
    # walking it backwards stops after `limit` rows instead of sorting them all.
    _NEWEST_FIRST = "r.rowid DESC"
    _SKIP_REASON = "skip_reason"  # the column (schema version 6 on SQLite, 5 on PostgreSQL)
    # The condition on run r of being a candidate: one whose id {ids} selects, or whose
    # _CANDIDATE_KEY {more} selects (empty, or a UNION ALL). SQLite keeps an IN list of rowids
    # as a sorted b-tree and walks it newest first, so only the first page's candidates have
    # their status derived; PostgreSQL joins the ids to the runs by primary key and sorts.
    _CANDIDATES = "r.rowid IN (SELECT rowid FROM runs WHERE id IN ({ids}){more})"
    _CANDIDATE_KEY = "rowid"  # what {more} selects
    # Whether to order the candidates before deriving their finer status, in a subquery of
    # its own: SQLite's walk of the rowids reads only the first page's already.
    _DERIVE_IN_ORDER = False

    def get_run(self, run_id: str) -> Run | None:
        """The run, or ``None``. An input or output whose stored JSON cannot be decoded reads as
        an :class:`~pgflow_py.store.base.Undecodable` (as in :meth:`runs`)."""
        runs = self._read_runs(f"SELECT {_RUN_COLUMNS} FROM runs r WHERE r.id = :id", {"id": run_id})
        return runs[0] if runs else None

    def runs(
        self,
        flow_slug: str | None,
        status: str | None,
        key: str | None,
        limit: int,
        before: str | None = None,
    ) -> list[Run]:
        where: list[str] = []
        derived: str | None = None  # the finer status's condition, on the candidates
        params: dict[str, Any] = {"limit": limit}
        if flow_slug is not None:
            where.append("r.flow_slug = :flow")
            params["flow"] = flow_slug
        if key is not None:
            where.append("r.key = :key")
            params["key"] = key
        if status is not None:
            condition, derived = self._status_condition(
                RunStatus(status).value, flow_slug is not None
            )
            where.append(condition)
        if before is not None:
            # Keyset paging in the order of the listing (insertion order): runs started
            # meanwhile come after the cursor, never onto a later page. A cursor run since
            # pruned is a position in time instead (ids are time-ordered UUIDv7s).
            with self._read() as conn:
                row = conn.execute(
                    f"SELECT {self._SEQ} FROM runs WHERE id = ?", (before,)
                ).fetchone()
            if row is not None:
                where.append(f"r.{self._SEQ} < :before")
                params["before"] = row[0]
            else:
                where.append("r.id < :before")
                params["before"] = before
        if derived is not None and self._DERIVE_IN_ORDER:
            # The candidates in order first (OFFSET 0 keeps the subquery apart), then the finer
            # status derived for as many as the page takes.
            sql = (f"SELECT {_RUN_COLUMNS} FROM (SELECT * FROM runs r WHERE "
                   f"{' AND '.join(where)} ORDER BY {self._NEWEST_FIRST} OFFSET 0) r "
                   f"WHERE {derived}")
        else:
            if derived is not None:
                where.append(derived)
            sql = f"SELECT {_RUN_COLUMNS} FROM runs r"
            if where:
                sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {self._NEWEST_FIRST} LIMIT :limit"
        return self._read_runs(sql, params)

    def _status_condition(self, status: str, by_flow: bool) -> tuple[str, str | None]:
        """The SQL condition on run ``r`` of having ``status`` (a known value, written into the
        statement so that the partial indexes on it apply): of being a candidate, and of
        having that finer status (``None`` if the first says it all).

        Completed and queued runs are common: the listing walks the runs newest first (of the
        flow: its index of unfinished runs is in that order too) and finds them near the top as
        a rule. The other statuses are rare, and a walk would read every run newer than the
        newest of them, evaluating the finer status of each unfinished one on the way (half a
        second at a million runs): their runs are picked from the partial indexes that count
        them instead (see ``_UNFINISHED_SQL``), and only those candidates are ordered.
        """
        seq = self._SEQ
        f = " AND flow_slug = :flow" if by_flow else ""
        if status == "completed":
            return "r.status = 'completed'", None
        if status == "queued":
            return f"r.status = 'started' AND ({_STATUS_SQL}) = 'queued'", None
        if status in ("failed", "cancelled"):
            return (f"r.status = '{status}' AND r.{seq} IN (SELECT {seq} FROM runs "
                    f"INDEXED BY runs_{status} WHERE status = '{status}'{f})"), None
        tasks, jobs = {
            # A running task, or (below) a first attempt ended and nothing waiting or running.
            "running": ("step_tasks_running WHERE status = 'started'",
                        "runs_running WHERE task_status = 'started'"),
            "retrying": ("step_tasks_retrying WHERE status = 'queued' AND attempts > 0",
                         "runs_retrying WHERE task_status = 'queued' AND attempts > 0"),
            # Every queued task due later (a scheduled run has one).
            "scheduled": ("step_tasks_queued WHERE status = 'queued' AND run_at > :now",
                          "runs_queued WHERE task_status = 'queued' AND due > :now"),
        }[status]
        # Jobs' tasks are in their runs' rows.
        more = f" UNION ALL SELECT {self._CANDIDATE_KEY} FROM runs INDEXED BY {jobs}{f}"
        if status == "running":
            more += (f" UNION ALL SELECT {self._CANDIDATE_KEY} FROM runs INDEXED BY runs_begun "
                     f"WHERE status = 'started' AND started_at IS NOT NULL{f}")
        candidates = self._CANDIDATES.format(
            ids=f"SELECT run_id FROM step_tasks INDEXED BY {tasks}{f}", more=more
        )
        return f"r.status = 'started' AND {candidates}", f"({_STATUS_SQL}) = '{status}'"

    def _read_runs(self, sql: str, params: dict[str, Any]) -> list[Run]:
        params = {**params, "now": self.clock.now()}
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            ids = [r[0] for r in rows]
            marks = placeholders(len(ids))
            step_rows = conn.execute(
                f"SELECT run_id, step_slug, status, output, error, {self._SKIP_REASON} "
                f"FROM step_states WHERE run_id IN ({marks})",
                ids,
            ).fetchall()
            task_rows = conn.execute(
                "SELECT run_id, step_slug, task_index, status, attempts, output, error, history, "
                f"started_at FROM tasks WHERE run_id IN ({marks}) ORDER BY id",
                ids,
            ).fetchall()
        loads = _json.loads
        decode = _decode
        tasks: dict[tuple[str, str], list[tuple[TaskRun, float | None]]] = {}
        for run_id, step, index, status, attempts, output, error, history, started in task_rows:
            record = TaskRun(
                index=index,
                status=status,
                attempts=attempts,
                output=decode(output),
                error=error,
                history=tuple(
                    AttemptRecord(
                        h["attempt"], h["error"], _dt(h["at"]), step, index,  # type: ignore[arg-type]
                        h.get("traceback"),
                    )
                    for h in (loads(history) if history else ())
                ),
            )
            tasks.setdefault((run_id, step), []).append((record, started))
        steps: dict[str, dict[str, StepRun]] = {}
        for run_id, step, status, output, error, skip_reason in step_rows:
            step_tasks = sorted(tasks.get((run_id, step), []), key=lambda t: t[0].index or 0)
            steps.setdefault(run_id, {})[step] = StepRun(
                slug=step,
                status=status,
                attempts=max((t.attempts for t, _ in step_tasks), default=0),
                output=decode(output),
                error=error,
                tasks=tuple(t for t, _ in step_tasks),
                skip_reason=skip_reason,
            )
        for (run_id, step), step_tasks in tasks.items():
            if step not in steps.get(run_id, {}):
                # A job's step has no state row: its one task is its state.
                task = step_tasks[0][0]
                steps.setdefault(run_id, {})[step] = StepRun(
                    slug=step,
                    status="started" if task.status in ("queued", "started") else task.status,
                    attempts=task.attempts,
                    output=task.output,
                    error=task.error if task.status == "failed" else None,
                    tasks=(task,),
                )
        result = []
        by_run: dict[str, list[tuple[TaskRun, float | None]]] = {}
        for (rid, _step), step_tasks in tasks.items():
            by_run.setdefault(rid, []).extend(step_tasks)
        for (run_id, flow_slug, status, inp, output, error, key, priority, created, started,
             finished) in rows:
            order = self._step_order(flow_slug)
            run_steps = steps.get(run_id, {})
            last = max(by_run.get(run_id, ()), key=lambda t: t[1] or 0.0, default=None)
            result.append(Run(
                id=run_id,
                flow_slug=flow_slug,
                status=RunStatus(status),
                input=decode(inp),
                output=decode(output),
                error=error,
                key=key,
                priority=priority,
                created_at=_dt(created),  # type: ignore[arg-type]
                started_at=_dt(started),
                finished_at=_dt(finished),
                attempts=last[0].attempts if last is not None else 0,
                steps=tuple(sorted(run_steps.values(), key=lambda s: order.get(s.slug, 0))),
            ))
        return result

    def _step_order(self, flow_slug: str) -> dict[str, int]:
        try:
            d = self._definition(flow_slug)
        except SchemaError:
            return {}
        return {s.slug: i for i, s in enumerate(d.steps)}
