"""The PostgreSQL backend (psycopg 3, the ``postgres`` extra): the shared SQL layers on a server.

The tables live in their own schema (``pgflow`` unless told otherwise), so they never meet an
application's tables. Every write transaction takes the schema's advisory lock: claims, results
and starts share it and run side by side, kept apart by row locks (``writes.py``); the rest
takes it exclusively and runs alone, as every write does on SQLite. Reads never wait. The
layers' SQL (SQLite's dialect) is translated once per statement text.
"""

from __future__ import annotations

import contextlib
import logging
import re
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

from ... import _json
from ...clock import Clock
from ...errors import SchemaError, StoreError
from ..sql.connection import Conn
from .listen import Listener, channel_for, payload_for
from .writes import SharedWrites

log = logging.getLogger("pgflow_py.store")

__all__ = ("SCHEMA_VERSION", "PostgresBackend")

SCHEMA_VERSION = 7
_MIGRATIONS = {
    1: "postgres_0001_initial.sql", 2: "postgres_0002_operations.sql",
    3: "postgres_0003_trace_context.sql", 4: "postgres_0004_throughput.sql",
    5: "postgres_0005_conditions.sql", 6: "postgres_0006_dashboard.sql",
    7: "postgres_0007_job_rows.sql",
}
NUL_ESCAPE = "\\u0000"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise SchemaError(
            "the PostgreSQL backend needs psycopg 3: pip install 'pgflow_py[postgres]'"
        ) from None
    return psycopg


def _describe(psycopg: Any, url: str) -> str:
    """Where a connection string points, for messages (never its password)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "on the PostgreSQL server"
    host = parts.get("host") or "localhost"
    return f"at {host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


_QUOTED = re.compile(r'"([^"]*)"|\'([^\']*)\'')
_KEYWORD_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _secrets(url: str) -> list[str]:
    """The passwords ``url`` may hold, as written and decoded, found without parsing it the
    way libpq does (the URL may be malformed: that is when its error quotes it)."""
    found: list[str] = []
    _, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # The password runs from the first ':' of the user info to an '@'; unencoded, it may
        # itself hold '@', '/' or '?', so take every reading.
        first, last = rest.find("@"), rest.rfind("@")
        for end in {first, last}:
            user_info = rest[:end]
            if ":" in user_info:
                found.append(user_info.partition(":")[2])
    if sep:
        found += re.findall(r"[?&]password=([^&]*)", url, re.IGNORECASE)
    else:  # a libpq keyword string: "host=… password=…"
        found += [m.strip("'") for m in _KEYWORD_PASSWORD.findall(url)]
    decoded = [urllib.parse.unquote(secret, errors="replace") for secret in found]
    return sorted({s for s in (*found, *decoded) if s}, key=len, reverse=True)


def _redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any of ``secrets``, nor any quoted part of one (libpq quotes the
    token it could not parse, which may be a piece of a password)."""
    for secret in secrets:
        text = text.replace(secret, "***")

    def hide(match: re.Match[str]) -> str:
        quoted = match.group(1) if match.group(1) is not None else match.group(2)
        if quoted and quoted != "***" and any(quoted in secret for secret in secrets):
            return match.group(0).replace(quoted, "***")
        return match.group(0)

    return _QUOTED.sub(hide, text) if secrets else text


class _Translating:
    """A psycopg connection that speaks the layers' SQL: ``?`` and ``:name`` parameters become
    PostgreSQL's own ``$1, $2, …`` (a raw cursor, so psycopg need not parse the statement: it
    does not cache statements of more than 50 parameters, and parsing one of a few thousand
    took longer than running it), and SQLite's ``INDEXED BY`` hints are dropped."""

    def __init__(self, db: Any, raw_cursor: Any) -> None:
        self._db = db
        self._raw_cursor = raw_cursor
        self._sql: dict[str, tuple[str, list[str] | None]] = {}
        self.pipeline: Any = None  # psycopg's Pipeline while a write transaction is open

    def _translate(self, sql: str) -> tuple[str, list[str] | None]:
        """The statement in PostgreSQL's terms, and the order of its named parameters."""
        found = self._sql.get(sql)
        if found is None:
            text = _INDEXED_BY.sub("", sql)
            names: list[str] = []

            def number(match: re.Match[str]) -> str:
                if match.group(1) not in names:
                    names.append(match.group(1))
                return f"${names.index(match.group(1)) + 1}"

            text = _NAMED.sub(number, text)
            if not names:
                pieces = text.split("?")
                text = pieces[0] + "".join(f"${i}{piece}" for i, piece in enumerate(pieces[1:], 1))
            found = (text, names or None)
            if len(self._sql) > 4096:  # IN lists of every length: keep it bounded
                self._sql.clear()
            self._sql[sql] = found
        return found

    def _params(self, names: list[str] | None, parameters: Any) -> Any:
        if names is None:
            return parameters
        return [parameters[name] for name in names]

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        text, names = self._translate(sql)
        cursor = self._raw_cursor(self._db)
        cursor.execute(text, self._params(names, parameters))
        return cursor if self.pipeline is None else _Piped(cursor, self.pipeline)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        text, names = self._translate(sql)
        cursor = self._raw_cursor(self._db)
        cursor.executemany(text, [self._params(names, p) for p in parameters])
        return cursor


class _Piped:
    """A cursor of a statement sent in pipeline mode: its rows are fetched when asked for
    (psycopg syncs the pipeline then), and so is its row count (synced here)."""

    __slots__ = ("_cursor", "_pipeline")

    def __init__(self, cursor: Any, pipeline: Any) -> None:
        self._cursor = cursor
        self._pipeline = pipeline

    @property
    def rowcount(self) -> int:
        if self._cursor.pgresult is None:  # its result has not come back yet
            self._pipeline.sync()
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor.fetchall())


class PostgresBackend(SharedWrites):
    """:class:`~pgflow_py.store.base.Backend` on PostgreSQL.

    ``url`` is a libpq connection string or ``postgresql://`` URL; ``schema`` names the
    PostgreSQL schema that holds pgflow's tables (created on first use).
    """

    _HINTS = (
        ("connection refused", "; is the server running, and is the host and port right?"),
        ("password authentication failed", "; check the user and password in the URL"),
        ("does not exist", "; create the database first (createdb), or fix its name in the URL"),
        ("permission denied", "; grant this user CREATE on the database, or pick another schema"),
    )
    _APPEND_HISTORY = (
        "history = (coalesce(history, '[]')::jsonb || jsonb_build_array(jsonb_build_object("
        "'attempt', attempts, 'error', ?::text, 'at', ?::float8, 'traceback', ?::text)))::text"
    )
    _NEWEST_FIRST = "r.seq DESC"
    _SEQ = "seq"
    _CANDIDATES = "r.id IN ({ids}{more})"
    _CANDIDATE_KEY = "id"
    _DERIVE_IN_ORDER = True  # else the status of every candidate is derived, then sorted

    _db: Any  # the psycopg connection
    _translating: _Translating  # _conn, as what it is

    def __init__(self, url: str, clock: Clock, *, schema: str = "pgflow") -> None:
        psycopg = _import_psycopg()
        if not _SCHEMA_NAME.match(schema):
            raise SchemaError(
                f"schema {schema!r} is not a plain PostgreSQL name: use lower-case letters, "
                "digits and underscores"
            )
        self._psycopg = psycopg
        self._schema = schema
        self._channel = channel_for(schema)
        self._secrets = _secrets(url)
        self._driver_errors = (psycopg.Error,)
        where = f"{_describe(psycopg, url)}, schema {schema}"
        super().__init__(url, clock, where)
        self._max_variables = 65_535
        self._started = 0  # runs started here since the tables were last analyzed
        self._analyzed = 0  # rows of runs then
        self._open()
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        error: StoreError | None = None
        try:
            db = self._psycopg.connect(self.url, autocommit=True)
        except self._psycopg.Error as exc:
            error = self._store_error(exc)
        if error is not None:
            # Raised outside the except block, so the driver's error (whose message may quote
            # the URL, password and all) is neither its cause nor its context.
            raise error
        db.execute(f"SET search_path TO {self._schema}")
        # The schema's locks: the exclusive writers' (the bigint key all versions used), and
        # the space of the per-key and per-flow locks of shared transactions (writes.py).
        self._schema_lock, self._lock_space = db.execute(
            "SELECT CAST(hashtext(%s) AS BIGINT), hashtext(%s)",
            (f"pgflow:{self._schema}", f"pgflow:{self._schema}"),
        ).fetchone()
        # The store's statements read a few rows through indexes, but the planner's cost of
        # one with a correlated subquery per row of a large table (a runs listing by status
        # at a million runs) passes jit_above_cost, and compiling it took 450 ms of a 2 ms
        # query (python -m benchmarks.dashboard). No statement here gains from JIT.
        db.execute("SET jit = off")
        self._db = db
        self._conn = self._translating = _Translating(db, self._psycopg.RawCursor)

    def _ensure_open(self) -> None:
        """Reconnect after the server closed the connection (a restart, a failover)."""
        if self._closed:
            raise self._closed_error()
        if self._db.closed or self._db.broken:
            self._open()

    def _migrate(self) -> None:
        with self._write() as c:
            # The migrations are scripts of many statements, which pipeline mode cannot send.
            self._leave_pipeline(None)
            # Only if missing: creating needs CREATE on the database, which the role that
            # merely uses an existing schema need not have.
            if c.execute("SELECT to_regnamespace(?) IS NULL", (self._schema,)).fetchone()[0]:
                c.execute(f"CREATE SCHEMA {self._schema}")
            exists = c.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]
            version = 0
            if exists:
                row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row is not None else 0
            else:
                tables = [r[0] for r in c.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                ).fetchall()]
                if tables:
                    raise SchemaError(
                        f"the database {self._where}, holds tables that are not pgflow's "
                        f"({sorted(tables)[:5]}); give pgflow a schema of its own"
                    )
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"the database {self._where} was written by a newer pgflow_py "
                    f"(schema version {version}; this version knows up to {SCHEMA_VERSION}); "
                    "upgrade pgflow_py to use it"
                )
            # A version without a file here is one this branch skipped (its number was taken by
            # a migration of another branch); the merge fills it in.
            for target in sorted(t for t in _MIGRATIONS if version < t <= SCHEMA_VERSION):
                sql = resources.files(__package__) / "schema" / _MIGRATIONS[target]
                self._db.execute(sql.read_text(encoding="utf-8"))
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(target),),
                )

    def _condition_met(self, c: Conn, if_: Any, if_not: Any, value_json: str) -> bool:
        # PostgreSQL's own jsonb @>, which pgflow evaluates; pgflow_py.conditions implements
        # the same for SQLite and flow.perform (a test holds the two to the same answers).
        patterns = [None if p is None else _json.dumps(p) for p in (if_, if_not)]
        if any(NUL_ESCAPE in text for text in (value_json, *patterns) if text is not None):
            # jsonb cannot hold U+0000, which a step's output (stored as text) may: the cast
            # would abort the transaction, so these few are decided in Python.
            return super()._condition_met(c, if_, if_not, value_json)
        row = c.execute(
            "SELECT (CAST(? AS jsonb) IS NULL OR CAST(? AS jsonb) @> CAST(? AS jsonb)) "
            "AND (CAST(? AS jsonb) IS NULL OR NOT CAST(? AS jsonb) @> CAST(? AS jsonb))",
            (patterns[0], value_json, patterns[0], patterns[1], value_json, patterns[1]),
        ).fetchone()
        return bool(row[0])

    def _store_error(self, exc: Exception) -> StoreError:
        error = super()._store_error(exc)
        text = _redact(str(error), self._secrets)
        if "percent-encoded" in text:
            text += (
                " (in a URL, a user name or password holding one of : / ? # [ ] @ % must "
                "percent-encode it, e.g. % as %25: urllib.parse.quote(password, safe=''))"
            )
        return error if text == str(error) else StoreError(text)

    def _begin(self, shared: bool) -> None:
        self._ensure_open()
        # READ COMMITTED whatever the server's default: each statement sees what committed
        # before it began, so a writer sees the writes of the one it waited for (a lock below,
        # or a row lock in a shared transaction). The schema's lock is held until COMMIT or
        # ROLLBACK: exclusive, one writer at a time as on SQLite; shared, beside the other
        # shared ones (see writes.py).
        take = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        self._keys_locked = 0
        # The transaction runs in pipeline mode: a statement whose result nobody reads (BEGIN,
        # the lock, SAVEPOINT, an INSERT) goes out with the next one whose result is read,
        # and COMMIT with the NOTIFY: a round trip per answer needed, not per statement.
        self._pipeline_mode = self._db.pipeline()
        self._translating.pipeline = self._pipeline_mode.__enter__()
        self._db.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        self._db.execute(f"SELECT {take}({self._schema_lock})")

    def _leave_pipeline(self, error: BaseException | None) -> None:
        """End pipeline mode: send what is queued and read every result (raising the first
        error, unless ``error`` is already being handled)."""
        if self._translating.pipeline is not None:
            self._translating.pipeline = None
            self._pipeline_mode.__exit__(None if error is None else type(error), error, None)

    def _is_conflict(self, exc: Exception) -> bool:
        return getattr(exc, "sqlstate", None) in ("40P01", "40001")  # deadlock, serialization

    def _in_transaction(self) -> bool:
        return bool(
            self._db.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE
        )

    def _rollback(self) -> None:
        if self._translating.pipeline is not None:
            # The error that led here is the one being raised.
            with contextlib.suppress(self._psycopg.Error):
                self._leave_pipeline(StoreError("rolled back"))
        if not self._db.closed and self._in_transaction():
            self._db.execute("ROLLBACK")

    def _commit(self) -> None:
        # One NOTIFY per transaction that queued work, however many rows (per-row notifies
        # serialise writers on the server's notification queue: Oban #956); delivered at
        # COMMIT, and not at all on ROLLBACK. Sent with the COMMIT, in one round trip.
        if self._due_flows:
            self._db.execute(
                "SELECT pg_notify(%s, %s)", (self._channel, payload_for(self._due_flows))
            )
        self._db.execute("COMMIT")
        self._leave_pipeline(None)

    def listen(self, callback: Callable[[frozenset[str] | None], None]) -> Listener:
        """Start a :class:`Listener` calling ``callback(flow_slugs)`` when another connection
        commits work of those flows (``None``: of any flow); close it when done."""
        listener = Listener(
            self._psycopg, self.url, self._channel, self._where, callback, self._backend_pid,
            lambda text: _redact(text, self._secrets),
        )
        listener.start()
        return listener

    def _backend_pid(self) -> int | None:
        """The server process of this store's connection: its own notifications are not news."""
        db = self._db
        return None if db.closed else int(db.info.backend_pid)

    def _wrote(self) -> None:
        """Nothing to do: the server checkpoints on its own."""

    def _started_runs(self, count: int) -> None:
        self._started += count
        if self._started >= max(1_000, self._analyzed // 10):
            self._analyze()

    def _analyze(self) -> None:
        """Refresh the planner's statistics of the tables that grow.

        A queue's tables go from empty to many thousands of rows in seconds, long before
        autovacuum looks again (a minute, by default); planned with the statistics of an empty
        table, the claims and completions scan instead of using their indexes (measured: 3,700
        vs 5,400-6,000 jobs/s). Best effort: a user who may not analyze them gets autovacuum's.
        """
        self._started = 0
        with self._lock:
            try:
                self._ensure_open()
                self._db.execute("ANALYZE runs, step_tasks, step_states")
                self._analyzed = int(self._db.execute(
                    "SELECT reltuples FROM pg_class WHERE oid = 'runs'::regclass"
                ).fetchone()[0])
            except self._psycopg.Error as exc:
                log.debug("could not analyze pgflow's tables %s: %s", self._where, exc)

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        with self._lock:
            self._ensure_open()
            with super()._read() as c:
                yield c

    def _unchanged_token(self, c: Conn) -> int | None:
        # No counter of other connections' commits: the stored definition is always read.
        return None

    def data_version(self) -> int:
        # The current snapshot (oldest running transaction, next id, those in progress): it
        # changes when any transaction, this connection's too, starts writing or commits.
        with self._read() as c:
            snapshot = c.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        return zlib.crc32(snapshot.encode())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    def drop_schema_and_close(self) -> None:
        """Close, then delete pgflow's schema and everything in it (for tests)."""
        self.close()
        with self._psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {self._schema} CASCADE")
