"""What a runner tells monitoring about each attempt: a plain hook, and OpenTelemetry."""

from __future__ import annotations

import contextvars
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _helpers import as_schema_version, drain

import pgflow_py as pf
from pgflow_py.store.sqlite import SCHEMA_VERSION
from pgflow_py.telemetry import AttemptInfo
from pgflow_py.testing import FakeClock

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("current", default=None)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def attempt_started(self, attempt: AttemptInfo) -> Any:
        token = object()
        current.set(f"{attempt.flow_slug}#{attempt.attempt}")
        self.events.append(("started", attempt, token))
        return token

    def attempt_ended(self, token, attempt, outcome, duration, error) -> None:
        self.events.append(("ended", attempt, token, outcome, duration, error))


def test_the_hook_sees_each_attempt_start_and_end_with_its_outcome(tmp_path) -> None:
    seen: list[str | None] = []

    @pf.job(queue="twice", max_attempts=2, base_delay=0)
    def twice(input, ctx):
        seen.append(current.get())  # set by attempt_started, in this thread too
        raise ValueError("nope")

    @pf.job(queue="fine")
    async def fine(input, ctx):
        seen.append(current.get())
        return 1

    recorder = Recorder()
    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        bad = store.start(twice, {})
        good = store.start(fine, {})
        drain(store, twice, fine, telemetry=recorder)
    assert sorted(s or "" for s in seen) == ["fine#1", "twice#1", "twice#2"]
    started = {id(e[2]): e[1] for e in recorder.events if e[0] == "started"}
    ended = [e for e in recorder.events if e[0] == "ended"]
    assert len(started) == len(ended) == 3
    for _, attempt, token, _, duration, _ in ended:
        assert started[id(token)] == attempt  # the token comes back with its own attempt
        assert duration >= 0
    outcomes = sorted((e[1].run_id, e[1].attempt, e[3], e[5]) for e in ended)
    assert outcomes == sorted([
        (bad.id, 1, "retried", "ValueError: nope"),
        (bad.id, 2, "failed", "ValueError: nope"),
        (good.id, 1, "completed", None),
    ])


def test_a_hook_that_raises_is_logged_once_and_changes_nothing(tmp_path, caplog) -> None:
    class Broken:
        def attempt_started(self, attempt):
            raise RuntimeError("exporter down")

        def attempt_ended(self, *args):
            raise RuntimeError("exporter down")

    @pf.job(queue="noop")
    def noop(input, ctx):
        return input

    with pf.connect(tmp_path / "db") as store:
        runs = store.start_many(noop, [1, 2, 3])
        with caplog.at_level(logging.ERROR, logger="pgflow_py.runner"):
            stats = drain(store, noop, telemetry=Broken())
        assert stats.completed == 3
        assert [store.get_run(r.id).output for r in runs] == [1, 2, 3]
    assert len([r for r in caplog.records if "telemetry" in r.getMessage()]) == 1


def test_opentelemetry_spans_and_metrics(tmp_path) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from pgflow_py.telemetry.otel import OpenTelemetry

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer = tracer_provider.get_tracer("app")

    flow = pf.flow("traced", max_attempts=2, base_delay=0)

    @flow.step()
    def split(input, ctx):
        with tracer.start_as_current_span("app work"):  # a child of the attempt's span
            return [1, 2]

    @flow.map(array="split")
    async def each(item, ctx):
        if ctx.attempt == 1 and item == 2:
            raise ValueError("flaky")
        return item

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        run = store.start(flow, {})
        drain(store, flow, telemetry=OpenTelemetry(tracer_provider, meter_provider))
        assert store.get_run(run.id).status == "completed"

    spans = exporter.get_finished_spans()
    attempts = [s for s in spans if s.name.startswith("pgflow ")]
    assert sorted((s.name, s.attributes.get("pgflow.task_index"), s.attributes["pgflow.attempt"],
                   s.attributes["pgflow.outcome"]) for s in attempts) == [
        ("pgflow traced.each", 0, 1, "completed"),
        ("pgflow traced.each", 1, 1, "retried"),
        ("pgflow traced.each", 1, 2, "completed"),
        ("pgflow traced.split", None, 1, "completed"),
    ]
    assert all(s.attributes["pgflow.run_id"] == run.id for s in attempts)
    failed = next(s for s in attempts if s.attributes["pgflow.outcome"] == "retried")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: flaky"
    (work,) = [s for s in spans if s.name == "app work"]
    split_span = next(s for s in attempts if s.name == "pgflow traced.split")
    assert work.parent is not None and work.parent.span_id == split_span.context.span_id

    metrics = {
        m.name: m for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics for m in sm.metrics
    }
    counts = {  # the histogram's count counts attempts by step and outcome
        (p.attributes["pgflow.step"], p.attributes["pgflow.outcome"]): p.count
        for p in metrics["pgflow.attempt.duration"].data.data_points
    }
    assert counts == {("split", "completed"): 1, ("each", "completed"): 2, ("each", "retried"): 1}


# --- trace context: from the code that starts a run to its attempts' spans ------------------------


def _tracing() -> tuple[Any, Any]:
    """An SDK tracer provider (not the global one) and the exporter that keeps its spans."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _attempt_spans(exporter: Any, run_id: str) -> list[Any]:
    return [
        s for s in exporter.get_finished_spans()
        if s.name.startswith("pgflow ") and s.attributes["pgflow.run_id"] == run_id
    ]


def test_attempt_spans_join_the_trace_of_the_span_that_started_their_run(store: pf.Store) -> None:
    from pgflow_py.telemetry.otel import OpenTelemetry

    provider, exporter = _tracing()
    tracer = provider.get_tracer("app")
    flow = pf.flow("traced_pipeline", max_attempts=2, base_delay=0)

    @flow.step()
    def fetch(input, ctx):
        if ctx.attempt == 1:
            raise ValueError("flaky")  # the retry is in the same trace
        return 1

    @flow.step(depends_on=["fetch"])
    def save(deps, ctx):
        with tracer.start_as_current_span("app work"):
            return deps["fetch"]

    @pf.job(queue="traced_job")
    def traced_job(input, ctx):
        return input

    with tracer.start_as_current_span("request") as request:
        run = store.start(flow, {})
        batch = store.start_many(traced_job, [1, 2])
    untraced = store.start(traced_job, 3)  # no current span: a trace of its own
    drain(store, flow, traced_job, telemetry=OpenTelemetry(provider))

    origin = request.get_span_context()
    pipeline = _attempt_spans(exporter, run.id)
    assert sorted((s.name, s.attributes["pgflow.attempt"]) for s in pipeline) == [
        ("pgflow traced_pipeline.fetch", 1), ("pgflow traced_pipeline.fetch", 2),
        ("pgflow traced_pipeline.save", 1),
    ]
    jobs = [s for r in batch for s in _attempt_spans(exporter, r.id)]
    assert len(jobs) == 2
    for span in pipeline + jobs:
        assert span.context.trace_id == origin.trace_id
        assert span.parent is not None and span.parent.span_id == origin.span_id
        assert span.parent.is_remote  # it came through the store
    (work,) = [s for s in exporter.get_finished_spans() if s.name == "app work"]
    save_span = next(s for s in pipeline if s.name.endswith(".save"))
    assert work.context.trace_id == origin.trace_id
    assert work.parent is not None and work.parent.span_id == save_span.context.span_id

    (alone,) = _attempt_spans(exporter, untraced.id)
    assert alone.parent is None and alone.context.trace_id != origin.trace_id


def test_an_unreadable_stored_trace_context_leaves_the_attempt_a_trace_of_its_own(
    store: pf.Store,
) -> None:
    from pgflow_py.telemetry.otel import OpenTelemetry

    provider, exporter = _tracing()

    @pf.job(queue="badly_traced")
    def badly_traced(input, ctx):
        return input

    with provider.get_tracer("app").start_as_current_span("request"):
        runs = store.start_many(badly_traced, [1, 2, 3])
    with store.backend._write() as c:  # type: ignore[attr-defined]
        for run, value in zip(runs, ["not json", "[1]", '{"traceparent": "00-nonsense"}'],
                              strict=True):
            c.execute("UPDATE runs SET trace_context = ? WHERE id = ?", (value, run.id))
    drain(store, badly_traced, telemetry=OpenTelemetry(provider))
    for run in runs:
        assert store.get_run(run.id).status == "completed"
        (span,) = _attempt_spans(exporter, run.id)
        assert span.parent is None


def test_the_trace_context_is_captured_only_under_a_valid_current_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    provider, _ = _tracing()
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    from pgflow_py.telemetry.propagation import current_context

    assert current_context() is None  # no current span
    with provider.get_tracer("app").start_as_current_span("request") as request:
        carrier = json.loads(current_context() or "null")
        with monkeypatch.context() as patch:  # a process that never imported OpenTelemetry
            patch.delitem(sys.modules, "opentelemetry.trace")
            assert current_context() is None
            assert "opentelemetry.trace" not in sys.modules
    ids = request.get_span_context()
    assert carrier["traceparent"] == (
        f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{int(ids.trace_flags):02x}"
    )
    assert ids.trace_flags.sampled

    remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0),
                         trace_state=TraceState([("vendor", "x")]))
    with trace.use_span(NonRecordingSpan(remote)):  # unsampled, with a vendor's state
        carrier = json.loads(current_context() or "null")
    assert carrier["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-00"
    assert carrier["tracestate"] == "vendor=x"
    with trace.use_span(trace.INVALID_SPAN):
        assert current_context() is None


def test_a_version_3_database_gains_the_trace_context_column(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgflow_py.telemetry.otel import OpenTelemetry

    provider, exporter = _tracing()

    @pf.job(queue="old_and_new")
    def old_and_new(input, ctx):
        return input

    with monkeypatch.context() as patch:
        as_schema_version(patch, 3)
        with pf.connect(db_path) as old:
            before = old.start(old_and_new, 1)
    conn = sqlite3.connect(db_path)
    try:
        assert "trace_context" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    finally:
        conn.close()

    with pf.connect(db_path) as new:
        with provider.get_tracer("app").start_as_current_span("request") as request:
            after = new.start(old_and_new, 2)
        drain(new, old_and_new, telemetry=OpenTelemetry(provider))
        assert [new.get_run(r.id).output for r in (before, after)] == [1, 2]
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            stored = dict(conn.execute("SELECT id, trace_context FROM runs").fetchall())
        finally:
            conn.close()
    assert stored[before.id] is None
    assert json.loads(stored[after.id])["traceparent"].split("-")[1] == (
        f"{request.get_span_context().trace_id:032x}"
    )
    (old_span,) = _attempt_spans(exporter, before.id)
    (new_span,) = _attempt_spans(exporter, after.id)
    assert old_span.parent is None
    assert new_span.parent is not None
    assert new_span.parent.span_id == request.get_span_context().span_id
