"""The runner: claim due tasks in batches, run them on a fixed pool of workers, record results.

One dispatcher coroutine makes every database call of the runner, on the event loop thread, so
there is no thread hop at all: each pass records the results gathered since the last one and
claims up to the number of idle workers in one transaction, then hands the tasks straight to
idle workers. (A separate database thread was measured slower: the GIL hand-offs between it
and the loop cost more than the overlap gained.) What happens within one attempt lives in
:mod:`.attempt`; this module schedules attempts and records their outcomes.

Prefetch: while recent attempts are short next to an exchange (:class:`_Prefetch`), the
dispatcher claims ahead into a buffer (``_ready``), leased like running tasks and renewed by the
heartbeat, which workers take from without waiting for a pass; results are then written when
the buffer runs low or when the oldest has waited a batch window, whichever comes first, so a
runner at low concurrency still exchanges large batches. Buffered tasks never started go back
to the queue at stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs

from .. import _json
from ..clock import format_seconds, utc_datetime
from ..context import CancelFlag, Context, attempt_label
from ..dsl import Flow, distinct_flows
from ..errors import PgflowError, StepTimeout, StoreError
from ..store import ClaimedTask, RunFailure, Store, TaskFailure, TaskSuccess
from ..telemetry import AttemptInfo, Telemetry
from ..telemetry import Outcome as TelemetryOutcome
from .attempt import (
    DROPPED,
    Attempt,
    Completed,
    Failed,
    Outcome,
    attempt,
    error_text,
    failure_record,
    traceback_text,
)
from .executor import StepRuntime, call_hook
from .hooks import DeadCall, DeadHooks
from .loader import step_runtimes
from .outbox import Outbox
from .scheduler import CronScheduler
from .threads import HandlerThreads

__all__ = ("Runner", "RunnerStats")

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


@attrs.define(slots=True)
class _Counts:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    cancelled: int = 0

    def stats(self) -> RunnerStats:
        return RunnerStats(**attrs.asdict(self))


_UNSERVED_AFTER = 60.0  # seconds a queued run may wait before its flow is said to be unserved
_UNSERVED_EVERY = 60.0
_TIMEOUT_GRAIN = 0.005  # seconds: attempts whose timeouts end this close share one loop timer
_PEEK = 0.05  # seconds between looks at whether another process wrote to the store
# Prefetch (see _Prefetch): only attempts shorter than an exchange and than _SHORT_ATTEMPT are
# buffered for. The buffer tops an exchange up to about _BATCH tasks: at most
# max(_BATCH - concurrency, concurrency // 4) tasks, never more than _BUFFER_CAP. Measured on
# PostgreSQL (no-op jobs, one worker at concurrency 10): batches of 20 drain 5,200-7,500 jobs/s,
# of 74 9,200-15,400, of 126 9,500-12,000; at concurrency 100, batches of 100 and of 200 drain
# alike. Past about 100 a batch costs the same per task, and only holds tasks longer.
_SHORT_ATTEMPT = 0.005  # seconds; longer, the engine's tens of µs per attempt hardly matter
_BATCH = 100
_BUFFER_CAP = 256
_RESULTS_WINDOW = (0.001, 0.02)  # bounds of the wait for results while the buffer is full
_WINDOW_EXCHANGES = 2.0  # within those bounds, results wait about this many exchanges' time
_SMOOTHING = 0.1  # weight of the newest sample in the moving averages


class _Listening(Protocol):
    """A backend's wake-ups from other processes (PostgreSQL's LISTEN connection)."""

    @property
    def connected(self) -> bool: ...

    def close(self, wait: float = ...) -> None: ...


class _Prefetch:
    """How many tasks to claim ahead of the workers: moving averages of the attempts' duration
    and of an exchange's, both in seconds of loop time.

    Claiming ahead pays only when attempts are shorter than an exchange: then workers would
    otherwise wait for the dispatcher, and with a buffer a worker that finishes takes its next
    task at once while each exchange carries more results and claims. The buffer holds what
    the workers get through in about one exchange's time (so a buffered task waits less than
    that), growing as attempts get shorter; nothing is buffered once attempts take as long as
    an exchange, or _SHORT_ATTEMPT (then claiming ahead would only hold tasks that other
    workers could run now, and would gain little).
    """

    __slots__ = ("attempt", "cap", "concurrency", "exchange")

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.cap = min(max(_BATCH - concurrency, concurrency // 4, 1), _BUFFER_CAP)
        self.attempt = math.inf  # no prefetch before attempts were seen
        self.exchange = 0.001

    def attempt_took(self, seconds: float) -> None:
        if self.attempt == math.inf:
            self.attempt = seconds
        else:
            self.attempt += (seconds - self.attempt) * _SMOOTHING

    def exchange_took(self, seconds: float) -> None:
        self.exchange += (seconds - self.exchange) * _SMOOTHING

    def target(self) -> int:
        """Tasks to hold in the buffer now (0: claim for idle workers only)."""
        if self.attempt >= min(self.exchange, _SHORT_ATTEMPT):
            return 0
        ratio = self.exchange / max(self.attempt, 1e-6)
        return min(self.cap, int(self.concurrency * (ratio - 1)))

    def window(self) -> float:
        """How long results may wait while the buffer is still over half full."""
        low, high = _RESULTS_WINDOW
        return min(max(_WINDOW_EXCHANGES * self.exchange, low), high)


class Runner:
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
        telemetry: Telemetry | None = None,
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
        self.counts = _Counts()
        # Throughput: per flow, [tasks completed, attempts failed] since the dispatcher's last
        # pass, which read the minute (a pass follows each attempt within about a millisecond:
        # the attempts add to a dict, and never read the clock). Each pass that finds a new
        # minute folds them into the tally by (flow slug, minute), which heartbeats add to the
        # store's throughput.
        self._counted: collections.defaultdict[str, list[int]] = _new_counted()
        self._minute = int(self.clock.now() // 60)
        self._tally: dict[tuple[str, int], list[int]] = {}
        self._flush_due = 0.0  # loop time of the next throughput flush
        self._outbox = Outbox()
        self._dead = DeadHooks()
        self._in_flight = 0
        self._running: dict[int, Attempt] = {}
        self._to_release: list[int] = []  # tasks of a flow that changed shape elsewhere
        self._beat_interval = lease / 3
        self._next_beat = 0.0  # 0 when something must be looked at now
        self._beat_due: float | None = None  # when the regular heartbeat is due
        self._stopping = False
        self._stop_deadline = math.inf
        self._shutdown_flag = CancelFlag()  # what handlers see as ctx.shutting_down
        self._debug = log.isEnabledFor(logging.DEBUG)  # looked at again at each heartbeat
        self._telemetry = telemetry
        self._telemetry_failed = False
        self._next_unserved_check = 0.0  # at the first pass, then every _UNSERVED_EVERY
        self._pause = 0.005  # adaptive poll for work from other processes
        self._must_claim = True
        self._tg: anyio.abc.TaskGroup
        self._loop: asyncio.AbstractEventLoop
        # Idle workers wait on these futures; the dispatcher hands each a task directly, or
        # leaves it in _ready when no worker is waiting yet.
        self._idle: list[asyncio.Future[ClaimedTask | None]] = []
        # Claimed tasks no worker has started yet: the prefetch buffer (see _Prefetch), counted
        # in _in_flight, leased like running tasks.
        self._ready: collections.deque[ClaimedTask] = collections.deque()
        self._prefetch = _Prefetch(concurrency)
        # Runs with a failure for good not written yet: their buffered tasks do not start, and
        # go back to the queue just before it is written, so that if the run fails they are
        # cancelled as queued tasks are (never started, no attempt counted).
        self._failing_runs: set[str] = set()
        self._closing = False
        # Attempts by the end of their timeout, rounded up to _TIMEOUT_GRAIN: one loop timer per
        # bucket rather than one per attempt.
        self._timeouts: dict[float, set[Attempt]] = {}
        self._wake = asyncio.Event()
        self._listener: _Listening | None = None
        # Sync handlers' threads; one abandoned at a timeout no longer counts toward the pool.
        self._threads = HandlerThreads(concurrency)

    # --- control -------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping

    def stop(self) -> None:
        """Stop claiming; running tasks finish (up to the shutdown timeout)."""
        if not self._stopping:
            self._stopping = True
            self._shutdown_flag.set()
            # The loop's clock is time.monotonic(); the deadline holds whatever the store does.
            self._stop_deadline = time.monotonic() + self.shutdown_timeout
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

        served = frozenset(self.flow_slugs)

        def wake_from_elsewhere(flow_slugs: frozenset[str] | None) -> None:
            if flow_slugs is None or not flow_slugs.isdisjoint(served):
                wake_from_anywhere("started")

        self.store.add_listener(wake_from_anywhere)
        listen = getattr(self.backend, "listen", None)  # PostgreSQL only
        try:
            if listen is not None and not self.until_idle:
                self._listener = listen(wake_from_elsewhere)
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
                        for running in self._running.values():
                            running.flag.set()
                        tg.cancel_scope.cancel()
            if self._outbox and not self._past_stop_deadline():
                with contextlib.suppress(StoreError):  # logged below, with what is left
                    self._exchange(0)
            for call in self._dead.take():
                await call_hook("on_dead", *call)
        finally:
            self.store.remove_listener(wake_from_anywhere)
            if self._listener is not None:
                self._listener.close()
            self._threads.close()
            try:
                self._flush_throughput(final=True)  # first: it cannot raise
                if self._outbox:
                    self._exchange(0)
                # Whatever is still leased to this runner goes back to the queue.
                self.backend.release(self.worker_id, None)
                self.backend.forget_worker(self.worker_id)
            except Exception as exc:  # the database is failing: leases expire on their own
                log.error(
                    "could not record %d result(s) and release this worker's tasks before "
                    "stopping (%s); they run again once their leases expire", len(self._outbox), exc,
                )
        return self.counts.stats()

    def _past_stop_deadline(self) -> bool:
        return self._stopping and time.monotonic() >= self._stop_deadline

    def _housekeeping(self) -> None:
        """Start due ``on_dead`` hooks, renew leases, start due cron ticks."""
        minute = int(self.clock.now() // 60)
        if minute != self._minute:
            self._fold_counted()
            self._minute = minute
        if self._dead:
            for call in self._dead.take():
                self._tg.start_soon(call_hook, "on_dead", *call)
        if self._to_release:
            self.backend.release(self.worker_id, self._to_release)
            self._to_release = []
        if self._loop.time() >= self._next_beat:
            self._beat()
        cron_at = self.cron.next_at
        if cron_at is not None and cron_at <= self.clock.now() and not self._stopping:
            self.cron.start_due()
        if self._loop.time() >= self._next_unserved_check:
            self._next_unserved_check = self._loop.time() + _UNSERVED_EVERY
            self._warn_unserved()

    def _warn_unserved(self) -> None:
        """Say which flows have runs waiting that no live worker serves: a run of a flow no
        worker imports stays queued forever, and nothing else would say so."""
        for slug, waited in self.backend.unserved(_UNSERVED_AFTER):
            log.warning(
                "flow %r has runs queued for %s that no live worker serves: start a worker "
                "with the module that defines it (pgflow worker MODULE), or cancel them",
                slug, format_seconds(waited),
            )

    def _beat(self) -> None:
        """Renew leases, stop attempts whose task was taken away, reclaim expired leases."""
        now = self._loop.time()
        if self._beat_due is not None and now - self._beat_due > self.lease / 3:
            log.warning(
                "the heartbeat ran %.1fs late (lease %gs): the event loop was blocked, by an "
                "async handler doing blocking work, a sync handler holding the GIL in C code, "
                "or a slow database; past the lease, another worker takes these tasks and runs "
                "them again. Use isolation=\"process\" for such handlers, or a longer --lease",
                now - self._beat_due, self.lease,
            )
        self._next_beat = self._beat_due = now + self._beat_interval
        self._debug = log.isEnabledFor(logging.DEBUG)
        # Buffered tasks are leased as running ones are: their leases are renewed too.
        held = [*self._running, *(task.id for task in self._ready)]
        lost = self.backend.heartbeat(self.worker_id, self.flow_slugs, held, self.lease)
        if lost:
            self._drop_lost(lost)
        failed_runs: list[RunFailure] = []
        self.backend.reclaim_expired(self.flow_slugs, failed_runs)
        self.counts.failed += len(failed_runs)
        self._runs_failed(failed_runs, {})
        if (self._tally or self._counted) and now >= self._flush_due:
            # At the regular beats only, not at each early one (runs failing call for those).
            self._flush_due = now + self._beat_interval
            self._flush_throughput()

    def _drop_lost(self, lost: list[int]) -> None:
        """Stop the attempts of tasks this runner no longer holds (run cancelled or failed,
        lease reclaimed); drop those still in the buffer, which never run."""
        gone = set(lost)
        for task_id in lost:
            running = self._running.get(task_id)
            if running is not None:
                running.stop("cancel")
        dropped = self._drop_buffered(lambda task: task.id in gone)
        if dropped:
            log.info("%d claimed task(s) not started yet were taken away (run cancelled or "
                     "failed, or lease lost); not run here", dropped)

    def _drop_buffered(self, gone: Callable[[ClaimedTask], bool]) -> int:
        """Remove the buffered tasks ``gone`` says the store took away; return how many."""
        kept = [task for task in self._ready if not gone(task)]
        dropped = len(self._ready) - len(kept)
        if dropped:
            self._ready = collections.deque(kept)
            self._in_flight -= dropped
        return dropped

    def _next_ready(self) -> ClaimedTask | None:
        """Take the first buffered task that may start: not one of a run with a failure for
        good still being written (the store may cancel it)."""
        if not self._failing_runs:
            return self._ready.popleft()
        for i, task in enumerate(self._ready):
            if task.run_id not in self._failing_runs:
                del self._ready[i]
                return task
        return None

    def _hand_out(self) -> None:
        """Give buffered tasks to idle workers."""
        while self._idle and self._ready and not self._stopping:
            task = self._next_ready()
            if task is None:
                return
            self._idle.pop().set_result(task)

    def _fold_counted(self) -> None:
        """Move the counts since the last pass into the tally, under the current minute."""
        for slug, (completed, failed) in self._counted.items():
            counts = self._tally.setdefault((slug, self._minute), [0, 0])
            counts[0] += completed
            counts[1] += failed
        self._counted = _new_counted()

    def _flush_throughput(self, final: bool = False) -> None:
        """Add the tally to the store's throughput. Should the store fail, the tally is kept
        for the next beat (and the runner serves on); at the end, it is logged as lost."""
        self._fold_counted()
        if not self._tally:
            return
        rows = [(slug, minute, n[0], n[1]) for (slug, minute), n in self._tally.items()]
        try:
            self.backend.add_throughput(rows)
        except Exception as exc:
            lost = "; these counts are lost" if final else ", retrying at the next heartbeat"
            log.log(
                logging.WARNING if isinstance(exc, StoreError) else logging.ERROR,
                "could not record the throughput of %d flow-minute(s) (%s)%s",
                len(rows), exc, lost, exc_info=not isinstance(exc, StoreError),
            )
            return
        self._tally = {}

    async def _dispatch(self) -> None:
        backoff = 0.05
        while True:
            try:
                if await self._dispatch_once():
                    return
                backoff = 0.05
            except Exception as exc:
                if self._stopping and self._stop_reached():
                    return
                # Back off instead of spinning; unrecorded results are kept and retried.
                if isinstance(exc, StoreError):
                    log.error("database error, retrying in %.2gs: %s", backoff, exc)
                else:
                    log.exception("unexpected error in the runner, retrying in %.2gs", backoff)
                await self._wait(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _dispatch_once(self) -> bool:
        """One pass: housekeeping, then record results and claim, then wait. True means stop."""
        self._wake.clear()
        if self._stopping and self._stop_reached():
            return True
        self._housekeeping()
        if self._stopping:
            await self._drain_for_stop()
            return False
        done, due = await self._claim_pass()
        return False if done else await self._idle_wait(due)

    def _stop_reached(self) -> bool:
        """While stopping: whether nothing runs and every result is written, or the shutdown
        timeout has passed."""
        if not (self._in_flight or self._outbox):
            return True
        if not self._past_stop_deadline():
            return False
        if self._in_flight:
            log.warning("shutdown timeout: cancelling %d running task(s)", self._in_flight)
        return True

    async def _drain_for_stop(self) -> None:
        if self._outbox:
            self._exchange(0)
        if self._ready:
            # Claimed ahead, never started: back to the queue for other workers, no attempt
            # counted (released at the next housekeeping should the store fail now).
            self._to_release += [task.id for task in self._ready]
            self._in_flight -= len(self._ready)
            self._ready.clear()
            self.backend.release(self.worker_id, self._to_release)
            self._to_release = []
        if self._in_flight:
            await self._wait(self._stop_deadline - time.monotonic())

    async def _claim_pass(self) -> tuple[bool, float | None]:
        """Record the results gathered and claim tasks for idle workers and the buffer, in one
        transaction.

        Returns whether this pass is over (it has waited already) and, when it read it, when
        the next queued task is due.
        """
        target = self._prefetch.target()
        # Idle workers, and room in the buffer; while it is over half full, only idle workers
        # (there are none then) or results waiting past their window call for an exchange.
        want = max(self.concurrency + target - self._in_flight, 0)  # the target may have shrunk
        full = self.concurrency + target // 2
        due: float | None = None
        if want and not (self._must_claim or self._outbox):
            # Nothing new from this process: a cheap read tells whether anything (perhaps
            # started by another process) is due, before taking the write lock to claim.
            due = self.backend.next_due(self.flow_slugs)
            if due is None or due > self.clock.now():
                want = 0
        if want or self._outbox:
            claimed = self._exchange(want)
            due = None  # the results may have queued tasks (retries, next steps)
            if want:
                # A full batch may leave more behind; otherwise ask again next time.
                self._must_claim = len(claimed) == want
            if claimed:
                self._pause = 0.005
                self._in_flight += len(claimed)
                self._ready.extend(claimed)
                self._hand_out()
                if self._in_flight < self.concurrency:
                    await anyio.sleep(0)  # let workers start, then look again
                    return True, None
        if self._in_flight >= full:
            # Every worker is busy (and the buffer over half full): results (or the next
            # heartbeat) wake us.
            await self._wait(self._next_beat - self._loop.time())
            await self._gather_results(target)
            return True, None
        return False, due

    async def _idle_wait(self, due: float | None) -> bool:
        """Some workers are idle and nothing was claimed: wait for work. True means stop."""
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
        ``_pause`` (growing while nothing happens) return anyway, to look for due tasks.
        While a LISTEN connection is up, another process's commit that queues work wakes us
        itself, and the counter is not read."""
        listening = self._listener is not None and self._listener.connected
        seen = None if listening else self.backend.data_version()
        end = self._loop.time() + self._pause
        self._pause = min(self._pause * 2, self.poll_interval)
        while (left := end - self._loop.time()) > 0 and self._loop.time() < self._next_beat:
            await self._wait(min(left, _PEEK))
            if self._wake.is_set() or (
                seen is not None and self.backend.data_version() != seen
            ):
                self._pause = 0.005  # something changed: look again soon after
                return

    async def _gather_results(self, target: int) -> None:
        """Give other busy workers a moment to finish, so results are written in batches.

        Without a buffer: until half the workers are idle, or for ``batch_window``. With one
        (``target`` tasks): until it is half empty, or the window of :class:`_Prefetch` (a
        few exchanges' time) has passed, so how many results a write carries does not depend
        on the concurrency.
        """
        if target:
            window = self._loop.time() + self._prefetch.window()
            enough = self.concurrency + target // 2  # the buffer half empty: time to refill
        else:
            window = self._loop.time() + self.batch_window
            enough = self.concurrency - self.batch_size + 1
        # (With a buffer, an idle worker means its tasks wait for results being written.)
        while (
            self._in_flight >= enough
            and not (target and self._idle)
            and self._loop.time() < window
        ):
            self._wake.clear()
            await self._wait(window - self._loop.time())

    async def _wait(self, timeout: float) -> None:
        now = self._loop.time()
        timeout = min(timeout, self._next_beat - now, self._stop_deadline - now)
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

    # --- recording results ---------------------------------------------------------------------

    def _exchange(self, claim: int) -> list[ClaimedTask]:
        """Record the results gathered so far and claim up to ``claim`` tasks: one transaction."""
        if self._failing_runs:
            self._release_failing()
        successes, failures = self._outbox.take()
        failed_runs: list[RunFailure] = []
        began = self._loop.time()
        try:
            finished, claimed = self.backend.finish_and_claim(
                successes, failures, failed_runs, self.worker_id, self.flow_slugs, claim,
                self.lease,
            )
            self._prefetch.exchange_took(self._loop.time() - began)
        except StoreError:
            self._outbox.put_back(successes, failures)
            raise
        except Exception:
            # Not the database failing, but a result it cannot take (or a fault of ours): write
            # them one at a time, so that only the result at fault fails.
            log.exception(
                "could not record a batch of %d result(s); recording them one by one",
                len(successes) + len(failures),
            )
            failed_runs = []
            finished = self._finish_one_by_one(successes, failures, failed_runs)
            claimed = []
            self._must_claim = True
        if finished:
            self.store.notify_finished()
        self._runs_failed(failed_runs, self._dead.recorded(failures))
        if not self._outbox.failures:
            self._failing_runs.clear()
        return claimed

    def _release_failing(self) -> None:
        """Put the buffered tasks of runs about to fail back in the queue (see __init__)."""
        held = [task for task in self._ready if task.run_id in self._failing_runs]
        if held:
            self.backend.release(self.worker_id, [task.id for task in held])
            gone = {task.id for task in held}
            self._drop_buffered(lambda task: task.id in gone)

    def _finish_one_by_one(
        self, successes: list[TaskSuccess], failures: list[TaskFailure],
        failed_runs: list[RunFailure],
    ) -> list[str]:
        finished: list[str] = []
        results: list[TaskSuccess | TaskFailure] = [*successes, *failures]
        for i, result in enumerate(results):
            try:
                try:
                    if isinstance(result, TaskSuccess):
                        finished += self.backend.finish([result], [], failed_runs)
                    else:
                        finished += self.backend.finish([], [result], failed_runs)
                except StoreError:
                    raise
                except Exception as exc:
                    log.exception("could not record the result of task %d", result.task_id)
                    if isinstance(result, TaskSuccess):
                        self.counts.completed -= 1
                        self.counts.failed += 1
                    finished += self.backend.finish([], [TaskFailure(
                        result.task_id, result.attempt,
                        _json.printable(f"{error_text(exc)} (recording this attempt's result)"),
                        None, result.claim,
                    )], failed_runs)
            except StoreError:
                rest = results[i:]
                self._outbox.put_back(
                    [r for r in rest if isinstance(r, TaskSuccess)],
                    [r for r in rest if isinstance(r, TaskFailure)],
                )
                break
            except Exception:
                # Left leased: its lease expires and the task is retried as a lost attempt.
                log.exception("could not record a failure for task %d either", result.task_id)
        return finished

    def _runs_failed(
        self, failed_runs: list[RunFailure], dying: dict[tuple[int, int], DeadCall]
    ) -> None:
        """Stop the failed runs' other attempts and call ``on_dead`` once for each."""
        if failed_runs:
            self._next_beat = 0.0  # their other running attempts must stop now
            if self._ready:  # and their buffered tasks, cancelled with the run, never start
                failed = {failure.run_id for failure in failed_runs}
                self._drop_buffered(lambda task: task.run_id in failed)
        for failure in failed_runs:
            key = None if failure.task_id is None else (failure.task_id, failure.attempt)
            call = dying.get(key) if key is not None else None
            if call is None:
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
                call = (step.on_dead, ctx, PgflowError(failure.error))
            self._dead.run_failed(key, call)

    # --- workers -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            # At stop, the buffer goes back to the queue.
            task = self._next_ready() if self._ready and not self._stopping else None
            if task is None:
                idle: asyncio.Future[ClaimedTask | None] = self._loop.create_future()
                self._idle.append(idle)
                task = await idle
                if task is None:
                    return
            handle = Attempt(me)
            try:
                await self._execute(task, handle)
            except asyncio.CancelledError:
                raise  # the runner's own: attempt() turns a handler's into an outcome
            except BaseException as exc:
                self._fault(task, handle, exc)
            finally:
                self._in_flight -= 1
                self._wake.set()

    def _watch(self, handle: Attempt, timeout: float) -> None:
        """Stop ``handle``'s attempt once ``timeout`` has passed (at most _TIMEOUT_GRAIN late)."""
        due = math.ceil((self._loop.time() + timeout) / _TIMEOUT_GRAIN) * _TIMEOUT_GRAIN
        handle.due = due
        bucket = self._timeouts.get(due)
        if bucket is None:
            bucket = self._timeouts[due] = set()
            self._loop.call_at(due, self._time_out, due)
        bucket.add(handle)

    def _time_out(self, due: float) -> None:
        for handle in self._timeouts.pop(due):
            handle.stop("timeout")

    def _context(self, task: ClaimedTask, step: StepRuntime, handle: Attempt) -> Context:
        return Context(
            run_id=task.run_id,
            flow_slug=task.flow_slug,
            step_slug=task.step_slug,
            task_index=task.task_index,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            flow_input=task.flow_input,
            resources=self.resources,
            deadline=utc_datetime(time.time() + step.options.timeout),
            cancel_flag=handle.flag,
            shutdown_flag=self._shutdown_flag,
        )

    async def _execute(self, task: ClaimedTask, handle: Attempt) -> None:
        """Run one attempt of ``task`` and record its outcome."""
        if task.flow_version != self.versions[task.flow_slug]:
            self._outdated(task)
            return
        step = self.steps[(task.flow_slug, task.step_slug)]
        ctx = self._context(task, step, handle)
        debug = self._debug
        telemetry = self._telemetry
        if debug or telemetry is not None:
            started = time.perf_counter()
            if debug:
                log.debug("%s: started", _label(task), extra=_ids(task))
            if telemetry is not None:
                info = AttemptInfo(
                    task.flow_slug, task.step_slug, task.task_index, task.run_id, task.attempt,
                    task.max_attempts, self.worker_id, task.trace_context,
                )
                token = self._instrument(telemetry.attempt_started, info)
        # The timeout counts from here, not from the claim (the task may have been buffered).
        began = self._loop.time()
        self._watch(handle, step.options.timeout)
        self._running[task.id] = handle
        try:
            outcome: Outcome = await attempt(step, task, ctx, handle, self._threads)
        finally:
            bucket = self._timeouts.get(handle.due)
            if bucket is not None:  # None once its timer has fired
                bucket.discard(handle)
            del self._running[task.id]
            self._prefetch.attempt_took(self._loop.time() - began)
        error: str | None = None
        failed: Failed | None = None
        if type(outcome) is Completed:
            self.counts.completed += 1
            self._counted[task.flow_slug][0] += 1
            handle.recorded = True
            self._outbox.successes.append(TaskSuccess(
                task.id, task.attempt, outcome.output_json, task.run_id, task.step_slug,
                step.is_job, task.claim, task.started_at,
            ))
            ended: TelemetryOutcome = "completed"
            if debug:
                log.debug("%s: completed in %.1f ms", _label(task),
                          (time.perf_counter() - started) * 1000, extra=_ids(task))
        elif outcome is DROPPED:
            # The task was cancelled, its run failed, or its lease was lost: nothing to record.
            self.counts.cancelled += 1
            handle.recorded = True
            ended = "cancelled"
            if debug:
                log.debug("%s: stopped (run cancelled or failed, or lease lost); not recorded",
                          _label(task), extra=_ids(task))
        else:
            assert isinstance(outcome, Failed)
            failed = outcome
            will_retry, error = self._record_failure(step, task, handle, failed)
            ended = "retried" if will_retry else "failed"
        if telemetry is not None:
            self._instrument(
                telemetry.attempt_ended, token, info, ended, time.perf_counter() - started, error
            )
        if failed is not None:
            await self._hooks(step, task, ctx, failed, ended == "retried")

    def _instrument(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except Exception:
            if not self._telemetry_failed:  # once: it would fail for every attempt
                self._telemetry_failed = True
                log.exception("telemetry %r raised; ignored", method)
            return None

    def _outdated(self, task: ClaimedTask) -> None:
        """Another process deployed a new shape of this flow: hand its tasks back, stop serving it."""
        self._to_release.append(task.id)
        self._wake.set()
        if task.flow_slug in self.flow_slugs:
            self.flow_slugs = [s for s in self.flow_slugs if s != task.flow_slug]
            log.error(
                "flow %r changed shape in the store (version %d; this runner has version %d): "
                "no longer serving it here; restart this runner with the current code",
                task.flow_slug, task.flow_version, self.versions[task.flow_slug],
            )

    def _record_failure(
        self, step: StepRuntime, task: ClaimedTask, handle: Attempt, failed: Failed
    ) -> tuple[bool, str]:
        """Count and log a failed attempt and put its record in the outbox; return whether it
        will be retried, and its error as recorded."""
        try:
            record, delay = failure_record(step, task, failed, self.clock.now())
        except Exception as exc:  # the retry policy could not be applied: fail for good
            log.exception("could not work out the retry of task %d", task.id)
            record = TaskFailure(
                task.id, task.attempt, error_text(exc), None, task.claim, traceback_text(exc)
            )
            delay = None
        if isinstance(failed.error, StepTimeout):
            self.counts.timed_out += 1
        self._counted[task.flow_slug][1] += 1
        # The traceback at every failed attempt, not only the last: that is when it is looked
        # for. Timeouts and deliberate permanent failures have none worth reading.
        exc_info = (
            None if failed.permanent or isinstance(failed.error, StepTimeout) else failed.error
        )
        if delay is None and self._ready:
            self._failing_runs.add(task.run_id)  # hold its run's buffered tasks (see __init__)
        if delay is not None:
            self.counts.retried += 1
            log.warning("%s: failed, retrying in %.3gs: %s", _label(task), delay, record.error,
                        exc_info=exc_info, extra=_ids(task))
        else:
            self.counts.failed += 1
            log.warning("%s: failed for good: %s", _label(task), record.error, exc_info=exc_info,
                        extra=_ids(task))
        handle.recorded = True
        self._outbox.failures.append(record)
        self._wake.set()
        return delay is not None, record.error

    async def _hooks(
        self, step: StepRuntime, task: ClaimedTask, ctx: Context, failed: Failed, will_retry: bool
    ) -> None:
        """Run the failure hooks of a failed attempt, whose record is in the outbox already."""
        if step.on_failure is None and step.on_dead is None:
            return
        key = (task.id, task.attempt)
        hook_ctx = attrs.evolve(ctx, will_retry=will_retry)
        if step.on_dead is not None and not will_retry:
            # Called once the store says this failure is the one that failed the run.
            self._dead.expect(key, (step.on_dead, hook_ctx, failed.error))
        if step.on_failure is not None:
            # The failure is recorded before the hook runs: a slow hook must not hold the task.
            self._dead.hook_started(key)
            try:
                await call_hook("on_failure", step.on_failure, hook_ctx, failed.error)
            finally:
                if self._dead.hook_ended(key):
                    self._wake.set()

    def _fault(self, task: ClaimedTask, handle: Attempt, exc: BaseException) -> None:
        """Something failed around the attempt (building its context, recording its outcome):
        the attempt fails with that error, and the runner serves on."""
        log.error("%s: unexpected error around the attempt", _label(task), exc_info=exc)
        if handle.recorded:
            return
        step = self.steps.get((task.flow_slug, task.step_slug))
        failed = Failed(exc)
        if step is None:
            self.counts.failed += 1
            self._counted[task.flow_slug][1] += 1
            self._outbox.failures.append(
                TaskFailure(
                    task.id, task.attempt, error_text(exc), None, task.claim, traceback_text(exc)
                )
            )
            self._wake.set()
        else:
            self._record_failure(step, task, handle, failed)


def _new_counted() -> collections.defaultdict[str, list[int]]:
    return collections.defaultdict(lambda: [0, 0])


def _label(task: ClaimedTask) -> str:
    return attempt_label(
        task.flow_slug, task.step_slug, task.task_index, task.run_id, task.attempt,
        task.max_attempts,
    )


def _ids(task: ClaimedTask) -> dict[str, Any]:
    """The attempt's ids as log record attributes (``--log-format json`` shows them)."""
    return {
        "run_id": task.run_id, "flow_slug": task.flow_slug, "step_slug": task.step_slug,
        "task_index": task.task_index, "attempt": task.attempt,
        "max_attempts": task.max_attempts,
    }


def _steps_for(
    flows: Sequence[Flow], store: Store, versions: dict[str, int]
) -> dict[tuple[str, str], StepRuntime]:
    steps: dict[tuple[str, str], StepRuntime] = {}
    for flow in flows:
        if not isinstance(flow, Flow):
            raise TypeError(f"run_flows takes pf.Job / pf.Flow objects, got {flow!r}")
    for flow in distinct_flows(flows):
        versions[flow.slug] = store.register(flow)
        for runtime in step_runtimes(flow):
            steps[(runtime.flow_slug, runtime.step_slug)] = runtime
    return steps
