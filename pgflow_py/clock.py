"""Time, behind a small interface so tests can replace it (see ``pgflow_py.testing.FakeClock``)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol

import anyio

__all__ = ("Clock", "SystemClock", "format_seconds", "utc_datetime")


def utc_datetime(timestamp: float) -> datetime:
    """The aware UTC datetime of ``timestamp`` (seconds since the epoch)."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


class Clock(Protocol):
    """What scheduling, backoff and idle waits read time from."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m``, ``5h``, ``2d``: the largest whole unit."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"
