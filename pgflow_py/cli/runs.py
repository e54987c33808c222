"""``pgflow runs``, ``show``, ``start``, ``retry``, ``cancel`` and ``prune``."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from ..errors import PgflowError
from ..models import Run, RunStatus, StepRun
from ..ops_json import run_to_json
from .common import database_option, json_option, one_line, open_store
from .output import (
    duration_callback,
    echo,
    echo_error,
    echo_json,
    format_time,
    pretty_json,
    relative_time,
    status_style,
    table,
    terminal_width,
    truncate,
)

__all__ = ("cancel", "prune", "retry", "runs", "show", "start")

STATUSES = [s.value for s in RunStatus]


# --- runs ----------------------------------------------------------------------------------------


@click.command()
@click.option("--flow", "flow_slug", default=None, help="Only runs of this flow (its slug).")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only runs in this status.")
@click.option("--key", default=None, help="Only the run started with this idempotency key.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Show at most this many runs.")
@json_option
@database_option
def runs(
    flow_slug: str | None,
    status: str | None,
    key: str | None,
    limit: int,
    as_json: bool,
    database: str,
) -> None:
    """List runs, newest first."""
    with open_store(database) as store:
        found = store.runs(flow=flow_slug, status=status, key=key, limit=limit)
    if as_json:
        echo_json([run_to_json(r) for r in found])
        return
    if not found:
        echo("no runs" + _filters(flow_slug, status, key))
        return
    now = datetime.now(timezone.utc)
    headers = ["ID", "FLOW", "STATUS", "ATTEMPTS", "CREATED", "FINISHED", "ERROR"]
    rows = [
        [r.id, r.flow_slug, r.status.value, str(r.attempts), relative_time(r.created_at, now),
         relative_time(r.finished_at, now), r.error or ""]
        for r in found
    ]
    # The error column gets what the terminal has left (at least 30 characters).
    used = sum(max(len(h), *(len(row[c]) for row in rows)) + 2 for c, h in enumerate(headers[:-1]))
    room = max(terminal_width() - used, 30)
    for row in rows:
        row[-1] = truncate(row[-1], room)
    styles = [[None, None, status_style(r.status.value)] for r in found]
    for line in table(headers, rows, styles):
        echo(line)
    count = f"{len(found)} run{'s' if len(found) != 1 else ''} shown"
    if len(found) == limit:
        echo(f"{count} (limit {limit}; use --limit)")
    else:
        echo(count)


def _filters(flow_slug: str | None, status: str | None, key: str | None) -> str:
    parts = [f"flow {flow_slug}"] if flow_slug else []
    parts += [f"status {status}"] if status else []
    parts += [f"key {key}"] if key is not None else []
    return f" ({', '.join(parts)})" if parts else ""


# --- show ----------------------------------------------------------------------------------------

MAX_TASKS_SHOWN = 50


@click.command()
@click.argument("run_id")
@json_option
@database_option
def show(run_id: str, as_json: bool, database: str) -> None:
    """Show one run.

    Its header, input and output, steps (with the tasks of map steps) and failed attempts
    (with tracebacks).
    """
    with open_store(database) as store:
        run = store.get_run(run_id)
    if as_json:
        echo_json(run_to_json(run))
        return
    for line in render_run(run, terminal_width()):
        echo(line)


def render_run(run: Run, width: int = 120, now: datetime | None = None) -> list[str]:
    """The lines ``pgflow show`` prints for ``run``."""
    now = now or datetime.now(timezone.utc)

    def bold(text: str) -> str:
        return click.style(text, bold=True)

    header = [
        ("run", run.id),
        ("flow", run.flow_slug),
        ("status", status_style(run.status.value)(run.status.value)),
        ("key", run.key if run.key is not None else "-"),
        ("priority", str(run.priority)),
        ("created", format_time(run.created_at, now)),
        ("started", format_time(run.started_at, now)),
        ("finished", format_time(run.finished_at, now)),
        ("attempts", str(run.attempts)),
    ]
    if run.error:
        header.append(("error", run.error))
    lines = [f"{bold(name.ljust(9))} {value}" for name, value in header]
    lines += ["", bold("input")] + ["  " + line for line in pretty_json(run.input)]
    lines += ["", bold("output")] + ["  " + line for line in pretty_json(run.output)]
    lines += ["", bold("steps")]
    if run.steps:
        lines += _render_steps(run.steps, width)
    else:
        lines.append("  (none)")
    history = run.history
    if history:
        lines += ["", bold(f"failed attempts ({len(history)})")]
        for record in history:
            where = record.step_slug or "?"
            if record.task_index is not None:
                where += f"[{record.task_index}]"
            stamp = record.at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {stamp}  {where}  attempt {record.attempt}: {record.error}")
            traceback = getattr(record, "traceback", None)
            if traceback:
                lines += ["      " + line for line in str(traceback).rstrip().splitlines()]
    return lines


def _render_steps(steps: tuple[StepRun, ...], width: int) -> list[str]:
    rows = []
    styles = []
    for step in steps:
        note = step.error or ""
        reason = step.skip_reason
        if reason:
            note = f"({reason}) {note}".strip()
        rows.append([step.slug, step.status, str(step.attempts), note])
        styles.append([None, status_style(step.status)])
    used = sum(max(len(h), *(len(r[c]) for r in rows)) + 2
               for c, h in enumerate(["STEP", "STATUS", "ATTEMPTS"])) + 2
    for row in rows:
        row[-1] = truncate(row[-1], max(width - used, 30))
    body = table(["STEP", "STATUS", "ATTEMPTS", "ERROR"], rows, styles)
    lines = ["  " + body[0]]
    for step, line in zip(steps, body[1:], strict=True):
        lines.append("  " + line)
        if any(task.index is not None for task in step.tasks):
            lines += _render_tasks(step, width)
    return lines


def _render_tasks(step: StepRun, width: int) -> list[str]:
    tasks = sorted(step.tasks, key=lambda t: t.index if t.index is not None else -1)
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.status] = counts.get(task.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines = [f"    {len(tasks)} task{'s' if len(tasks) != 1 else ''}: {summary}"]
    shown = tasks[:MAX_TASKS_SHOWN]
    rows = [[f"[{t.index}]", t.status, str(t.attempts), t.error or ""] for t in shown]
    for row in rows:
        row[-1] = truncate(row[-1], max(width - 40, 30))
    styles = [[None, status_style(t.status)] for t in shown]
    lines += ["    " + line for line in table(["TASK", "STATUS", "ATTEMPTS", "ERROR"], rows, styles)]
    if len(tasks) > len(shown):
        lines.append(f"    … {len(tasks) - len(shown)} more tasks (use --json for all)")
    return lines


# --- start ---------------------------------------------------------------------------------------


@click.command()
@click.argument("flow_slug", metavar="FLOW")
@click.argument("input_json", required=False, default=None)
@click.option("--delay", default=None, callback=duration_callback, metavar="DURATION",
              help="Start after this long: seconds, or 30s, 15m, 12h, 7d, 2w.")
@click.option("--key", default=None, help="Idempotency key: the same flow and key give the same run.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@json_option
@database_option
def start(
    flow_slug: str,
    input_json: str | None,
    delay: timedelta | None,
    key: str | None,
    priority: int,
    as_json: bool,
    database: str,
) -> None:
    """Start a run of a flow.

    FLOW is a slug whose definition is in the store; INPUT_JSON its input (default null; "-"
    reads it from stdin). Prints the run's id.
    """
    value = _parse_input(input_json)
    with open_store(database) as store:
        run = store.start(flow_slug, value, delay=delay, key=key, priority=priority)
    if as_json:
        echo_json(run_to_json(run))
    else:
        echo(run.id)


def _parse_input(text: str | None) -> Any:
    if text is None:
        return None
    source = "INPUT_JSON"
    if text == "-":
        text, source = sys.stdin.read(), "the input on stdin"
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise click.ClickException(f"{source} is not valid JSON: {one_line(exc)}") from exc
    except RecursionError:
        raise click.ClickException(f"{source} is nested too deeply") from None


# --- retry, cancel -------------------------------------------------------------------------------


@click.command()
@click.argument("run_ids", nargs=-1, metavar="RUN_ID...")
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed run (of --flow).")
@click.option("--flow", "flow_slug", default=None, help="With --failed: only runs of this flow.")
@json_option
@database_option
def retry(
    run_ids: tuple[str, ...], all_failed: bool, flow_slug: str | None, as_json: bool,
    database: str,
) -> None:
    """Run failed or cancelled runs again.

    Each gets fresh attempts; the history of its failed attempts is kept.
    """
    if all_failed:
        if run_ids:
            raise click.UsageError("give run ids or --failed, not both")
        with open_store(database) as store:
            count = store.retry_all(flow=flow_slug)
        if as_json:
            echo_json({"retried": count, "flow": flow_slug})
            return
        echo(f"{count} failed run{'s' if count != 1 else ''} retried"
             + (f" (flow {flow_slug})" if flow_slug else ""))
        return
    if flow_slug is not None:
        raise click.UsageError("--flow goes with --failed")
    if not run_ids:
        raise click.UsageError("give the ids of the runs to retry, or --failed")
    _each(database, run_ids, lambda store, run_id: store.retry(run_id), as_json)


@click.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@json_option
@database_option
def cancel(run_ids: tuple[str, ...], as_json: bool, database: str) -> None:
    """Cancel unfinished runs.

    Their queued tasks never start; running ones are cancelled.
    """

    def cancel_one(store: Any, run_id: str) -> Run:
        run: Run = store.get_run(run_id)
        if run.status in (RunStatus.COMPLETED, RunStatus.FAILED):
            raise click.ClickException(
                f"run {run_id} is {run.status.value}; only unfinished runs can be cancelled"
            )
        if run.status is RunStatus.CANCELLED:
            return run
        cancelled: Run = store.cancel(run_id)
        return cancelled

    _each(database, run_ids, cancel_one, as_json)


def _each(database: str, run_ids: tuple[str, ...], action: Any, as_json: bool) -> None:
    """Apply ``action`` to every run, printing ``ID STATUS`` (or, with --json, the list of the
    runs as they are now); report failures in one line each and exit 1 after the others."""
    failed = 0
    done: list[Run] = []
    with open_store(database) as store:
        for run_id in run_ids:
            try:
                run = action(store, run_id)
            except PgflowError as exc:
                echo_error(one_line(exc))
                failed += 1
            except click.ClickException as exc:
                echo_error(exc.format_message())
                failed += 1
            else:
                done.append(run)
                if not as_json:
                    echo(f"{run.id} {status_style(run.status.value)(run.status.value)}")
    if as_json:
        echo_json(done)
    if failed:
        sys.exit(1)


# --- prune ---------------------------------------------------------------------------------------


@click.command()
@click.option("--older-than", default="7d", callback=duration_callback, metavar="DURATION", show_default=True,
              help="Delete terminal runs finished longer ago than this: 30s, 15m, 12h, 7d, 2w.")
@json_option
@database_option
def prune(older_than: timedelta, as_json: bool, database: str) -> None:
    """Delete old finished runs.

    Deletes completed, failed and cancelled runs that finished more than --older-than ago.
    """
    with open_store(database) as store:
        count = store.prune(older_than=older_than)
    if as_json:
        echo_json({"deleted": count})
        return
    echo(f"{count} run{'s' if count != 1 else ''} deleted")
