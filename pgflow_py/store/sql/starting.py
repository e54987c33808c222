"""Starting runs: their rows and their root steps' tasks, a batch in a few statements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...conditions import CONDITION_NOT_MET, Skip, condition_met
from ...definition import FlowDefinition, StepDefinition
from ..base import NewRun
from .batches import _Batches
from .connection import Conn, placeholders


class _Starting(_Batches):
    """New runs and their root steps' tasks."""

    def start_runs(self, definition: FlowDefinition, runs: Sequence[NewRun]) -> list[str]:
        now = self.clock.now()
        d = definition
        ids: list[str] = []
        with self._write() as c:
            # Checked in the same transaction, so a definition and its runs land together, and
            # a process holding an outdated definition cannot start runs of it.
            self._register(c, d)
            fresh: list[NewRun] = []
            for r in runs:
                if r.cron_tick is not None and not c.execute(
                    "UPDATE flows SET cron_last_tick = ? WHERE flow_slug = ? "
                    "AND (cron_last_tick IS NULL OR cron_last_tick < ?)",
                    (r.cron_tick, d.slug, r.cron_tick),
                ).rowcount:
                    ids.append("")  # this tick (or a later one) already has its run
                    continue
                if r.key is not None:
                    existing = c.execute(
                        "SELECT id FROM runs WHERE flow_slug = ? AND key = ? "
                        "AND status != 'cancelled'",
                        (d.slug, r.key),
                    ).fetchone()
                    if existing is not None:
                        ids.append(existing[0])
                        continue
                fresh.append(r)
                ids.append(r.id)
            if any(r.trace_context is not None for r in fresh):
                self._insert(
                    c, self._INSERT_TRACED_RUNS, self._TRACED_RUN_VALUES,
                    [(r.id, d.slug, r.input_json, r.key, r.priority, len(d.steps), r.run_at,
                      r.created_at, r.trace_context) for r in fresh],
                )
            else:  # the common case: the column keeps its default, NULL
                self._insert(
                    c, self._INSERT_RUNS, self._RUN_VALUES,
                    [(r.id, d.slug, r.input_json, r.key, r.priority, len(d.steps), r.run_at,
                      r.created_at) for r in fresh],
                )
            self._plan_runs(c, d, self._definitions[d.slug][0], fresh, now)
        return ids

    def _plan_runs(
        self, c: Conn, d: FlowDefinition, version: int, fresh: Sequence[NewRun], now: float
    ) -> None:
        """Create the step states and root tasks of ``fresh`` runs (their rows written)."""
        # Root steps start with their runs; the rows of a whole batch go in a few
        # statements per table.
        states: list[tuple[Any, ...]] = []
        tasks: list[tuple[Any, ...]] = []
        empty_maps: list[tuple[NewRun, str]] = []
        max_attempts_of = self._graph(d).max_attempts
        conditional = self._graph(d).conditional
        unmet: list[tuple[NewRun, StepDefinition]] = []  # root steps whose condition fails
        job = d.kind == "job"  # a job's one step keeps its state in its task
        for r in fresh:
            for step in d.steps:
                if step.depends_on:
                    states.append((r.id, step.slug, "created", len(step.depends_on), None, None))
                    continue
                if conditional and step.slug in conditional and not condition_met(
                    step.if_, step.if_not, r.input_json
                ):
                    # No task; a state row (a job's too) to fail or skip below.
                    states.append((r.id, step.slug, "created", 0, None, None))
                    unmet.append((r, step))
                    continue
                max_attempts = max_attempts_of[step.slug]
                due = r.run_at + step.start_delay
                if step.step_type == "single":
                    if not job:
                        states.append((r.id, step.slug, "started", 0, 1, now))
                    tasks.append((r.id, d.slug, version, step.slug, None, max_attempts,
                                  r.priority, due, None, now))
                    continue
                items = r.root_items or ()
                states.append((r.id, step.slug, "started", 0, len(items), now))
                if not items:
                    empty_maps.append((r, step.slug))
                tasks.extend(
                    (r.id, d.slug, version, step.slug, i, max_attempts, r.priority, due, item,
                     now)
                    for i, item in enumerate(items)
                )
        self._insert(
            c,
            "INSERT INTO step_states (run_id, step_slug, status, remaining_deps, "
            "remaining_tasks, started_at) VALUES ",
            "(?, ?, ?, ?, ?, ?)",
            states,
        )
        self._insert_tasks(c, tasks)
        for r, step in unmet:
            if step.when_unmet == "fail":
                self._fail_run(c, r.id, step.slug, CONDITION_NOT_MET, now, report=False)
                continue
            skip = Skip("condition_unmet", cascade=step.when_unmet == "skip-cascade")
            self._complete_steps(
                c, d, r.id, r.priority, [(step.slug, skip)], now, [], not_before=r.run_at
            )
        for r, slug in empty_maps:  # a root map over an empty array completes at once
            self._complete_steps(
                c, d, r.id, r.priority, [(slug, "[]")], now, [], not_before=r.run_at
            )

    def _replan(
        self, c: Conn, d: FlowDefinition, version: int, runs: list[NewRun], now: float
    ) -> None:
        # Nothing of these runs has started (checked in this transaction): their rows stay
        # (id, input, key, priority, due time, place in the listing); their steps and tasks are
        # planned again from scratch, as a start of ``d`` would have.
        for start in range(0, len(runs), 500):
            ids = [r.id for r in runs[start:start + 500]]
            marks = placeholders(len(ids))
            c.execute(f"DELETE FROM step_tasks WHERE run_id IN ({marks})", ids)
            c.execute(f"DELETE FROM step_states WHERE run_id IN ({marks})", ids)
            c.execute(
                f"UPDATE runs SET remaining_steps = ? WHERE id IN ({marks})", [len(d.steps), *ids]
            )
        self._plan_runs(c, d, version, runs, now)
