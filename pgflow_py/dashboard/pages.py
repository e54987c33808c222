"""The dashboard's HTML pages: overview, runs, one run, workers.

Each page is a Jinja2 template (``templates/``, autoescaped: every value from the store is text,
never markup). A page's live part is its ``live`` block; the page's script asks for the same URL
with the header ``X-Pgflow-Partial: 1`` every few seconds and gets only that block back, which it
puts in place without reloading the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..clock import format_seconds, utc_datetime
from ..errors import InputError, RunNotFound
from ..models import FlowStats, Run, RunStatus, WorkerInfo
from ..ops_json import dumps
from ..store import Store
from .graph import BOX_HEIGHT, BOX_WIDTH, layout

if TYPE_CHECKING:
    from ..models import ThroughputPoint

__all__ = ("PAGE_SIZE", "page_routes")

HERE = Path(__file__).parent
PAGE_SIZE = 50
CHART_MINUTES = 60
RECENT_FAILURES = 8
STATUSES = [s.value for s in RunStatus]
# How often each page's live part is fetched again, in milliseconds: the overview counts every
# run of every flow, so it asks less often than a single run's page.
REFRESH = {"overview": 5000, "runs": 3000, "run": 2000, "workers": 5000}

# No inline script or style may run: were a value ever rendered unescaped, a <script> in it
# would still not execute.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

T = TypeVar("T")


def page_routes(store: Store, read_only: bool) -> list[BaseRoute]:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=_ago, duration=_duration, json=dumps, number=_number, seconds=format_seconds
    )

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        template = env.get_template(f"{name}.html")
        context.update(
            base=request.scope.get("root_path", "").rstrip("/"),
            read_only=read_only,
            now=store.clock.now(),
            page=name,
            refresh=REFRESH.get(name, 0),
            request_url=str(request.url),
        )
        if request.headers.get("x-pgflow-partial") == "1":
            block = template.blocks["live"]
            body = "".join(block(template.new_context(context)))
        else:
            body = template.render(context)
        return HTMLResponse(body, status_code, headers={"Content-Security-Policy": CSP})

    async def call(function: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(function, *args)

    async def overview(request: Request) -> Response:
        stats, workers, points, failures = await call(_overview_data, store)
        return render(
            request, "overview", flows=_flow_rows(stats, points, store.clock.now()),
            failures=failures,
            totals={s: sum(f.counts.get(s, 0) for f in stats) for s in STATUSES},
            workers_live=sum(1 for w in workers if not w.lost),
            workers_lost=sum(1 for w in workers if w.lost),
            chart_minutes=CHART_MINUTES,
        )

    async def runs(request: Request) -> Response:
        params = request.query_params
        flow = params.get("flow") or None
        status = params.get("status") or None
        key = params.get("key") or None
        before = params.get("before") or None
        slugs = [d.slug for d in await call(store.flows)]
        filters = {"flow": flow or "", "status": status or "", "key": key or ""}
        if status is not None and status not in STATUSES:
            return render(request, "runs", 400, error=f"unknown status {status!r}", runs=[],
                          filters=filters, slugs=slugs, statuses=STATUSES, total=None,
                          older=None, before=before)
        try:
            found = await call(store.runs, flow, status, key, PAGE_SIZE + 1, before)
            total = None if key else await call(store.count, flow, status)
        except InputError as exc:
            return render(request, "runs", 400, error=str(exc), runs=[], filters=filters,
                          slugs=slugs, statuses=STATUSES, total=None, older=None, before=before)
        older = found[PAGE_SIZE - 1].id if len(found) > PAGE_SIZE else None
        return render(
            request, "runs", runs=found[:PAGE_SIZE], filters=filters, slugs=slugs,
            statuses=STATUSES, total=total, older=older, before=before, error=None,
        )

    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            found = await call(store.get_run, run_id)
        except (RunNotFound, InputError) as exc:
            return render(request, "missing", 404, message=str(exc))
        definitions = {d.slug: d for d in await call(store.flows)}
        definition = definitions.get(found.flow_slug)
        graph = layout(definition, found.steps) if definition is not None else None
        return render(
            request, "run", run=found, graph=graph, box_width=BOX_WIDTH, box_height=BOX_HEIGHT,
            can_retry=found.status in (RunStatus.FAILED, RunStatus.CANCELLED),
            can_cancel=not found.status.is_terminal,
            step_types={s.slug: s.step_type for s in definition.steps} if definition else {},
        )

    async def workers(request: Request) -> Response:
        found = await call(store.workers)
        return render(request, "workers", workers=found)

    return [
        Route("/", overview, methods=["GET"]),
        Route("/runs", runs, methods=["GET"]),
        Route("/runs/{run_id}", run, methods=["GET"]),
        Route("/workers", workers, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _overview_data(
    store: Store,
) -> tuple[list[FlowStats], list[WorkerInfo], list[ThroughputPoint], list[Run]]:
    return (store.stats(), store.workers(), store.throughput(CHART_MINUTES),
            store.runs(status=RunStatus.FAILED, limit=RECENT_FAILURES))


def _flow_rows(
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
