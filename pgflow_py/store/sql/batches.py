"""Results applied set-wise: a batch of finished jobs or single flow steps in a few statements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ... import _json
from ...definition import FlowDefinition, StepDefinition
from ..base import TaskFailure, TaskSuccess
from .connection import Conn, placeholders
from .steps import _Steps


class _Batches(_Steps):
    """A batch of results in a few statements; anything unusual goes the one-by-one way."""

    def _finish(
        self,
        c: Conn,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        now: float,
        finished: list[str],
    ) -> None:
        rest = self._complete_jobs(c, [s for s in successes if s.job], now, finished)
        rest += self._complete_flow_steps(c, [s for s in successes if not s.job], now, finished)
        rest = self._complete_map_tasks(c, rest, now, finished)
        for s in rest:
            self._complete_task(c, s, now, finished)
        for f in failures:
            self._fail_task(c, f, now, finished)

    # Flow steps: (run id, step slug, output) completed; (run id, steps done, first start) and
    # (run id, step slug, dependencies done) counted down.
    _COMPLETE_STATES_FROM = (
        "UPDATE step_states SET status = 'completed', output = v.column3, remaining_tasks = 0, "
        "finished_at = ? FROM (VALUES {}) AS v WHERE step_states.run_id = v.column1 "
        "AND step_states.step_slug = v.column2 AND step_states.status = 'started'"
    )
    _COUNT_DOWN_RUNS_FROM = (
        "UPDATE runs SET remaining_steps = runs.remaining_steps - v.column2, "
        "started_at = coalesce(runs.started_at, v.column3) FROM (VALUES {}) AS v "
        "WHERE runs.id = v.column1 AND runs.status = 'started'"
    )
    _COUNT_DOWN_DEPS_FROM = (
        "UPDATE step_states SET remaining_deps = step_states.remaining_deps - v.column3 "
        "FROM (VALUES {}) AS v WHERE step_states.run_id = v.column1 "
        "AND step_states.step_slug = v.column2 AND step_states.status = 'created'"
    )

    def _complete_jobs(
        self, c: Conn, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        """Complete the tasks of single-step jobs set-wise: one statement for their tasks, one
        for their runs.

        Optimistic: if any result turns out late (its task is no longer started at that
        attempt), the batch is undone and returned for the one-by-one path.
        """
        rows = [s for s in batch if s.task_id < 0]
        if rows:
            self._complete_job_rows(c, rows, now, finished)
            batch = [s for s in batch if s.task_id > 0]
        if not batch:
            return []
        c.execute("SAVEPOINT jobs")
        done = self._update_from(
            c, self._COMPLETE_TASKS_FROM, self._TASK_RESULT, (now,),
            [(s.task_id, s.output_json, s.attempt, s.claim) for s in batch],
        )
        if done == len(batch):
            done = self._update_from(
                c, self._COMPLETE_JOB_RUNS_FROM, self._RUN_RESULT, (now,),
                [(s.run_id, s.output_json, s.started_at, s.task_id) for s in batch],
            )
        if done != len(batch):
            c.execute("ROLLBACK TO jobs")
            c.execute("RELEASE jobs")
            return batch
        c.execute("RELEASE jobs")
        finished.extend(s.run_id for s in batch)
        return []

    def _complete_flow_steps(
        self, c: Conn, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        """Complete the single (not map) steps of flows set-wise, a handful of statements for the
        whole batch, and start the dependents that only waited for them.

        Returns what is left for the one-by-one path: map tasks, late results, and the whole
        batch if anything turns out unusual (the batch's writes are undone then).
        """
        if len(batch) < 2:
            return batch
        by_id = {s.task_id: s for s in batch}
        rows = self._started_tasks(c, by_id, maps=False)
        if not rows:
            return batch
        c.execute("SAVEPOINT steps")
        ok = self._complete_tasks(c, rows, by_id, now) and self._advance(
            c, rows, by_id, now, finished
        )
        if not ok:
            c.execute("ROLLBACK TO steps")
            c.execute("RELEASE steps")
            return batch
        c.execute("RELEASE steps")
        done = {row[0] for row in rows}
        return [s for s in batch if s.task_id not in done]

    def _started_tasks(
        self, c: Conn, by_id: dict[int, TaskSuccess], *, maps: bool
    ) -> list[Any]:
        """The batch's tasks still started (single-step or map ones): id, run id, flow slug,
        flow version, step slug, priority, start."""
        return self._select_in(
            c, "SELECT id, run_id, flow_slug, flow_version, step_slug, priority, started_at "
            "FROM step_tasks WHERE id IN ({}) AND status = 'started' "
            f"AND task_index IS {'NOT NULL' if maps else 'NULL'}",
            list(by_id),
        )

    def _select_in(self, c: Conn, sql: str, keys: list[Any]) -> list[Any]:
        """The rows of ``sql`` (``… IN ({})``) for all ``keys``, a statement per few hundred."""
        per = max(1, min(500, self._max_variables))
        rows: list[Any] = []
        for start in range(0, len(keys), per):
            chunk = keys[start:start + per]
            rows += c.execute(sql.format(placeholders(len(chunk))), chunk).fetchall()
        return rows

    def _complete_tasks(
        self, c: Conn, rows: list[Any], by_id: dict[int, TaskSuccess], now: float
    ) -> bool:
        """Complete the tasks of ``rows`` with their results; False if any was late."""
        return self._update_from(
            c, self._COMPLETE_TASKS_FROM, self._TASK_RESULT, (now,),
            [(s.task_id, s.output_json, s.attempt, s.claim)
             for s in (by_id[row[0]] for row in rows)],
        ) == len(rows)

    def _complete_map_tasks(
        self, c: Conn, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        """Complete map tasks set-wise: their tasks, their steps' counts of tasks left, and the
        first-start time of their runs in a statement each; a map step whose last task is
        among them completes the one-by-one way. Returns what is left (non-map tasks, late
        results; the whole batch, its writes undone, if anything is unusual)."""
        if len(batch) < 2:
            return batch
        by_id = {s.task_id: s for s in batch}
        rows = self._started_tasks(c, by_id, maps=True)
        if not rows:
            return batch
        steps: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            steps.setdefault((row[1], row[4]), []).append(row)
        c.execute("SAVEPOINT maps")
        ok = self._complete_tasks(c, rows, by_id, now)
        left: dict[tuple[str, str], int] = {}
        if ok:
            per = max(1, min(500, self._max_variables // 3))
            for chunk_start in range(0, len(steps), per):
                chunk = list(steps.items())[chunk_start:chunk_start + per]
                left.update(((run_id, slug), n) for run_id, slug, n in c.execute(
                    self._COUNT_DOWN_TASKS_FROM.format(",".join([self._TASKS_DONE] * len(chunk))),
                    [v for (run_id, slug), tasks in chunk for v in (run_id, slug, len(tasks))],
                ).fetchall())
            ok = len(left) == len(steps)
        if not ok:
            c.execute("ROLLBACK TO maps")
            c.execute("RELEASE maps")
            return batch
        c.execute("RELEASE maps")
        first_start: dict[str, float] = {}
        for tasks in steps.values():
            for row in tasks:
                if row[6] is not None and (row[1] not in first_start or row[6] < first_start[row[1]]):
                    first_start[row[1]] = row[6]
        for (run_id, slug), tasks in steps.items():
            if left[(run_id, slug)] == 0:  # the step's last task: the step completes
                _tid, _run, flow, version, _slug, priority, _started = tasks[0]
                self._complete_steps(
                    c, self._definition(flow, version), run_id, priority,
                    [(slug, self._map_output(c, run_id, slug))], now, finished,
                    started_at=first_start.get(run_id),
                )
        self._update_from(
            c, self._MARK_STARTED_FROM, self._STARTED, (),
            list(first_start.items()),
        )
        return [s for s in batch if s.task_id not in {row[0] for row in rows}]

    def _advance(
        self,
        c: Conn,
        rows: list[Any],
        by_id: dict[int, TaskSuccess],
        now: float,
        finished: list[str],
    ) -> bool:
        """Mark the steps of ``rows`` (single-step tasks just completed) completed, finish runs
        with nothing left, and start ready dependents. False: something unusual, undo."""
        if self._update_from(
            c, self._COMPLETE_STATES_FROM, "(?, ?, ?)", (now,),
            [(run_id, step, by_id[tid].output_json) for tid, run_id, _f, _v, step, _p, _s in rows],
        ) != len(rows):
            return False
        per_run: dict[str, list[Any]] = {}
        for row in rows:
            per_run.setdefault(row[1], []).append(row)
        if self._update_from(
            c, self._COUNT_DOWN_RUNS_FROM, "(?, CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION))",
            (), [(run_id, len(steps), min((r[6] for r in steps if r[6] is not None), default=None))
                 for run_id, steps in per_run.items()],
        ) != len(per_run):
            return False
        remaining = dict(self._select_in(
            c, "SELECT id, remaining_steps FROM runs WHERE id IN ({})", list(per_run)
        ))
        # Dependents: those with one dependency are ready now; the others count down.
        ready: list[tuple[FlowDefinition, str, int, StepDefinition, tuple[str, str] | None]] = []
        counting: dict[tuple[str, str], tuple[FlowDefinition, int, StepDefinition, int]] = {}
        complete: list[tuple[FlowDefinition, str]] = []
        for run_id, steps in per_run.items():
            if remaining[run_id] == 0:
                complete.append((self._definition(steps[0][2], steps[0][3]), run_id))
                continue
            for tid, _run, flow, version, step, priority, _started in steps:
                d = self._definition(flow, version)
                for dependent in self._graph(d).dependents[step]:
                    if len(dependent.depends_on) == 1:
                        ready.append((d, run_id, priority, dependent,
                                      (step, by_id[tid].output_json)))
                    else:
                        key = (run_id, dependent.slug)
                        seen = counting.get(key)
                        counting[key] = (d, priority, dependent, 1 + (seen[3] if seen else 0))
        if complete:
            self._finish_runs_completed(c, complete, now)
        if counting:
            if self._update_from(
                c, self._COUNT_DOWN_DEPS_FROM, "(?, ?, CAST(? AS BIGINT))", (),
                [(run_id, slug, n) for (run_id, slug), (_d, _p, _s, n) in counting.items()],
            ) != len(counting):
                return False
            keys = list(counting)
            per = max(1, min(500, self._max_variables // 2))
            for start in range(0, len(keys), per):
                chunk = keys[start:start + per]
                for run_id, slug in c.execute(
                    "SELECT run_id, step_slug FROM step_states WHERE remaining_deps = 0 "
                    "AND status = 'created' AND (run_id, step_slug) IN (VALUES "
                    + ",".join(["(?, ?)"] * len(chunk)) + ")",
                    [v for key in chunk for v in key],
                ).fetchall():
                    d, priority, dependent, _n = counting[(run_id, slug)]
                    ready.append((d, run_id, priority, dependent, None))
        # Only now, past the last check that can still undo this batch.
        finished.extend(run_id for _d, run_id in complete)
        self._start_ready(c, ready, now, finished)
        return True

    def _start_ready(
        self,
        c: Conn,
        ready: list[tuple[FlowDefinition, str, int, StepDefinition, tuple[str, str] | None]],
        now: float,
        finished: list[str],
    ) -> None:
        """Start steps whose dependencies are all complete: single steps fed by one dependency
        in two statements for all; the others (maps, several dependencies) one by one."""
        states: list[tuple[Any, ...]] = []
        tasks: list[tuple[Any, ...]] = []
        failed: set[str] = set()
        for d, run_id, priority, step, known in ready:
            if run_id in failed:
                continue
            graph = self._graph(d)
            if (step.step_type == "single" and known is not None
                    and step.slug not in graph.conditional):
                slug, output = known
                states.append((run_id, step.slug))
                tasks.append((run_id, d.slug, self._definitions[d.slug][0], step.slug, None,
                               graph.max_attempts[step.slug], priority,
                               now + step.start_delay, f"{{{_json.dumps(slug)}:{output}}}", now))
                continue
            done = self._begin_step(c, d, run_id, priority, step, now, known)
            if done is None:  # the run failed (a map fed a non-array)
                failed.add(run_id)
                finished.append(run_id)
            elif done:
                self._complete_steps(c, d, run_id, priority, done, now, finished)
        self._update_from(
            c, self._START_SINGLES_FROM, "(?, ?)", (now,),
            [row for row in states if row[0] not in failed],
        )
        self._insert_tasks(c, [t for t in tasks if t[0] not in failed])

