"""Trace context from the code that starts a run to the run's attempts.

``store.start`` and ``store.start_many`` call :func:`current_context`: when OpenTelemetry is in
use and a span is current (a web request's, say), its W3C trace context is stored with the run,
and :class:`~pgflow_py.telemetry.otel.OpenTelemetry` makes each attempt's span a child of that
span, so the trace runs from the request to the work it queued. Without OpenTelemetry this costs
one dictionary lookup per start: OpenTelemetry is never imported here.
"""

from __future__ import annotations

import json
import sys

__all__ = ("current_context",)


def current_context() -> str | None:
    """The current span's trace context as JSON text (``{"traceparent": "00-…"}``, with
    ``tracestate`` or ``baggage`` if there are any), or ``None``: when OpenTelemetry has not
    been imported by this process, or no valid span is current."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    # A span is current, so OpenTelemetry is in use: its propagation module is loaded by
    # whatever instruments the application, or now (it needs nothing not already installed).
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception:  # a broken propagator must not stop the start: the run goes untraced
        return None
    return json.dumps(carrier, separators=(",", ":")) if carrier else None
