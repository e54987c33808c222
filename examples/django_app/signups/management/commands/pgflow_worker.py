"""``python manage.py pgflow_worker``: serve the app's jobs until SIGTERM or SIGINT.

The same as ``pgflow worker signups.jobs``, with Django set up first, so handlers can use the
ORM and settings.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

import pgflow_py as pf
from signups.jobs import FLOWS
from signups.pgflow import get_store


class Command(BaseCommand):
    help = "Serve the signups app's pgflow jobs (until SIGTERM/SIGINT, or --until-idle)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, default=10,
                            help="tasks run at once by this worker (default 10)")
        parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                            help="seconds running tasks get to finish after SIGTERM (default 30)")
        parser.add_argument("--until-idle", action="store_true",
                            help="return once nothing is queued, running or scheduled")

    def handle(self, *args: Any, **options: Any) -> None:
        stats = pf.run_flows(
            FLOWS, store=get_store(), concurrency=options["concurrency"],
            shutdown_timeout=options["shutdown_timeout"], until_idle=options["until_idle"],
        )
        self.stdout.write(f"worker stopped: {stats}")
