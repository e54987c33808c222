"""The dashboard's JSON API (see :mod:`pgflow_py.dashboard.app`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import FlowNotFound, InputError, PgflowError, RunNotFound, ShapeMismatch
from ..models import Run, RunStatus
from ..ops_json import run_to_json, to_json
from ..store import Store

__all__ = ("DEFAULT_LIMIT", "MAX_LIMIT", "cancel_run", "routes")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
STATUSES = [s.value for s in RunStatus]

T = TypeVar("T")


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def cancel_run(store: Store, run_id: str) -> Run:
    """Cancel an unfinished run, as ``pgflow cancel`` does: a cancelled run is returned as it is,
    a completed or failed one refused (:class:`~pgflow_py.InputError`)."""
    run = store.get_run(run_id)
    if run.status in (RunStatus.COMPLETED, RunStatus.FAILED):
        raise InputError(f"run {run_id} is {run.status.value}; only unfinished runs can be cancelled")
    if run.status is RunStatus.CANCELLED:
        return run
    return store.cancel(run_id)


def routes(store: Store) -> list[Route]:
    async def call(function: Callable[..., T], *args: Any, conflict: bool = False) -> T:
        """``function(*args)`` in a worker thread; library errors become API errors (an
        ``InputError`` is a 409 for the actions, ``conflict``, and a 400 otherwise)."""
        try:
            return await run_in_threadpool(function, *args)
        except RunNotFound as exc:
            raise ApiError(404, _one_line(exc)) from exc
        except (InputError, FlowNotFound, ShapeMismatch) as exc:
            # what the run's state (or its flow's) refuses: retrying a run whose flow was
            # deleted or changed shape, say
            raise ApiError(409 if conflict else 400, _one_line(exc)) from exc
        except PgflowError as exc:
            raise ApiError(500, _one_line(exc)) from exc

    def api(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(await handler(request))
            except ApiError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)

        return endpoint

    @api
    async def list_runs(request: Request) -> Any:
        params = request.query_params
        flow = params.get("flow") or None
        key = params.get("key") or None
        before = params.get("before") or None
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"unknown status {status!r}; use one of {STATUSES}")
        limit = _limit(params.get("limit") or None)
        found = await call(store.runs, flow, status, key, limit, before)
        return [run_to_json(run) for run in found]

    @api
    async def show_run(request: Request) -> Any:
        run = await call(store.get_run, _run_id(request))
        return run_to_json(run)

    @api
    async def stats(request: Request) -> Any:
        return to_json(await call(store.stats))

    @api
    async def workers(request: Request) -> Any:
        return to_json(await call(store.workers))

    @api
    async def retry(request: Request) -> Any:
        run = await call(store.retry, _run_id(request), conflict=True)
        return run_to_json(run)

    @api
    async def cancel(request: Request) -> Any:
        run = await call(cancel_run, store, _run_id(request), conflict=True)
        return run_to_json(run)

    @api
    async def retry_failed(request: Request) -> Any:
        flow = request.query_params.get("flow") or None
        return {"retried": await call(store.retry_all, flow, conflict=True)}

    return [
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/retry-failed", retry_failed, methods=["POST"]),
        Route("/api/runs/{run_id}", show_run, methods=["GET"]),
        Route("/api/stats", stats, methods=["GET"]),
        Route("/api/workers", workers, methods=["GET"]),
        Route("/api/runs/{run_id}/retry", retry, methods=["POST"]),
        Route("/api/runs/{run_id}/cancel", cancel, methods=["POST"]),
    ]


def _run_id(request: Request) -> str:
    run_id: str = request.path_params["run_id"]
    if "\x00" in run_id:  # what the store refuses (InputError) before looking: a 400, not a 409
        raise ApiError(400, f"run id {run_id!r} holds a NUL character")
    return run_id


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else -1
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {text!r}")
    return limit


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
