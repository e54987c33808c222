"""What every ``pgflow`` subcommand shares: the ``--database`` option, opening the store, and
library errors reported in one line."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from ..errors import PgflowError
from ..store import Store, connect

__all__ = ("database_option", "json_option", "one_line", "open_store")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DATABASE = "pgflow.db"


def database_option(function: F) -> F:
    return click.option(
        "--database", envvar="PGFLOW_DATABASE", default=DEFAULT_DATABASE, show_default=True,
        help="SQLite path, or postgresql:// URL (?schema=name); also $PGFLOW_DATABASE.",
    )(function)


def json_option(function: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON to stdout."
    )(function)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _sqlite_path(database: str) -> str | None:
    if database.startswith(("postgresql://", "postgres://")) or "://" in database.split("/", 1)[0]:
        return None
    path = database.removeprefix("sqlite:///") if database.startswith("sqlite:///") else database
    return None if path == ":memory:" else path


@contextmanager
def open_store(database: str) -> Iterator[Store]:
    """The store at ``database``; a library error inside becomes a one-line ``Error: ...``.

    A SQLite file that does not exist is refused rather than created: ``pgflow runs`` with a
    mistyped path should say so, not show an empty new database.
    """
    path = _sqlite_path(database)
    if path is not None and not os.path.exists(path):
        raise click.ClickException(
            f"no pgflow database at {path}: give --database (or set $PGFLOW_DATABASE); a "
            "worker, or a start from code, creates it"
        )
    try:
        with connect(database) as store:
            yield store
    except PgflowError as exc:
        raise click.ClickException(one_line(exc)) from exc
