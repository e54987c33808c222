"""What every ``pgflow`` subcommand shares: the ``--database`` option, opening the store, and
library errors reported in one line."""

from __future__ import annotations

import os
import re
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


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _sqlite_path(database: str) -> str | None:
    """The file a SQLite ``database`` names; ``None`` for ``:memory:`` and for URLs, which
    :func:`pgflow_py.connect` checks (never quoting one: it may hold a password)."""
    if database.startswith("sqlite:///"):
        database = database.removeprefix("sqlite:///")
    elif _SCHEME.match(database):
        return None
    path = database
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
