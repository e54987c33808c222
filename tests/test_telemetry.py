"""What a runner tells monitoring about each attempt: a plain hook, and OpenTelemetry."""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf
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
