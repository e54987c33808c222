"""A stateful test of the storage layer: random starts, claims, results, lease expiries,
cancellations, retries and releases against a simple model of what the store must do.

The machine drives a real store (a fresh SQLite file per example, or a fresh PostgreSQL schema
with ``$PGFLOW_TEST_POSTGRES``; on a fake clock) through the
backend boundary the runtime uses (``claim``, ``finish``, ``heartbeat``, ``reclaim_expired``,
``release``) and the public ``Store`` (``start``, ``start_many``, ``cancel``, ``retry``). After
every step it checks the tables against the model: no task lost, none completed twice, attempts
never above the maximum, outputs exactly those reported, terminal runs idle, a run's start
recorded once an attempt began (and kept by a cancel). Starts the store must refuse change
nothing; a run input corrupted in the database reaches workers as ``Undecodable``. At the end it
drains everything and checks that every run is completed, failed or cancelled.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _helpers import fresh_store
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pgflow_py as pf
from pgflow_py.backoff import retry_delay
from pgflow_py.store.base import ClaimedTask, RunFailure, TaskFailure, TaskSuccess, Undecodable
from pgflow_py.testing import FakeClock

WORKERS = ("w1", "w2")
BASE_DELAY = 1.0
LONG_LEASE = 600.0
TINY_LEASE = 0.001


def _make_job(max_attempts: int) -> pf.Job:
    @pf.job(queue=f"sm_job{max_attempts}", max_attempts=max_attempts, base_delay=BASE_DELAY)
    def handler(input: Any, ctx: pf.Context) -> Any:
        return input

    return handler


def _make_flow(max_attempts: int) -> pf.Flow:
    fan = pf.flow(f"sm_fan{max_attempts}", max_attempts=max_attempts, base_delay=BASE_DELAY)

    @fan.step()
    def split(input: Any, ctx: pf.Context) -> Any:
        return input

    @fan.map(array="split")
    def each(item: Any, ctx: pf.Context) -> Any:
        return item

    @fan.step(depends_on=["each"])
    def final(deps: Any, ctx: pf.Context) -> Any:
        return deps

    return fan


JOBS = {m: _make_job(m) for m in (1, 2, 3)}
FLOWS = {m: _make_flow(m) for m in (1, 2, 3)}
SLUGS = [f.slug for f in (*JOBS.values(), *FLOWS.values())]

# Results name the claim they answer when the backend hands out claim tokens (attempt numbers
# alone repeat after store.retry and backend.release).
CLAIM_TOKENS = "claim" in TaskSuccess._fields

json_values = st.integers(-5, 1000)
NOT_AN_ARRAY = {"not": "an array"}
TOO_DEEP = "[" * 5000 + "]" * 5000  # stored by hand: past the decoder's recursion limit


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


# Starts the store must refuse with InputError, writing nothing: (input, keyword arguments).
BAD_STARTS: list[tuple[Any, dict[str, Any]]] = [
    (_nested(300), {}),
    ({"name": "caf\udce9"}, {}),
    ({1: "a", "1": "b"}, {}),
    (1, {"priority": 2**63}),
    (1, {"priority": -(2**31) - 1}),
    (1, {"key": "k\udc80"}),
    (1, {"delay": float("nan")}),
    (1, {"delay": 1e300}),
]


@dataclass
class RunModel:
    id: str
    kind: str  # "job" or "flow"
    max_attempts: int
    input: Any
    status: str = "active"  # active | completed | failed | cancelled
    output: Any = None
    root_output: Any = None
    root_done: bool = False
    map_outputs: dict[int, Any] = field(default_factory=dict)
    corrupt: bool = False  # its stored input was overwritten with JSON too deep to decode
    attempt_ended: bool = False  # since the last retry: then the run's start is recorded

    @property
    def seen_input(self) -> Any:
        """The run's input as workers and readers see it."""
        return Undecodable if self.corrupt else self.input


@dataclass
class TaskModel:
    id: int
    run_id: str
    step_slug: str
    task_index: int | None
    attempts: int = 0
    claims: int = 0
    status: str = "queued"  # queued | started | completed | failed | cancelled


@dataclass
class Held:
    worker: str
    attempt: int
    claim: int | None
    expires_by: float | None  # real time after which a tiny lease has surely expired

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.attempt, self.claim)


def _same(actual: Any, expected: Any) -> bool:
    """Equal, where ``expected`` may be the class ``Undecodable`` (any instance matches)."""
    if expected is Undecodable:
        return isinstance(actual, Undecodable) and actual.error.startswith("RecursionError: ")
    return bool(actual == expected)


def _tracked(fn: Any) -> Any:
    """Mark the machine broken when a step raises, so teardown does not drain over a failure."""

    @functools.wraps(fn)
    def wrapper(self: StoreMachine, *args: Any, **kwargs: Any) -> Any:
        self.broken = True
        result = fn(self, *args, **kwargs)
        self.broken = False
        return result

    return wrapper


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.tmp = tempfile.mkdtemp(prefix="pgflow-stateful-")
        self.clock = FakeClock(1_800_000_000)
        self._store = fresh_store(Path(self.tmp) / "state.db", self.clock)
        self.store = self._store.__enter__()
        self.backend: Any = self.store.backend
        self.runs: dict[str, RunModel] = {}
        self.tasks: dict[int, TaskModel] = {}
        self.held: dict[int, Held] = {}
        # (task_id, (attempt, claim)) of attempts that are over: their results must be ignored.
        self.stale: list[tuple[int, tuple[int, int | None]]] = []

    # --- helpers -------------------------------------------------------------------------------

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self.backend._lock:
            return self.backend._conn.execute(query, params).fetchall()

    def snapshot(self) -> tuple[list[Any], ...]:
        return (
            self.sql("SELECT * FROM runs ORDER BY id"),
            self.sql("SELECT * FROM step_states ORDER BY run_id, step_slug"),
            self.sql("SELECT * FROM tasks ORDER BY id"),
        )

    def success(self, task_id: int, key: tuple[int, int | None], value: Any) -> TaskSuccess:
        """A success as the runner reports it (a job's names its run, for the batch path)."""
        attempt, claim = key
        t = self.tasks[task_id]
        extra: dict[str, Any] = {"claim": claim} if CLAIM_TOKENS else {}
        if self.runs[t.run_id].kind == "job":
            extra.update(run_id=t.run_id, step_slug=t.step_slug, job=True)
        return TaskSuccess(task_id, attempt, json.dumps(value), **extra)

    @staticmethod
    def failure(task_id: int, key: tuple[int, int | None], error: str, retry_at: float | None) -> TaskFailure:
        attempt, claim = key
        extra: dict[str, Any] = {"claim": claim} if CLAIM_TOKENS else {}
        return TaskFailure(task_id, attempt, error, retry_at, **extra)

    def drop_held_of_run(self, run_id: str) -> None:
        """The run ended: its running attempts are over (their late results must be ignored)."""
        for task_id, h in list(self.held.items()):
            if self.tasks[task_id].run_id == run_id:
                del self.held[task_id]
                self.stale.append((task_id, h.key))
        for t in self.tasks.values():
            if t.run_id == run_id and t.status in ("queued", "started"):
                t.status = "cancelled"

    def fail_run(self, run_id: str) -> None:
        self.runs[run_id].status = "failed"
        self.runs[run_id].output = None
        self.drop_held_of_run(run_id)

    def expected_input(self, task: ClaimedTask, run: RunModel) -> Any:
        if run.kind == "job" or task.step_slug == "split":
            return run.seen_input
        if task.step_slug == "each":
            assert run.root_done and isinstance(run.root_output, list)
            assert task.task_index is not None and 0 <= task.task_index < len(run.root_output)
            return run.root_output[task.task_index]
        assert task.step_slug == "final"
        assert len(run.map_outputs) == len(run.root_output)
        return {"each": [run.map_outputs[i] for i in range(len(run.root_output))]}

    def output_for(self, task_id: int, data: st.DataObject | None) -> Any:
        t = self.tasks[task_id]
        if t.step_slug == "split":
            if data is None:
                return [1, 2]
            return data.draw(
                st.one_of(st.lists(json_values, max_size=3), st.just(NOT_AN_ARRAY)), label="output"
            )
        return 7 if data is None else data.draw(json_values, label="output")

    def do_claim(self, worker: str, limit: int, lease: float) -> list[ClaimedTask]:
        now = self.clock.now()
        due = self.sql(
            "SELECT count(*) FROM tasks WHERE status = 'queued' AND run_at <= ?", (now,)
        )[0][0]
        claimed = self.backend.claim(worker, SLUGS, limit, lease)
        expires_by = time.time() + lease if lease < 1 else None
        assert len(claimed) == min(limit, due), (len(claimed), limit, due)
        for task in claimed:
            assert task.id not in self.held, f"task {task.id} claimed while held by another attempt"
            run = self.runs[task.run_id]
            assert run.status == "active", f"claimed a task of a {run.status} run"
            model = self.tasks.setdefault(
                task.id, TaskModel(task.id, task.run_id, task.step_slug, task.task_index)
            )
            assert (model.run_id, model.step_slug, model.task_index) == (
                task.run_id, task.step_slug, task.task_index
            )
            assert model.status == "queued", model
            assert task.attempt == model.attempts + 1, (task, model)
            assert task.max_attempts == run.max_attempts
            assert task.attempt <= task.max_attempts
            assert _same(task.flow_input, run.seen_input), (task.flow_input, run)
            assert _same(task.input, self.expected_input(task, run)), (task.input, run)
            (run_at,) = self.sql("SELECT run_at FROM tasks WHERE id = ?", (task.id,))[0]
            assert run_at <= now, "claimed a task before it was due"
            claim = getattr(task, "claim", None)
            if claim is not None:  # claim tokens count every claim ever, never reset
                assert claim == model.claims + 1, (task, model)
                model.claims = claim
            model.attempts = task.attempt
            model.status = "started"
            self.held[task.id] = Held(worker, task.attempt, claim, expires_by)
        return claimed

    def do_complete(self, task_id: int, value: Any, late: Sequence[TaskSuccess] = ()) -> None:
        """Report a success, in one batch with ``late`` results that must be ignored."""
        h = self.held.pop(task_id)
        t = self.tasks[task_id]
        run = self.runs[t.run_id]
        finished = self.backend.finish([*late, self.success(task_id, h.key, value)], [])
        self.stale.append((task_id, h.key))
        run.attempt_ended = True
        t.status = "completed"
        expect_finished: list[str] = []
        if run.kind == "job":
            run.status, run.output = "completed", value
            expect_finished = [run.id]
        elif t.step_slug == "split":
            run.root_done, run.root_output = True, value
            if not isinstance(value, list):
                # A map fed a non-array fails the run at once, no retry.
                self.fail_run(run.id)
                expect_finished = [run.id]
        elif t.step_slug == "each":
            assert t.task_index is not None
            assert t.task_index not in run.map_outputs, "a map task succeeded twice"
            run.map_outputs[t.task_index] = value
        else:
            run.status, run.output = "completed", {"final": value}
            expect_finished = [run.id]
        assert finished == expect_finished, (finished, expect_finished)
        row = self.sql("SELECT status, output FROM tasks WHERE id = ?", (task_id,))[0]
        assert row[0] == "completed" and json.loads(row[1]) == value

    def do_fail(self, task_id: int, retry_in: float | None) -> None:
        h = self.held.pop(task_id)
        t = self.tasks[task_id]
        retry_at = None if retry_in is None else self.clock.now() + retry_in
        failed: list[RunFailure] = []
        finished = self.backend.finish(
            [], [self.failure(task_id, h.key, "boom", retry_at)], failed
        )
        self.stale.append((task_id, h.key))
        run = self.runs[t.run_id]
        run.attempt_ended = True
        if retry_at is None:
            t.status = "failed"
            self.fail_run(t.run_id)
            assert finished == [t.run_id]
            assert [(f.run_id, f.task_id) for f in failed] == [(run.id, task_id)]
            assert _same(failed[0].flow_input, run.seen_input), (failed[0], run)
        else:
            t.status = "queued"
            assert finished == []

    # --- rules ---------------------------------------------------------------------------------

    @precondition(lambda self: sum(r.status == "active" for r in self.runs.values()) < 4)
    @rule(
        kind=st.sampled_from(["job", "flow"]),
        max_attempts=st.integers(1, 3),
        inputs=st.lists(st.integers(0, 100), min_size=1, max_size=2),
        delay=st.sampled_from([None, 0, 3]),
    )
    @_tracked
    def start(self, kind: str, max_attempts: int, inputs: list[int], delay: float | None) -> None:
        flow = JOBS[max_attempts] if kind == "job" else FLOWS[max_attempts]
        if len(inputs) == 1:
            started = [self.store.start(flow, inputs[0], delay=delay)]
        else:
            started = self.store.start_many(flow, inputs, delay=delay)
        for run, value in zip(started, inputs, strict=True):
            assert run.id not in self.runs
            expected = pf.RunStatus.SCHEDULED if delay else pf.RunStatus.QUEUED
            assert run.status is expected
            self.runs[run.id] = RunModel(run.id, kind, max_attempts, value)

    @precondition(lambda self: any(r.status == "active" for r in self.runs.values()))
    @rule(
        advance=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 30.0]),
        worker=st.sampled_from(WORKERS),
        limit=st.integers(1, 4),
        tiny_lease=st.booleans(),
    )
    @_tracked
    def claim(self, advance: float, worker: str, limit: int, tiny_lease: bool) -> None:
        """Time passes (backoffs and delays fall due), then a worker takes what is due."""
        self.clock.advance(advance)
        self.do_claim(worker, limit, TINY_LEASE if tiny_lease else LONG_LEASE)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "retry", "fail"]))
    @_tracked
    def report(self, data: st.DataObject, outcome: str) -> None:
        """A worker reports a held attempt: success, failure to retry (while attempts are left)
        after a short backoff, or failure for good."""
        task_id = data.draw(st.sampled_from(sorted(self.held)), label="task")
        if outcome == "success":
            late: list[TaskSuccess] = []
            if self.stale and data.draw(st.booleans(), label="batched_with_late_results"):
                late = [self.success(tid, key, [99]) for tid, key in self.stale]
            self.do_complete(task_id, self.output_for(task_id, data), late)
            return
        retry_in = None
        attempts_left = self.runs[self.tasks[task_id].run_id].max_attempts - self.held[task_id].attempt
        if outcome == "retry" and attempts_left > 0:
            retry_in = data.draw(st.sampled_from([0.0, 1.0, 10.0]), label="retry_in")
        self.do_fail(task_id, retry_in)

    def send_late(self, task_id: int, key: tuple[int, int | None], outcome: str) -> None:
        """Report an attempt that is over again: the store must ignore it entirely."""
        before = self.snapshot()
        if outcome == "success":
            finished = self.backend.finish([self.success(task_id, key, [99])], [])
        else:
            retry_at = self.clock.now() if outcome == "retry" else None
            finished = self.backend.finish([], [self.failure(task_id, key, "late", retry_at)])
        held = self.held.get(task_id)
        assert finished == [] and self.snapshot() == before, (
            f"a late {outcome} of task {task_id} attempt {key[0]} (claim {key[1]}) was applied "
            f"(the task is {self.tasks[task_id].status}"
            + (f", held by {held.worker} at attempt {held.attempt})" if held else ")")
        )

    @precondition(lambda self: self.stale)
    @rule(outcome=st.sampled_from(["success", "retry", "fail"]))
    @_tracked
    def late_results(self, outcome: str) -> None:
        """Every attempt that is over (finished, reclaimed, cancelled) reports again: ignored."""
        for task_id, key in self.stale:
            self.send_late(task_id, key, outcome)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    @_tracked
    def expire_leases(self, data: st.DataObject) -> None:
        """Workers die: a held lease (and every tiny one) runs out; reclaiming fails the attempts."""
        tiny = [tid for tid, h in self.held.items() if h.expires_by is not None]
        task_id = data.draw(st.sampled_from(sorted(self.held)), label="task")
        with self.backend._lock:
            # A job's task is its run's row (its id: minus the row's sequence number).
            if task_id > 0:
                self.backend._conn.execute(
                    "UPDATE step_tasks SET lease_expires = 0 WHERE id = ?", (task_id,)
                )
            else:
                self.backend._conn.execute(
                    f"UPDATE runs SET lease_expires = 0 WHERE {self.backend._SEQ} = ?", (-task_id,)
                )
        if tiny:
            deadline = max(self.held[tid].expires_by or 0.0 for tid in tiny)
            time.sleep(max(0.0, deadline - time.time()) + 0.002)
        self.reclaim({task_id, *tiny})

    def reclaim(self, expired: set[int]) -> None:
        now = self.clock.now()
        count = self.backend.reclaim_expired(SLUGS)
        assert count == len(expired), (count, expired)
        # A lost attempt counts: at max_attempts the run fails (cancelling its other tasks).
        failed_runs = {
            self.tasks[tid].run_id for tid in expired
            if self.held[tid].attempt >= self.runs[self.tasks[tid].run_id].max_attempts
        }
        for task_id in sorted(expired):
            h = self.held.pop(task_id)
            self.stale.append((task_id, h.key))
            t = self.tasks[task_id]
            self.runs[t.run_id].attempt_ended = True
            if h.attempt < self.runs[t.run_id].max_attempts:
                t.status = "queued"
                if t.run_id not in failed_runs:
                    (run_at,) = self.sql("SELECT run_at FROM tasks WHERE id = ?", (task_id,))[0]
                    assert run_at == now + retry_delay(h.attempt, base_delay=BASE_DELAY)
            else:
                t.status = "failed"
        for run_id in failed_runs:
            self.fail_run(run_id)
            # Expired tasks are reclaimed in no set order: the first at max_attempts fails the
            # run, and the expired tasks after it are cancelled with the rest of the run.
            mine = sorted(tid for tid in expired if self.tasks[tid].run_id == run_id)
            marks = ",".join("?" * len(mine))
            rows = dict(self.sql(f"SELECT id, status FROM tasks WHERE id IN ({marks})", tuple(mine)))
            failed = [tid for tid in mine if rows[tid] == "failed"]
            assert len(failed) == 1 and self.tasks[failed[0]].status == "failed", rows
            assert all(rows[tid] == "cancelled" for tid in mine if tid not in failed), rows
            for tid in mine:
                self.tasks[tid].status = rows[tid]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    @_tracked
    def release(self, data: st.DataObject) -> None:
        """A worker hands tasks back without counting the attempt; others' tasks are untouched."""
        worker = data.draw(st.sampled_from(sorted({h.worker for h in self.held.values()})), label="worker")
        mine = sorted(tid for tid, h in self.held.items() if h.worker == worker)
        chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True), label="tasks")
        others = [tid for tid, h in self.held.items() if h.worker != worker]
        if others and data.draw(st.booleans(), label="with_foreign"):
            chosen.append(data.draw(st.sampled_from(sorted(others)), label="foreign"))
        self.backend.release(worker, chosen)
        for task_id in chosen:
            if self.held[task_id].worker != worker:
                continue
            h = self.held.pop(task_id)
            t = self.tasks[task_id]
            t.attempts = h.attempt - 1
            t.status = "queued"
            if h.claim is not None:
                # The attempt number is handed out again, but a claim token names this claim
                # alone, so a late result of the released attempt must be ignored too.
                self.stale.append((task_id, h.key))

    @precondition(lambda self: self.held)
    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    @_tracked
    def heartbeat(self, worker: str, data: st.DataObject) -> None:
        """Renewing reports every task this worker does not hold (any more) as lost."""
        mine = sorted(tid for tid, h in self.held.items() if h.worker == worker)
        known = sorted(self.tasks)
        extra = data.draw(st.lists(st.sampled_from(known), max_size=2), label="extra") if known else []
        ids = list(dict.fromkeys([*mine, *extra]))
        lost = self.backend.heartbeat(worker, SLUGS, ids, LONG_LEASE)
        assert sorted(lost) == sorted(tid for tid in ids if tid not in mine)
        for task_id in mine:
            self.held[task_id].expires_by = None  # renewed to a long lease

    def pick_run(self, data: st.DataObject, *statuses: str) -> str:
        """Mostly a run in one of ``statuses``, sometimes any run (to check refusals)."""
        wanted = [r.id for r in self.runs.values() if r.status in statuses]
        pool = wanted if data.draw(st.integers(0, 3), label="wanted") else list(self.runs)
        return data.draw(st.sampled_from(pool), label="run")

    @precondition(lambda self: any(r.status == "active" for r in self.runs.values()))
    @rule(data=st.data())
    @_tracked
    def cancel(self, data: st.DataObject) -> None:
        run_id = self.pick_run(data, "active")
        run = self.runs[run_id]
        running = any(self.tasks[tid].run_id == run_id for tid in self.held)
        result = self.store.cancel(run_id)
        if run.status == "active":
            run.status = "cancelled"
            run.attempt_ended = run.attempt_ended or running  # its start is kept
            self.drop_held_of_run(run_id)
        assert result.status.value == run.status
        assert (result.started_at is not None) == run.attempt_ended, (result, run)

    @precondition(lambda self: any(r.status in ("failed", "cancelled") for r in self.runs.values()))
    @rule(data=st.data())
    @_tracked
    def retry(self, data: st.DataObject) -> None:
        run_id = self.pick_run(data, "failed", "cancelled")
        run = self.runs[run_id]
        if run.status not in ("failed", "cancelled"):
            try:
                self.store.retry(run_id)
            except pf.InputError:
                return
            raise AssertionError(f"retry of a {run.status} run was accepted")
        result = self.store.retry(run_id)
        run.attempt_ended = False
        for t in self.tasks.values():
            if t.run_id == run_id and t.status != "completed":
                t.status, t.attempts = "queued", 0
        if run.kind == "flow" and run.root_done and not isinstance(run.root_output, list):
            run.status = "failed"  # the stored non-array output fails the map step again
        else:
            run.status = "active"
        assert result.status.is_terminal == (run.status != "active"), result.status

    @rule(which=st.integers(0, len(BAD_STARTS) - 1), many=st.booleans())
    @_tracked
    def refused_start(self, which: int, many: bool) -> None:
        """A start the store must refuse: an input that would not read back, or an argument
        the databases cannot store. Nothing is written."""
        value, options = BAD_STARTS[which]
        before = self.snapshot()
        try:
            if many and "key" not in options:  # start_many takes no key
                self.store.start_many(JOBS[1], [1, value], **options)
            else:
                self.store.start(FLOWS[1], value, **options)
        except pf.InputError:
            pass
        else:
            raise AssertionError(f"start({value!r:.60}, {options}) was accepted")
        assert self.snapshot() == before

    @precondition(lambda self: any(
        r.status == "active" and not r.corrupt for r in self.runs.values()
    ))
    @rule(data=st.data())
    @_tracked
    def corrupt_input(self, data: st.DataObject) -> None:
        """A run's stored input is overwritten with JSON nested too deeply to decode (as an
        older version could have stored): workers get ``Undecodable``, everything else goes on."""
        # In the order started: run ids are random, so sorting them would draw differently
        # when Hypothesis replays the example.
        run_id = data.draw(st.sampled_from([
            r.id for r in self.runs.values() if r.status == "active" and not r.corrupt
        ]), label="run")
        with self.backend._write() as c:
            c.execute("UPDATE runs SET input = ? WHERE id = ?", (TOO_DEEP, run_id))
        self.runs[run_id].corrupt = True

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    @_tracked
    def runs_read_back(self) -> None:
        """Every run reads back, its start recorded once an attempt began (kept by a cancel)."""
        now = self.clock.now()
        runs = self.store.runs(limit=10_000)
        # store.count and store.stats derive statuses from indexes: they agree with runs().
        tally = {status: sum(r.status == status for r in runs) for status in pf.RunStatus}
        assert {status: self.store.count(status=status) for status in pf.RunStatus} == tally
        for stats in self.store.stats():
            assert stats.counts == {
                status.value: sum(r.status == status and r.flow_slug == stats.flow_slug
                                  for r in runs)
                for status in pf.RunStatus
            }, stats
        # Listing by status picks a rare status's runs from its indexes: the same runs, in
        # the same order, as filtering the whole listing (of every flow, and of each flow).
        for status in pf.RunStatus:
            for flow in (None, *{r.flow_slug for r in runs}):
                assert [r.id for r in self.store.runs(flow, status, limit=10_000)] == [
                    r.id for r in runs
                    if r.status == status and flow in (None, r.flow_slug)
                ], (status, flow)
        for run in runs:
            model = self.runs[run.id]
            held = any(self.tasks[tid].run_id == run.id for tid in self.held)
            assert (run.started_at is not None) == (model.attempt_ended or held), (run, model)
            if run.started_at is not None:
                assert run.created_at <= run.started_at and run.started_at.timestamp() <= now
            assert _same(run.input, model.seen_input), (run.input, model)

    @invariant()
    @_tracked
    def late_results_of_live_tasks_are_ignored(self) -> None:
        """The risky late results: old attempts of tasks that are queued or running again.

        (Sending them is a write, but one the store must ignore, so the state stays as it was.)
        """
        for task_id, key in self.stale:
            if self.tasks[task_id].status in ("queued", "started"):
                for outcome in ("success", "retry"):
                    self.send_late(task_id, key, outcome)

    @invariant()
    @_tracked
    def no_task_lost(self) -> None:
        stuck = self.sql(
            "SELECT r.id FROM runs r WHERE r.status = 'started' AND NOT EXISTS (SELECT 1 FROM "
            "tasks t WHERE t.run_id = r.id AND t.status IN ('queued', 'started'))"
        )
        assert not stuck, f"unfinished runs with nothing queued or running: {stuck}"

    @invariant()
    @_tracked
    def terminal_runs_are_idle(self) -> None:
        busy = self.sql(
            "SELECT r.id, r.status, t.step_slug, t.task_index, t.status FROM runs r "
            "JOIN tasks t ON t.run_id = r.id "
            "WHERE r.status != 'started' AND t.status IN ('queued', 'started')"
        )
        assert not busy, f"terminal runs with live tasks: {busy}"
        steps = self.sql(
            "SELECT r.id, r.status, s.step_slug, s.status FROM runs r "
            "JOIN step_states s ON s.run_id = r.id "
            "WHERE r.status != 'started' AND s.status IN ('created', 'started')"
        )
        assert not steps, f"terminal runs with live steps: {steps}"

    @invariant()
    @_tracked
    def attempts_within_bounds(self) -> None:
        over = self.sql("SELECT * FROM tasks WHERE attempts < 0 OR attempts > max_attempts")
        assert not over, f"attempts out of bounds: {over}"

    @invariant()
    @_tracked
    def no_task_completed_twice(self) -> None:
        dupes = self.sql(
            "SELECT run_id, step_slug, task_index, count(*) FROM tasks "
            "GROUP BY run_id, step_slug, task_index HAVING count(*) > 1"  # NULLs group together
        )
        assert not dupes, f"several rows for one task: {dupes}"
        completed = {r[0] for r in self.sql("SELECT id FROM tasks WHERE status = 'completed'")}
        assert completed == {t.id for t in self.tasks.values() if t.status == "completed"}

    @invariant()
    @_tracked
    def tasks_match_model(self) -> None:
        rows = self.sql("SELECT id, run_id, status, attempts, lease_owner FROM tasks")
        started = {r[0]: (r[4], r[3]) for r in rows if r[2] == "started"}
        assert started == {tid: (h.worker, h.attempt) for tid, h in self.held.items()}
        for task_id, run_id, status, attempts, _owner in rows:
            model = self.tasks.get(task_id)
            if model is None:  # never claimed
                assert attempts == 0 and status in ("queued", "cancelled"), (task_id, status)
                assert self.runs[run_id].status in ("active", "cancelled", "failed")
            else:
                assert (status, attempts) == (model.status, model.attempts), (task_id, model)

    @invariant()
    @_tracked
    def runs_match_model(self) -> None:
        rows = self.sql("SELECT id, status, output FROM runs")
        assert {r[0] for r in rows} == set(self.runs)
        for run_id, status, output in rows:
            model = self.runs[run_id]
            assert status == ("started" if model.status == "active" else model.status), model
            if model.status == "completed":
                assert json.loads(output) == model.output, (output, model)
            else:
                assert output is None

    # --- end -----------------------------------------------------------------------------------

    def drain(self) -> None:
        """Complete everything: every run must end completed, failed or cancelled."""
        for _ in range(100):
            for task_id in sorted(self.held):
                self.do_complete(task_id, self.output_for(task_id, None))
            if all(r.status != "active" for r in self.runs.values()):
                break
            if not self.do_claim("w1", 1000, LONG_LEASE):
                self.clock.advance(3600)
        for check in (self.late_results_of_live_tasks_are_ignored, self.no_task_lost,
                      self.terminal_runs_are_idle, self.attempts_within_bounds,
                      self.no_task_completed_twice, self.tasks_match_model, self.runs_match_model):
            check()
        statuses = {r[0] for r in self.sql("SELECT DISTINCT status FROM runs")}
        assert statuses <= {"completed", "failed", "cancelled"}, statuses

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.drain()
        finally:
            self._store.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreStateful = StoreMachine.TestCase
