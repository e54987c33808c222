"""The runner with OpenTelemetry on: an SDK tracer whose spans go through a batch processor to
an exporter that drops them, and a meter provider whose metrics are read in memory, so the
figure is the cost of making spans and recording metrics, not of shipping them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pgflow_py.telemetry.otel import OpenTelemetry


def telemetry() -> OpenTelemetry:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    return OpenTelemetry(tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
