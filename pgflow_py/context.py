"""The context handed to every handler."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

__all__ = ("Context",)

_handler_logger = logging.getLogger("pgflow_py.handler")


def _bound_logger(ctx: Context) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(
        _handler_logger,
        {
            "run_id": ctx.run_id,
            "flow_slug": ctx.flow_slug,
            "step_slug": ctx.step_slug,
            "task_index": ctx.task_index,
            "attempt": ctx.attempt,
        },
    )


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
    logger: logging.LoggerAdapter[logging.Logger] = attrs.field(
        default=attrs.Factory(_bound_logger, takes_self=True), eq=False, repr=False
    )
    cancel_event: threading.Event = attrs.field(factory=threading.Event, eq=False, repr=False)
    """Set by the runner when this attempt must stop (run cancelled or failed, lease lost)."""

    @property
    def cancelled(self) -> bool:
        """Whether this attempt should stop: a cheap check for long-running sync handlers.

        Async handlers are cancelled outright; a sync handler's thread cannot be, so it should
        poll this and return early. Its result is ignored either way.
        """
        return self.cancel_event.is_set()
