"""The SQLite backend: one file (or ``:memory:``), WAL, one connection per process.

Writes run in ``BEGIN IMMEDIATE`` transactions so concurrent processes queue on the busy timeout
instead of failing on lock upgrades. WAL checkpoints run in a background thread. Everything
else is the shared layers of :mod:`pgflow_py.store.sql`, whose SQL is SQLite's own dialect.
"""

from __future__ import annotations

import os
import sqlite3
from importlib import resources

import sqlite_utils

from ...clock import Clock
from ...errors import SchemaError, StoreError
from ..sql import SqlBackend
from ..sql.claims import LOST_WORKER
from ..sql.connection import Conn
from .checkpoint import Checkpointer

__all__ = ("LOST_WORKER", "SCHEMA_VERSION", "SqliteBackend", "UnusableDatabase")

SCHEMA_VERSION = 8
APPLICATION_ID = 0x70666C77  # "pflw": marks a file as a pgflow_py database
_MIGRATIONS = {
    1: "sqlite_0001_initial.sql", 2: "sqlite_0002_lean_jobs.sql", 3: "sqlite_0003_operations.sql",
    4: "sqlite_0004_trace_context.sql", 5: "sqlite_0005_throughput.sql",
    6: "sqlite_0006_conditions.sql", 7: "sqlite_0007_dashboard.sql", 8: "sqlite_0008_job_rows.sql",
}


class UnusableDatabase(StoreError, SchemaError):
    """The database file cannot be opened or used (a missing or read-only directory, a file
    that is not SQLite). A :class:`SchemaError` too, as it was before it said why."""


def _create_private(path: str) -> None:
    """Create a missing database file readable by this user alone: run inputs can be
    secrets. SQLite gives the -wal and -shm files the database's permissions, so they follow
    (and an existing file keeps the permissions its owner chose)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise _open_error(path, exc) from None


def _open_error(path: str, exc: BaseException) -> UnusableDatabase:
    """Why ``path`` cannot be used, found by looking at it (what SQLite reports, "unable to
    open database file", says neither which nor what to do)."""
    full = os.path.abspath(path)
    directory = os.path.dirname(full)
    name = os.path.basename(full)
    text = str(exc).strip()
    if not os.path.exists(full):
        problem = f"cannot create database file {full!r}: "
        if not os.path.isdir(directory):
            problem += (
                f"directory {directory!r} does not exist (create it first)"
                if not os.path.exists(directory) else f"{directory!r} is not a directory"
            )
        elif not os.access(directory, os.W_OK | os.X_OK):
            problem += (
                f"directory {directory!r} is not writable by this user (give it write access, "
                "or point pgflow at another directory)"
            )
        else:
            problem += f"{text}; check the path and its directory"
        return UnusableDatabase(problem)
    prefix = f"cannot use the pgflow database {full!r}: "
    if os.path.isdir(full):
        return UnusableDatabase(prefix + "it is a directory; point pgflow at a file path")
    if not os.access(full, os.R_OK | os.W_OK):
        return UnusableDatabase(
            prefix + "the file is not readable and writable by this user (give it access)"
        )
    if not os.access(directory, os.W_OK | os.X_OK) and not all(
        os.access(full + suffix, os.R_OK | os.W_OK) for suffix in ("-wal", "-shm")
    ):
        return UnusableDatabase(
            prefix + f"directory {directory!r} is not writable by this user (SQLite needs to "
            f"create {name}-wal and {name}-shm beside the database; give it write access)"
        )
    lowered = text.lower()
    if "not a database" in lowered:
        return UnusableDatabase(
            prefix + "the file is not an SQLite database (or is encrypted); point pgflow at "
            "another path"
        )
    if "malformed" in lowered:
        return UnusableDatabase(prefix + "the file is corrupt; restore it from a backup")
    if isinstance(exc, StoreError):  # already says what and where
        return UnusableDatabase(text)
    return UnusableDatabase(prefix + text)


class SqliteBackend(SqlBackend):
    """:class:`~pgflow_py.store.base.Backend` on SQLite."""

    _driver_errors = (sqlite3.Error,)
    _HINTS = (
        ("readonly", "; the file or its directory (which holds the -wal and -shm files) is "
                     "read-only: give this process write access"),
        ("disk is full", "; the disk (or the database's size limit) is full: free some space"),
        ("locked", "; another process held the write lock longer than the busy timeout"),
        ("malformed", "; the file is corrupt: restore it from a backup"),
        ("not a database", "; the file is not a SQLite database: point pgflow at another path"),
        ("unable to open", "; check that the directory exists and is writable"),
    )

    def __init__(self, path: str, clock: Clock, *, busy_timeout: float = 10.0) -> None:
        on_disk = path not in (":memory:", "")
        where = f"at {os.path.abspath(path)}" if on_disk else "in memory"
        super().__init__(path, clock, where)
        if on_disk:
            _create_private(path)
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from None
        self._conn: Conn = self._db
        self._checkpointer: Checkpointer | None = None
        # Bound parameters per statement (999 before SQLite 3.32; Python < 3.11 cannot ask).
        getlimit = getattr(self._db, "getlimit", None)
        limit = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
        self._max_variables = 999 if getlimit is None or limit is None else int(getlimit(limit))
        try:
            self._configure(busy_timeout)
            self._migrate()
        except (sqlite3.DatabaseError, StoreError) as exc:
            self._db.close()
            raise _open_error(path, exc) from None
        except BaseException:
            self._db.close()
            raise
        if path != ":memory:":
            self._checkpointer = Checkpointer(path, busy_timeout)

    def _configure(self, busy_timeout: float) -> None:
        c = self._db
        c.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if self.url != ":memory:":
            c.execute("PRAGMA journal_mode = WAL")
            # Checkpoints run in the background (see checkpoint.py); this is the fallback should
            # that thread fall behind. Past that, the WAL file is cut back to 64 MB.
            c.execute("PRAGMA wal_autocheckpoint = 16384")
            c.execute("PRAGMA journal_size_limit = 67108864")
        c.execute("PRAGMA synchronous = NORMAL")
        # Runs and tasks are touched at random (uuids): keep the hot pages in memory.
        c.execute("PRAGMA cache_size = -65536")
        c.execute("PRAGMA mmap_size = 268435456")
        c.execute("PRAGMA temp_store = MEMORY")
        c.execute("PRAGMA foreign_keys = OFF")

    def _migrate(self) -> None:
        c = self._db
        version = c.execute("PRAGMA user_version").fetchone()[0]
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database {self._where} was written by a newer pgflow_py "
                f"(schema version {version}; this version knows up to {SCHEMA_VERSION}); "
                "upgrade pgflow_py to use it"
            )
        if version == SCHEMA_VERSION and app_id == APPLICATION_ID:
            return
        with self._write():
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = c.execute("PRAGMA user_version").fetchone()[0]
            app_id = c.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                tables = sqlite_utils.Database(c).table_names()
                if tables:
                    raise SchemaError(
                        f"the database {self._where} is not a pgflow database "
                        f"(it has tables {tables[:5]}); use a separate file for pgflow"
                    )
            # A version without a file here is one this branch skipped (its number was taken by
            # a migration of another branch); the merge fills it in.
            for target in sorted(t for t in _MIGRATIONS if version < t <= SCHEMA_VERSION):
                sql = resources.files(__package__) / "schema" / _MIGRATIONS[target]
                for statement in sql.read_text(encoding="utf-8").split(";\n"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {target}")
            c.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _begin(self, shared: bool) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _in_transaction(self) -> bool:
        return self._db.in_transaction

    def _wrote(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wrote()

    def _unchanged_token(self, c: Conn) -> int | None:
        return int(c.execute("PRAGMA data_version").fetchone()[0])

    def data_version(self) -> int:
        with self._read() as c:
            return int(c.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._lock:
            self._closed = True
            self._db.close()
