"""Cron: start one run per tick of each served flow that has a ``cron`` expression.

Every runner serving a cron flow does this. The store records the latest tick started per flow
and creates a tick's run only if no run of that tick (or a later one) was created, so however
many runners reach the tick, and even after its run was pruned or cancelled, there is one run.
The run carries the key ``cron:<tick timestamp>`` so it can be found.
After downtime only the most recent missed tick runs (once), and never a tick from before the
flow was first registered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import attrs
from croniter import croniter

from ..dsl import Flow
from ..store import Store

__all__ = ("CronScheduler", "cron_key", "latest_tick", "next_tick")

log = logging.getLogger("pgflow_py.runner")


def latest_tick(expression: str, now: float) -> float:
    """The most recent tick at or before ``now`` (UTC)."""
    # croniter's get_prev is strictly before its start; start just after `now` (ticks are whole
    # minutes, so the next whole second is safe).
    return float(croniter(expression, math.floor(now) + 1).get_prev(float))


def next_tick(expression: str, now: float) -> float:
    """The first tick strictly after ``now``."""
    return float(croniter(expression, now).get_next(float))


def cron_key(tick: float) -> str:
    return f"cron:{int(tick)}"


@attrs.define
class _Entry:
    flow: Flow
    expression: str
    since: float
    next_at: float


class CronScheduler:
    """Starts the runs of due ticks for the cron flows of one runner."""

    def __init__(self, store: Store, flows: Sequence[Flow]) -> None:
        self.store = store
        self.entries: list[_Entry] = []
        now = store.clock.now()
        for flow in flows:
            expression = flow.definition.cron
            if expression is None:
                continue
            since = store.backend.registered_at(flow.slug)
            self.entries.append(_Entry(flow, expression, now if since is None else since, now))

    @property
    def next_at(self) -> float | None:
        """When the next tick of any flow is due (``None`` without cron flows)."""
        return min((e.next_at for e in self.entries), default=None)

    def start_due(self) -> None:
        """Start the run of the latest due tick of each flow whose next tick has come."""
        now = self.store.clock.now()
        for entry in self.entries:
            if entry.next_at > now:
                continue
            tick = latest_tick(entry.expression, now)
            if tick >= entry.since:
                run = self.store.start_cron_tick(entry.flow, tick, cron_key(tick))
                if run is not None:
                    log.info("cron %r: started run %s for %s", entry.flow.slug, run.id,
                             cron_key(tick))
            entry.next_at = next_tick(entry.expression, now)
