"""Retry delays (pure functions)."""

from __future__ import annotations

import random
from typing import Literal

__all__ = ("BackoffKind", "retry_delay")

BackoffKind = Literal["exponential", "fixed"]


def retry_delay(
    failed_attempts: int,
    *,
    base_delay: float,
    backoff: BackoffKind = "exponential",
    max_delay: float = 3600.0,
    jitter: bool = False,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt, after ``failed_attempts`` failures (1-based).

    Exponential: ``base_delay * 2**(n-1)`` capped by ``max_delay``; fixed: ``base_delay``.
    With ``jitter`` the delay is drawn uniformly from [0.5, 1.0] of that value.
    """
    if failed_attempts < 1:
        raise ValueError(f"failed_attempts is 1-based, got {failed_attempts}")
    if backoff == "fixed":
        delay = float(base_delay)
    else:
        # Cap the exponent first so huge attempt counts cannot overflow a float.
        exponent = min(failed_attempts - 1, 1000)
        delay = float(base_delay) * 2.0**exponent if base_delay else 0.0
    delay = min(delay, float(max_delay))
    if jitter:
        delay *= (rng or random).uniform(0.5, 1.0)
    return delay
