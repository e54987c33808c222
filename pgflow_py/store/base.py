"""The backend boundary: the job-level operations the store facade and the runtime rely on.

Every backend (SQLite, PostgreSQL) implements :class:`Backend`; nothing above this layer writes
SQL. Values cross the boundary as decoded Python objects, except outputs and inputs on the write
path, which arrive already encoded as JSON text so the hot path encodes each value once. The
records of the hot path are named tuples, cheap to make by the thousand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import attrs

from ..clock import Clock
from ..definition import FlowDefinition
from ..models import FlowStats, Run, WorkerInfo

__all__ = (
    "Backend", "ClaimedTask", "NewRun", "RunFailure", "TaskFailure", "TaskSuccess", "Undecodable"
)


@attrs.frozen(slots=True)
class Undecodable:
    """Stands in for a stored JSON value that could not be decoded (nested too deeply, not
    JSON: written by an older version or by hand), so that one bad value never aborts the
    read or claim of others. ``error`` is the one-line ``Type: message`` of what failed."""

    error: str

    @classmethod
    def of(cls, exc: BaseException) -> Undecodable:
        return cls(" ".join(f"{type(exc).__name__}: {exc}".split()))


class NewRun(NamedTuple):
    """A run to create. ``root_items`` holds the encoded elements of a root map's array."""

    id: str
    input_json: str
    run_at: float
    created_at: float
    priority: int = 0
    key: str | None = None
    root_items: tuple[str, ...] | None = None
    cron_tick: float | None = None
    """For a cron run: its tick. The run is created only if no run of this or a later tick was."""
    trace_context: str | None = None
    """The starting code's W3C trace context as JSON text (``{"traceparent": …}``), or ``None``
    (see :func:`pgflow_py.telemetry.propagation.current_context`)."""


class ClaimedTask(NamedTuple):
    """A task taken by a worker: everything needed to run one attempt."""

    id: int
    run_id: str
    flow_slug: str
    step_slug: str
    task_index: int | None
    attempt: int
    max_attempts: int
    priority: int
    input: Any
    """The task's input; an :class:`Undecodable` if its stored JSON cannot be read."""
    flow_input: Any
    """The run's input; an :class:`Undecodable` if its stored JSON cannot be read."""
    flow_version: int = 1
    """The flow definition's version the task was created under (bumped by shape changes)."""
    claim: int | None = None
    """Which claim of the task this is (never reset, unlike ``attempt`` after a retry)."""
    started_at: float | None = None
    """When it was claimed (the store's clock)."""
    trace_context: str | None = None
    """The run's :attr:`NewRun.trace_context`: the trace its attempts' spans belong to."""


class TaskSuccess(NamedTuple):
    """A completed attempt. ``job`` (with ``run_id`` and ``step_slug``) marks the one step of a
    job, which backends may complete in bulk."""

    task_id: int
    attempt: int
    output_json: str
    run_id: str = ""
    step_slug: str = ""
    job: bool = False
    claim: int | None = None
    """The :attr:`ClaimedTask.claim` this result belongs to; a result of an earlier claim (after
    a cancel and retry) is ignored. ``None`` checks the attempt only."""
    started_at: float | None = None
    """The :attr:`ClaimedTask.started_at` of the attempt, sparing the backend a lookup."""


class TaskFailure(NamedTuple):
    """A failed attempt; ``retry_at`` is when to try again, ``None`` to fail the run for good."""

    task_id: int
    attempt: int
    error: str
    retry_at: float | None
    claim: int | None = None
    traceback: str | None = None
    """The formatted traceback, kept in the task's history (capped; see ``cap_traceback``)."""


@attrs.frozen(slots=True)
class RunFailure:
    """A run that failed for good, as reported by ``finish`` and ``reclaim_expired``.

    ``task_id`` is the task whose failure did it, ``None`` when the store failed the run itself
    (a map step fed something other than an array). ``flow_input`` is an :class:`Undecodable`
    if the run's stored input cannot be read.
    """

    run_id: str
    flow_slug: str
    step_slug: str
    error: str
    flow_input: Any
    task_id: int | None = None
    task_index: int | None = None
    attempt: int = 0


class Backend(Protocol):
    """Job-level storage operations. Implementations are safe to call from several threads."""

    url: str
    location: str
    """Where the database is, for messages and logs: a path, or host, port and database
    (never a password)."""
    clock: Clock

    def register(self, definition: FlowDefinition) -> int:
        """Store or update a definition and return its version. If its shape changed, runs that
        have not started move to it; raise ``ShapeMismatch`` (writing nothing) if any other
        unfinished run blocks it."""
        ...

    def get_definition(self, flow_slug: str) -> FlowDefinition | None: ...

    def definitions(self) -> list[FlowDefinition]: ...

    def registered_at(self, flow_slug: str) -> float | None:
        """When the flow's definition was first written."""
        ...

    def start_runs(self, definition: FlowDefinition, runs: Sequence[NewRun]) -> list[str]:
        """Register ``definition`` and create runs in one transaction; return their ids (an
        existing run's for a known key, ``""`` for a cron tick already started)."""
        ...

    def start_run(self, definition: FlowDefinition, run: NewRun) -> str:
        """``start_runs`` of one run, which may share its transaction with the starts other
        threads make at the same time (group commit); returns once the run is committed."""
        ...

    def claim(
        self, worker_id: str, flow_slugs: Sequence[str], limit: int, lease_seconds: float
    ) -> list[ClaimedTask]:
        """Take up to ``limit`` due tasks, highest priority then oldest first, keeping each
        flow's ``concurrency`` cap across all runners."""
        ...

    def finish(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None = None,
    ) -> list[str]:
        """Record results in one transaction, advancing their runs; late results are ignored.

        Returns the ids of runs that reached a terminal status; the runs that failed for good
        are also appended to ``failed_runs`` when given.
        """
        ...

    def finish_and_claim(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None,
        worker_id: str,
        flow_slugs: Sequence[str],
        limit: int,
        lease_seconds: float,
    ) -> tuple[list[str], list[ClaimedTask]]:
        """``finish`` then ``claim`` in one transaction (the runner's hot path): returns the
        finished runs' ids and the claimed tasks, which may include tasks these results queued."""
        ...

    def heartbeat(
        self, worker_id: str, flow_slugs: Sequence[str], task_ids: Sequence[int],
        lease_seconds: float,
    ) -> list[int]:
        """Renew this worker's leases; return the ids it no longer holds (cancelled, failed
        run, or reclaimed), whose attempts must stop."""
        ...

    def reclaim_expired(
        self, flow_slugs: Sequence[str], failed_runs: list[RunFailure] | None = None
    ) -> int:
        """Fail the attempts of tasks whose lease expired (their worker is gone) and requeue them
        per their retry policy; return how many. Runs failed for good go to ``failed_runs``."""
        ...

    def add_throughput(self, rows: Sequence[tuple[str, int, int, int]]) -> None:
        """Add ``(flow_slug, minute, completed, failed)`` rows to the per-minute counts
        (``minute``: epoch seconds // 60), in one transaction."""
        ...

    def forget_worker(self, worker_id: str) -> None:
        """Remove a stopped worker from the workers table."""
        ...

    def release(self, worker_id: str, task_ids: Sequence[int] | None) -> None:
        """Put claimed tasks back in the queue without counting an attempt (``None``: every
        task this worker holds)."""
        ...

    def data_version(self) -> int:
        """A number that changes whenever another connection or process commits: a cheap way
        for an idle runner to notice work started elsewhere."""
        ...

    def next_due(self, flow_slugs: Sequence[str]) -> float | None:
        """When the earliest queued task of these flows is due, or ``None`` if none is queued."""
        ...

    def get_run(self, run_id: str) -> Run | None: ...

    def runs(
        self,
        flow_slug: str | None,
        status: str | None,
        key: str | None,
        limit: int,
        before: str | None = None,
    ) -> list[Run]:
        """Newest first (insertion order); ``before``: only runs started before that run (a
        run id no longer stored is taken as a position in time)."""
        ...

    def count(self, flow_slug: str | None, status: str | None) -> int:
        """How many runs :meth:`runs` would list without a limit, through indexes."""
        ...

    def stats(self) -> list[FlowStats]:
        """Per stored flow: runs by status, the oldest queued run's age, live workers."""
        ...

    def workers(self) -> list[WorkerInfo]:
        """Every worker in the workers table, lost ones included."""
        ...

    def unserved(self, older_than: float) -> list[tuple[str, float]]:
        """Flows that no live worker serves, whose oldest queued run has been due for more
        than ``older_than`` seconds: (slug, seconds due), by slug."""
        ...

    def throughput(
        self, since_minute: int, flow_slug: str | None
    ) -> list[tuple[str, int, int, int]]:
        """The ``(flow_slug, minute, completed, failed)`` rows of stored flows from
        ``since_minute`` on, by flow then minute; minutes without a row are left out."""
        ...

    def retry_all(self, flow_slug: str | None) -> int:
        """Retry every failed run (of a flow) in one transaction; return how many. Runs that
        cannot be retried (their key taken, their flow changed shape) stay failed."""
        ...

    def delete_flow(self, flow_slug: str) -> int:
        """Delete a flow's definition and runs; return how many runs. Raises ``FlowNotFound``,
        or ``InputError`` while any of its runs is unfinished."""
        ...

    def cancel(self, run_id: str) -> bool:
        """Cancel an unfinished run; ``False`` if it was already terminal."""
        ...

    def retry(self, run_id: str) -> bool:
        """Run a failed or cancelled run again with fresh attempts; ``False`` if it is not."""
        ...

    def prune(self, before: float) -> int:
        """Delete terminal runs finished before ``before``, and the throughput of minutes
        that ended by then; return how many runs."""
        ...

    def close(self) -> None: ...
