"""The ``pgflow`` command: ``worker`` serves flows; ``runs``, ``show``, ``start``, ``retry``,
``cancel``, ``prune``, ``stats`` and ``workers`` inspect and operate on a store; ``dashboard``
serves a JSON API over one."""

from __future__ import annotations

import click

from .dashboard import dashboard
from .monitor import stats, workers
from .runs import cancel, prune, retry, runs, show, start
from .worker import flows_in_modules, load_resources, worker

__all__ = ("flows_in_modules", "load_resources", "main")


@click.group()
@click.version_option(package_name="pgflow_py")
def main() -> None:
    """pgflow_py: background jobs and workflows on SQLite or PostgreSQL."""


for _command in (worker, runs, show, start, retry, cancel, prune, stats, workers, dashboard):
    main.add_command(_command)
