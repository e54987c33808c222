"""Helpers for testing code that uses pgflow_py: a fake clock and assertions.

The pytest fixtures ``pgflow_clock`` and ``pgflow_store`` are installed by the package's pytest
plugin (``pgflow_py.pytest_plugin``), so they are available in any test once pgflow_py is installed.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import anyio

from .clock import utc_datetime
from .dsl import Flow
from .models import Run
from .store import Store

__all__ = ("FakeClock", "assert_started")


class FakeClock:
    """A clock that only moves when told to, or when the runner waits for due work.

    Pass it to ``pf.connect(..., clock=FakeClock())``: scheduling (``delay``, ``run_at``,
    ``start_delay``), backoff and the idle waits of ``run_flows(until_idle=True)`` use it, so
    waiting an hour takes no time. Timeouts of running handlers stay real.
    """

    def __init__(self, start: datetime | float | None = None) -> None:
        if start is None:
            self._now = time.time()
        elif isinstance(start, datetime):
            self._now = start.timestamp()
        else:
            self._now = float(start)

    def now(self) -> float:
        return self._now

    def datetime(self) -> datetime:
        return utc_datetime(self._now)

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise ValueError("a FakeClock cannot go backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Jump forward instead of waiting."""
        if seconds > 0:
            self._now += seconds
        await anyio.sleep(0)


_MISSING: Any = object()


def assert_started(store: Store, flow: Flow | str, input: Any = _MISSING) -> Run:
    """Assert that a run of ``flow`` (with ``input``, if given) was started; return the newest.

    On failure, the message lists the runs of that flow that do exist.
    """
    slug = flow.slug if isinstance(flow, Flow) else flow
    runs = store.runs(flow=slug, limit=10_000)
    for run in runs:
        if input is _MISSING or run.input == input:
            return run
    wanted = "" if input is _MISSING else f" with input {input!r}"
    seen = [r.input for r in runs[:10]]
    raise AssertionError(
        f"expected a run of {slug!r}{wanted} to be started; "
        f"found {len(runs)} run(s) of it" + (f", with inputs {seen}" if seen else "")
    )
