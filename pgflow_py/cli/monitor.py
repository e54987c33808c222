"""``pgflow stats`` and ``pgflow workers``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click

from ..models import RunStatus
from ..store import Store
from .common import database_option, json_option, open_store
from .output import echo, echo_json, format_age, relative_time, status_style, table

__all__ = ("stats", "workers")


def _call(store: Store, method: str) -> list[Any]:
    function: Callable[[], list[Any]] | None = getattr(store, method, None)
    if function is None:
        raise click.ClickException(f"this version of pgflow_py's store has no {method}()")
    return list(function())


@click.command()
@json_option
@database_option
def stats(as_json: bool, database: str) -> None:
    """Runs by status, per flow.

    Also the age of the oldest queued run and the workers serving each flow.
    """
    with open_store(database) as store:
        found = _call(store, "stats")
    if as_json:
        echo_json(found)
        return
    if not found:
        echo("no flows")
        return
    statuses = [s.value for s in RunStatus]
    headers = ["FLOW", *(s.upper() for s in statuses), "OLDEST QUEUED", "WORKERS"]
    rows = []
    styles = []
    for item in found:
        counts = getattr(item, "counts", {}) or {}
        rows.append([
            str(getattr(item, "flow_slug", None) or "(all)"),
            *(str(counts.get(s, 0)) for s in statuses),
            format_age(getattr(item, "oldest_queued_age", None)),
            str(getattr(item, "workers", "-")),
        ])
        styles.append([None, *(
            status_style(s) if counts.get(s, 0) and s in ("failed", "running", "retrying") else None
            for s in statuses
        )])
    for line in table(headers, rows, styles):
        echo(line)


@click.command()
@json_option
@database_option
def workers(as_json: bool, database: str) -> None:
    """Workers serving this database.

    Each with its host, pid, flows, last heartbeat and running tasks.
    """
    with open_store(database) as store:
        found = _call(store, "workers")
    if as_json:
        echo_json(found)
        return
    if not found:
        echo("no workers")
        return
    now = datetime.now(timezone.utc)
    headers = ["ID", "HOST", "PID", "FLOWS", "STARTED", "HEARTBEAT", "RUNNING", "STATE"]
    rows = []
    styles = []
    for w in found:
        lost = bool(getattr(w, "lost", False))
        flows = getattr(w, "flows", ()) or ()
        rows.append([
            str(getattr(w, "id", "")),
            str(getattr(w, "hostname", "")),
            str(getattr(w, "pid", "")),
            ",".join(flows) if not isinstance(flows, str) else flows,
            relative_time(getattr(w, "started_at", None), now),
            relative_time(getattr(w, "last_heartbeat", None), now),
            str(getattr(w, "running", "")),
            "lost" if lost else "alive",
        ])
        styles.append([None] * 7 + [status_style("failed" if lost else "completed")])
    for line in table(headers, rows, styles):
        echo(line)
