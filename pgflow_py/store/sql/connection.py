"""The bottom layer: one connection, the transactions every other layer writes in, and errors.

The layers above write their SQL in SQLite's dialect with ``?`` and ``:name`` parameters; a
backend whose database speaks another dialect hands them a connection that translates. What
differs beyond syntax is a hook here, or a class attribute of a layer.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, TypeVar

from ...clock import Clock
from ...errors import StoreError

# A non-terminal run's finer status is derived from its tasks when read (a job's from its own
# row, which holds its task).
_STATUS_SQL = """
CASE
  WHEN r.status != 'started' THEN r.status
  WHEN r.task_status = 'started' THEN 'running'
  WHEN r.task_status = 'queued' AND r.attempts > 0 THEN 'retrying'
  WHEN r.task_status IS NOT NULL THEN
    CASE WHEN r.started_at IS NOT NULL THEN 'running'
         WHEN r.task_status = 'queued' AND r.due > :now THEN 'scheduled' ELSE 'queued' END
  WHEN EXISTS (SELECT 1 FROM step_tasks t
               WHERE t.run_id = r.id AND t.status = 'started') THEN 'running'
  WHEN EXISTS (SELECT 1 FROM step_tasks t
               WHERE t.run_id = r.id AND t.status = 'queued' AND t.attempts > 0) THEN 'retrying'
  WHEN r.started_at IS NULL THEN
    CASE WHEN (SELECT min(t.run_at) FROM step_tasks t
               WHERE t.run_id = r.id AND t.status = 'queued') > :now
         THEN 'scheduled' ELSE 'queued' END
  ELSE 'running'
END"""


class Cursor(Protocol):
    """What the layers use of a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Conn(Protocol):
    """What the layers use of a connection: ``execute`` and ``executemany``, returning cursors."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...


T = TypeVar("T")


class NeedsExclusive(Exception):
    """Raised inside a shared write transaction by work that must run alone (registering a
    changed definition, a cron tick): :meth:`_Connection._transact` runs the body again in an
    exclusive one."""


class _Conflict(Exception):
    """A shared write transaction was chosen as a deadlock's victim (rolled back; run again)."""


def placeholders(n: int) -> str:
    """``?,?,…``: ``n`` bound parameters, for an ``IN (…)`` list."""
    return ",".join("?" * n)


class _Connection(abc.ABC):
    """One connection to the database, and the transactions every other layer writes in."""

    # Hints for the driver's errors, by a word of their message.
    _HINTS: ClassVar[tuple[tuple[str, str], ...]] = ()

    # Whether this database lets write transactions run side by side (PostgreSQL). Where it
    # does, the hot paths (claims, results, starts) write in *shared* transactions, which row
    # locks keep apart: a run's row for its results, SKIP LOCKED for claims, a lock per key for
    # keyed starts. Everything else writes *exclusively*, alone, as every SQLite write does.
    _SHARED_WRITES: ClassVar[bool] = False

    _driver_errors: tuple[type[Exception], ...]  # the driver's errors, become StoreError
    _conn: Conn
    _max_variables: int  # bound parameters allowed per statement

    def __init__(self, url: str, clock: Clock, where: str) -> None:
        self.url = url
        self.clock = clock
        self._where = where  # "at /path/app.db", for messages
        self.location = where.removeprefix("at ")
        self._lock = threading.RLock()
        self._closed = False  # set by close(), under the lock
        # Flows the current write transaction made work due for ("" for any flow): what a
        # backend that can tell other processes (PostgreSQL's NOTIFY) tells them at COMMIT.
        self._due_flows: set[str] = set()
        self._shared_tx = False  # the current write transaction is a shared one

    # --- what a backend provides ---------------------------------------------------------------

    @abc.abstractmethod
    def _begin(self, shared: bool) -> None:
        """Start a write transaction that holds the database's write lock until it ends, so
        writers never interleave (SQLite's ``BEGIN IMMEDIATE``); ``shared`` (only asked of a
        backend with ``_SHARED_WRITES``): beside other shared ones, never beside an exclusive
        one."""

    def _is_conflict(self, exc: Exception) -> bool:
        """Whether a driver error is a deadlock or serialisation failure, which running the
        transaction again resolves."""
        return False

    @abc.abstractmethod
    def _in_transaction(self) -> bool: ...

    @abc.abstractmethod
    def _wrote(self) -> None:
        """Called after each committed write transaction."""

    @abc.abstractmethod
    def _unchanged_token(self, c: Conn) -> int | None:
        """A number that stays the same while no other connection commits anything (SQLite's
        ``PRAGMA data_version``); ``None`` where the database cannot tell."""

    @abc.abstractmethod
    def data_version(self) -> int:
        """A number that changes when other connections write (see ``Backend.data_version``)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def _made_due(self, flow_slug: str) -> None:
        """Record that the current write transaction queued work of ``flow_slug`` (``""``: of
        flows it does not know)."""
        self._due_flows.add(flow_slug)

    # --- transactions --------------------------------------------------------------------------

    def _rollback(self) -> None:
        if self._in_transaction():
            self._conn.execute("ROLLBACK")

    def _closed_error(self) -> StoreError:
        return StoreError(
            f"the store {self._where} is closed (store.close() was called, or its with block "
            "ended); open it again with pf.connect()"
        )

    @contextmanager
    def _write(self, *, shared: bool = False) -> Iterator[Conn]:
        """A write transaction; driver errors become a :class:`StoreError` naming the database.

        ``shared``: the body's writes are kept apart from other shared transactions' by row
        locks (see ``_SHARED_WRITES``); write shared bodies through :meth:`_transact`.
        """
        with self._lock:
            if self._closed:
                raise self._closed_error()
            shared = shared and self._SHARED_WRITES
            try:
                self._begin(shared)
                self._shared_tx = shared
                self._due_flows.clear()
                try:
                    yield self._conn
                except BaseException:
                    self._rollback()
                    raise
                self._commit()
            except self._driver_errors as exc:
                self._rollback()
                if shared and self._is_conflict(exc):
                    raise _Conflict(str(exc)) from exc
                raise self._store_error(exc) from exc
            finally:
                self._shared_tx = False
            self._wrote()

    def _commit(self) -> None:
        """Commit the write transaction; a backend that can tell other processes of the work
        it queued (``_due_flows``: PostgreSQL's NOTIFY) does so here. SQLite has nobody to
        tell: other processes read its ``PRAGMA data_version``."""
        self._conn.execute("COMMIT")

    def _transact(self, body: Callable[[Conn], T], *, shared: bool) -> T:
        """``body(c)`` in a write transaction, shared if asked and possible; run again,
        exclusively, if it raises :class:`NeedsExclusive` or loses a deadlock twice. The body
        may run more than once: it must keep its results in what it returns."""
        shared = shared and self._SHARED_WRITES
        conflicts = 0
        while True:
            try:
                with self._write(shared=shared) as c:
                    return body(c)
            except NeedsExclusive:
                if not shared:
                    raise
                shared = False
            except _Conflict:
                conflicts += 1
                shared = conflicts < 2  # an exclusive transaction meets no row locks

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            try:
                yield self._conn
            except self._driver_errors as exc:
                raise self._store_error(exc) from exc

    def _store_error(self, exc: Exception) -> StoreError:
        text = str(exc).strip()
        hint = next((h for key, h in self._HINTS if key in text.lower()), "")
        return StoreError(f"the pgflow database {self._where} failed: {text}{hint}")

    def _insert(self, c: Conn, head: str, values: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert rows with multi-row ``VALUES`` lists: about a quarter cheaper than
        ``executemany``, which runs the statement once per row."""
        if not rows:
            return
        per = max(1, min(500, self._max_variables // values.count("?")))
        for start in range(0, len(rows), per):
            chunk = rows[start:start + per]
            c.execute(head + ",".join([values] * len(chunk)), [v for row in chunk for v in row])

    def _update_from(
        self, c: Conn, sql: str, row: str, first: tuple[Any, ...], rows: list[tuple[Any, ...]]
    ) -> int:
        """Run ``sql`` (an ``UPDATE … FROM (VALUES {})``) over ``rows``, ``first`` bound before
        them; return how many rows it changed."""
        per = max(1, min(500, (self._max_variables - len(first)) // row.count("?")))
        changed = 0
        for start in range(0, len(rows), per):
            chunk = rows[start:start + per]
            changed += c.execute(
                sql.format(",".join([row] * len(chunk))),
                [*first, *(v for values in chunk for v in values)],
            ).rowcount
        return changed
