"""``pgflow stats`` and ``pgflow workers``."""

from __future__ import annotations

from datetime import datetime, timezone

import click

from ..models import RunStatus
from .common import database_option, json_option, open_store
from .output import echo, echo_json, format_age, relative_time, status_style, table

__all__ = ("stats", "workers")


@click.command()
@json_option
@database_option
def stats(as_json: bool, database: str) -> None:
    """Runs by status, per flow.

    Also the age of the oldest queued run and the workers serving each flow.
    """
    with open_store(database) as store:
        found = store.stats()
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
        counts = item.counts
        rows.append([
            item.flow_slug,
            *(str(counts.get(s, 0)) for s in statuses),
            format_age(item.oldest_queued_age),
            str(item.workers),
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
        found = store.workers()
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
        rows.append([
            w.id,
            w.hostname or "-",
            "-" if w.pid is None else str(w.pid),
            ",".join(w.flows),
            relative_time(w.started_at, now),
            relative_time(w.last_heartbeat, now),
            str(w.running),
            "lost" if w.lost else "alive",
        ])
        styles.append([None] * 7 + [status_style("failed" if w.lost else "completed")])
    for line in table(headers, rows, styles):
        echo(line)
