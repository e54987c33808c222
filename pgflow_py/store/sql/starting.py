"""Starting runs: their rows and their root steps' tasks, a batch in a few statements."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from ...conditions import CONDITION_NOT_MET, Skip, condition_met
from ...definition import FlowDefinition, StepDefinition
from ...errors import StoreError
from ..base import NewRun
from .batches import _Batches
from .connection import Conn, NeedsExclusive, placeholders


@attrs.define(eq=False)
class _Pending:
    """One caller's start, queued for the next group commit."""

    definition: FlowDefinition
    run: NewRun
    done: threading.Event | None = None  # set when run_id or error is, or when it is to lead
    lead: bool = False  # this caller commits the next batch
    run_id: str | None = None
    error: Exception | None = None

    def outcome(self) -> str:
        if self.error is not None:
            raise self.error
        assert self.run_id is not None
        return self.run_id


def _groups(batch: list[_Pending]) -> Iterator[tuple[FlowDefinition, list[_Pending]]]:
    """The batch's starts in queued order, consecutive starts of one definition together (so
    that runs are written in the order of the starts, as one after another would be)."""
    group: list[_Pending] = []
    for p in batch:
        if group and p.definition is not group[0].definition:
            yield group[0].definition, group
            group = []
        group.append(p)
    if group:
        yield group[0].definition, group


_MOST = 1_000  # starts per group commit, beyond which the next caller commits the rest


class _Starting(_Batches):
    """New runs and their root steps' tasks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Group commit of concurrent starts (start_run): the starts waiting for the next
        # commit, and whether a caller is committing a batch now.
        self._starts_mutex = threading.Lock()
        self._starts_queue: list[_Pending] = []
        self._starts_committing = False
        self._starts_company = False  # the last batch had more than one start

    def start_runs(self, definition: FlowDefinition, runs: Sequence[NewRun]) -> list[str]:
        now = self.clock.now()
        ids = self._transact(lambda c: self._start_in(c, definition, runs, now), shared=True)
        self._started_runs(len(runs))
        return ids

    def start_run(self, definition: FlowDefinition, run: NewRun) -> str:
        """Start one run as :meth:`start_runs` does, committed together with the starts other
        threads make meanwhile (group commit).

        A caller that finds no commit of starts in flight leads: it commits its own run and
        everything queued by then in one transaction. Callers arriving meanwhile queue and
        wait; when the commit ends, the first of them leads the next. No caller waits for
        company, so one caller alone commits at once, as before. Each returns once its own run
        is committed, with its own id or its own exception: a batch whose transaction fails is
        retried one start per transaction, in the order they queued.
        """
        pending = _Pending(definition, run)
        with self._starts_mutex:
            self._starts_queue.append(pending)
            lead = not self._starts_committing
            if lead:
                self._starts_committing = True
            else:
                pending.done = threading.Event()
        if not lead:
            assert pending.done is not None
            try:
                pending.done.wait()
            except BaseException:
                self._leave_queue(pending)
                raise
            if not pending.lead:
                return pending.outcome()
        try:
            if self._starts_company:
                # The last batch had company: let the threads that hold the GIL in their
                # own start queue before this batch is taken. Measured with 8 threads: batches
                # of ~6.5 starts instead of ~1.4 (one thread otherwise keeps the GIL between
                # its starts), 6-35% more starts/s. A caller alone never yields.
                time.sleep(0)
            self._commit_starts()
        finally:
            with self._starts_mutex:
                self._pass_lead()  # to the first that arrived during this commit, if any
        return pending.outcome()

    def _pass_lead(self) -> None:
        """Wake the first queued caller to commit the next batch, or, with none queued, let
        the next caller lead at once (called with ``_starts_mutex`` held)."""
        if self._starts_queue:
            following = self._starts_queue[0]
            following.lead = True
            assert following.done is not None
            following.done.set()
        else:
            self._starts_committing = False

    def _leave_queue(self, pending: _Pending) -> None:
        """A waiting caller was interrupted: take its start out of the queue if no batch has
        taken it yet, and pass on the lead if it had just been given it."""
        with self._starts_mutex:
            if pending not in self._starts_queue:
                return  # in a batch: its run may be committed, as an interrupted start may be
            self._starts_queue.remove(pending)
            if pending.lead:
                self._pass_lead()

    def _take_starts(self) -> list[_Pending]:
        with self._starts_mutex:
            batch, self._starts_queue = self._starts_queue, []
        return batch

    def _commit_starts(self) -> None:
        """Commit the queued starts in one transaction; on failure, one per transaction."""
        batch: list[_Pending] = []
        error: Exception | None = None

        def body(c: Conn) -> None:
            # Taken once the write lock is held: starts that queued while this transaction
            # waited for it join too (and a transaction run again keeps those it had).
            batch.extend(self._take_starts())
            now = self.clock.now()
            taken = list(batch)
            while taken:
                for definition, members in _groups(taken):
                    ids = self._start_in(c, definition, [p.run for p in members], now)
                    for p, run_id in zip(members, ids, strict=True):
                        p.run_id = run_id
                # Starts that queued while these statements ran join this commit too.
                taken = self._take_starts() if len(batch) < _MOST else []
                batch.extend(taken)

        try:
            self._transact(body, shared=True)
        except Exception as exc:
            error = exc
            batch = batch or self._take_starts()
        except BaseException as exc:
            batch = batch or self._take_starts()
            for p in batch:
                p.run_id = None
                p.error = StoreError(
                    f"starting a run of {p.definition.slug!r} was interrupted: the thread "
                    f"committing it with other starts stopped ({exc!r}); look it up before starting "
                    "it again (by its key, if it has one)"
                )
                if p.done is not None:
                    p.done.set()
            raise
        self._starts_company = len(batch) > 1
        if error is None:
            self._started_runs(len(batch))
        elif len(batch) == 1:
            batch[0].error = error
        else:
            # Which start failed it is unknown (validation happened before queueing; what is
            # left is rare: a changed shape, the database): each alone, in queued order.
            for p in batch:
                p.run_id = None
                try:
                    (p.run_id,) = self.start_runs(p.definition, [p.run])
                except Exception as exc:
                    p.error = exc
        for p in batch:
            if p.done is not None and not p.lead:
                p.done.set()

    def _lock_keys(self, c: Conn, flow_slug: str, keys: list[str]) -> None:
        """In a shared transaction, hold ``keys`` of ``flow_slug`` until it ends, so that two
        starts of one key never both find it free (a no-op where transactions never run side
        by side)."""

    def _started_runs(self, count: int) -> None:
        """Called after each transaction that started ``count`` runs."""

    def _start_in(
        self, c: Conn, definition: FlowDefinition, runs: Sequence[NewRun], now: float
    ) -> list[str]:
        """Start ``runs`` of ``definition`` inside the caller's transaction; their ids."""
        d = definition
        ids: list[str] = []
        # Checked in the same transaction, so a definition and its runs land together, and
        # a process holding an outdated definition cannot start runs of it.
        self._register(c, d)
        fresh: list[NewRun] = []
        keyed: dict[str, str] = {}  # key -> id of a run of this batch
        if self._shared_tx:
            if any(r.cron_tick is not None for r in runs):
                raise NeedsExclusive  # a tick a minute: not worth a lock of its own
            self._lock_keys(c, d.slug, sorted({r.key for r in runs if r.key is not None}))
        for r in runs:
            if r.cron_tick is not None and not c.execute(
                "UPDATE flows SET cron_last_tick = ? WHERE flow_slug = ? "
                "AND (cron_last_tick IS NULL OR cron_last_tick < ?)",
                (r.cron_tick, d.slug, r.cron_tick),
            ).rowcount:
                ids.append("")  # this tick (or a later one) already has its run
                continue
            if r.key is not None:
                if r.key in keyed:  # as if started after the earlier one: that run
                    ids.append(keyed[r.key])
                    continue
                existing = c.execute(
                    "SELECT id FROM runs WHERE flow_slug = ? AND key = ? "
                    "AND status != 'cancelled'",
                    (d.slug, r.key),
                ).fetchone()
                if existing is not None:
                    ids.append(existing[0])
                    continue
                keyed[r.key] = r.id
            fresh.append(r)
            ids.append(r.id)
        if self._JOB_ROWS and d.kind == "job":
            # A job's run row holds its task: one row per job.
            rows, unmet = self._job_rows(d, self._definitions[d.slug][0], fresh)
            self._insert(c, self._INSERT_JOB_RUNS, self._JOB_RUN_VALUES, rows)
            if len(unmet) < len(fresh):
                self._due_flows.add(d.slug)
            # A run whose condition does not hold has no task: failed or skipped below.
            self._plan_runs(c, d, self._definitions[d.slug][0], unmet, now)
            return ids
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

    def _job_rows(
        self, d: FlowDefinition, version: int, runs: Sequence[NewRun]
    ) -> tuple[list[tuple[Any, ...]], list[NewRun]]:
        """The rows (of ``_JOB_RUN_VALUES``) of runs of job ``d`` with their task queued, and
        the runs whose condition does not hold (their rows have no task)."""
        step = d.steps[0]
        max_attempts = self._graph(d).max_attempts[step.slug]
        conditional = step.slug in self._graph(d).conditional
        rows: list[tuple[Any, ...]] = []
        unmet: list[NewRun] = []
        for r in runs:
            if conditional and not condition_met(step.if_, step.if_not, r.input_json):
                unmet.append(r)
                rows.append((r.id, d.slug, r.input_json, r.key, r.priority, r.run_at,
                             r.created_at, r.trace_context, None, None, None, None, None))
                continue
            rows.append((r.id, d.slug, r.input_json, r.key, r.priority, r.run_at, r.created_at,
                         r.trace_context, step.slug, "queued", version, max_attempts,
                         r.run_at + step.start_delay))
        return rows, unmet

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
            no_task = f", {self._NO_JOB_TASK}" if self._JOB_ROWS else ""
            c.execute(
                f"UPDATE runs SET remaining_steps = ?{no_task} WHERE id IN ({marks})",
                [len(d.steps), *ids],
            )
        if self._JOB_ROWS and d.kind == "job":
            rows, unmet = self._job_rows(d, version, runs)
            c.executemany(  # rows of _JOB_RUN_VALUES: the task's columns are row[8:]
                self._QUEUE_JOB_TASK,
                [(row[8], row[10], row[11], row[12], row[0]) for row in rows
                 if row[8] is not None],
            )
            if len(unmet) < len(runs):
                self._due_flows.add(d.slug)
            runs = unmet
        self._plan_runs(c, d, version, runs, now)
