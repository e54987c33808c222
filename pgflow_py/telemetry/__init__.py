"""Instrumentation: what a runner tells your monitoring about each attempt.

Pass an object with two methods as ``run_flows(..., telemetry=...)``:

    class Metrics:
        def attempt_started(self, attempt: pf.telemetry.AttemptInfo) -> object: ...
        def attempt_ended(self, token: object, attempt: pf.telemetry.AttemptInfo,
                          outcome: str, duration: float, error: str | None) -> None: ...

``attempt_started`` is called in the attempt's own context, just before the handler (so a
context variable it sets is seen by the handler, also in a sync handler's thread); whatever it
returns comes back as ``token``. ``outcome`` is ``"completed"``, ``"retried"``, ``"failed"``
(for good) or ``"cancelled"``; ``duration`` is in seconds. An exception in either method is
logged once and changes nothing. Without ``telemetry=`` the runner makes no call at all.

:class:`pgflow_py.telemetry.otel.OpenTelemetry` (``pip install 'pgflow_py[otel]'``) is one such
object: a span per attempt and a histogram of durations.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import attrs

__all__ = ("AttemptInfo", "Outcome", "Telemetry")

Outcome = Literal["completed", "retried", "failed", "cancelled"]


@attrs.frozen(slots=True)
class AttemptInfo:
    """Which attempt: the ids a log line or a span carries."""

    flow_slug: str
    step_slug: str
    task_index: int | None
    run_id: str
    attempt: int
    max_attempts: int
    worker_id: str
    trace_context: str | None = None
    """The W3C trace context (JSON text) of the code that started the run, if it was started
    under a current OpenTelemetry span: the parent its attempts' spans should have."""


class Telemetry(Protocol):
    """What ``run_flows(telemetry=...)`` calls around each attempt."""

    def attempt_started(self, attempt: AttemptInfo) -> Any: ...

    def attempt_ended(
        self, token: Any, attempt: AttemptInfo, outcome: Outcome, duration: float,
        error: str | None,
    ) -> None: ...
