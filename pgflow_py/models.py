"""What the store returns: runs, their steps and tasks, and their status."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import attrs

__all__ = (
    "AttemptRecord", "FlowStats", "Run", "RunStatus", "StepRun", "TaskRun", "ThroughputPoint",
    "WorkerInfo",
)


class RunStatus(str, enum.Enum):
    """Status of a run, derived from its tasks when it is read."""

    SCHEDULED = "scheduled"
    """Nothing started yet; the first task is due in the future."""
    QUEUED = "queued"
    """Nothing started yet; due now."""
    RUNNING = "running"
    RETRYING = "retrying"
    """Waiting out a backoff after a failed attempt."""
    COMPLETED = "completed"
    FAILED = "failed"
    """Failed for good: the dead-letter list."""
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


@attrs.frozen
class AttemptRecord:
    """One failed attempt of a task, kept in its history."""

    attempt: int
    error: str
    at: datetime
    step_slug: str | None = None
    task_index: int | None = None
    traceback: str | None = None
    """The attempt's formatted traceback (its last characters if long); ``None`` if none was
    recorded (a lost worker, or a record written before tracebacks were kept)."""


@attrs.frozen
class TaskRun:
    """One task of a step (a single step has one; a map step one per element)."""

    index: int | None
    status: str
    attempts: int
    output: Any
    error: str | None
    history: tuple[AttemptRecord, ...] = ()


@attrs.frozen
class StepRun:
    """One step of a run: ``created`` (waiting for dependencies), ``started``, ``completed``,
    ``skipped``, ``failed`` or ``cancelled``."""

    slug: str
    status: str
    attempts: int
    output: Any
    error: str | None
    tasks: tuple[TaskRun, ...] = ()
    skip_reason: str | None = None
    """Why a ``skipped`` step was skipped: ``"condition_unmet"`` (its ``if_``/``if_not`` did
    not hold), ``"handler_failed"`` (its last attempt failed and ``when_exhausted`` skips; its
    ``error`` is that attempt's) or ``"dependency_skipped"`` (a ``skip-cascade`` above it)."""


@attrs.frozen
class Run:
    """A run of a flow or job, as read from the store."""

    id: str
    flow_slug: str
    status: RunStatus
    input: Any
    output: Any
    error: str | None
    key: str | None
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    steps: tuple[StepRun, ...] = ()

    @property
    def history(self) -> tuple[AttemptRecord, ...]:
        """Every failed attempt of every task of this run, oldest first (kept across retries)."""
        records = [h for step in self.steps for task in step.tasks for h in task.history]
        return tuple(sorted(records, key=lambda h: h.at))

    def step(self, slug: str) -> StepRun:
        for s in self.steps:
            if s.slug == slug:
                return s
        raise KeyError(slug)


@attrs.frozen
class FlowStats:
    """One flow's figures, from :meth:`pgflow_py.Store.stats`."""

    flow_slug: str
    counts: dict[str, int]
    """Runs by status: every :class:`RunStatus` value, 0 when none."""
    oldest_queued_age: float | None
    """Seconds since the oldest queued run became due; ``None`` when none is queued."""
    workers: int
    """Live workers serving the flow."""


@attrs.frozen
class ThroughputPoint:
    """One flow's work in one minute, from :meth:`pgflow_py.Store.throughput`."""

    flow_slug: str
    minute: datetime
    """The start of the minute, in UTC."""
    completed: int
    """Tasks whose attempt completed in that minute."""
    failed: int
    """Attempts that failed in that minute (retried or not, lost workers' included)."""


@attrs.frozen
class WorkerInfo:
    """A worker process, from :meth:`pgflow_py.Store.workers`."""

    id: str
    hostname: str | None
    pid: int | None
    flows: tuple[str, ...]
    started_at: datetime
    last_heartbeat: datetime
    running: int
    """Tasks it holds now."""
    lost: bool
    """Its last heartbeat is older than its lease: it stopped (or is stuck), and the tasks
    it held will be taken back."""
