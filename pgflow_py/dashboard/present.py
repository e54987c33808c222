"""What the page templates show, made from what the store returns: the overview's chart rows,
cut-down JSON, the tasks of a large map step, and the filters the templates use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import attrs

from ..clock import format_seconds, utc_datetime
from ..models import FlowStats, TaskRun, ThroughputPoint
from ..ops_json import dumps

__all__ = ("CHART_MINUTES", "FILTERS", "JSON_LIMIT", "TASKS_SHOWN", "flow_rows", "shown_tasks")

CHART_MINUTES = 60
JSON_LIMIT = 64 * 1024
"""Characters of an input or output shown on a page; the API has all of it."""
OUTPUT_LIMIT = 4 * 1024
"""Characters of one task's output (folded under its row)."""
TASKS_SHOWN = 50
"""Tasks listed per step: the ones that need a look (failed, running, retrying) first."""


@attrs.frozen
class Cut:
    text: str
    cut: bool
    size: int
    """Characters of the whole JSON text."""


def json_cut(value: Any, limit: int = JSON_LIMIT) -> Cut:
    text = dumps(value)
    if len(text) <= limit:
        return Cut(text, False, len(text))
    return Cut(text[:limit], True, len(text))


def output_cut(value: Any) -> Cut:
    """A task's output as its folded row shows it: cut at :data:`OUTPUT_LIMIT`."""
    return json_cut(value, OUTPUT_LIMIT)


def shown_tasks(tasks: Sequence[TaskRun], limit: int = TASKS_SHOWN) -> list[TaskRun]:
    """At most ``limit`` tasks, those failed, running or waiting to retry first, each group in
    index order."""
    def rank(task: TaskRun) -> int:
        if task.status == "failed":
            return 0
        if task.status == "started" or (task.status == "queued" and task.attempts > 0):
            return 1
        return 2

    ordered = sorted(tasks, key=lambda t: (rank(t), t.index if t.index is not None else -1))
    return ordered[:limit]


def flow_rows(
    stats: Sequence[FlowStats], points: Sequence[ThroughputPoint], now: float
) -> list[dict[str, Any]]:
    """Per flow: its figures and its chart, one bar per minute of the last hour, oldest first."""
    this_minute = int(now // 60)
    first = this_minute - CHART_MINUTES + 1
    bars: dict[str, list[list[int]]] = {}
    for point in points:
        minute = int(point.minute.timestamp() // 60)
        if first <= minute <= this_minute:
            series = bars.setdefault(point.flow_slug, [[0, 0] for _ in range(CHART_MINUTES)])
            series[minute - first][0] += point.completed
            series[minute - first][1] += point.failed
    rows = []
    for flow in stats:
        series = bars.get(flow.flow_slug, [[0, 0] for _ in range(CHART_MINUTES)])
        peak = max(max(done + failed for done, failed in series), 1)
        chart = []
        for i, (done, failed) in enumerate(series):
            at = utc_datetime((first + i) * 60)
            chart.append({
                "x": i * 3, "done": done, "failed": failed, "label": f"{at:%H:%M}",
                "h_done": _bar(done, peak), "h_failed": _bar(failed, peak),
            })
        rows.append({
            "stats": flow, "chart": chart,
            "done_hour": sum(d for d, _ in series), "failed_hour": sum(f for _, f in series),
        })
    return rows


def _bar(value: int, peak: int, height: int = 28) -> float:
    """A bar's height: any non-zero value shows at least a sliver."""
    return 0.0 if value == 0 else max(1.0, round(value / peak * height, 1))


def _ago(moment: datetime | None, now: float) -> str:
    if moment is None:
        return ""
    delta = now - moment.timestamp()
    if -1 < delta < 1:
        return "now"
    return f"{format_seconds(delta)} ago" if delta > 0 else f"in {format_seconds(delta)}"


def _number(value: int | float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:,}"


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start) / timedelta(seconds=1)
    if seconds < 0.0005:
        return "<1 ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s" if seconds < 60 \
        else format_seconds(seconds)


def segment(value: str) -> str:
    """``value`` as one path segment of a URL (``/``, ``?``, ``#`` escaped too)."""
    return quote(value, safe="")


def middle(value: str, width: int = 22) -> str:
    """``value`` shortened in the middle to ``width`` characters: slugs that differ at their
    end stay apart."""
    if len(value) <= width:
        return value
    head = (width - 1) // 2
    return value[:head] + "…" + value[len(value) - (width - 1 - head):]


FILTERS = {
    "ago": _ago, "duration": _duration, "json": dumps, "json_cut": json_cut, "middle": middle,
    "number": _number, "output_cut": output_cut, "seconds": format_seconds, "segment": segment,
    "shown_tasks": shown_tasks,
}
