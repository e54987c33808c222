"""The context handed to every handler."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

__all__ = ("Context",)

_handler_logger = logging.getLogger("pgflow_py.handler")


class CancelFlag:
    """A flag the runner raises when an attempt must stop; cheap to create and to check."""

    __slots__ = ("_raised",)

    def __init__(self) -> None:
        self._raised = False

    def set(self) -> None:
        self._raised = True  # a single attribute store: safe across threads

    def is_set(self) -> bool:
        return self._raised


def attempt_label(
    flow_slug: str, step_slug: str, task_index: int | None, run_id: str, attempt: int,
    max_attempts: int,
) -> str:
    """How log lines name an attempt: ``flow.step[index] run <id> attempt n/max``."""
    index = "" if task_index is None else f"[{task_index}]"
    return f"{flow_slug}.{step_slug}{index} run {run_id} attempt {attempt}/{max_attempts}"


class _AttemptLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        ids: Any = self.extra
        label = attempt_label(
            ids["flow_slug"], ids["step_slug"], ids["task_index"], ids["run_id"], ids["attempt"],
            ids["max_attempts"],
        )
        kwargs["extra"] = {**ids, **kwargs.get("extra", {})}
        return f"{label}: {msg}", kwargs


@attrs.frozen(kw_only=True)
class Context:
    """What a handler knows about the attempt it runs in.

    ``resources`` is the runner's mapping (dependency injection); ``deadline`` is when this
    attempt times out (``None`` in ``perform``); ``will_retry`` is set in failure hooks.
    """

    run_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    flow_slug: str
    step_slug: str
    task_index: int | None = None
    attempt: int = 1
    max_attempts: int = 1
    flow_input: Any = None
    resources: Mapping[str, Any] = attrs.field(factory=dict)
    deadline: datetime | None = None
    will_retry: bool = False
    cancel_flag: CancelFlag = attrs.field(factory=CancelFlag, eq=False, repr=False)
    """Raised by the runner when this attempt must stop (run cancelled or failed, lease lost)."""
    shutdown_flag: CancelFlag = attrs.field(factory=CancelFlag, eq=False, repr=False)
    """Raised by the runner when its worker begins a graceful shutdown."""

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger (``pgflow_py.handler``) whose lines begin with this attempt's ids, as the
        runner's own do (``send_email.send[3] run 0192… attempt 2/3: …``), whatever the log
        format; the ids are also record attributes (``record.run_id``, …) for formatters."""
        return _AttemptLogger(
            _handler_logger,
            {
                "run_id": self.run_id,
                "flow_slug": self.flow_slug,
                "step_slug": self.step_slug,
                "task_index": self.task_index,
                "attempt": self.attempt,
                "max_attempts": self.max_attempts,
            },
        )

    @property
    def shutting_down(self) -> bool:
        """Whether the worker began a graceful shutdown: a long-running handler can save its
        progress and return (it has until the shutdown timeout; then it is cancelled and the
        task goes back to the queue)."""
        return self.shutdown_flag.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether this attempt should stop: a cheap check for long-running sync handlers.

        Async handlers are cancelled outright; a sync handler's thread cannot be, so it should
        poll this and return early. Its result is ignored either way.
        """
        return self.cancel_flag.is_set()
