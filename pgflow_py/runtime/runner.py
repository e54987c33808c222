"""``run_flows``: claim due tasks in batches, run them on a fixed pool of workers, record results.

One dispatcher coroutine makes every database call of the runner, on the event loop thread, so
there is no thread hop at all: each pass records the results gathered since the last one and
claims up to the number of idle workers in one transaction, then hands the tasks straight to
idle workers. (A separate database thread was measured slower: the GIL hand-offs between it
and the loop cost more than the overlap gained.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from .. import _json
from ..backoff import retry_delay
from ..clock import utc_datetime
from ..context import CancelFlag, Context
from ..dsl import Flow, Hook
from ..errors import (
    IsolatedError,
    PermanentFailure,
    PgflowError,
    Retry,
    StepTimeout,
    StoreError,
)
from ..store import ClaimedTask, RunFailure, Store, TaskFailure, TaskSuccess, connect
from .executor import StepRuntime, call_hook, run_attempt, timeout_error
from .loader import load_stored_flows, step_runtimes
from .scheduler import CronScheduler
from .threads import HandlerThreads

__all__ = ("RunnerStats", "arun_flows", "run_flows")

log = logging.getLogger("pgflow_py.runner")


@attrs.frozen
class RunnerStats:
    """What a runner did: task attempts that completed, failed for good, were retried, timed out."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    cancelled: int = 0
    """Attempts stopped because their run was cancelled or failed, or their lease was lost."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, IsolatedError):
        return str(exc)  # already "<the child's exception type>: <message>"
    if isinstance(exc, Retry):
        return f"Retry: {exc}"
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_uncancel = getattr(asyncio.Task, "uncancel", None)  # Python 3.11+: keep cancel counts balanced
_TIMEOUT_GRAIN = 0.005  # seconds: attempts whose timeouts end this close share one loop timer
_PEEK = 0.05  # seconds between looks at whether another process wrote to the store


class _Attempt:
    """One running attempt of a task, and how to stop it."""

    __slots__ = ("due", "flag", "stopped", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task  # the worker running it
        self.flag = CancelFlag()
        self.stopped: str | None = None
        self.due = 0.0  # its timeout's slot in the runner's timeout buckets

    def stop(self, why: str) -> None:
        """``"timeout"`` fails the attempt; ``"cancel"`` (run cancelled or failed, lease lost)
        drops it. Async handlers are cancelled; sync ones see ``ctx.cancelled``."""
        if self.stopped is None:
            self.stopped = why
            self.flag.set()
            self.task.cancel()


class _Runner:
    def __init__(
        self,
        store: Store,
        flows: Sequence[Flow],
        *,
        concurrency: int,
        until_idle: bool,
        resources: Mapping[str, Any],
        lease: float,
        poll_interval: float,
        shutdown_timeout: float,
    ) -> None:
        self.store = store
        self.backend = store.backend
        self.clock = store.clock
        self.versions: dict[str, int] = {}
        self.steps = _steps_for(flows, store, self.versions)
        self.cron = CronScheduler(store, flows)
        self.flow_slugs = sorted({flow for flow, _ in self.steps})
        self.concurrency = concurrency
        self.until_idle = until_idle
        self.resources = resources
        self.lease = lease
        self.poll_interval = poll_interval
        self.shutdown_timeout = shutdown_timeout
        # Results are recorded (and idle workers refilled) once half the pool is idle, or after
        # a millisecond: one transaction per batch instead of one per task.
        self.batch_size = max(1, concurrency // 2)
        self.batch_window = 0.001
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.counts = {"completed": 0, "failed": 0, "retried": 0, "timed_out": 0, "cancelled": 0}
        self._successes: list[TaskSuccess] = []
        self._failures: list[TaskFailure] = []
        self._in_flight = 0
        self._running: dict[int, _Attempt] = {}
        # on_dead hooks: candidates by task id, then those due once their failure is recorded.
        # All three by (task id, attempt): one task's attempts can overlap here, when a retry
        # fails while the previous attempt's on_failure hook still runs.
        self._dying: dict[tuple[int, int], tuple[Hook, Context, Exception]] = {}
        self._dead_hooks: list[tuple[Hook, Context, Exception]] = []
        self._hooking: set[tuple[int, int]] = set()  # attempts whose on_failure hook runs
        self._dead_after_hook: dict[tuple[int, int], tuple[Hook, Context, Exception]] = {}
        self._beat_interval = lease / 3
        self._next_beat = 0.0
        self._stopping = False
        self._stop_deadline: float | None = None
        self._pause = 0.005  # adaptive poll for work from other processes
        self._must_claim = True
        self._tg: anyio.abc.TaskGroup
        self._loop: asyncio.AbstractEventLoop
        # Idle workers wait on these futures; the dispatcher hands each a task directly, or
        # leaves it in _ready when no worker is waiting yet.
        self._idle: list[asyncio.Future[ClaimedTask | None]] = []
        self._ready: collections.deque[ClaimedTask] = collections.deque()
        self._closing = False
        # Attempts by the end of their timeout, rounded up to _TIMEOUT_GRAIN: one loop timer per
        # bucket rather than one per attempt.
        self._timeouts: dict[float, set[_Attempt]] = {}
        self._wake = asyncio.Event()
        # Sync handlers' threads; one abandoned at a timeout no longer counts toward the pool.
        self._threads = HandlerThreads(concurrency)

    # --- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks finish (up to the shutdown timeout)."""
        self._stopping = True
        self._wake.set()

    # --- main loop -----------------------------------------------------------------------------

    async def run(self) -> RunnerStats:
        loop = self._loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def wake_from_anywhere(event: str) -> None:
            if event == "cancelled":
                self._next_beat = 0.0  # look for attempts to stop at once
            else:
                self._must_claim = True  # new work from this process: claim without asking
            if threading.get_ident() == loop_thread:
                self._wake.set()
            else:
                loop.call_soon_threadsafe(self._wake.set)

        self.store.add_listener(wake_from_anywhere)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.concurrency):
                    tg.start_soon(self._worker)
                self._tg = tg
                try:
                    await self._dispatch()
                finally:
                    self._closing = True
                    for idle in self._idle:
                        if not idle.done():  # (cancelled along with the runner)
                            idle.set_result(None)
                    if self._in_flight:
                        # Shutdown timeout passed or the runner was cancelled: stop the attempts
                        # still running; their tasks are released below, without counting.
                        for attempt in self._running.values():
                            attempt.flag.set()
                        tg.cancel_scope.cancel()
            self._exchange(0)
            await self._run_dead_hooks()
        finally:
            self.store.remove_listener(wake_from_anywhere)
            self._threads.close()
            try:
                self._exchange(0)
                # Whatever is still leased to this runner goes back to the queue.
                self.backend.release(self.worker_id, None)
                self.backend.forget_worker(self.worker_id)
            except StoreError as exc:
                log.error(
                    "could not record %d result(s) before stopping (%s); their tasks run again "
                    "once their leases expire", len(self._successes) + len(self._failures), exc,
                )
        return RunnerStats(**self.counts)

    async def _run_dead_hooks(self) -> None:
        hooks, self._dead_hooks = self._dead_hooks, []
        for hook, ctx, exc in hooks:
            await call_hook("on_dead", hook, ctx, exc)

    def _start_dead_hooks(self) -> None:
        hooks, self._dead_hooks = self._dead_hooks, []
        for hook, ctx, exc in hooks:
            self._tg.start_soon(call_hook, "on_dead", hook, ctx, exc)

    def _beat(self) -> None:
        """Renew leases, stop attempts whose task was taken away, reclaim expired leases."""
        self._next_beat = self._loop.time() + self._beat_interval
        lost = self.backend.heartbeat(
            self.worker_id, self.flow_slugs, list(self._running), self.lease
        )
        for task_id in lost:
            self._running[task_id].stop("cancel")
        failed_runs: list[RunFailure] = []
        self.backend.reclaim_expired(self.flow_slugs, failed_runs)
        self.counts["failed"] += len(failed_runs)
        self._runs_failed(failed_runs)

    async def _dispatch(self) -> None:
        backoff = 0.05
        while True:
            try:
                if await self._dispatch_once():
                    return
                backoff = 0.05
            except StoreError as exc:
                # Back off instead of spinning; unrecorded results are kept and retried.
                log.error("database error, retrying in %.2gs: %s", backoff, exc)
                await self._wait(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _dispatch_once(self) -> bool:
        """One pass: heartbeat, cron, record results and claim, then wait. True means stop."""
        self._wake.clear()
        if self._dead_hooks:
            self._start_dead_hooks()
        if self._loop.time() >= self._next_beat:
            self._beat()
        cron_at = self.cron.next_at
        if cron_at is not None and cron_at <= self.clock.now() and not self._stopping:
            self.cron.start_due()
        if self._stopping:
            if self._successes or self._failures:
                self._exchange(0)
            if self._in_flight == 0:
                return True
            now = self._loop.time()
            self._stop_deadline = self._stop_deadline or now + self.shutdown_timeout
            if now >= self._stop_deadline:
                log.warning("shutdown timeout: cancelling %d running task(s)", self._in_flight)
                return True
            await self._wait(self._stop_deadline - now)
            return False
        want = self.concurrency - self._in_flight  # idle workers
        due: float | None = None
        if want and not (self._must_claim or self._successes or self._failures):
            # Nothing new from this process: a cheap read tells whether anything (perhaps
            # started by another process) is due, before taking the write lock to claim.
            due = self.backend.next_due(self.flow_slugs)
            if due is None or due > self.clock.now():
                want = 0
        if want or self._successes or self._failures:
            claimed = self._exchange(want)
            due = None  # the results may have queued tasks (retries, next steps)
            if want:
                # A full batch may leave more behind; otherwise ask again next time.
                self._must_claim = len(claimed) == want
            if claimed:
                self._pause = 0.005
                self._in_flight += len(claimed)
                for task in claimed:
                    if self._idle:
                        self._idle.pop().set_result(task)
                    else:
                        self._ready.append(task)
                if self._in_flight < self.concurrency:
                    await anyio.sleep(0)  # let workers start, then look again
                    return False
        if self._in_flight >= self.concurrency:
            # Every worker is busy: results (or the next heartbeat) wake us.
            await self._wait(self._next_beat - self._loop.time())
            await self._gather_results()
            return False
        if due is None:
            due = self.backend.next_due(self.flow_slugs)
        now = self.clock.now()
        if due is not None and due <= now:
            # Due but not claimed (another runner took it, or holds the write lock).
            await self._wait(self._pause)
            self._pause = min(self._pause * 2, self.poll_interval)
            return False
        if self._in_flight:
            # Results will wake us; meanwhile watch for work from other processes.
            await self._poll_wait()
            return False
        if self.until_idle:
            # Waits out backoffs and delays (a fake clock jumps), never future cron ticks.
            if due is None:
                return True
            await self._sleep_until(due - now)
            return False
        target = min((t for t in (due, self.cron.next_at) if t is not None), default=None)
        if target is not None and target - now < self._pause:
            await self._sleep_until(target - now)
            return False
        await self._poll_wait()
        return False

    async def _poll_wait(self) -> None:
        """Wait for a wake-up (local work, results, the heartbeat) or for another process to
        commit, which is checked every _PEEK seconds at the cost of reading a counter; after
        ``_pause`` (growing while nothing happens) return anyway, to look for due tasks."""
        seen = self.backend.data_version()
        end = self._loop.time() + self._pause
        self._pause = min(self._pause * 2, self.poll_interval)
        while (left := end - self._loop.time()) > 0 and self._loop.time() < self._next_beat:
            await self._wait(min(left, _PEEK))
            if self._wake.is_set() or self.backend.data_version() != seen:
                self._pause = 0.005  # something changed: look again soon after
                return

    async def _gather_results(self) -> None:
        """Give other busy workers a moment to finish, so results are written in batches."""
        window = self._loop.time() + self.batch_window
        while (
            self._in_flight
            and self.concurrency - self._in_flight < self.batch_size
            and self._loop.time() < window
        ):
            self._wake.clear()
            await self._wait(window - self._loop.time())

    async def _wait(self, timeout: float) -> None:
        timeout = min(timeout, self._next_beat - self._loop.time())
        if self._wake.is_set():
            return
        with anyio.move_on_after(max(timeout, 0.0)):
            await self._wake.wait()

    async def _sleep_until(self, delay: float) -> None:
        """Sleep on the store's clock (a fake clock jumps), waking early for new work or for
        the next heartbeat."""
        async with anyio.create_task_group() as tg:

            async def sleeper() -> None:
                await self.clock.sleep(delay)
                tg.cancel_scope.cancel()

            async def waker() -> None:
                await self._wait(delay)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            tg.start_soon(waker)

    def _exchange(self, claim: int) -> list[ClaimedTask]:
        """Record the results gathered so far and claim up to ``claim`` tasks: one transaction."""
        successes, self._successes = self._successes, []
        failures, self._failures = self._failures, []
        failed_runs: list[RunFailure] = []
        try:
            finished, claimed = self.backend.finish_and_claim(
                successes, failures, failed_runs, self.worker_id, self.flow_slugs, claim,
                self.lease,
            )
        except StoreError:
            self._successes[:0] = successes
            self._failures[:0] = failures
            raise
        if finished:
            self.store.notify_finished()
        dying = {
            key: self._dying.pop(key)
            for key in ((f.task_id, f.attempt) for f in failures) if key in self._dying
        }
        self._runs_failed(failed_runs, dying)
        return claimed

    def _runs_failed(
        self,
        failed_runs: list[RunFailure],
        dying: dict[tuple[int, int], tuple[Hook, Context, Exception]] | None = None,
    ) -> None:
        """Stop the failed runs' other attempts and call ``on_dead`` once for each."""
        if failed_runs:
            self._next_beat = 0.0  # their other running attempts must stop now
        for failure in failed_runs:
            key = None if failure.task_id is None else (failure.task_id, failure.attempt)
            dead = (dying or {}).get(key) if key is not None else None
            if dead is None:
                # Failed by the store (a map fed a non-array, a lost worker's last attempt):
                # no handler exception to hand over, so the hook gets the recorded error.
                step = self.steps.get((failure.flow_slug, failure.step_slug))
                if step is None or step.on_dead is None:
                    continue
                ctx = Context(
                    run_id=failure.run_id, flow_slug=failure.flow_slug,
                    step_slug=failure.step_slug, task_index=failure.task_index,
                    attempt=failure.attempt, max_attempts=step.options.max_attempts,
                    flow_input=failure.flow_input, resources=self.resources,
                )
                dead = (step.on_dead, ctx, PgflowError(failure.error))
            if key is not None and key in self._hooking:
                self._dead_after_hook[key] = dead  # after its on_failure
            else:
                self._dead_hooks.append(dead)

    # --- workers -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            if self._ready:
                task: ClaimedTask | None = self._ready.popleft()
            else:
                idle = self._loop.create_future()
                self._idle.append(idle)
                task = await idle
            if task is None:
                return
            try:
                await self._execute(task, me)
            finally:
                self._in_flight -= 1
                self._wake.set()

    def _watch(self, attempt: _Attempt, timeout: float) -> None:
        """Stop ``attempt`` once ``timeout`` has passed (at most _TIMEOUT_GRAIN late)."""
        due = math.ceil((self._loop.time() + timeout) / _TIMEOUT_GRAIN) * _TIMEOUT_GRAIN
        attempt.due = due
        bucket = self._timeouts.get(due)
        if bucket is None:
            bucket = self._timeouts[due] = set()
            self._loop.call_at(due, self._time_out, due)
        bucket.add(attempt)

    def _time_out(self, due: float) -> None:
        for attempt in self._timeouts.pop(due):
            attempt.stop("timeout")

    async def _execute(self, task: ClaimedTask, me: asyncio.Task[Any]) -> None:
        if task.flow_version != self.versions[task.flow_slug]:
            self._outdated(task)
            return
        step = self.steps[(task.flow_slug, task.step_slug)]
        attempt = _Attempt(me)
        ctx = Context(
            run_id=task.run_id,
            flow_slug=task.flow_slug,
            step_slug=task.step_slug,
            task_index=task.task_index,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            flow_input=task.flow_input,
            resources=self.resources,
            deadline=utc_datetime(time.time() + step.options.timeout),
            cancel_flag=attempt.flag,
        )
        error: Exception | None = None
        output: Any = None
        self._watch(attempt, step.options.timeout)
        self._running[task.id] = attempt
        try:
            if step.is_async:
                output = await step.handler(task.input, ctx)
            else:
                output = await run_attempt(step, task.input, ctx, self._threads)
        except asyncio.CancelledError:
            if attempt.stopped is None:
                raise  # the runner itself is being cancelled
        except Exception as exc:
            error = exc
        finally:
            bucket = self._timeouts.get(attempt.due)
            if bucket is not None:  # None once its timer has fired
                bucket.discard(attempt)
            del self._running[task.id]
            if attempt.stopped is not None and _uncancel is not None:
                _uncancel(me)
        if attempt.stopped == "cancel":
            # The task was cancelled, its run failed, or its lease was lost: nothing to record.
            self.counts["cancelled"] += 1
            return
        if attempt.stopped == "timeout":
            error = timeout_error(step, ctx)
        if error is not None:
            # Outside the attempt's try, so stopping the attempt cannot cut a hook short.
            await self._failed(step, task, ctx, error)
            return
        if output is None:
            output_json = "null"
        else:
            try:
                output_json = _json.dumps(output)
            except (TypeError, ValueError) as exc:
                await self._failed(step, task, ctx, TypeError(
                    f"the handler returned a value that is not JSON-serializable: {exc}"
                ))
                return
        self.counts["completed"] += 1
        self._successes.append(TaskSuccess(
            task.id, task.attempt, output_json, task.run_id, task.step_slug, step.is_job,
            task.claim, task.started_at,
        ))

    def _outdated(self, task: ClaimedTask) -> None:
        """Another process deployed a new shape of this flow: hand its tasks back, stop serving it."""
        self.backend.release(self.worker_id, [task.id])
        if task.flow_slug in self.flow_slugs:
            self.flow_slugs = [s for s in self.flow_slugs if s != task.flow_slug]
            log.error(
                "flow %r changed shape in the store (version %d; this runner has version %d): "
                "no longer serving it here; restart this runner with the current code",
                task.flow_slug, task.flow_version, self.versions[task.flow_slug],
            )

    async def _failed(
        self, step: StepRuntime, task: ClaimedTask, ctx: Context, exc: Exception
    ) -> None:
        if isinstance(exc, StepTimeout):
            self.counts["timed_out"] += 1
        opts = step.options
        will_retry = not isinstance(exc, PermanentFailure) and task.attempt < task.max_attempts
        error = _error_text(exc)
        retry_at: float | None = None
        if will_retry:
            self.counts["retried"] += 1
            delay = exc.delay if isinstance(exc, Retry) else retry_delay(
                task.attempt, base_delay=opts.base_delay, backoff=opts.backoff,
                max_delay=opts.max_delay, jitter=opts.jitter,
            )
            retry_at = self.clock.now() + delay
            log.info(
                "%s.%s failed (run %s, attempt %d of %d), retrying in %.3gs: %s",
                task.flow_slug, task.step_slug, task.run_id, task.attempt, task.max_attempts,
                delay, error,
            )
        else:
            self.counts["failed"] += 1
            log.warning(
                "%s.%s failed for good (run %s, attempt %d of %d): %s",
                task.flow_slug, task.step_slug, task.run_id, task.attempt, task.max_attempts,
                error, exc_info=None if isinstance(exc, (PermanentFailure, StepTimeout)) else exc,
            )
        hook_ctx = attrs.evolve(ctx, will_retry=will_retry)
        if step.on_dead is not None and not will_retry:
            # Called once the store says this failure is the one that failed the run.
            self._dying[(task.id, task.attempt)] = (step.on_dead, hook_ctx, exc)
        if step.on_failure is not None:
            self._hooking.add((task.id, task.attempt))
        # Recorded before the hook runs: a slow hook must not hold the task (or its lease).
        self._failures.append(TaskFailure(task.id, task.attempt, error, retry_at, task.claim))
        self._wake.set()
        if step.on_failure is not None:
            try:
                await call_hook("on_failure", step.on_failure, hook_ctx, exc)
            finally:
                self._hooking.discard((task.id, task.attempt))
            dead = self._dead_after_hook.pop((task.id, task.attempt), None)
            if dead is not None:  # on_dead was waiting for this on_failure to finish
                self._dead_hooks.append(dead)
                self._wake.set()


def _steps_for(
    flows: Sequence[Flow], store: Store, versions: dict[str, int]
) -> dict[tuple[str, str], StepRuntime]:
    steps: dict[tuple[str, str], StepRuntime] = {}
    for flow in flows:
        if not isinstance(flow, Flow):
            raise TypeError(f"run_flows takes pf.Job / pf.Flow objects, got {flow!r}")
        versions[flow.slug] = store.register(flow)
        for runtime in step_runtimes(flow):
            steps[(runtime.flow_slug, runtime.step_slug)] = runtime
    return steps


async def arun_flows(
    flows: Sequence[Flow] | None = None,
    *,
    store: Store | str | None = None,
    concurrency: int = 10,
    until_idle: bool = False,
    resources: Mapping[str, Any] | None = None,
    lease: float = 30.0,
    poll_interval: float = 0.1,
    shutdown_timeout: float = 30.0,
    handle_signals: bool = True,
) -> RunnerStats:
    """Serve ``flows`` (default: every flow in the store) inside a running event loop.

    Returns when idle (``until_idle=True``) or after SIGINT/SIGTERM: running tasks get up to
    ``shutdown_timeout`` seconds to finish; a second signal stops at once.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    own_store = not isinstance(store, Store)
    the_store = store if isinstance(store, Store) else connect(store)
    try:
        if flows is None:
            flows = load_stored_flows(the_store.backend.definitions())
        runner = _Runner(
            the_store,
            list(flows),
            concurrency=concurrency,
            until_idle=until_idle,
            resources=dict(resources or {}),
            lease=lease,
            poll_interval=poll_interval,
            shutdown_timeout=shutdown_timeout,
        )
        if not (handle_signals and threading.current_thread() is threading.main_thread()):
            return await runner.run()
        return await _with_signals(runner)
    finally:
        if own_store:
            the_store.close()


async def _with_signals(runner: _Runner) -> RunnerStats:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        if runner._stopping:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            if main is not None:
                main.cancel()
        else:
            log.info("%s: finishing running tasks, then stopping", signal.Signals(signum).name)
            runner.stop()

    installed = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # e.g. Windows
            pass
    try:
        return await runner.run()
    except asyncio.CancelledError:
        if not runner._stopping:
            raise
        return RunnerStats(**runner.counts)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_flows(
    flows: Sequence[Flow] | None = None,
    *,
    store: Store | str | None = None,
    concurrency: int = 10,
    until_idle: bool = False,
    resources: Mapping[str, Any] | None = None,
    lease: float = 30.0,
    poll_interval: float = 0.1,
    shutdown_timeout: float = 30.0,
    handle_signals: bool = True,
) -> RunnerStats:
    """Serve ``flows`` until idle or until SIGINT/SIGTERM; blocking (see :func:`arun_flows`)."""
    return anyio.run(
        lambda: arun_flows(
            flows, store=store, concurrency=concurrency, until_idle=until_idle,
            resources=resources, lease=lease, poll_interval=poll_interval,
            shutdown_timeout=shutdown_timeout, handle_signals=handle_signals,
        )
    )
