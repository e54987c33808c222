"""Calling handlers (in this thread, a worker thread or a child process) and failure hooks."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from ..context import Context
from ..definition import EffectiveOptions
from ..dsl import Hook, import_path
from ..errors import IsolatedError, PermanentFailure, Retry
from ..payloads import Payloads
from .threads import HandlerThreads

__all__ = ("StepRuntime", "StoredOutput", "UnfitInput", "UnstorableOutput", "call_hook", "run_attempt")

log = logging.getLogger("pgflow_py.runner")


@attrs.frozen
class StepRuntime:
    """What the runner needs to execute a step: its handler, options and the flow's hooks."""

    flow_slug: str
    step_slug: str
    handler: Callable[..., Any]
    options: EffectiveOptions
    on_failure: Hook | None = None
    on_dead: Hook | None = None
    is_job: bool = False
    payloads: Payloads | None = None  # a typed handler's: structured in the attempt (or child)
    is_async: bool = attrs.field(init=False)

    @is_async.default
    def _is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


class StoredOutput:
    """An output already encoded as the store keeps it (by a child process)."""

    __slots__ = ("json",)

    def __init__(self, json: str) -> None:
        self.json = json


class UnstorableOutput(TypeError):
    """A child process's handler returned a value the store cannot keep."""


class UnfitInput(IsolatedError):
    """A child process's input did not fit its handler's annotation (a permanent failure)."""


async def run_attempt(step: StepRuntime, value: Any, ctx: Context, threads: HandlerThreads) -> Any:
    """Run a sync handler once; the caller cancels it at the timeout (async handlers are
    awaited directly by :func:`.attempt.attempt`).

    The handler runs in a worker thread that is abandoned at the deadline: the attempt fails
    then, though Python cannot stop the thread. With ``isolation="process"`` it runs in a child
    process, killed at the deadline.
    """
    if step.options.isolation == "process":
        return await _run_in_child(step, value, ctx)
    result = await threads.run(step.handler, value, ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _run_in_child(step: StepRuntime, value: Any, ctx: Context) -> Any:
    """Run a sync handler in a child process, killed if this attempt is cancelled or times out."""
    payload = json.dumps({
        "handler": import_path(step.handler),
        "input": value,
        "ctx": {
            "run_id": ctx.run_id, "flow_slug": ctx.flow_slug, "step_slug": ctx.step_slug,
            "task_index": ctx.task_index, "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts, "flow_input": ctx.flow_input,
            "deadline": ctx.deadline.isoformat() if ctx.deadline else None,
        },
    }).encode()
    # The child imports the handler by path, so it needs this process's import path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = await anyio.open_process(
        [sys.executable, "-m", "pgflow_py.runtime.child"], stderr=None, env=env
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send(payload)
        await process.stdin.aclose()
        chunks = [chunk async for chunk in process.stdout]
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
    if not chunks:
        raise IsolatedError(
            "ChildProcessDied", f"the handler's process exited with code {code} before reporting"
        )
    result = json.loads(b"".join(chunks))
    if result["ok"]:
        return StoredOutput(result["output_json"])
    if result["kind"] == "unstorable":
        raise UnstorableOutput(result["message"])
    if result["kind"] == "permanent":
        raise PermanentFailure(result["message"])
    if result["kind"] == "input":
        raise UnfitInput("InputError", result["message"], result.get("traceback"))
    if result["kind"] == "retry":
        raise Retry(result["delay"], result["message"])
    raise IsolatedError(result["type"], result["message"], result.get("traceback"))


async def call_hook(name: str, hook: Hook, ctx: Context, error: BaseException) -> None:
    """Run a failure hook; its own exceptions are logged and change nothing."""
    try:
        if inspect.iscoroutinefunction(hook):
            await hook(ctx, error)
        else:
            result = await anyio.to_thread.run_sync(hook, ctx, error)
            if inspect.isawaitable(result):
                await result
    except asyncio.CancelledError:
        raise
    except BaseException:  # SystemExit too: a hook's failure is its own, never the runner's
        log.exception(
            "%s hook of %s.%s raised (run %s, attempt %d); ignored",
            name, ctx.flow_slug, ctx.step_slug, ctx.run_id, ctx.attempt,
        )
