"""OpenTelemetry for pgflow_py attempts (``pip install 'pgflow_py[otel]'``).

    from pgflow_py.telemetry.otel import OpenTelemetry
    pf.run_flows(flows, telemetry=OpenTelemetry())

Each attempt is a span (``pgflow <flow>.<step>``, kind CONSUMER) that is current while the
handler runs, so the handler's own spans are its children. A run started while a span was
current (a web request's, say: see :mod:`pgflow_py.telemetry.propagation`) carries that span's
trace context, and its attempts' spans are children of that span, in the request's trace.
Attributes name the run, flow, step, task index, attempt and outcome; a failed attempt's span
has status ERROR with the recorded error. One metric, ``pgflow.attempt.duration`` (a histogram
in seconds, by flow, step and outcome): its count is the number of attempts, so a separate
counter would only double the cost (about 11 us an attempt with the SDK). The global tracer and
meter providers are used unless others are given.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import AttemptInfo, Outcome

__all__ = ("OpenTelemetry",)

_SCOPE = "pgflow_py"


class OpenTelemetry:
    """A span per attempt, and a histogram of their durations (whose count counts them)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._durations = meter.create_histogram(
            "pgflow.attempt.duration", unit="s", description="How long attempts took"
        )

    def attempt_started(self, attempt: AttemptInfo) -> Any:
        attributes: dict[str, Any] = {
            "pgflow.run_id": attempt.run_id,
            "pgflow.flow": attempt.flow_slug,
            "pgflow.step": attempt.step_slug,
            "pgflow.attempt": attempt.attempt,
            "pgflow.max_attempts": attempt.max_attempts,
            "pgflow.worker_id": attempt.worker_id,
        }
        if attempt.task_index is not None:
            attributes["pgflow.task_index"] = attempt.task_index
        parent = None if attempt.trace_context is None else _extract(attempt.trace_context)
        span = self._tracer.start_span(
            f"pgflow {attempt.flow_slug}.{attempt.step_slug}", kind=SpanKind.CONSUMER,
            attributes=attributes, context=parent,
        )
        # On top of the starter's context (so its baggage reaches the handler too), or else of
        # the current one.
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def attempt_ended(
        self, token: Any, attempt: AttemptInfo, outcome: Outcome, duration: float,
        error: str | None,
    ) -> None:
        span, attached = token
        span.set_attribute("pgflow.outcome", outcome)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        otel_context.detach(attached)
        labels = {
            "pgflow.flow": attempt.flow_slug, "pgflow.step": attempt.step_slug,
            "pgflow.outcome": outcome,
        }
        self._durations.record(duration, labels)


def _extract(trace_context: str) -> otel_context.Context | None:
    """The current context with the span (and baggage) a run was started under, from its
    stored carrier; ``None`` (the current context as it is) if the carrier cannot be read."""
    try:
        carrier = json.loads(trace_context)
    except ValueError:
        return None
    if not isinstance(carrier, dict):
        return None
    return propagate.extract(
        {k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)},
        context=otel_context.get_current(),
    )
