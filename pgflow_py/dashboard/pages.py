"""The dashboard's HTML pages: overview, runs, one run, workers.

Each page is a Jinja2 template (``templates/``, autoescaped: every value from the store is text,
never markup). A page's live part is its ``live`` block; the page's script asks for the same URL
with the header ``X-Pgflow-Partial: 1`` every few seconds and gets only that block back, which it
puts in place without reloading the page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import InputError, PgflowError, RunNotFound
from ..models import FlowStats, Run, RunStatus, WorkerInfo
from ..store import Store
from .graph import BOX_HEIGHT, BOX_WIDTH, SKIP_REASONS, layout, step_status
from .present import CHART_MINUTES, FILTERS, TASKS_SHOWN, flow_rows

if TYPE_CHECKING:
    from ..models import ThroughputPoint

__all__ = ("PAGE_SIZE", "page_routes")

HERE = Path(__file__).parent
PAGE_SIZE = 50
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
    env.filters.update(FILTERS)

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        template = env.get_template(f"{name}.html")
        context.update(
            base=request.scope.get("root_path", "").rstrip("/"),
            read_only=read_only,
            now=store.clock.now(),
            page=name,
            refresh=REFRESH.get(name, 0),
        )
        headers = {"Content-Security-Policy": CSP}
        if request.headers.get("x-pgflow-partial") == "1":
            block = template.blocks["live"]
            body = "".join(block(template.new_context(context)))
            headers["X-Pgflow-Partial"] = "1"  # the page's script takes only what says so
        else:
            body = template.render(context)
        return HTMLResponse(body, status_code, headers=headers)

    def page(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Any]:
        """``handler``, with the store's errors shown as a page that says what failed (the
        database locked, unreachable, ...): a refresh then shows it in place of the live part."""
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except PgflowError as exc:
                return render(request, "error", 503, title="The store answered with an error",
                              message=f"{type(exc).__name__}: {exc}")

        return endpoint

    async def call(function: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(function, *args)

    @page
    async def overview(request: Request) -> Response:
        stats, workers, points, failures = await call(_overview_data, store)
        return render(
            request, "overview", flows=flow_rows(stats, points, store.clock.now()),
            failures=failures,
            totals={s: sum(f.counts.get(s, 0) for f in stats) for s in STATUSES},
            workers_live=sum(1 for w in workers if not w.lost),
            workers_lost=sum(1 for w in workers if w.lost),
            chart_minutes=CHART_MINUTES,
        )

    @page
    async def runs(request: Request) -> Response:
        params = request.query_params
        flow = params.get("flow") or None
        status = params.get("status") or None
        key = params.get("key") or None
        before = params.get("before") or None
        slugs = [d.slug for d in await call(store.flows)]
        filters = {"flow": flow or "", "status": status or "", "key": key or ""}
        listing: dict[str, Any] = {"filters": filters, "slugs": slugs, "statuses": STATUSES, "before": before}
        if status is not None and status not in STATUSES:
            return render(request, "runs", 400, error=f"unknown status {status!r}", runs=[],
                          total=None, older=None, **listing)
        try:
            found = await call(store.runs, flow, status, key, PAGE_SIZE + 1, before)
            total = None if key else await call(store.count, flow, status)
        except InputError as exc:
            return render(request, "runs", 400, error=str(exc), runs=[], total=None, older=None,
                          **listing)
        older = found[PAGE_SIZE - 1].id if len(found) > PAGE_SIZE else None
        return render(request, "runs", runs=found[:PAGE_SIZE], total=total, older=older,
                      error=None, **listing)

    @page
    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            found = await call(store.get_run, run_id)
        except (RunNotFound, InputError) as exc:
            return render(request, "error", 404, title="Not found", message=str(exc))
        definitions = {d.slug: d for d in await call(store.flows)}
        definition = definitions.get(found.flow_slug)
        graph = layout(definition, found.steps) if definition is not None else None
        return render(
            request, "run", run=found, graph=graph, box_width=BOX_WIDTH, box_height=BOX_HEIGHT,
            can_retry=found.status in (RunStatus.FAILED, RunStatus.CANCELLED),
            can_cancel=not found.status.is_terminal,
            step_types={s.slug: s.step_type for s in definition.steps} if definition else {},
            step_statuses={s.slug: step_status(s) for s in found.steps},
            tasks_shown=TASKS_SHOWN, skip_reasons=SKIP_REASONS,
        )

    @page
    async def workers(request: Request) -> Response:
        found = await call(store.workers)
        return render(request, "workers", workers=found)

    @page
    async def find(request: Request) -> Response:
        """The header's box: a run id opens that run; anything else lists the runs with that
        key."""
        base = request.scope.get("root_path", "").rstrip("/")
        wanted = request.query_params.get("q", "").strip()
        if not wanted:
            return RedirectResponse(f"{base}/runs", 303)
        try:
            await call(store.get_run, wanted)
        except (RunNotFound, InputError):
            return RedirectResponse(f"{base}/runs?{urlencode({'key': wanted})}", 303)
        return RedirectResponse(f"{base}/runs/{quote(wanted, safe='')}", 303)

    return [
        Route("/", overview, methods=["GET"]),
        Route("/runs", runs, methods=["GET"]),
        Route("/runs/{run_id}", run, methods=["GET"]),
        Route("/workers", workers, methods=["GET"]),
        Route("/find", find, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _overview_data(
    store: Store,
) -> tuple[list[FlowStats], list[WorkerInfo], list[ThroughputPoint], list[Run]]:
    return (store.stats(), store.workers(), store.throughput(CHART_MINUTES),
            store.runs(status=RunStatus.FAILED, limit=RECENT_FAILURES))
