"""How a run advances one step at a time: steps start, complete and fail, runs finish."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ... import _json
from ...conditions import CONDITION_NOT_MET, Skip, condition_met
from ...definition import FlowDefinition, StepDefinition
from ..base import RunFailure, TaskFailure, TaskSuccess, Undecodable
from .connection import Conn, placeholders
from .definitions import _Definitions

TRACEBACK_LIMIT = 8_000
"""Characters of a traceback kept in a task's history: the end, where the error was raised."""


def cap_traceback(text: str | None) -> str | None:
    """``text`` cut to its last :data:`TRACEBACK_LIMIT` characters, behind a line that says
    how much was cut."""
    if text is None or len(text) <= TRACEBACK_LIMIT:
        return text
    cut = len(text) - TRACEBACK_LIMIT
    return f"[... {cut} characters of the traceback cut ...]\n" + text[cut:]


class _Steps(_Definitions):
    """Steps start, complete and fail one at a time; runs finish when their steps are done."""

    # Appends the failed attempt (its number, error ?, time ?, traceback ?) to a task's
    # history, a JSON list.
    _APPEND_HISTORY = (
        "history = json_insert(coalesce(history, '[]'), '$[#]', "
        "json_object('attempt', attempts, 'error', ?, 'at', ?, 'traceback', ?))"
    )
    _INSERT_RUNS = (
        "INSERT INTO runs (id, flow_slug, status, input, key, priority, remaining_steps, "
        "run_at, created_at) VALUES "
    )
    _RUN_VALUES = "(?, ?, 'started', ?, ?, ?, ?, ?, ?)"
    # A job's run, with its task queued (or none: the task columns NULL).
    _INSERT_JOB_RUNS = (
        "INSERT INTO runs (id, flow_slug, status, input, key, priority, remaining_steps, "
        "run_at, created_at, trace_context, step_slug, task_status, flow_version, attempts, "
        "claims, max_attempts, due) VALUES "
    )
    _JOB_RUN_VALUES = (
        "(?, ?, 'started', ?, ?, ?, 1, ?, ?, ?, ?, ?, CAST(? AS BIGINT), 0, 0, "
        "CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION))"
    )
    # Queues a job's task in its run's row (step slug, flow version, max attempts, due, run id).
    _QUEUE_JOB_TASK = (
        "UPDATE runs SET step_slug = ?, task_status = 'queued', flow_version = ?, attempts = 0, "
        "claims = coalesce(claims, 0), max_attempts = ?, due = ?, lease_owner = NULL, "
        "lease_expires = NULL, task_started_at = NULL WHERE id = ?"
    )
    # Clears a run's task columns (a job's run whose task goes away).
    _NO_JOB_TASK = (
        "step_slug = NULL, task_status = NULL, flow_version = NULL, attempts = NULL, "
        "claims = NULL, max_attempts = NULL, due = NULL, lease_owner = NULL, "
        "lease_expires = NULL, task_started_at = NULL"
    )
    # Runs started under a current span (OpenTelemetry) also record its trace context.
    _INSERT_TRACED_RUNS = (
        "INSERT INTO runs (id, flow_slug, status, input, key, priority, remaining_steps, "
        "run_at, created_at, trace_context) VALUES "
    )
    _TRACED_RUN_VALUES = "(?, ?, 'started', ?, ?, ?, ?, ?, ?, ?)"
    # Each takes a VALUES list ({}) of one row or many. The casts type the columns on
    # PostgreSQL. A task row names (id, output, attempt, claim): the guard makes a late result
    # (after reclaim, cancel, run failure, or a retry's new claim) change nothing.
    _COMPLETE_TASKS_FROM = (
        "UPDATE step_tasks SET status = 'completed', output = v.column2, finished_at = ?, "
        "lease_owner = NULL, lease_expires = NULL FROM (VALUES {}) AS v "
        "WHERE step_tasks.id = v.column1 AND step_tasks.attempts = v.column3 "
        "AND step_tasks.claims = coalesce(v.column4, step_tasks.claims) "
        "AND step_tasks.status = 'started'"
    )
    _TASK_RESULT = "(CAST(? AS BIGINT), ?, CAST(? AS BIGINT), CAST(? AS BIGINT))"
    # A job's run (id, output, start, task id) completes with its one task's output. Its start
    # is the completing attempt's (if known), else that of the task with the given id.
    _COMPLETE_JOB_RUNS_FROM = (
        "UPDATE runs SET status = 'completed', remaining_steps = 0, output = v.column2, "
        "finished_at = ?, started_at = coalesce(runs.started_at, v.column3, "
        "(SELECT t.started_at FROM step_tasks t WHERE t.id = v.column4)) "
        "FROM (VALUES {}) AS v WHERE runs.id = v.column1 AND runs.status = 'started'"
    )
    _RUN_RESULT = "(?, ?, CAST(? AS DOUBLE PRECISION), CAST(? AS BIGINT))"
    # A job whose run row holds its task completes: _TASK_RESULT rows (the task's id is minus
    # the row's {seq}), guarded as _COMPLETE_TASKS_FROM is.
    _COMPLETE_JOB_ROWS_FROM = (
        "UPDATE runs SET status = 'completed', task_status = 'completed', remaining_steps = 0, "
        "output = v.column2, finished_at = ?, lease_owner = NULL, lease_expires = NULL, "
        "started_at = coalesce(runs.started_at, runs.task_started_at) FROM (VALUES {values}) AS v "
        "WHERE runs.{seq} = -v.column1 AND runs.attempts = v.column3 "
        "AND runs.claims = coalesce(v.column4, runs.claims) AND runs.task_status = 'started' "
        "AND runs.status = 'started'"
    )
    # Runs (id, output) whose steps are all done complete.
    _COMPLETE_RUNS_FROM = (
        "UPDATE runs SET status = 'completed', output = v.column2, finished_at = ? "
        "FROM (VALUES {}) AS v WHERE runs.id = v.column1"
    )
    # Single steps (run id, step slug) whose dependencies are complete start (their tasks are
    # inserted beside them).
    _START_SINGLES_FROM = (
        "UPDATE step_states SET status = 'started', remaining_deps = 0, remaining_tasks = 1, "
        "started_at = ? FROM (VALUES {}) AS v WHERE step_states.run_id = v.column1 "
        "AND step_states.step_slug = v.column2"
    )
    # Runs (id, start) record when their first attempt started, once one has ended.
    _MARK_STARTED_FROM = (
        "UPDATE runs SET started_at = v.column2 FROM (VALUES {}) AS v "
        "WHERE runs.id = v.column1 AND runs.started_at IS NULL"
    )
    _STARTED = "(?, CAST(? AS DOUBLE PRECISION))"
    # Map steps (run id, step slug, tasks done) count down their tasks left.
    _COUNT_DOWN_TASKS_FROM = (
        "UPDATE step_states SET remaining_tasks = step_states.remaining_tasks - v.column3 "
        "FROM (VALUES {}) AS v WHERE step_states.run_id = v.column1 "
        "AND step_states.step_slug = v.column2 AND step_states.status = 'started' "
        "RETURNING step_states.run_id, step_states.step_slug, step_states.remaining_tasks"
    )
    _TASKS_DONE = "(?, ?, CAST(? AS BIGINT))"
    _INSERT_TASKS = (
        "INSERT INTO step_tasks (run_id, flow_slug, flow_version, step_slug, task_index, "
        "status, max_attempts, priority, run_at, input, created_at) VALUES "
    )
    _TASK_VALUES = "(?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)"

    def _insert_tasks(self, c: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert queued tasks (rows of ``_TASK_VALUES``), noting their flows as made due."""
        if rows:
            self._insert(c, self._INSERT_TASKS, self._TASK_VALUES, rows)
            self._due_flows.update({row[1] for row in rows})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Runs failed by the current write transaction, for the caller (see _collecting_failures).
        self._failed_runs: list[RunFailure] | None = None

    def _start_step(
        self,
        c: Conn,
        d: FlowDefinition,
        step: StepDefinition,
        run_id: str,
        priority: int,
        run_at: float,
        now: float,
        items: Sequence[str] | None,
        input_json: str | None = None,
    ) -> list[tuple[str, str | Skip]]:
        """Queue a step's tasks; a map over no items completes at once.

        Returns ``(step_slug, output_json)`` of a step that completed immediately, for cascading.
        """
        max_attempts = self._graph(d).max_attempts[step.slug]
        version = self._definitions[d.slug][0]
        if step.step_type == "map":
            assert items is not None
            if not items:
                c.execute(
                    "UPDATE step_states SET status = 'started', remaining_deps = 0, remaining_tasks = 0, "
                    "started_at = ? WHERE run_id = ? AND step_slug = ?",
                    (now, run_id, step.slug),
                )
                return [(step.slug, "[]")]  # the caller completes it
            c.execute(
                "UPDATE step_states SET status = 'started', remaining_deps = 0, "
                "remaining_tasks = ?, started_at = ? "
                "WHERE run_id = ? AND step_slug = ?",
                (len(items), now, run_id, step.slug),
            )
            self._insert_tasks(
                c,
                [(run_id, d.slug, version, step.slug, i, max_attempts, priority, run_at, item, now)
                 for i, item in enumerate(items)],
            )
            return []
        if d.kind == "job":
            # Only a retry starts a job's step here (a run its condition had failed): the
            # step keeps its state in its task again.
            c.execute(
                "DELETE FROM step_states WHERE run_id = ? AND step_slug = ?", (run_id, step.slug)
            )
            if self._JOB_ROWS:
                c.execute(
                    self._QUEUE_JOB_TASK, (step.slug, version, max_attempts, run_at, run_id)
                )
                self._due_flows.add(d.slug)
                return []
        else:
            c.execute(self._START_SINGLES_FROM.format("(?, ?)"), (now, run_id, step.slug))
        self._insert_tasks(
            c,
            [(run_id, d.slug, version, step.slug, None, max_attempts, priority, run_at,
              input_json, now)],
        )
        return []

    @contextmanager
    def _collecting_failures(self, into: list[RunFailure] | None) -> Iterator[None]:
        # Called with the write lock held, so only this transaction appends to the list.
        self._failed_runs = into
        try:
            yield
        finally:
            self._failed_runs = None

    def _complete_job_rows(
        self, c: Conn, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> None:
        """Complete jobs whose run rows hold their tasks: one statement per few hundred. A late
        result (its attempt or claim no longer current) matches no row and changes nothing."""
        per = max(1, min(500, (self._max_variables - 1) // 4))
        sql = self._COMPLETE_JOB_ROWS_FROM.format(seq=self._SEQ, values="{}")
        for start in range(0, len(batch), per):
            chunk = batch[start:start + per]
            finished.extend(row[0] for row in c.execute(
                sql.format(",".join([self._TASK_RESULT] * len(chunk))) + " RETURNING runs.id",
                [now, *(v for s in chunk for v in (s.task_id, s.output_json, s.attempt, s.claim))],
            ).fetchall())

    def _complete_task(
        self, c: Conn, s: TaskSuccess, now: float, finished: list[str]
    ) -> None:
        if s.task_id < 0:  # a job's task, in its run's row
            self._complete_job_rows(c, [s], now, finished)
            return
        row = c.execute(
            self._COMPLETE_TASKS_FROM.format(self._TASK_RESULT)
            + " RETURNING step_tasks.run_id, step_tasks.flow_slug, step_tasks.step_slug, "
            "step_tasks.task_index, step_tasks.priority, step_tasks.flow_version, "
            "step_tasks.started_at",
            (now, s.task_id, s.output_json, s.attempt, s.claim),
        ).fetchone()
        if row is None:
            return
        run_id, flow_slug, step_slug, task_index, priority, version, started_at = row
        if task_index is None:
            step_output = s.output_json
        else:
            left = c.execute(
                self._COUNT_DOWN_TASKS_FROM.format(self._TASKS_DONE), (run_id, step_slug, 1)
            ).fetchone()
            if left is None or left[2] > 0:
                self._mark_started(c, run_id, started_at)
                return
            step_output = self._map_output(c, run_id, step_slug)
        d = self._definition(flow_slug, version)
        self._complete_steps(
            c, d, run_id, priority, [(step_slug, step_output)], now, finished, started_at=started_at
        )

    @staticmethod
    def _map_output(c: Conn, run_id: str, step_slug: str) -> str:
        """A completed map step's output: its tasks' outputs as a JSON array, in order."""
        outputs = c.execute(
            "SELECT output FROM step_tasks WHERE run_id = ? AND step_slug = ? "
            "AND status = 'completed' ORDER BY task_index",
            (run_id, step_slug),
        ).fetchall()
        return "[" + ",".join(o[0] for o in outputs) + "]"

    def _mark_started(self, c: Conn, run_id: str, started_at: float | None) -> None:
        """Record when a run's first attempt started, once one has ended."""
        c.execute(self._MARK_STARTED_FROM.format(self._STARTED), (run_id, started_at))

    def _complete_steps(
        self,
        c: Conn,
        d: FlowDefinition,
        run_id: str,
        priority: int,
        done: list[tuple[str, str | Skip]],
        now: float,
        finished: list[str],
        not_before: float = 0.0,
        started_at: float | None = None,
    ) -> None:
        """Mark steps completed (or skipped: a :class:`Skip` for output) and start the
        dependents that became ready, cascading.

        Dependents are due no earlier than ``not_before`` (a delayed run's start time);
        ``started_at`` is when the completing attempt started. A plain skip readies dependents
        as a completion does (they receive deps without the skipped step); a cascading one
        skips every step below it too.
        """
        while done:
            step_slug, output = done.pop()
            skip = output if type(output) is Skip else None
            if d.kind == "job":
                # A job's one step is its leaf (and has no state row): finish the run.
                if skip is not None:
                    self._skip_job(c, run_id, step_slug, skip, now, started_at, finished)
                elif c.execute(
                    self._COMPLETE_JOB_RUNS_FROM.format(self._RUN_RESULT),
                    (now, run_id, output, started_at, None),
                ).rowcount:
                    finished.append(run_id)
                return
            if skip is not None:
                updated = self._mark_skipped(c, d, run_id, step_slug, skip, now)
            else:
                updated = c.execute(
                    "UPDATE step_states SET status = 'completed', output = ?, "
                    "remaining_tasks = 0, finished_at = ? WHERE run_id = ? AND step_slug = ? "
                    "AND status IN ('created', 'started')",
                    (output, now, run_id, step_slug),
                ).rowcount
            left = c.execute(
                "UPDATE runs SET remaining_steps = remaining_steps - ?, "
                "started_at = coalesce(started_at, ?) "
                "WHERE id = ? AND status = 'started' RETURNING remaining_steps",
                (updated, started_at, run_id),
            ).fetchone()
            if left is None:
                return  # the run failed or was cancelled meanwhile
            if left[0] == 0:
                self._finish_run_completed(c, d, run_id, now)
                finished.append(run_id)
                return
            if not updated:
                continue  # the step had ended before: its dependents were handled then
            if skip is not None and skip.cascade:
                continue  # everything below it is skipped too
            for dependent in self._graph(d).dependents[step_slug]:
                known: tuple[str, str] | None = None
                if len(dependent.depends_on) == 1:
                    # Its only dependency just ended: it is ready, and we hold the output
                    # (a skipped dependency leaves it none).
                    if skip is None:
                        # (output is the str of a completion when skip is None)
                        known = (step_slug, output)  # type: ignore[assignment]
                else:
                    ready = c.execute(
                        "UPDATE step_states SET remaining_deps = remaining_deps - 1 "
                        "WHERE run_id = ? AND step_slug = ? AND status = 'created' "
                        "RETURNING remaining_deps",
                        (run_id, dependent.slug),
                    ).fetchone()
                    if ready is None or ready[0] > 0:
                        continue
                started = self._begin_step(
                    c, d, run_id, priority, dependent, now, known, max(now, not_before)
                )
                if started is None:
                    finished.append(run_id)
                    return
                done.extend(started)

    def _mark_skipped(
        self, c: Conn, d: FlowDefinition, run_id: str, step_slug: str, skip: Skip, now: float
    ) -> int:
        """Mark a step skipped (with everything below it, for a cascade); return how many
        steps that ended. Its tasks still queued or running are cancelled: their late results
        change nothing."""
        skipped: int = c.execute(
            "UPDATE step_states SET status = 'skipped', skip_reason = ?, error = ?, "
            "output = NULL, finished_at = ? WHERE run_id = ? AND step_slug = ? "
            "AND status IN ('created', 'started')",
            (skip.reason, skip.error, now, run_id, step_slug),
        ).rowcount
        if not skipped:
            return 0
        if skip.reason == "handler_failed":  # a map's other tasks
            c.execute(
                "UPDATE step_tasks SET status = 'cancelled', finished_at = ?, lease_owner = NULL, "
                "lease_expires = NULL WHERE run_id = ? AND step_slug = ? "
                "AND status IN ('queued', 'started')",
                (now, run_id, step_slug),
            )
        below = self._graph(d).downstream[step_slug] if skip.cascade else ()
        if below:
            # Nothing below a step that had not completed can have started.
            skipped += c.execute(
                "UPDATE step_states SET status = 'skipped', skip_reason = 'dependency_skipped', "
                "finished_at = ? WHERE run_id = ? AND status = 'created' "
                f"AND step_slug IN ({placeholders(len(below))})",
                (now, run_id, *below),
            ).rowcount
        return skipped

    def _skip_job(
        self,
        c: Conn,
        run_id: str,
        step_slug: str,
        skip: Skip,
        now: float,
        started_at: float | None,
        finished: list[str],
    ) -> None:
        """A skipped job completes with output ``None``; its step gets a state row, so the
        skip and its reason can be read back."""
        if not c.execute(
            self._COMPLETE_JOB_RUNS_FROM.format(self._RUN_RESULT),
            (now, run_id, None, started_at, None),
        ).rowcount:
            return
        c.execute(
            "DELETE FROM step_states WHERE run_id = ? AND step_slug = ?", (run_id, step_slug)
        )
        c.execute(
            "INSERT INTO step_states (run_id, step_slug, status, remaining_deps, skip_reason, "
            "error, finished_at) VALUES (?, ?, 'skipped', 0, ?, ?, ?)",
            (run_id, step_slug, skip.reason, skip.error, now),
        )
        finished.append(run_id)

    def _condition_met(self, c: Conn, if_: Any, if_not: Any, value_json: str) -> bool:
        """Whether a step with patterns ``if_`` / ``if_not`` runs on ``value_json``: evaluated
        here in Python (:func:`~pgflow_py.conditions.condition_met`, the same function as
        ``flow.perform``'s), as SQLite has no ``@>``; PostgreSQL asks its own ``@>``."""
        return condition_met(if_, if_not, value_json)

    def _unmet(
        self, c: Conn, step: StepDefinition, run_id: str, value_json: str, now: float
    ) -> Skip | None:
        """Check a conditional step's condition on its input ``value_json``: ``None`` if it
        holds, else the skip to apply. Raises :class:`_RunFailed` after failing the run
        (``when_unmet="fail"``, or a value that cannot be read)."""
        try:
            met = self._condition_met(c, step.if_, step.if_not, value_json)
        except Exception as exc:
            # Not raised: that would undo the whole batch of results, again on every try.
            self._fail_run(
                c, run_id, step.slug,
                f"the condition of step {step.slug!r} cannot be checked: "
                f"{Undecodable.of(exc).error}",
                now, report=False,
            )
            raise _RunFailed from None
        if met:
            return None
        if step.when_unmet == "fail":
            self._fail_run(c, run_id, step.slug, CONDITION_NOT_MET, now, report=False)
            raise _RunFailed
        return Skip("condition_unmet", cascade=step.when_unmet == "skip-cascade")

    def _begin_step(
        self,
        c: Conn,
        d: FlowDefinition,
        run_id: str,
        priority: int,
        step: StepDefinition,
        now: float,
        known: tuple[str, str] | None = None,
        due_from: float | None = None,
    ) -> list[tuple[str, str | Skip]] | None:
        """Start a step whose dependencies have all ended, handing it the outputs of those
        that completed (skipped ones are left out).

        ``known`` is the ``(slug, output)`` of a sole dependency the caller already holds.
        Returns steps that ended at once (an empty map, a skip), or ``None`` if the run failed
        because a map step received something other than an array, or a condition failed it.
        """
        run_at = (now if due_from is None else due_from) + step.start_delay
        deps = [known] if known is not None else c.execute(
            "SELECT step_slug, output FROM step_states WHERE run_id = ? AND status = 'completed' "
            f"AND step_slug IN ({placeholders(len(step.depends_on))})",
            (run_id, *step.depends_on),
        ).fetchall() if step.depends_on else []
        conditional = step.slug in self._graph(d).conditional
        if step.step_type == "single" or conditional:
            deps_json = "{" + ",".join(f"{_json.dumps(slug)}:{out}" for slug, out in deps) + "}"
        if conditional:
            value_json = deps_json if step.depends_on else c.execute(
                "SELECT input FROM runs WHERE id = ?", (run_id,)
            ).fetchone()[0]
            try:
                skip = self._unmet(c, step, run_id, value_json, now)
            except _RunFailed:
                return None
            if skip is not None:
                return [(step.slug, skip)]
        if step.step_type == "map" and not deps:
            # Its array's step was skipped: a map over nothing.
            return self._start_step(c, d, step, run_id, priority, run_at, now, [])
        if step.step_type == "map":
            source, array_json = deps[0]
            try:
                array = _json.loads(array_json)
                items = [_json.dumps(item) for item in array] if isinstance(array, list) else None
            except Exception as exc:
                # Not raised: that would undo the whole batch of results, again on every try.
                self._fail_run(
                    c, run_id, step.slug,
                    f"map step {step.slug!r} cannot read the output of step {source!r}: "
                    f"{Undecodable.of(exc).error}",
                    now,
                )
                return None
            if items is None:
                self._fail_run(
                    c, run_id, step.slug,
                    f"map step {step.slug!r} expected an array from step {source!r}, "
                    f"got {type(array).__name__}: {array_json[:200]}",
                    now,
                )
                return None
            return self._start_step(c, d, step, run_id, priority, run_at, now, items)
        return self._start_step(c, d, step, run_id, priority, run_at, now, None, deps_json)

    def _finish_run_completed(
        self, c: Conn, d: FlowDefinition, run_id: str, now: float
    ) -> None:
        self._finish_runs_completed(c, [(d, run_id)], now)

    def _finish_runs_completed(
        self, c: Conn, runs: list[tuple[FlowDefinition, str]], now: float
    ) -> None:
        """Complete runs whose steps are all done: output ``{leaf: output}``, two statements."""
        outputs: dict[str, dict[str, str]] = {}
        for start in range(0, len(runs), 500):
            chunk = [run_id for _d, run_id in runs[start:start + 500]]
            for run_id, slug, output in c.execute(
                "SELECT run_id, step_slug, output FROM step_states "
                f"WHERE run_id IN ({placeholders(len(chunk))}) AND status = 'completed'",
                chunk,
            ).fetchall():
                outputs.setdefault(run_id, {})[slug] = output
        self._update_from(
            c, self._COMPLETE_RUNS_FROM, "(?, CAST(? AS TEXT))", (now,),
            [(run_id, self._run_output(self._graph(d).leaves, outputs.get(run_id, {})))
             for d, run_id in runs],
        )

    @staticmethod
    def _run_output(leaves: tuple[str, ...], outputs: dict[str, str]) -> str | None:
        """``{leaf: output}`` over the leaves that completed; ``None`` when none did (a
        skipped leaf is left out, as pgflow's ``jsonb_object_agg`` does)."""
        parts = [f"{_json.dumps(slug)}:{outputs[slug]}" for slug in leaves if slug in outputs]
        return "{" + ",".join(parts) + "}" if parts else None

    def _fail_task(
        self, c: Conn, f: TaskFailure, now: float, finished: list[str]
    ) -> None:
        if f.task_id < 0:
            self._fail_job_row(c, f, now, finished)
            return
        history_sql = self._APPEND_HISTORY
        if f.retry_at is not None:
            row = c.execute(
                f"UPDATE step_tasks SET status = 'queued', run_at = ?, error = ?, {history_sql}, "
                "lease_owner = NULL, lease_expires = NULL "
                "WHERE id = ? AND attempts = ? AND claims = coalesce(?, claims) AND status = 'started' "
                "RETURNING run_id, started_at, flow_slug",
                (f.retry_at, f.error, f.error, now, cap_traceback(f.traceback), f.task_id,
                 f.attempt, f.claim),
            ).fetchone()
            if row is not None:
                self._mark_started(c, row[0], row[1])
                if f.retry_at <= now:  # due again at once (a retry after a backoff is not)
                    self._made_due(row[2])
            return
        row = c.execute(
            f"UPDATE step_tasks SET status = 'failed', error = ?, {history_sql}, finished_at = ?, "
            "lease_owner = NULL, lease_expires = NULL "
            "WHERE id = ? AND attempts = ? AND claims = coalesce(?, claims) AND status = 'started' "
            "RETURNING run_id, step_slug, task_index, started_at, flow_slug, flow_version, priority",
            (f.error, f.error, now, cap_traceback(f.traceback), now, f.task_id, f.attempt,
             f.claim),
        ).fetchone()
        if row is None:
            return
        run_id, step_slug, task_index, started_at, flow_slug, version, priority = row
        self._mark_started(c, run_id, started_at)
        self._failed_for_good(c, f, run_id, step_slug, task_index, flow_slug, version, priority,
                              started_at, now, finished)

    def _failed_for_good(
        self,
        c: Conn,
        f: TaskFailure,
        run_id: str,
        step_slug: str,
        task_index: int | None,
        flow_slug: str,
        version: int,
        priority: int,
        started_at: float | None,
        now: float,
        finished: list[str],
    ) -> None:
        """A task's last attempt failed (recorded): its step is skipped (``when_exhausted``),
        or its run fails."""
        d = self._definition(flow_slug, version)
        mode = self._graph(d).skip_exhausted.get(step_slug)
        if mode is not None:
            # when_exhausted skips: the step (a map: at its first exhausted task) ends skipped.
            skip = Skip("handler_failed", cascade=mode == "skip-cascade", error=f.error)
            self._complete_steps(
                c, d, run_id, priority, [(step_slug, skip)], now, finished,
                started_at=started_at,
            )
            return
        if self._fail_run(c, run_id, step_slug, f.error, now, (f.task_id, task_index, f.attempt)):
            finished.append(run_id)

    def _fail_job_row(self, c: Conn, f: TaskFailure, now: float, finished: list[str]) -> None:
        """:meth:`_fail_task` for a job whose run row holds its task."""
        guard = (
            f"WHERE {self._SEQ} = ? AND attempts = ? AND claims = coalesce(?, claims) "
            "AND task_status = 'started' AND status = 'started' "
        )
        # The run's start (its first attempt's) is recorded as an attempt ends.
        ended = (
            f"task_error = ?, {self._APPEND_HISTORY}, lease_owner = NULL, lease_expires = NULL, "
            "started_at = coalesce(started_at, task_started_at) "
        )
        params = (f.error, f.error, now, cap_traceback(f.traceback), -f.task_id, f.attempt,
                  f.claim)
        if f.retry_at is not None:
            row = c.execute(
                f"UPDATE runs SET task_status = 'queued', due = ?, {ended}{guard}"
                "RETURNING flow_slug",
                (f.retry_at, *params),
            ).fetchone()
            if row is not None and f.retry_at <= now:
                self._made_due(row[0])
            return
        row = c.execute(
            f"UPDATE runs SET task_status = 'failed', {ended}{guard}"
            "RETURNING id, step_slug, flow_slug, flow_version, priority, started_at",
            params,
        ).fetchone()
        if row is not None:
            run_id, step_slug, flow_slug, version, priority, started_at = row
            self._failed_for_good(c, f, run_id, step_slug, None, flow_slug, version, priority,
                                  started_at, now, finished)

    def _fail_run(
        self,
        c: Conn,
        run_id: str,
        step_slug: str,
        error: str,
        now: float,
        task: tuple[int, int | None, int] | None = None,
        report: bool = True,
    ) -> bool:
        """Fail a run for good (``task``: the id, index and attempt of the task that did it).

        ``report=False``: not a failure for ``on_dead`` (an unmet condition; no handler failed).
        """
        row = c.execute(
            "UPDATE runs SET status = 'failed', error = ?, finished_at = ? "
            "WHERE id = ? AND status = 'started' RETURNING flow_slug, input",
            (error, now, run_id),
        ).fetchone()
        if row is None:
            return False
        if self._failed_runs is not None and report:
            task_id, index, attempt = task if task is not None else (None, None, 0)
            try:
                flow_input = _json.loads(row[1])
            except Exception as exc:  # failing the run must not depend on reading its input
                flow_input = Undecodable.of(exc)
            self._failed_runs.append(RunFailure(
                run_id, row[0], step_slug, error, flow_input, task_id, index, attempt
            ))
        c.execute(
            "UPDATE step_states SET status = 'failed', error = ?, finished_at = ? "
            "WHERE run_id = ? AND step_slug = ?",
            (error, now, run_id, step_slug),
        )
        self._cancel_rest(c, run_id, now)
        return True

    def _cancel_rest(self, c: Conn, run_id: str, now: float) -> None:
        if self._JOB_ROWS:
            c.execute(
                "UPDATE runs SET task_status = 'cancelled', lease_owner = NULL, "
                "lease_expires = NULL WHERE id = ? AND task_status IN ('queued', 'started')",
                (run_id,),
            )
        c.execute(
            "UPDATE step_tasks SET status = 'cancelled', finished_at = ?, lease_owner = NULL, "
            "lease_expires = NULL WHERE run_id = ? AND status IN ('queued', 'started')",
            (now, run_id),
        )
        c.execute(
            "UPDATE step_states SET status = 'cancelled', finished_at = ? "
            "WHERE run_id = ? AND status IN ('created', 'started')",
            (now, run_id),
        )


class _RunFailed(Exception):
    """Raised by :meth:`_Steps._unmet` once it has failed the run (caught by its caller)."""
