"""``create_app(store, read_only=False)``: the dashboard's Starlette app.

Endpoints (JSON is ``application/json``, built by :mod:`pgflow_py.ops_json` exactly as the CLI's
``--json``):

- ``GET /api/runs?flow=&status=&key=&limit=&before=``: a list of runs, newest first, as
  ``pgflow runs --json`` (an empty parameter means no filter; ``limit`` 1 to 500, default 50;
  ``before=<run id>`` pages back: pass the last id of a page to get the next).
- ``GET /api/runs/{id}``: one run, as ``pgflow show --json``.
- ``GET /api/stats``, ``GET /api/workers``: as ``pgflow stats --json`` / ``pgflow workers --json``.
- ``POST /api/runs/{id}/retry``, ``POST /api/runs/{id}/cancel``: the run as it is afterwards.
- ``POST /api/retry-failed?flow=``: every failed run (of a flow) runs again, as
  ``pgflow retry --failed``; ``{"retried": <count>}``.
- Pages (HTML): ``/`` (overview), ``/runs``, ``/runs/{id}``, ``/workers``; see
  :mod:`pgflow_py.dashboard.pages`. Static assets under ``/static``.

Errors are ``{"error": "<message>"}``: 400 for a bad query parameter or run id, 404 for an
unknown run (or path), 409 for a retry or cancel the run's state does not allow (a completed run
cannot be retried nor cancelled; cancelling a cancelled run returns it unchanged), 403 for a
refused POST, 500 for anything else.

POST rule (cross-site request forgery):

1. ``read_only=True``: every POST answers 403 ``{"error": "read-only dashboard"}``.
2. A POST must carry the header ``X-Pgflow: 1``. A page on another site cannot add a custom header
   to a request without a CORS preflight, which this app never grants; HTML forms cannot add
   one at all.
3. When the request has an ``Origin`` header (or, without one, a ``Referer``), its host and port
   must equal the request's ``Host`` header; ``Origin: null`` is refused. Browsers send
   ``Origin`` with every POST; a client that sends neither (curl, a script) is judged by rule 2
   alone. Behind a reverse proxy, keep the ``Host`` header the browser sent.

Every GET answer has ``Cache-Control: no-store``; every answer ``X-Content-Type-Options:
nosniff``. The store is blocking, so each call to it runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..store import Store
from .api import routes
from .pages import page_routes

__all__ = ("create_app",)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def create_app(
    store: Store, read_only: bool = False, allowed_hosts: Sequence[str] | None = None
) -> Starlette:
    """An ASGI app serving the dashboard's pages and API over ``store`` (not closed by the app).

    ``read_only=True`` refuses every POST (retry, cancel) with 403. ``allowed_hosts``: the only
    names (or addresses) a request's ``Host`` may give, others answered 400; ``pgflow dashboard``
    on a loopback address passes the loopback names, so that a web page that rebinds its own
    name to 127.0.0.1 (DNS rebinding) cannot use it.
    """
    return Starlette(
        routes=[*routes(store), *page_routes(store, read_only)],
        middleware=[Middleware(
            GuardMiddleware, read_only=read_only,
            allowed_hosts=None if allowed_hosts is None else frozenset(
                h.strip("[]").lower() for h in allowed_hosts
            ),
        )],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = error(exc.status_code, exc.detail)
    response.headers.update(exc.headers or {})  # Allow, on a 405
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    return error(500, f"internal error: {type(exc).__name__}")


class GuardMiddleware:
    """Applies the POST rule of the module docstring and the headers every answer gets."""

    def __init__(self, app: ASGIApp, read_only: bool, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.read_only = read_only
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if self.allowed_hosts is not None:
            host = _hostname(Request(scope).headers.get("host", ""))
            if host not in self.allowed_hosts:
                await error(400, f"host {host!r} is not allowed here")(scope, receive, send)
                return
        if method not in SAFE_METHODS:
            refusal = self.refusal(Request(scope))
            if refusal is not None:
                await error(403, refusal)(scope, receive, send)
                return
        no_store = method in ("GET", "HEAD")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if no_store:
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, request: Request) -> str | None:
        """Why this POST is refused, or ``None``."""
        if self.read_only:
            return "read-only dashboard"
        if request.headers.get("x-pgflow") != "1":
            return "a POST needs the header X-Pgflow: 1"
        source = request.headers.get("origin")
        name = "Origin"
        if source is None:
            source, name = request.headers.get("referer"), "Referer"
        if source is None:
            return None
        host = request.headers.get("host", "")
        if _netloc(source) is None or _netloc(source) != _host(host, request.url.scheme):
            return f"cross-site request refused ({name} does not match Host)"
        return None


def _hostname(host: str) -> str:
    """The name or address of a ``Host`` header, without its port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host(host: str, scheme: str) -> str:
    """``host[:port]`` lowercased, without the scheme's default port."""
    host = host.strip().lower()
    default = DEFAULT_PORTS.get(scheme)
    if default and host.endswith(f":{default}"):
        host = host[: -len(default) - 1]
    return host


def _netloc(url: str) -> str | None:
    """The ``host[:port]`` of an Origin or Referer URL (default port dropped); ``None`` for
    ``null`` or anything that is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not hostname or parts.username or parts.password:
        return None
    return _host(parts.netloc, parts.scheme)

