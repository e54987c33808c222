"""One attempt of one task: run the handler, classify what happened, build the record.

:func:`attempt` never raises for anything the handler does (returns, raises, even
``SystemExit``, or values that cannot be stored): it returns one :data:`Outcome`. Only the
runner's own cancellation goes through. :func:`failure_record` turns a failure into what the
store keeps, with the retry policy applied.
"""

from __future__ import annotations

import asyncio
import os
import traceback
from typing import Any, Final

from .. import _json
from ..backoff import retry_delay
from ..context import CancelFlag, Context
from ..errors import InputError, IsolatedError, PermanentFailure, Retry, StepTimeout
from ..store import ClaimedTask, TaskFailure, Undecodable
from .executor import StepRuntime, StoredOutput, UnfitInput, UnstorableOutput, run_attempt
from .threads import HandlerThreads

__all__ = (
    "DROPPED",
    "Attempt",
    "Completed",
    "Dropped",
    "Failed",
    "Outcome",
    "attempt",
    "error_text",
    "failure_record",
    "traceback_text",
)

_uncancel = getattr(asyncio.Task, "uncancel", None)  # Python 3.11+: keep cancel counts balanced


class Attempt:
    """A running attempt, as the runner sees it: the worker running it, and how to stop it."""

    __slots__ = ("due", "flag", "recorded", "stopped", "worker")

    def __init__(self, worker: asyncio.Task[Any]) -> None:
        self.worker = worker
        self.flag = CancelFlag()
        self.stopped: str | None = None
        self.due = 0.0  # its timeout's slot in the runner's timeout buckets
        self.recorded = False  # its outcome is counted (and its result in the outbox)

    def stop(self, why: str) -> None:
        """``"timeout"`` fails the attempt; ``"cancel"`` (run cancelled or failed, lease lost)
        drops it. Async handlers are cancelled; sync ones see ``ctx.cancelled``."""
        if self.stopped is None:
            self.stopped = why
            self.flag.set()
            self.worker.cancel()


class Completed:
    """The handler returned a value the store can keep."""

    __slots__ = ("output_json",)

    def __init__(self, output_json: str) -> None:
        self.output_json = output_json


class Failed:
    """The attempt failed: ``permanent`` ones are not retried whatever attempts are left."""

    __slots__ = ("error", "permanent")

    def __init__(self, error: BaseException, permanent: bool = False) -> None:
        self.error = error
        self.permanent = permanent or isinstance(error, PermanentFailure)


class Dropped:
    """Stopped because its run was cancelled or failed, or its lease was lost: nothing to record."""

    __slots__ = ()


DROPPED: Final = Dropped()
Outcome = Completed | Failed | Dropped
_NULL: Final = Completed("null")


async def attempt(
    step: StepRuntime, task: ClaimedTask, ctx: Context, handle: Attempt, threads: HandlerThreads
) -> Outcome:
    """Run one attempt of ``task`` and say how it ended."""
    output: Any = None
    error: BaseException | None = None
    if type(task.input) is Undecodable or type(task.flow_input) is Undecodable:
        # Written around start's checks (by hand, by an old version): it would never read.
        bad, what = (
            (task.input, "input") if type(task.input) is Undecodable
            else (task.flow_input, "flow input")
        )
        return Failed(PermanentFailure(f"the task's {what} cannot be read: {bad.error}"))
    value = task.input
    payloads = step.payloads
    if payloads is not None and step.options.isolation != "process":  # a child structures its own
        try:
            value = payloads.structure(value)
        except InputError as exc:  # the same input would never fit: no retry
            return Failed(exc, permanent=True)
    try:
        if step.is_async:
            output = await step.handler(value, ctx)
        else:
            output = await run_attempt(step, value, ctx, threads)
    except asyncio.CancelledError as exc:
        if handle.stopped is None:
            if _runner_cancelled(handle.worker):
                raise
            error = exc  # the handler raised it itself
    except BaseException as exc:  # SystemExit and the like too: the handler's, not the runner's
        error = exc
    finally:
        if handle.stopped is not None and _uncancel is not None:
            _uncancel(handle.worker)
    if handle.stopped == "cancel":
        return DROPPED
    if handle.stopped == "timeout":
        return Failed(StepTimeout(
            f"step {step.flow_slug}.{step.step_slug} timed out after {step.options.timeout:g}s "
            f"(attempt {ctx.attempt} of {ctx.max_attempts})"
        ))
    if error is not None:
        if isinstance(error, UnstorableOutput):  # as below, found by a child process
            return Failed(TypeError(str(error)), permanent=True)
        if isinstance(error, UnfitInput):
            return Failed(error, permanent=True)  # as above, found by a child process
        return Failed(error)
    if output is None:
        return _NULL
    if type(output) is StoredOutput:
        return Completed(output.json)
    try:
        if payloads is not None:
            output = payloads.unstructure(output)
        return Completed(_json.dumps(output))
    except Exception as exc:
        # The handler did its work (an e-mail sent is sent): running it again would repeat it.
        return Failed(TypeError(f"{_json.UNSTORABLE_OUTPUT}: {exc}"), permanent=True)


def _runner_cancelled(worker: asyncio.Task[Any]) -> bool:
    cancelling = getattr(worker, "cancelling", None)
    # Before Python 3.11 a cancellation cannot be told from a CancelledError the handler raised.
    return cancelling is None or cancelling() > 0


def error_text(exc: BaseException) -> str:
    """The one-line ``Type: message`` recorded for a failed attempt (lone surrogates escaped)."""
    if isinstance(exc, IsolatedError):
        text = str(exc)  # already "<the child's exception type>: <message>"
    elif isinstance(exc, Retry):
        text = f"Retry: {exc}"
    else:
        message = str(exc)
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return _json.printable(text)


def failure_record(
    step: StepRuntime, task: ClaimedTask, failed: Failed, now: float
) -> tuple[TaskFailure, float | None]:
    """The store's record of a failed attempt, and the delay before the retry (``None``: the
    task failed for good)."""
    exc = failed.error
    delay: float | None = None
    if not failed.permanent and task.attempt < task.max_attempts:
        opts = step.options
        delay = exc.delay if isinstance(exc, Retry) else retry_delay(
            task.attempt, base_delay=opts.base_delay, backoff=opts.backoff,
            max_delay=opts.max_delay, jitter=opts.jitter,
        )
    record = TaskFailure(
        task.id, task.attempt, error_text(exc), None if delay is None else now + delay, task.claim,
        traceback_text(exc),
    )
    return record, delay


def traceback_text(exc: BaseException) -> str | None:
    """The formatted traceback kept with a failed attempt: the child's for an isolated handler;
    none for a timeout (the runner stopped it: its frames say nothing about the handler)."""
    if isinstance(exc, IsolatedError):
        return exc.traceback
    if isinstance(exc, StepTimeout) or exc.__traceback__ is None:
        return None
    report = traceback.TracebackException.from_exception(exc)
    # The runner's own frames lead to every handler: they say nothing about this failure.
    frames = list(report.stack)
    while len(frames) > 1 and frames[0].filename.startswith(_RUNTIME_DIR):
        del frames[0]
    report.stack = traceback.StackSummary.from_list(frames)
    return _json.printable("".join(report.format()))


_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
