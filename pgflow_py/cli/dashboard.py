"""``pgflow dashboard``: serve :func:`pgflow_py.dashboard.create_app` with uvicorn."""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

import click

from .common import database_option, open_store

__all__ = ("dashboard",)

LOOPBACK = ("127.0.0.1", "localhost", "::1")

NEEDS_EXTRA = "pgflow dashboard needs the dashboard extra: pip install 'pgflow_py[dashboard]'"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; the dashboard has no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8787, show_default=True,
              help="Port to listen on.")
@click.option("--read-only", is_flag=True, help="Refuse retry and cancel (POST answers 403).")
@database_option
def dashboard(host: str, port: int, read_only: bool, database: str) -> None:
    """Serve the web dashboard at http://HOST:PORT/: runs, their DAGs and tracebacks,
    workers, retry and cancel (unless --read-only), and its JSON API under /api/."""
    try:
        import uvicorn

        from ..dashboard import create_app
    except ImportError:
        click.echo(NEEDS_EXTRA, err=True)
        sys.exit(1)
    with open_store(database) as store:
        # Listening on loopback, only this machine can connect, so only its names may be in the
        # Host header: a web page that rebinds its own domain name to 127.0.0.1 (DNS rebinding)
        # is refused (400).
        allowed = [*LOOPBACK, host] if _is_loopback(host) else None
        app: Any = create_app(store, read_only=read_only, allowed_hosts=allowed)
        # No access log: every open page asks again every few seconds, which would bury the
        # lines that matter (start, stop, errors).
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
