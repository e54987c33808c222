"""Benchmarks for pgflow_py (not part of the test suite): ``python -m benchmarks``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pgflow_py as pf


def fresh_db(directory: Path, name: str) -> Path:
    """The path of a database file in ``directory`` with no leftovers of an earlier repetition."""
    path = directory / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def many_runs_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a benchmark over a database of many runs (``--runs --path --reuse
    --database``); see :func:`filled_database`."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--path", type=Path, default=Path("/tmp"))
    parser.add_argument("--reuse", action="store_true", help="keep a database filled before")
    parser.add_argument("--database", help="a PostgreSQL URL instead of a SQLite file")
    return parser


def filled_database(
    args: argparse.Namespace, name: str, fill: Callable[[pf.Store, int], None]
) -> str | Path:
    """The database a many-runs benchmark measures: ``args.database`` (a PostgreSQL URL) or the
    SQLite file ``name`` in ``args.path``, filled by ``fill(store, args.runs)`` unless
    ``args.reuse`` and it was filled before (a URL is taken as filled)."""
    if args.database:
        if not args.reuse:
            with pf.connect(args.database) as store:
                fill(store, args.runs)
        return str(args.database)
    path = args.path / f"{name}.db"
    if not args.reuse or not path.exists():
        path = fresh_db(args.path, name)
        with pf.connect(path) as store:
            fill(store, args.runs)
    return path
