"""The public store: validates what users hand it, then calls the backend."""

from __future__ import annotations

import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from .. import _json
from ..clock import Clock, SystemClock, utc_datetime
from ..definition import FlowDefinition, StepDefinition
from ..dsl import Flow, InputT
from ..errors import FlowNotFound, InputError, RunNotFound, StoreError, WaitTimeout
from ..models import FlowStats, Run, RunStatus, StepRun, ThroughputPoint, WorkerInfo
from ..telemetry.propagation import current_context
from .base import Backend, NewRun

__all__ = ("Store", "connect")

DEFAULT_PATH = "pgflow.db"
_MAX_THROUGHPUT_MINUTES = 7 * 24 * 60


def connect(url: str | os.PathLike[str] | None = None, *, clock: Clock | None = None) -> Store:
    """Open a store: a SQLite path (created and migrated on first use), ``":memory:"``, or a
    ``postgresql://`` URL (``?schema=name`` picks the schema of pgflow's tables, by default
    ``pgflow``). Without a URL, ``$PGFLOW_DATABASE`` or ``./pgflow.db``."""
    if url is None:
        url = os.environ.get("PGFLOW_DATABASE") or DEFAULT_PATH
    url = os.fspath(url)
    clock = clock or SystemClock()
    _check_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresBackend

        url, schema = _pop_schema(url)
        return Store(PostgresBackend(url, clock, schema=schema or "pgflow"))
    from .sqlite import SqliteBackend

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return Store(SqliteBackend(path, clock))


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PASSWORD = re.compile(r"\bpassword\s*=", re.IGNORECASE)


def _check_url(url: str) -> None:
    """Refuse what is neither a URL of ours nor a file path, without repeating it: taken for
    a SQLite path, its password would be quoted in the error about its directory."""
    scheme = _SCHEME.match(url)
    if scheme is not None and scheme.group(1).lower() not in ("postgresql", "postgres", "sqlite"):
        raise StoreError(
            f"unsupported database URL scheme {scheme.group(1)!r}: give a postgresql:// URL, "
            "a sqlite:/// URL or a file path"
        )
    if scheme is None and _PASSWORD.search(url):
        raise StoreError(
            "the database looks like a libpq connection string (it sets password=), which "
            "pgflow does not take: give a postgresql://user:password@host/db URL"
        )


def _pop_schema(url: str) -> tuple[str, str | None]:
    """Split pgflow's own ``schema=`` parameter off a PostgreSQL URL (libpq would refuse it),
    leaving the rest of the URL exactly as it was."""
    base, mark, query = url.partition("?")
    if not mark:
        return url, None
    kept: list[str] = []
    schema = None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "schema":
            schema = urllib.parse.unquote(value)
        else:
            kept.append(part)
    return base + ("?" + "&".join(kept) if kept else ""), schema


def new_run_ids(n: int) -> list[str]:
    """UUIDv7s: time-ordered, so runs started together sit together in the database's B-trees
    (far fewer pages written per batch than with random UUIDv4 keys)."""
    ms = f"{time.time_ns() // 1_000_000:012x}"
    prefix = f"{ms[:8]}-{ms[8:12]}-7"
    rand = os.urandom(10 * n).hex()
    # 48 bits of milliseconds, version 7, 12 random bits, the RFC 4122 variant, 62 random bits;
    # formatted by hand (three times faster than uuid.UUID), with one urandom call per batch.
    return [
        f"{prefix}{r[:3]}-{'89ab'[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"
        for r in (rand[i:i + 20] for i in range(0, 20 * n, 20))
    ]


def _seconds(value: float | timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InputError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    try:
        seconds = float(seconds)
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not math.isfinite(seconds):
        raise InputError(f"{name} must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise InputError(f"{name} must not be negative, got {value!r}")
    return seconds


# The latest due time a run may have: stored times are read back as datetimes, which end there.
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()

# What both databases can store (PostgreSQL's priority column is a 32-bit INTEGER).
_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1


def _check_text(value: str, name: str) -> None:
    """Refuse a string the databases cannot store: a lone surrogate is not UTF-8, and
    PostgreSQL's text holds no NUL (refused on SQLite too, so both behave alike)."""
    if not value.isascii():  # O(1): the common case costs nothing more
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"{name} {value!r} holds {value[exc.start:exc.end]!r}, a lone "
                "surrogate, which is not UTF-8 text (decode bytes with errors='replace')"
            ) from None
    if "\x00" in value:
        raise InputError(f"{name} {value!r} holds a NUL character ('\\x00'); remove it")


def _check_run_id(run_id: str) -> None:
    if isinstance(run_id, str):
        _check_text(run_id, "run id")


@attrs.frozen
class _StartPlan:
    """What every start of one definition needs, computed once."""

    definition: FlowDefinition
    root_map: StepDefinition | None
    first_delay: float
    steps: tuple[StepRun, ...]


_STEP_ENDED = frozenset({"completed", "skipped", "failed"})
"""The statuses of a step that :meth:`Store.wait` with ``step=`` waits for."""


class Store:
    """Runs and definitions in a database. Create with :func:`connect`; use as a context manager."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.clock = backend.clock
        self._listeners: list[Callable[[str], None]] = []
        self._plans: dict[str, _StartPlan] = {}
        self._finished = threading.Condition()

    def __repr__(self) -> str:
        return f"<pgflow_py.Store {self.backend.location!r}>"

    # --- definitions ---------------------------------------------------------------------------

    def register(self, flow: Flow) -> int:
        """Write ``flow``'s definition to the store (or update its options); return its version.

        If its shape (steps, dependencies, step types, conditions) changed, unfinished runs that
        have not started (queued or scheduled, no attempt made) move to the new shape in the
        same transaction, keeping their id, input, key, priority and due time. Raises
        :class:`~pgflow_py.ShapeMismatch`, changing nothing, if a run has started, or cannot
        move (a step it is queued for is gone; a new root map step and an input that is not an
        array); the message lists those runs. Starting a run (``start``) registers its flow too
        but moves no runs: there, any unfinished run blocks a changed shape.
        """
        return self.backend.register(flow.definition)

    def _resolve(self, flow: Flow | str) -> FlowDefinition:
        """The definition to start; a flow object is registered with its runs, in one transaction."""
        if isinstance(flow, Flow):
            return flow.definition
        if not isinstance(flow, str):
            raise InputError(f"flow must be a pf.Flow, a pf.Job or a flow slug, got {flow!r}")
        _check_text(flow, "flow slug")
        definition = self.backend.get_definition(flow)
        if definition is None:
            raise FlowNotFound(
                f"no flow {flow!r} in {self.backend.location}: start it once from its definition, "
                "or call store.register(flow), before starting it by slug"
            )
        return definition

    # --- starting ------------------------------------------------------------------------------

    def _due(self, delay: float | timedelta | None, run_at: datetime | None) -> float:
        now = self.clock.now()
        if delay is not None and run_at is not None:
            raise InputError("give either delay or run_at, not both")
        if delay is not None:
            due = now + _seconds(delay, "delay")
            if due > _LATEST:
                raise InputError(f"delay {delay!r} would make the run due after the year 9999")
            return due
        if run_at is not None:
            if not isinstance(run_at, datetime):
                raise InputError(f"run_at must be a datetime, got {run_at!r}")
            if run_at.tzinfo is None or run_at.utcoffset() is None:
                raise InputError(
                    f"run_at must be timezone-aware (e.g. datetime.now(timezone.utc)), got {run_at!r}"
                )
            due = run_at.timestamp()
            if due > _LATEST:
                raise InputError(f"run_at {run_at!r} is after the year 9999 in UTC")
            return due
        return now

    def _plan(self, definition: FlowDefinition) -> _StartPlan:
        cached = self._plans.get(definition.slug)
        if cached is None or cached.definition is not definition:
            roots = definition.root_steps
            cached = _StartPlan(
                definition=definition,
                root_map=next((s for s in roots if s.step_type == "map"), None),
                first_delay=min(s.start_delay for s in roots),
                steps=tuple(
                    StepRun(s.slug, "created" if s.depends_on else "started", 0, None, None)
                    for s in definition.steps
                ),
            )
            self._plans[definition.slug] = cached
        return cached

    @staticmethod
    def _new_run(
        plan: _StartPlan,
        input: Any,
        due: float,
        now: float,
        priority: int,
        key: str | None,
        run_id: str | None = None,
        trace_context: str | None = None,
    ) -> NewRun:
        try:
            input_json = _json.dumps(input)
            # Each item is part of the input, so it encodes if the input did.
            root_items = (
                None if plan.root_map is None or not isinstance(input, (list, tuple))
                else tuple(_json.dumps(item) for item in input)
            )
        except (TypeError, ValueError) as exc:
            # Anything dumps refuses would not read back as the same value, or at all.
            problem = str(exc)
            raise InputError(
                f"input of flow {plan.definition.slug!r} must be JSON-serializable "
                f"(dicts, lists, str, numbers, bools, None, attrs classes, dataclasses): "
                f"{_json.printable(problem)}"
            ) from None
        if plan.root_map is not None and root_items is None:
            raise InputError(
                f"flow {plan.definition.slug!r} starts with map step {plan.root_map.slug!r}, "
                f"so its input must be an array (list), got {type(input).__name__}"
            )
        return NewRun(
            run_id or new_run_ids(1)[0], input_json, due, now, priority, key, root_items, None,
            trace_context,
        )

    @staticmethod
    def _check_priority(priority: int) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InputError(f"priority must be an integer, got {priority!r}")
        if not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
            raise InputError(
                f"priority must fit in a signed 32-bit integer (-2**31 to 2**31 - 1), "
                f"got {priority!r}"
            )

    def start(
        self,
        flow: Flow[InputT] | str,
        input: InputT = None,  # type: ignore[assignment]  # mypy checks it against a job's handler
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
        key: str | None = None,
    ) -> Run:
        """Start a run of ``flow`` (object or slug) with ``input``; return it.

        ``delay``/``run_at`` schedule it (up to the year 9999); ``priority`` orders claims
        (higher first; a 32-bit signed integer, what both databases store); ``key`` makes the
        start idempotent: the same flow and key return the existing run.
        """
        self._check_priority(priority)
        if key is not None:
            if not isinstance(key, str):
                raise InputError(f"key must be a string, got {key!r}")
            _check_text(key, "key")
        due = self._due(delay, run_at)
        definition = self._resolve(flow)
        plan = self._plan(definition)
        new = self._new_run(
            plan, input, due, self.clock.now(), priority, key, None, current_context()
        )
        run_id = self.backend.start_run(definition, new)
        self._notify_started()
        if run_id != new.id:
            return self.get_run(run_id)
        return self._fresh_run(plan, new, self.clock.now())

    def start_cron_tick(self, flow: Flow, tick: float, key: str) -> Run | None:
        """Start the run of cron ``tick`` (with ``key``) unless a run of it or of a later tick
        was started: exactly once per tick, even after that run was pruned or cancelled.
        ``None`` if it was. Runners call this; it is not needed in application code."""
        definition = flow.definition
        plan = self._plan(definition)
        now = self.clock.now()
        new = self._new_run(plan, definition.cron_input, now, now, 0, key)._replace(
            cron_tick=tick
        )
        (run_id,) = self.backend.start_runs(definition, [new])
        if not run_id:
            return None
        self._notify_started()
        return self.get_run(run_id) if run_id != new.id else self._fresh_run(plan, new, now)

    def start_many(
        self,
        flow: Flow[InputT] | str,
        inputs: Iterable[InputT],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> list[Run]:
        """Start one run per input in a single transaction; all or none are written."""
        self._check_priority(priority)
        due = self._due(delay, run_at)
        definition = self._resolve(flow)
        inputs = list(inputs)
        now = self.clock.now()
        plan = self._plan(definition)
        trace_context = current_context()  # one span starts the whole batch
        news = [
            self._new_run(plan, item, due, now, priority, None, run_id, trace_context)
            for item, run_id in zip(inputs, new_run_ids(len(inputs)), strict=True)
        ]
        if not news:
            if isinstance(flow, Flow):
                self.register(flow)
            return []
        self.backend.start_runs(definition, news)
        self._notify_started()
        now = self.clock.now()
        created = utc_datetime(news[0].created_at)  # one start time for the whole batch
        return [self._fresh_run(plan, new, now, created) for new in news]

    def _fresh_run(
        self, plan: _StartPlan, new: NewRun, now: float, created: datetime | None = None
    ) -> Run:
        # Built from what was just written, sparing a read per started run.
        if plan.root_map is not None and not new.root_items:
            return self.get_run(new.id)  # empty root map: already advanced
        return Run(
            id=new.id,
            flow_slug=plan.definition.slug,
            status=RunStatus.SCHEDULED if new.run_at + plan.first_delay > now else RunStatus.QUEUED,
            input=_json.loads(new.input_json),
            output=None,
            error=None,
            key=new.key,
            priority=new.priority,
            created_at=created or utc_datetime(new.created_at),
            started_at=None,
            finished_at=None,
            attempts=0,
            steps=plan.steps,
        )

    # --- reading -------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> Run:
        """The run with this id; raises :class:`~pgflow_py.RunNotFound`.

        An input or output whose stored JSON cannot be decoded (nested too deeply, or not JSON:
        written by hand or by an older version) reads as a
        :class:`~pgflow_py.store.Undecodable`, whose ``error`` says what failed.
        """
        _check_run_id(run_id)
        run = self.backend.get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} in {self.backend.location}")
        return run

    def runs(
        self,
        flow: Flow | str | None = None,
        status: RunStatus | str | None = None,
        key: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Run]:
        """Runs, newest first, filtered by flow, status and key (undecodable values read as in
        :meth:`get_run`).

        ``before=<run id>`` pages back: only runs started before that one, so passing the last
        id of a page gets the next, unaffected by runs started meanwhile. A run id no longer
        stored (pruned) still works, as a position in time (ids are time-ordered).
        """
        run_status = self._status_arg(status)
        slug = self._flow_arg(flow)
        if key is not None:
            if not isinstance(key, str):
                raise InputError(f"key must be a string, got {key!r}")
            _check_text(key, "key")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**63:
            raise InputError(f"limit must be a non-negative integer, got {limit!r}")
        if before is not None:
            if not isinstance(before, str):
                raise InputError(f"before must be a run id (a string), got {before!r}")
            _check_text(before, "before")
        return self.backend.runs(
            slug, None if run_status is None else run_status.value, key, limit, before
        )

    @staticmethod
    def _status_arg(status: RunStatus | str | None) -> RunStatus | None:
        if status is None:
            return None
        try:
            return RunStatus(status)
        except ValueError:
            raise InputError(
                f"unknown status {status!r}; use one of {[s.value for s in RunStatus]}"
            ) from None

    @staticmethod
    def _flow_arg(flow: Flow | str | None) -> str | None:
        if flow is None:
            return None
        slug = flow.slug if isinstance(flow, Flow) else flow
        if not isinstance(slug, str):
            raise InputError(f"flow must be a pf.Flow, a pf.Job or a flow slug, got {flow!r}")
        _check_text(slug, "flow")
        return slug

    def count(self, flow: Flow | str | None = None, status: RunStatus | str | None = None) -> int:
        """How many runs (of a flow, with a status): what :meth:`runs` would list without a
        limit. Counted through indexes: about 70 ms on SQLite at a million runs of which 170,000
        unfinished (``python -m benchmarks.count``)."""
        run_status = self._status_arg(status)
        return self.backend.count(
            self._flow_arg(flow), None if run_status is None else run_status.value
        )

    def stats(self) -> list[FlowStats]:
        """Per stored flow, by slug: runs by status, the age in seconds of the oldest queued
        run (since it became due), and how many live workers serve it."""
        return self.backend.stats()

    def throughput(
        self, minutes: int = 60, flow: Flow | str | None = None
    ) -> list[ThroughputPoint]:
        """Per flow (by slug) then minute, oldest first: tasks completed and attempts failed
        in each of the last ``minutes`` minutes, the current one included. Minutes without
        any are left out. Runners add their counts at each heartbeat (every lease / 3
        seconds) and when they stop, so the latest few seconds may not show yet."""
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not (
            1 <= minutes <= _MAX_THROUGHPUT_MINUTES
        ):
            raise InputError(
                f"minutes must be a whole number from 1 to {_MAX_THROUGHPUT_MINUTES} (a week), "
                f"got {minutes!r}: pass e.g. minutes=60 for the last hour"
            )
        since = int(self.clock.now() // 60) - minutes + 1
        return [
            ThroughputPoint(slug, utc_datetime(minute * 60), completed, failed)
            for slug, minute, completed, failed in self.backend.throughput(
                since, self._flow_arg(flow)
            )
        ]

    def workers(self) -> list[WorkerInfo]:
        """The workers that have sent a heartbeat and not stopped cleanly, oldest first;
        ``lost`` ones stopped renewing their leases."""
        return self.backend.workers()

    def flows(self) -> list[FlowDefinition]:
        """The stored flow definitions, by slug."""
        return self.backend.definitions()

    def wait(
        self, run_id: str, timeout: float | timedelta | None = None, *, step: str | None = None
    ) -> Run:
        """Block until the run is completed, failed or cancelled; return it.

        With ``step="slug"``: until that step is completed, skipped or failed (pgflow's
        ``FlowStep.waitForStatus``), or the run has ended without it (cancelled, or failed
        by another step); the run is returned as it is then.

        Raises :class:`~pgflow_py.WaitTimeout` after ``timeout`` real seconds (a finite,
        non-negative number or a timedelta; ``None`` waits for good).
        """
        _check_run_id(run_id)
        if timeout is not None:
            timeout = _seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            run = self.get_run(run_id)
            if step is not None:
                status = self._step_status(run, step)
                if status in _STEP_ENDED or run.status.is_terminal:
                    return run
            elif run.status.is_terminal:
                return run
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                what = (
                    f"step {step!r} of run {run_id} is still {status}"
                    if step is not None else f"run {run_id} is still {run.status.value}"
                )
                raise WaitTimeout(f"{what} after {timeout}s; is a runner serving its flow?")
            # Woken at once by a runner in this process; polls for runners elsewhere.
            with self._finished:
                self._finished.wait(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, 0.05)

    def _step_status(self, run: Run, step: str) -> str:
        """The status of ``step`` in ``run`` (``created`` while it has no row yet); an unknown
        step slug raises :class:`~pgflow_py.InputError`."""
        for found in run.steps:
            if found.slug == step:
                return found.status
        definition = self.backend.get_definition(run.flow_slug)
        slugs = [] if definition is None else list(definition.step_slugs)
        if step not in slugs:
            raise InputError(
                f"flow {run.flow_slug!r} has no step {step!r}; wait on one of its steps: {slugs}"
            )
        return "created"

    # --- control -------------------------------------------------------------------------------

    def cancel(self, run_id: str) -> Run:
        """Cancel an unfinished run: its queued tasks never start, late results are ignored."""
        _check_run_id(run_id)
        self.backend.cancel(run_id)
        self._notify("cancelled")
        self.notify_finished()
        return self.get_run(run_id)

    def retry(self, run_id: str) -> Run:
        """Run a failed or cancelled run again with fresh attempts (its history is kept)."""
        run = self.get_run(run_id)
        if not self.backend.retry(run_id):
            raise InputError(
                f"run {run_id} is {run.status.value}; only failed or cancelled runs can be retried"
            )
        self._notify_started()
        return self.get_run(run_id)

    def retry_all(self, flow: Flow | str | None = None) -> int:
        """Run every failed run (of ``flow``) again, in one transaction; return how many.

        A run that :meth:`retry` would refuse (its key now names a newer run, or its flow
        changed shape) stays failed and is not counted.
        """
        retried = self.backend.retry_all(self._flow_arg(flow))
        if retried:
            self._notify_started()
        return retried

    def delete_flow(self, flow: Flow | str) -> int:
        """Delete a flow's definition and all its runs; return how many runs.

        Raises :class:`~pgflow_py.FlowNotFound` for an unknown flow, and
        :class:`~pgflow_py.InputError` while any of its runs is scheduled, queued, running or
        retrying (cancel them first, or let them finish).
        """
        slug = self._flow_arg(flow)
        if slug is None:
            raise InputError("delete_flow needs a flow (a pf.Flow, a pf.Job or a flow slug)")
        deleted = self.backend.delete_flow(slug)
        self._plans.pop(slug, None)
        return deleted

    def prune(self, older_than: timedelta | float = timedelta(days=7)) -> int:
        """Delete completed, failed and cancelled runs finished more than ``older_than`` ago,
        and the :meth:`throughput` of the minutes that ended by then; return how many runs.

        It reads every run (no index by finish time keeps completions cheap): call it from a
        periodic maintenance job, not per request.
        """
        return self.backend.prune(self.clock.now() - _seconds(older_than, "older_than"))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- in-process wake-ups (used by the runtime) ---------------------------------------------

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(event)`` (from any thread) when this store starts or requeues runs
        (``"started"``) or cancels one (``"cancelled"``)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        self._listeners.remove(callback)

    def _notify(self, event: str) -> None:
        for callback in list(self._listeners):
            callback(event)

    def _notify_started(self) -> None:
        self._notify("started")

    def notify_finished(self) -> None:
        """Wake the :meth:`wait` calls of this process to look again (a runner calls it when
        runs finish)."""
        with self._finished:
            self._finished.notify_all()
