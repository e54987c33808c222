"""The app's jobs. Handlers are plain functions: they may use the ORM like any Django code."""

from __future__ import annotations

from typing import Any

import pgflow_py as pf


@pf.job(queue="welcome_email", max_attempts=3, base_delay=5, timeout=30)
def welcome_email(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    # django.core.mail.send_mail(...) here; the example only says what it would send.
    return {"sent_to": input["email"]}


FLOWS: list[pf.Flow] = [welcome_email]
"""What the worker command serves."""
