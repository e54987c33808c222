"""The threads that run sync handlers: up to a runner's concurrency serve, and one abandoned at
a timeout stops counting, so an attempt that never returns cannot take a slot from later ones.

Lighter than a thread hop through anyio per attempt: a job goes to an idle thread through one
queue, and its result comes back with one ``call_soon_threadsafe``. The threads are daemons: an
abandoned handler does not keep the process alive at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("HandlerThreads",)

_QUEUED, _RUNNING, _DONE, _DROPPED = range(4)
# Seconds a job may wait for a thread before more are started: several of the GIL's 5 ms
# switch intervals, so a busy pool of short jobs does not grow for nothing.
_LATE = 0.02


class _Job:
    __slots__ = ("args", "context", "function", "future", "loop", "queued_at", "state")

    def __init__(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.function = function
        self.args = args
        self.context = contextvars.copy_context()  # as asyncio.to_thread does
        self.loop = loop
        self.future = future
        self.state = _QUEUED
        self.queued_at = loop.time()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the attempt was given up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class HandlerThreads:
    """Up to ``size`` daemon threads running sync handlers for one runner, started as needed."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counts and job states across threads
        self._serving = 0  # threads taking jobs (not counting abandoned ones)
        self._idle = 0  # of which waiting for one
        self._queued = 0  # jobs put and not yet taken
        # Jobs in the order queued (loop thread only), for the check of how long they wait.
        self._pending: collections.deque[_Job] = collections.deque()
        self._checking = False

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    return
                self._queued -= 1
                if job.state == _DROPPED:  # given up before it started
                    continue
                job.state = _RUNNING
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.context.run(job.function, *job.args)
            except BaseException as exc:  # handed to the awaiting attempt
                error = exc
            with self._lock:
                abandoned = job.state == _DROPPED
                job.state = _DONE
            if abandoned:
                return  # no longer counted: another thread serves in its place
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for this result
                return

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on a handler thread. If the caller is cancelled (timeout,
        cancel), the thread is abandoned to finish on its own and a new one takes its place."""
        loop = asyncio.get_running_loop()
        job = _Job(function, args, loop, loop.create_future())
        with self._lock:
            self._queued += 1
            if self._idle == 0 and self._serving < self._size:
                self._start_thread()
        self._pending.append(job)
        if not self._checking:
            self._checking = True
            loop.call_later(_LATE, self._check_waits, loop)
        self._jobs.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._lock:
                if job.state == _RUNNING:
                    self._serving -= 1  # its thread is abandoned to the call
                if job.state in (_QUEUED, _RUNNING):
                    job.state = _DROPPED
            raise

    def _start_thread(self) -> None:
        self._serving += 1
        threading.Thread(target=self._serve, name="pgflow-handler", daemon=True).start()

    def _check_waits(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start threads for jobs that have waited too long. An idle thread may be about to take
        a job queued earlier, so a job can be left waiting for a busy thread to finish its whole
        run (and time out meanwhile). Short jobs are taken in well under _LATE by the threads
        there are: starting one per job instead was measured 2-3 times slower for them."""
        pending = self._pending
        while pending and pending[0].state != _QUEUED:
            pending.popleft()
        if not pending:
            self._checking = False
            return
        since = loop.time() - _LATE
        late = 0
        for job in pending:  # oldest first
            if job.queued_at > since:
                break
            late += job.state == _QUEUED
        if late:
            with self._lock:
                for _ in range(min(late - self._idle, self._size - self._serving)):
                    self._start_thread()
        loop.call_later(_LATE, self._check_waits, loop)

    def close(self) -> None:
        """Let the serving threads end once idle (abandoned ones end when their call returns)."""
        with self._lock:
            for _ in range(self._serving):
                self._jobs.put(None)
            self._serving = 0
