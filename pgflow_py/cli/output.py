"""What the ``pgflow`` commands print for people: tables, relative times, durations, colour."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from ..clock import format_seconds
from ..ops_json import dumps, to_json

__all__ = (
        "duration_callback",
    "echo",
    "echo_error",
    "echo_json",
    "format_age",
    "format_seconds",
    "parse_duration",
    "pretty_json",
    "relative_time",
    "status_style",
    "table",
    "truncate",
)

STATUS_COLOURS = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "started": "cyan",
    "retrying": "magenta",
    "skipped": "bright_black",
}


def _colour() -> bool | None:
    """``None`` lets click decide (colour on a terminal only); ``False`` under $NO_COLOR."""
    return False if os.environ.get("NO_COLOR") else None


def echo(text: str = "") -> None:
    click.echo(text, color=_colour())


def echo_error(text: str) -> None:
    click.echo(f"Error: {' '.join(text.split())}", err=True, color=_colour())


def echo_json(value: Any) -> None:
    click.echo(dumps(value), color=False)


def status_style(status: str) -> Callable[[str], str]:
    colour = STATUS_COLOURS.get(status)
    if colour is None:
        return lambda text: text
    return lambda text: click.style(text, fg=colour, bold=status == "failed")


def truncate(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (an ellipsis marks the cut)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + "…"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    styles: Sequence[Sequence[Callable[[str], str] | None]] | None = None,
) -> list[str]:
    """Lines of a table with left-aligned columns; ``styles[r][c]`` styles a padded cell (so
    colour never shifts the alignment). The last column is not padded."""
    widths = [max([len(h)] + [len(row[c]) for row in rows]) for c, h in enumerate(headers)]
    last = len(headers) - 1

    def line(cells: Sequence[str], cell_styles: Sequence[Callable[[str], str] | None]) -> str:
        out = []
        for c, cell in enumerate(cells):
            padded = cell if c == last else cell.ljust(widths[c])
            style = cell_styles[c] if c < len(cell_styles) else None
            out.append(style(padded) if style is not None else padded)
        return "  ".join(out).rstrip()

    lines = [line(headers, [lambda h: click.style(h, bold=True)] * len(headers))]
    for r, row in enumerate(rows):
        lines.append(line(row, styles[r] if styles is not None else []))
    return lines


def terminal_width() -> int:
    """The terminal's width; 160 when stdout is not a terminal (a pipe, a file)."""
    if not sys.stdout.isatty():
        return 160
    return shutil.get_terminal_size((120, 24)).columns


def relative_time(when: datetime | None, now: datetime | None = None) -> str:
    """``3m ago`` (or ``in 5m`` for a time to come); ``-`` for none."""
    if when is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    delta = (now - when).total_seconds()
    if -1 < delta < 1:
        return "just now"
    return f"{format_seconds(delta)} ago" if delta > 0 else f"in {format_seconds(delta)}"


def format_age(seconds: float | None) -> str:
    return "-" if seconds is None else format_seconds(seconds)


def format_time(when: datetime | None, now: datetime | None = None) -> str:
    """``2026-12-01 21:35:21 UTC (3m ago)``; ``-`` for none."""
    if when is None:
        return "-"
    stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({relative_time(when, now)})"


def pretty_json(value: Any, max_lines: int = 40, line_width: int = 200) -> list[str]:
    """Indented JSON of ``value``: each line cut at ``line_width`` characters, the whole after
    ``max_lines`` lines (a last line says how much was left out)."""
    lines = json.dumps(to_json(value), indent=2, ensure_ascii=False).splitlines()
    shown = [truncate_keep_spaces(line, line_width) for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"… {len(lines) - max_lines:,} more lines (use --json for all)")
    return shown


def truncate_keep_spaces(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w``, or a number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number with a unit: 30s, 15m, 12h, 7d or 2w"
        )
    number, unit = match.groups()
    seconds = float(number) * _UNITS[(unit or "s").lower()]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


def duration_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | None:
    """A click callback turning an option's text into a timedelta (a usage error if it is not
    a duration)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
