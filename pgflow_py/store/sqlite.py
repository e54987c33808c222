"""The SQLite backend: one file (or ``:memory:``), WAL, one connection per process.

Writes run in ``BEGIN IMMEDIATE`` transactions so concurrent processes queue on the busy timeout
instead of failing on lock upgrades. A claim is a single ``UPDATE ... RETURNING`` over the partial
index of queued tasks; results are applied in batches, one transaction per batch.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from typing import Any

import sqlite_utils

from .. import _json
from ..backoff import retry_delay
from ..clock import Clock, utc_datetime
from ..definition import FlowDefinition, StepDefinition
from ..errors import InputError, SchemaError, ShapeMismatch, StoreError
from ..models import AttemptRecord, Run, RunStatus, StepRun, TaskRun
from ._checkpoint import Checkpointer
from .base import ClaimedTask, NewRun, RunFailure, TaskFailure, TaskSuccess

__all__ = ("LOST_WORKER", "SCHEMA_VERSION", "SqliteBackend")

LOST_WORKER = "WorkerLost: the worker running this attempt stopped renewing its lease"

SCHEMA_VERSION = 2
APPLICATION_ID = 0x70666C77  # "pflw": marks a file as a pgflow_py database
_MIGRATIONS = {1: "sqlite_0001_initial.sql", 2: "sqlite_0002_lean_jobs.sql"}

# What to do about the SQLite errors a user can meet, by a word of their message.
_HINTS = (
    ("readonly", "; the file or its directory (which holds the -wal and -shm files) is read-only: "
                 "give this process write access"),
    ("disk is full", "; the disk (or the database's size limit) is full: free some space"),
    ("locked", "; another process held the write lock longer than the busy timeout"),
    ("malformed", "; the file is corrupt: restore it from a backup"),
    ("not a database", "; the file is not a SQLite database: point pgflow at another path"),
    ("unable to open", "; check that the directory exists and is writable"),
)

# A non-terminal run's finer status is derived from its tasks when read.
_STATUS_SQL = """
CASE
  WHEN r.status != 'started' THEN r.status
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

# runs.started_at is written when the first attempt ends; until then it is the running attempts'.
_STARTED_SQL = """coalesce(r.started_at, (SELECT min(t.started_at) FROM step_tasks t
                                     WHERE t.run_id = r.id AND t.status = 'started'))"""

_RUN_COLUMNS = f"""r.id, r.flow_slug, {_STATUS_SQL} AS status, r.input, r.output, r.error, r.key,
r.priority, r.created_at, {_STARTED_SQL}, r.finished_at"""


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else utc_datetime(ts)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class _Graph:
    """What completing steps needs of a definition, looked up once per definition."""

    __slots__ = ("definition", "dependents", "leaves", "max_attempts")

    def __init__(self, d: FlowDefinition) -> None:
        self.definition = d
        self.dependents = {s.slug: d.dependents(s.slug) for s in d.steps}
        self.leaves = tuple(s.slug for s in d.leaf_steps)
        self.max_attempts = {s.slug: d.effective(s.slug).max_attempts for s in d.steps}


class SqliteBackend:
    """:class:`~pgflow_py.store.base.Backend` on SQLite."""

    def __init__(self, path: str, clock: Clock, *, busy_timeout: float = 10.0) -> None:
        self.url = path
        self.clock = clock
        self._lock = threading.RLock()
        self._definitions: dict[str, tuple[int, FlowDefinition]] = {}
        self._json_cache: dict[str, tuple[FlowDefinition, str]] = {}
        self._graphs: dict[str, _Graph] = {}
        # flow slug -> (definition, version, data_version when found stored as is)
        self._verified: dict[str, tuple[FlowDefinition, int, int]] = {}
        self._failed_runs: list[RunFailure] | None = None
        where = "in memory" if path == ":memory:" else f"at {os.path.abspath(path)}"
        self._where = where
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise SchemaError(f"cannot open the pgflow database {where}: {exc}") from exc
        self._checkpointer: Checkpointer | None = None
        # Bound parameters per statement (999 before SQLite 3.32; Python < 3.11 cannot ask).
        getlimit = getattr(self._conn, "getlimit", None)
        limit = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
        self._max_variables = 999 if getlimit is None or limit is None else int(getlimit(limit))
        try:
            self._configure(busy_timeout)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise SchemaError(
                f"the file {where} is not a usable pgflow database ({exc}); "
                "point pgflow at another path or restore the file"
            ) from exc
        except BaseException:
            self._conn.close()
            raise
        if path != ":memory:":
            self._checkpointer = Checkpointer(path, busy_timeout)

    # --- connection and schema -----------------------------------------------------------------

    def _configure(self, busy_timeout: float) -> None:
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if self.url != ":memory:":
            c.execute("PRAGMA journal_mode = WAL")
            # Checkpoints run in the background (see _checkpoint); this is the fallback should
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
        c = self._conn
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
            for target in range(version + 1, SCHEMA_VERSION + 1):
                sql = resources.files(__package__) / "schema" / _MIGRATIONS[target]
                for statement in sql.read_text(encoding="utf-8").split(";\n"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {target}")
            c.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; SQLite errors become a :class:`StoreError` naming the file."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise self._store_error(exc) from exc
            if self._checkpointer is not None:
                self._checkpointer.wrote()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self._store_error(exc) from exc

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        hint = next((h for key, h in _HINTS if key in text.lower()), "")
        return StoreError(f"the pgflow database {self._where} failed: {text}{hint}")

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._lock:
            self._conn.close()

    # --- definitions ---------------------------------------------------------------------------

    def register(self, definition: FlowDefinition) -> int:
        with self._write() as c:
            return self._register(c, definition)

    def _json_of(self, definition: FlowDefinition) -> str:
        # Definitions are immutable: encode each once; one entry per flow slug.
        cached = self._json_cache.get(definition.slug)
        if cached is None or cached[0] is not definition:
            cached = (definition, definition.to_json())
            self._json_cache[definition.slug] = cached
        return cached[1]

    def _register(self, c: sqlite3.Connection, definition: FlowDefinition) -> int:
        """Write or update ``definition`` inside the caller's transaction; return its version."""
        # Unchanged since this connection found it stored, if no other connection has committed
        # anything since (PRAGMA data_version): then the read can be skipped.
        seen = c.execute("PRAGMA data_version").fetchone()[0]
        verified = self._verified.get(definition.slug)
        if verified is not None and verified[0] is definition and verified[2] == seen:
            return verified[1]
        now = self.clock.now()
        text = self._json_of(definition)
        row = c.execute(
            "SELECT definition, version FROM flows WHERE flow_slug = ?", (definition.slug,)
        ).fetchone()
        if row is not None and row[0] == text:
            version = int(row[1])
            self._verified[definition.slug] = (definition, version, seen)
        elif row is None:
            self._verified.pop(definition.slug, None)
            version = 1
            c.execute(
                "INSERT INTO flows (flow_slug, kind, definition, version, created_at, updated_at) "
                "VALUES (?, ?, ?, 1, ?, ?)",
                (definition.slug, definition.kind, text, now, now),
            )
            self._insert_steps(c, definition)
        else:
            self._verified.pop(definition.slug, None)  # this connection's own write
            stored = FlowDefinition.from_json(row[0])
            version = int(row[1])
            if stored.shape() != definition.shape():
                self._check_no_unfinished(c, definition, stored)
                version += 1
            c.execute(
                "UPDATE flows SET kind = ?, definition = ?, version = ?, updated_at = ? "
                "WHERE flow_slug = ?",
                (definition.kind, text, version, now, definition.slug),
            )
            c.execute("DELETE FROM steps WHERE flow_slug = ?", (definition.slug,))
            c.execute("DELETE FROM deps WHERE flow_slug = ?", (definition.slug,))
            self._insert_steps(c, definition)
        self._definitions[definition.slug] = (version, definition)
        return version

    @staticmethod
    def _check_no_unfinished(
        c: sqlite3.Connection, definition: FlowDefinition, stored: FlowDefinition
    ) -> None:
        unfinished = c.execute(
            "SELECT count(*) FROM runs WHERE flow_slug = ? AND status = 'started'",
            (definition.slug,),
        ).fetchone()[0]
        if unfinished:
            diffs = "; ".join(definition.shape_differences(stored))
            raise ShapeMismatch(
                f"flow {definition.slug!r} changed shape ({diffs}) while {unfinished} run(s) "
                "of the stored version are unfinished. Let them finish or cancel them "
                "(store.cancel), or give the new version a new slug."
            )

    @staticmethod
    def _insert_steps(c: sqlite3.Connection, d: FlowDefinition) -> None:
        c.executemany(
            "INSERT INTO steps (flow_slug, step_slug, step_index, step_type, deps_count, "
            "max_attempts, base_delay, timeout, start_delay, handler) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (d.slug, s.slug, i, s.step_type, len(s.depends_on), s.max_attempts,
                 s.base_delay, s.timeout, s.start_delay, s.handler)
                for i, s in enumerate(d.steps)
            ],
        )
        c.executemany(
            "INSERT INTO deps (flow_slug, dep_slug, step_slug) VALUES (?, ?, ?)",
            [(d.slug, dep, s.slug) for s in d.steps for dep in s.depends_on],
        )

    def get_definition(self, flow_slug: str) -> FlowDefinition | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT definition, version FROM flows WHERE flow_slug = ?", (flow_slug,)
            ).fetchone()
        if row is None:
            return None
        cached = self._json_cache.get(flow_slug)
        if cached is not None and cached[1] == row[0]:
            definition = cached[0]  # unchanged since last read: skip parsing and validating
        else:
            definition = FlowDefinition.from_json(row[0])
            self._json_cache[flow_slug] = (definition, row[0])
        self._definitions[flow_slug] = (int(row[1]), definition)
        return definition

    def registered_at(self, flow_slug: str) -> float | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT created_at FROM flows WHERE flow_slug = ?", (flow_slug,)
            ).fetchone()
        return None if row is None else float(row[0])

    def definitions(self) -> list[FlowDefinition]:
        with self._read() as conn:
            rows = conn.execute("SELECT definition FROM flows ORDER BY flow_slug").fetchall()
        return [FlowDefinition.from_json(r[0]) for r in rows]

    def _graph(self, d: FlowDefinition) -> _Graph:
        graph = self._graphs.get(d.slug)
        if graph is None or graph.definition is not d:
            graph = self._graphs[d.slug] = _Graph(d)
        return graph

    def _definition(self, flow_slug: str, version: int | None = None) -> FlowDefinition:
        """The flow's definition, re-read when another process has changed its version."""
        cached = self._definitions.get(flow_slug)
        if cached is None or (version is not None and cached[0] != version):
            definition = self.get_definition(flow_slug)
            if definition is None:
                raise SchemaError(
                    f"flow {flow_slug!r} has runs in {self._where} but no stored definition "
                    "(was its row deleted by hand?); register the flow again with "
                    "store.register(flow)"
                )
            return definition
        return cached[1]

    # --- starting runs -------------------------------------------------------------------------

    def start_runs(self, definition: FlowDefinition, runs: Sequence[NewRun]) -> list[str]:
        now = self.clock.now()
        d = definition
        ids: list[str] = []
        with self._write() as c:
            # Checked in the same transaction, so a definition and its runs land together, and
            # a process holding an outdated definition cannot start runs of it.
            self._register(c, d)
            fresh: list[NewRun] = []
            for r in runs:
                if r.cron_tick is not None and not c.execute(
                    "UPDATE flows SET cron_last_tick = ? WHERE flow_slug = ? "
                    "AND (cron_last_tick IS NULL OR cron_last_tick < ?)",
                    (r.cron_tick, d.slug, r.cron_tick),
                ).rowcount:
                    ids.append("")  # this tick (or a later one) already has its run
                    continue
                if r.key is not None:
                    existing = c.execute(
                        "SELECT id FROM runs WHERE flow_slug = ? AND key = ? "
                        "AND status != 'cancelled'",
                        (d.slug, r.key),
                    ).fetchone()
                    if existing is not None:
                        ids.append(existing[0])
                        continue
                fresh.append(r)
                ids.append(r.id)
            self._insert(
                c, self._INSERT_RUNS, self._RUN_VALUES,
                [(r.id, d.slug, r.input_json, r.key, r.priority, len(d.steps), r.run_at,
                  r.created_at) for r in fresh],
            )
            # Root steps start with their runs; the rows of a whole batch go in a few
            # statements per table.
            version = self._definitions[d.slug][0]
            states: list[tuple[Any, ...]] = []
            tasks: list[tuple[Any, ...]] = []
            empty_maps: list[tuple[NewRun, str]] = []
            max_attempts_of = self._graph(d).max_attempts
            job = d.kind == "job"  # a job's one step keeps its state in its task
            for r in fresh:
                for step in d.steps:
                    if step.depends_on:
                        states.append((r.id, step.slug, "created", len(step.depends_on), None, None))
                        continue
                    max_attempts = max_attempts_of[step.slug]
                    due = r.run_at + step.start_delay
                    if step.step_type == "single":
                        if not job:
                            states.append((r.id, step.slug, "started", 0, 1, now))
                        tasks.append((r.id, d.slug, version, step.slug, None, max_attempts,
                                      r.priority, due, None, now))
                        continue
                    items = r.root_items or ()
                    states.append((r.id, step.slug, "started", 0, len(items), now))
                    if not items:
                        empty_maps.append((r, step.slug))
                    tasks.extend(
                        (r.id, d.slug, version, step.slug, i, max_attempts, r.priority, due, item,
                         now)
                        for i, item in enumerate(items)
                    )
            self._insert(
                c,
                "INSERT INTO step_states (run_id, step_slug, status, remaining_deps, "
                "remaining_tasks, started_at) VALUES ",
                "(?, ?, ?, ?, ?, ?)",
                states,
            )
            self._insert(c, self._INSERT_TASKS, self._TASK_VALUES, tasks)
            for r, slug in empty_maps:  # a root map over an empty array completes at once
                self._complete_steps(
                    c, d, r.id, r.priority, [(slug, "[]")], now, [], not_before=r.run_at
                )
        return ids

    _INSERT_RUNS = (
        "INSERT INTO runs (id, flow_slug, status, input, key, priority, remaining_steps, "
        "run_at, created_at) VALUES "
    )
    _RUN_VALUES = "(?, ?, 'started', ?, ?, ?, ?, ?, ?)"
    # Completes a job's run with its one task's output. Its start is the completing attempt's
    # (if known), else that of the task with the given id.
    _COMPLETE_JOB_RUN = (
        "UPDATE runs SET status = 'completed', remaining_steps = 0, output = ?, finished_at = ?, "
        "started_at = coalesce(started_at, ?, (SELECT t.started_at FROM step_tasks t "
        "WHERE t.id = ?)) WHERE id = ? AND status = 'started'"
    )
    # Completes a task's current attempt; the guard makes a late result (after reclaim, cancel,
    # run failure, or a retry's new claim) change nothing.
    _COMPLETE_TASK = (
        "UPDATE step_tasks SET status = 'completed', output = ?, finished_at = ?, "
        "lease_owner = NULL, lease_expires = NULL "
        "WHERE id = ? AND attempts = ? AND claims = coalesce(?, claims) AND status = 'started' "
    )
    # Starts a single step whose dependencies are complete (its task is inserted beside it).
    _START_SINGLE = (
        "UPDATE step_states SET status = 'started', remaining_deps = 0, remaining_tasks = 1, "
        "started_at = ? WHERE run_id = ? AND step_slug = ?"
    )
    _INSERT_TASKS = (
        "INSERT INTO step_tasks (run_id, flow_slug, flow_version, step_slug, task_index, "
        "status, max_attempts, priority, run_at, input, created_at) VALUES "
    )
    _TASK_VALUES = "(?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)"

    def _insert(
        self, c: sqlite3.Connection, head: str, values: str, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Insert rows with multi-row ``VALUES`` lists: about a quarter cheaper than
        ``executemany``, which runs the statement once per row."""
        if not rows:
            return
        per = max(1, min(500, self._max_variables // values.count("?")))
        for start in range(0, len(rows), per):
            chunk = rows[start:start + per]
            c.execute(head + ",".join([values] * len(chunk)), [v for row in chunk for v in row])

    def _start_step(
        self,
        c: sqlite3.Connection,
        d: FlowDefinition,
        step: StepDefinition,
        run_id: str,
        priority: int,
        run_at: float,
        now: float,
        items: Sequence[str] | None,
        input_json: str | None = None,
    ) -> list[tuple[str, str]]:
        """Queue a step's tasks; a map over no items completes at once.

        Returns ``(step_slug, output_json)`` of a step that completed immediately, for cascading.
        """
        max_attempts = self._graph(d).max_attempts[step.slug]
        version = self._definitions[d.slug][0]
        if step.step_type == "map":
            assert items is not None
            if not items:
                c.execute(
                    "UPDATE step_states SET status = 'started', remaining_deps = 0, remaining_tasks = 0, "
                    "started_at = ? WHERE run_id = ? AND step_slug = ?",
                    (now, run_id, step.slug),
                )
                return [(step.slug, "[]")]  # the caller completes it
            c.execute(
                "UPDATE step_states SET status = 'started', remaining_deps = 0, "
                "remaining_tasks = ?, started_at = ? "
                "WHERE run_id = ? AND step_slug = ?",
                (len(items), now, run_id, step.slug),
            )
            self._insert(
                c, self._INSERT_TASKS, self._TASK_VALUES,
                [(run_id, d.slug, version, step.slug, i, max_attempts, priority, run_at, item, now)
                 for i, item in enumerate(items)],
            )
            return []
        c.execute(self._START_SINGLE, (now, run_id, step.slug))
        self._insert(
            c, self._INSERT_TASKS, self._TASK_VALUES,
            [(run_id, d.slug, version, step.slug, None, max_attempts, priority, run_at,
              input_json, now)],
        )
        return []

    # --- claiming ------------------------------------------------------------------------------

    _CLAIM_SET = (
        "UPDATE step_tasks SET status = 'started', attempts = attempts + 1, claims = claims + 1, "
        "lease_owner = ?, lease_expires = ?, started_at = ? "
    )
    _CLAIM_RETURNING = (
        "RETURNING id, run_id, flow_slug, step_slug, task_index, attempts, max_attempts, "
        "priority, input, flow_version, claims"
    )
    # The priority levels a flow has queued tasks at, highest first: one index seek per level.
    _LEVELS = (
        "WITH RECURSIVE levels(p) AS ("
        " SELECT max(priority) FROM step_tasks INDEXED BY step_tasks_queued"
        " WHERE status = 'queued' AND flow_slug = :flow"
        " UNION ALL"
        " SELECT (SELECT max(priority) FROM step_tasks INDEXED BY step_tasks_queued"
        "  WHERE status = 'queued' AND flow_slug = :flow AND priority < levels.p)"
        " FROM levels WHERE levels.p IS NOT NULL) "
    )
    # Within a flow and level, due tasks are a prefix of the index: a range, never a scan past
    # tasks that are not due yet.
    _DUE_AT_LEVEL = (
        "SELECT id, priority, run_at FROM step_tasks INDEXED BY step_tasks_queued "
        "WHERE status = 'queued' AND flow_slug = ? AND priority = ? AND run_at <= ? "
        "ORDER BY run_at, id LIMIT ?"
    )

    def claim(
        self, worker_id: str, flow_slugs: Sequence[str], limit: int, lease_seconds: float
    ) -> list[ClaimedTask]:
        return self.finish_and_claim((), (), None, worker_id, flow_slugs, limit, lease_seconds)[1]

    def finish_and_claim(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None,
        worker_id: str,
        flow_slugs: Sequence[str],
        limit: int,
        lease_seconds: float,
    ) -> tuple[list[str], list[ClaimedTask]]:
        claiming = limit > 0 and bool(flow_slugs)
        if not successes and not failures and not claiming:
            return [], []
        now = self.clock.now()
        finished: list[str] = []
        rows: list[Any] = []
        with self._write() as c, self._collecting_failures(failed_runs):
            if successes or failures:
                self._finish(c, successes, failures, now, finished)
            if claiming:
                rows, run_inputs = self._claim(c, worker_id, flow_slugs, limit, lease_seconds, now)
        if not rows:
            return finished, []
        rows.sort(key=lambda row: (-row[7], row[0]))
        loads = _json.loads
        tasks = []
        for (tid, run_id, flow, step, index, attempt, max_att, prio, inp, version, claim) in rows:
            flow_input = loads(run_inputs[run_id])
            tasks.append(ClaimedTask(
                tid, run_id, flow, step, index, attempt, max_att, prio,
                flow_input if inp is None else loads(inp), flow_input, version, claim, now,
            ))
        return finished, tasks

    def _claim(
        self,
        c: sqlite3.Connection,
        worker_id: str,
        flow_slugs: Sequence[str],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[Any], dict[str, str]]:
        """Claim inside the caller's transaction: the task rows and their runs' input JSON.

        Each flow is looked up on its own, so a backlog in one queue never slows the claims of
        another, and a concurrency cap is just a smaller limit for its flow.
        """
        room = self._room(c, flow_slugs)
        candidates: list[tuple[int, int, float]] = []
        for slug in flow_slugs:
            want = min(limit, room.get(slug, limit))
            if want <= 0:
                continue
            levels = [row[0] for row in c.execute(
                self._LEVELS + "SELECT p FROM levels WHERE p IS NOT NULL", {"flow": slug}
            ).fetchall()]
            for level in levels:
                found = c.execute(self._DUE_AT_LEVEL, (slug, level, now, want)).fetchall()
                candidates += found
                want -= len(found)
                if want <= 0:
                    break
        if not candidates:
            return [], {}
        if len(flow_slugs) > 1:  # claim order across flows: priority, then due time
            candidates.sort(key=lambda row: (-row[1], row[2], row[0]))
            del candidates[limit:]
        # Leases are about liveness, so they run on real time even under a fake clock.
        rows = c.execute(
            self._CLAIM_SET + f"WHERE id IN ({_placeholders(len(candidates))}) "
            + self._CLAIM_RETURNING,
            (worker_id, time.time() + lease_seconds, now, *(row[0] for row in candidates)),
        ).fetchall()
        run_ids = list({row[1] for row in rows})
        # The runs are not written here: a run's start is read from its running tasks.
        run_inputs = dict(c.execute(
            f"SELECT id, input FROM runs WHERE id IN ({_placeholders(len(run_ids))})", run_ids
        ).fetchall())
        return rows, run_inputs

    def _room(self, c: sqlite3.Connection, flow_slugs: Sequence[str]) -> dict[str, int]:
        """How many more tasks each capped flow may run now (read in the claim's transaction,
        so no other runner can change it meanwhile)."""
        caps = {
            slug: cached[1].concurrency
            for slug in flow_slugs
            if (cached := self._definitions.get(slug)) is not None
            and cached[1].concurrency is not None
        }
        if not caps:
            return {}
        running = dict(c.execute(
            "SELECT flow_slug, count(*) FROM step_tasks WHERE status = 'started' "
            f"AND flow_slug IN ({_placeholders(len(caps))}) GROUP BY flow_slug",
            list(caps),
        ).fetchall())
        return {slug: cap - running.get(slug, 0) for slug, cap in caps.items()}

    def heartbeat(
        self, worker_id: str, flow_slugs: Sequence[str], task_ids: Sequence[int],
        lease_seconds: float,
    ) -> list[int]:
        real_now = time.time()
        held: set[int] = set()
        with self._write() as c:
            for start in range(0, len(task_ids), 500):
                chunk = list(task_ids[start:start + 500])
                held.update(r[0] for r in c.execute(
                    "UPDATE step_tasks SET lease_expires = ? WHERE lease_owner = ? "
                    f"AND status = 'started' AND id IN ({_placeholders(len(chunk))}) RETURNING id",
                    (real_now + lease_seconds, worker_id, *chunk),
                ).fetchall())
            c.execute(
                "INSERT INTO workers (id, hostname, pid, flows, started_at, last_heartbeat) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "last_heartbeat = excluded.last_heartbeat, flows = excluded.flows",
                (worker_id, socket.gethostname(), os.getpid(), ",".join(flow_slugs),
                 real_now, real_now),
            )
        return [task_id for task_id in task_ids if task_id not in held]

    def forget_worker(self, worker_id: str) -> None:
        with self._write() as c:
            c.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def reclaim_expired(
        self, flow_slugs: Sequence[str], failed_runs: list[RunFailure] | None = None
    ) -> int:
        if not flow_slugs:
            return 0
        real_now = time.time()
        now = self.clock.now()
        finished: list[str] = []
        with self._write() as c, self._collecting_failures(failed_runs):
            expired = c.execute(
                "SELECT id, flow_slug, flow_version, step_slug, attempts, max_attempts "
                "FROM step_tasks "
                f"WHERE status = 'started' AND flow_slug IN ({_placeholders(len(flow_slugs))}) "
                "AND lease_expires < ?",
                (*flow_slugs, real_now),
            ).fetchall()
            for task_id, flow_slug, version, step_slug, attempts, max_attempts in expired:
                # The lost worker's attempt counts, so a task that kills its worker cannot
                # be retried forever.
                retry_at = None
                if attempts < max_attempts:
                    o = self._definition(flow_slug, version).effective(step_slug)
                    retry_at = now + retry_delay(
                        attempts, base_delay=o.base_delay, backoff=o.backoff,
                        max_delay=o.max_delay, jitter=o.jitter,
                    )
                self._fail_task(c, TaskFailure(task_id, attempts, LOST_WORKER, retry_at), now,
                                finished)
        return len(expired)

    def release(self, worker_id: str, task_ids: Sequence[int] | None) -> None:
        if task_ids is not None and not task_ids:
            return
        unclaim = (
            "UPDATE step_tasks SET status = 'queued', attempts = attempts - 1, "
            "lease_owner = NULL, lease_expires = NULL, started_at = NULL "
            "WHERE status = 'started' AND lease_owner = ? "
        )
        with self._write() as c:
            # A released claim leaves no trace: a run's start is read from its running tasks.
            if task_ids is None:
                c.execute(unclaim, (worker_id,))
            else:
                c.executemany(unclaim + "AND id = ?", [(worker_id, t) for t in task_ids])

    def data_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def next_due(self, flow_slugs: Sequence[str]) -> float | None:
        found = []
        with self._read() as conn:
            for slug in flow_slugs:
                # The earliest task of each priority level: one seek per level.
                (due,) = conn.execute(
                    self._LEVELS + "SELECT min((SELECT run_at FROM step_tasks "
                    "INDEXED BY step_tasks_queued WHERE status = 'queued' AND flow_slug = :flow "
                    "AND priority = levels.p ORDER BY run_at LIMIT 1)) "
                    "FROM levels WHERE levels.p IS NOT NULL",
                    {"flow": slug},
                ).fetchone()
                if due is not None:
                    found.append(float(due))
        return min(found, default=None)

    # --- results -------------------------------------------------------------------------------

    @contextmanager
    def _collecting_failures(self, into: list[RunFailure] | None) -> Iterator[None]:
        # Called with the write lock held, so only this transaction appends to the list.
        self._failed_runs = into
        try:
            yield
        finally:
            self._failed_runs = None

    def finish(
        self,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        failed_runs: list[RunFailure] | None = None,
    ) -> list[str]:
        return self.finish_and_claim(successes, failures, failed_runs, "", (), 0, 0.0)[0]

    def _finish(
        self,
        c: sqlite3.Connection,
        successes: Sequence[TaskSuccess],
        failures: Sequence[TaskFailure],
        now: float,
        finished: list[str],
    ) -> None:
        rest = self._complete_jobs(c, [s for s in successes if s.job], now, finished)
        rest += self._complete_flow_steps(c, [s for s in successes if not s.job], now, finished)
        for s in rest:
            self._complete_task(c, s, now, finished)
        for f in failures:
            self._fail_task(c, f, now, finished)

    def _complete_jobs(
        self, c: sqlite3.Connection, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        """Complete the tasks of single-step jobs set-wise: two executemany for the batch.

        Optimistic: if any result turns out late (its task is no longer started at that
        attempt), the batch is undone and returned for the one-by-one path.
        """
        if not batch:
            return []
        c.execute("SAVEPOINT jobs")
        done = c.executemany(
            self._COMPLETE_TASK,
            [(s.output_json, now, s.task_id, s.attempt, s.claim) for s in batch],
        ).rowcount
        if done == len(batch):
            done = c.executemany(
                self._COMPLETE_JOB_RUN,
                [(s.output_json, now, s.started_at, s.task_id, s.run_id) for s in batch],
            ).rowcount
        if done != len(batch):
            c.execute("ROLLBACK TO jobs")
            c.execute("RELEASE jobs")
            return batch
        c.execute("RELEASE jobs")
        finished.extend(s.run_id for s in batch)
        return []

    def _complete_flow_steps(
        self, c: sqlite3.Connection, batch: list[TaskSuccess], now: float, finished: list[str]
    ) -> list[TaskSuccess]:
        """Complete the single (not map) steps of flows set-wise, a handful of statements for the
        whole batch, and start the dependents that only waited for them.

        Returns what is left for the one-by-one path: map tasks, late results, and the whole
        batch if anything turns out unusual (the batch's writes are undone then).
        """
        if len(batch) < 2:
            return batch
        by_id = {s.task_id: s for s in batch}
        rows = c.execute(
            "SELECT id, run_id, flow_slug, flow_version, step_slug, priority, started_at "
            f"FROM step_tasks WHERE id IN ({_placeholders(len(by_id))}) AND status = 'started' "
            "AND task_index IS NULL",
            list(by_id),
        ).fetchall()
        if not rows:
            return batch
        c.execute("SAVEPOINT steps")
        ok = c.executemany(
            self._COMPLETE_TASK,
            [(s.output_json, now, s.task_id, s.attempt, s.claim)
             for s in (by_id[row[0]] for row in rows)],
        ).rowcount == len(rows) and self._advance(c, rows, by_id, now, finished)
        if not ok:
            c.execute("ROLLBACK TO steps")
            c.execute("RELEASE steps")
            return batch
        c.execute("RELEASE steps")
        done = {row[0] for row in rows}
        return [s for s in batch if s.task_id not in done]

    def _advance(
        self,
        c: sqlite3.Connection,
        rows: list[Any],
        by_id: dict[int, TaskSuccess],
        now: float,
        finished: list[str],
    ) -> bool:
        """Mark the steps of ``rows`` (single-step tasks just completed) completed, finish runs
        with nothing left, and start ready dependents. False: something unusual, undo."""
        if c.executemany(
            "UPDATE step_states SET status = 'completed', output = ?, remaining_tasks = 0, "
            "finished_at = ? WHERE run_id = ? AND step_slug = ? AND status = 'started'",
            [(by_id[tid].output_json, now, run_id, step)
             for tid, run_id, _f, _v, step, _p, _s in rows],
        ).rowcount != len(rows):
            return False
        per_run: dict[str, list[Any]] = {}
        for row in rows:
            per_run.setdefault(row[1], []).append(row)
        if c.executemany(
            "UPDATE runs SET remaining_steps = remaining_steps - ?, "
            "started_at = coalesce(started_at, ?) WHERE id = ? AND status = 'started'",
            [(len(steps), min((r[6] for r in steps if r[6] is not None), default=None), run_id)
             for run_id, steps in per_run.items()],
        ).rowcount != len(per_run):
            return False
        remaining = dict(c.execute(
            f"SELECT id, remaining_steps FROM runs WHERE id IN ({_placeholders(len(per_run))})",
            list(per_run),
        ).fetchall())
        # Dependents: those with one dependency are ready now; the others count down.
        ready: list[tuple[FlowDefinition, str, int, StepDefinition, tuple[str, str] | None]] = []
        counting: dict[tuple[str, str], tuple[FlowDefinition, int, StepDefinition, int]] = {}
        complete: list[tuple[FlowDefinition, str]] = []
        for run_id, steps in per_run.items():
            if remaining[run_id] == 0:
                complete.append((self._definition(steps[0][2], steps[0][3]), run_id))
                finished.append(run_id)
                continue
            for tid, _run, flow, version, step, priority, _started in steps:
                d = self._definition(flow, version)
                for dependent in self._graph(d).dependents[step]:
                    if len(dependent.depends_on) == 1:
                        ready.append((d, run_id, priority, dependent,
                                      (step, by_id[tid].output_json)))
                    else:
                        key = (run_id, dependent.slug)
                        seen = counting.get(key)
                        counting[key] = (d, priority, dependent, 1 + (seen[3] if seen else 0))
        if complete:
            self._finish_runs_completed(c, complete, now)
        if counting:
            if c.executemany(
                "UPDATE step_states SET remaining_deps = remaining_deps - ? "
                "WHERE run_id = ? AND step_slug = ? AND status = 'created'",
                [(n, run_id, slug) for (run_id, slug), (_d, _p, _s, n) in counting.items()],
            ).rowcount != len(counting):
                return False
            keys = list(counting)
            for run_id, slug in c.execute(
                "SELECT run_id, step_slug FROM step_states WHERE remaining_deps = 0 "
                "AND status = 'created' AND (run_id, step_slug) IN (VALUES "
                + ",".join(["(?, ?)"] * len(keys)) + ")",
                [v for key in keys for v in key],
            ).fetchall():
                d, priority, dependent, _n = counting[(run_id, slug)]
                ready.append((d, run_id, priority, dependent, None))
        self._start_ready(c, ready, now, finished)
        return True

    def _start_ready(
        self,
        c: sqlite3.Connection,
        ready: list[tuple[FlowDefinition, str, int, StepDefinition, tuple[str, str] | None]],
        now: float,
        finished: list[str],
    ) -> None:
        """Start steps whose dependencies are all complete: single steps fed by one dependency
        in two statements for all; the others (maps, several dependencies) one by one."""
        states: list[tuple[Any, ...]] = []
        tasks: list[tuple[Any, ...]] = []
        failed: set[str] = set()
        for d, run_id, priority, step, known in ready:
            if run_id in failed:
                continue
            if step.step_type == "single" and known is not None:
                slug, output = known
                states.append((now, run_id, step.slug))
                tasks.append((run_id, d.slug, self._definitions[d.slug][0], step.slug, None,
                               self._graph(d).max_attempts[step.slug], priority,
                               now + step.start_delay, f"{{{_json.dumps(slug)}:{output}}}", now))
                continue
            done = self._begin_step(c, d, run_id, priority, step, now, known)
            if done is None:  # the run failed (a map fed a non-array)
                failed.add(run_id)
                finished.append(run_id)
            elif done:
                self._complete_steps(c, d, run_id, priority, done, now, finished)
        c.executemany(self._START_SINGLE, [row for row in states if row[1] not in failed])
        self._insert(
            c, self._INSERT_TASKS, self._TASK_VALUES, [t for t in tasks if t[0] not in failed]
        )

    def _complete_task(
        self, c: sqlite3.Connection, s: TaskSuccess, now: float, finished: list[str]
    ) -> None:
        row = c.execute(
            self._COMPLETE_TASK
            + "RETURNING run_id, flow_slug, step_slug, task_index, priority, flow_version, started_at",
            (s.output_json, now, s.task_id, s.attempt, s.claim),
        ).fetchone()
        if row is None:
            return
        run_id, flow_slug, step_slug, task_index, priority, version, started_at = row
        if task_index is None:
            step_output = s.output_json
        else:
            left = c.execute(
                "UPDATE step_states SET remaining_tasks = remaining_tasks - 1 "
                "WHERE run_id = ? AND step_slug = ? AND status = 'started' "
                "RETURNING remaining_tasks",
                (run_id, step_slug),
            ).fetchone()
            if left is None or left[0] > 0:
                self._mark_started(c, run_id, started_at)
                return
            outputs = c.execute(
                "SELECT output FROM step_tasks WHERE run_id = ? AND step_slug = ? "
                "AND status = 'completed' ORDER BY task_index",
                (run_id, step_slug),
            ).fetchall()
            step_output = "[" + ",".join(o[0] for o in outputs) + "]"
        d = self._definition(flow_slug, version)
        self._complete_steps(
            c, d, run_id, priority, [(step_slug, step_output)], now, finished, started_at=started_at
        )

    @staticmethod
    def _mark_started(c: sqlite3.Connection, run_id: str, started_at: float | None) -> None:
        """Record when a run's first attempt started, once one has ended."""
        c.execute(
            "UPDATE runs SET started_at = ? WHERE id = ? AND started_at IS NULL",
            (started_at, run_id),
        )

    def _complete_steps(
        self,
        c: sqlite3.Connection,
        d: FlowDefinition,
        run_id: str,
        priority: int,
        done: list[tuple[str, str]],
        now: float,
        finished: list[str],
        not_before: float = 0.0,
        started_at: float | None = None,
    ) -> None:
        """Mark steps completed and start the dependents that became ready, cascading.

        Dependents are due no earlier than ``not_before`` (a delayed run's start time);
        ``started_at`` is when the completing attempt started.
        """
        while done:
            step_slug, output = done.pop()
            if d.kind == "job":
                # A job's one step is its leaf (and has no state row): finish the run.
                if c.execute(
                    self._COMPLETE_JOB_RUN, (output, now, started_at, None, run_id)
                ).rowcount:
                    finished.append(run_id)
                return
            updated = c.execute(
                "UPDATE step_states SET status = 'completed', output = ?, remaining_tasks = 0, "
                "finished_at = ? WHERE run_id = ? AND step_slug = ? AND status != 'completed'",
                (output, now, run_id, step_slug),
            ).rowcount
            left = c.execute(
                "UPDATE runs SET remaining_steps = remaining_steps - ?, "
                "started_at = coalesce(started_at, ?) "
                "WHERE id = ? AND status = 'started' RETURNING remaining_steps",
                (1 if updated else 0, started_at, run_id),
            ).fetchone()
            if left is None:
                return  # the run failed or was cancelled meanwhile
            if left[0] == 0:
                self._finish_run_completed(c, d, run_id, now)
                finished.append(run_id)
                return
            for dependent in self._graph(d).dependents[step_slug]:
                known: tuple[str, str] | None = None
                if not updated:
                    break  # the step had completed before: its dependents were handled then
                if len(dependent.depends_on) == 1:
                    # Its only dependency just completed: it is ready, and we hold the output.
                    known = (step_slug, output)
                else:
                    ready = c.execute(
                        "UPDATE step_states SET remaining_deps = remaining_deps - 1 "
                        "WHERE run_id = ? AND step_slug = ? AND status = 'created' "
                        "RETURNING remaining_deps",
                        (run_id, dependent.slug),
                    ).fetchone()
                    if ready is None or ready[0] > 0:
                        continue
                started = self._begin_step(
                    c, d, run_id, priority, dependent, now, known, max(now, not_before)
                )
                if started is None:
                    finished.append(run_id)
                    return
                done.extend(started)

    def _begin_step(
        self,
        c: sqlite3.Connection,
        d: FlowDefinition,
        run_id: str,
        priority: int,
        step: StepDefinition,
        now: float,
        known: tuple[str, str] | None = None,
        due_from: float | None = None,
    ) -> list[tuple[str, str]] | None:
        """Start a step whose dependencies are all complete, handing it their outputs.

        ``known`` is the ``(slug, output)`` of a sole dependency the caller already holds.
        Returns steps completed at once (an empty map), or ``None`` if the run failed because
        a map step received something other than an array.
        """
        run_at = (now if due_from is None else due_from) + step.start_delay
        deps = [known] if known is not None else c.execute(
            "SELECT step_slug, output FROM step_states WHERE run_id = ? "
            f"AND step_slug IN ({_placeholders(len(step.depends_on))})",
            (run_id, *step.depends_on),
        ).fetchall()
        if step.step_type == "map":
            source, array_json = deps[0]
            array = _json.loads(array_json)
            if not isinstance(array, list):
                self._fail_run(
                    c, run_id, step.slug,
                    f"map step {step.slug!r} expected an array from step {source!r}, "
                    f"got {type(array).__name__}: {array_json[:200]}",
                    now,
                )
                return None
            items = [_json.dumps(item) for item in array]
            return self._start_step(c, d, step, run_id, priority, run_at, now, items)
        deps_json = "{" + ",".join(f"{_json.dumps(slug)}:{out}" for slug, out in deps) + "}"
        return self._start_step(c, d, step, run_id, priority, run_at, now, None, deps_json)

    def _finish_run_completed(
        self, c: sqlite3.Connection, d: FlowDefinition, run_id: str, now: float
    ) -> None:
        self._finish_runs_completed(c, [(d, run_id)], now)

    def _finish_runs_completed(
        self, c: sqlite3.Connection, runs: list[tuple[FlowDefinition, str]], now: float
    ) -> None:
        """Complete runs whose steps are all done: output ``{leaf: output}``, two statements."""
        outputs: dict[str, dict[str, str]] = {}
        for start in range(0, len(runs), 500):
            chunk = [run_id for _d, run_id in runs[start:start + 500]]
            for run_id, slug, output in c.execute(
                "SELECT run_id, step_slug, output FROM step_states "
                f"WHERE run_id IN ({_placeholders(len(chunk))})",
                chunk,
            ).fetchall():
                outputs.setdefault(run_id, {})[slug] = output
        c.executemany(
            "UPDATE runs SET status = 'completed', output = ?, finished_at = ? WHERE id = ?",
            [
                ("{" + ",".join(f"{_json.dumps(slug)}:{outputs[run_id][slug]}"
                                for slug in self._graph(d).leaves) + "}", now, run_id)
                for d, run_id in runs
            ],
        )

    def _fail_task(
        self, c: sqlite3.Connection, f: TaskFailure, now: float, finished: list[str]
    ) -> None:
        history_sql = (
            "history = json_insert(coalesce(history, '[]'), '$[#]', "
            "json_object('attempt', attempts, 'error', ?, 'at', ?))"
        )
        if f.retry_at is not None:
            row = c.execute(
                f"UPDATE step_tasks SET status = 'queued', run_at = ?, error = ?, {history_sql}, "
                "lease_owner = NULL, lease_expires = NULL "
                "WHERE id = ? AND attempts = ? AND claims = coalesce(?, claims) AND status = 'started' "
                "RETURNING run_id, started_at",
                (f.retry_at, f.error, f.error, now, f.task_id, f.attempt, f.claim),
            ).fetchone()
            if row is not None:
                self._mark_started(c, row[0], row[1])
            return
        row = c.execute(
            f"UPDATE step_tasks SET status = 'failed', error = ?, {history_sql}, finished_at = ?, "
            "lease_owner = NULL, lease_expires = NULL "
            "WHERE id = ? AND attempts = ? AND claims = coalesce(?, claims) AND status = 'started' "
            "RETURNING run_id, step_slug, task_index, started_at",
            (f.error, f.error, now, now, f.task_id, f.attempt, f.claim),
        ).fetchone()
        if row is None:
            return
        self._mark_started(c, row[0], row[3])
        if self._fail_run(c, row[0], row[1], f.error, now, (f.task_id, row[2], f.attempt)):
            finished.append(row[0])

    def _fail_run(
        self,
        c: sqlite3.Connection,
        run_id: str,
        step_slug: str,
        error: str,
        now: float,
        task: tuple[int, int | None, int] | None = None,
    ) -> bool:
        """Fail a run for good (``task``: the id, index and attempt of the task that did it)."""
        row = c.execute(
            "UPDATE runs SET status = 'failed', error = ?, finished_at = ? "
            "WHERE id = ? AND status = 'started' RETURNING flow_slug, input",
            (error, now, run_id),
        ).fetchone()
        if row is None:
            return False
        if self._failed_runs is not None:
            task_id, index, attempt = task if task is not None else (None, None, 0)
            self._failed_runs.append(RunFailure(
                run_id, row[0], step_slug, error, _json.loads(row[1]), task_id, index, attempt
            ))
        c.execute(
            "UPDATE step_states SET status = 'failed', error = ?, finished_at = ? "
            "WHERE run_id = ? AND step_slug = ?",
            (error, now, run_id, step_slug),
        )
        self._cancel_rest(c, run_id, now)
        return True

    @staticmethod
    def _cancel_rest(c: sqlite3.Connection, run_id: str, now: float) -> None:
        c.execute(
            "UPDATE step_tasks SET status = 'cancelled', finished_at = ?, lease_owner = NULL, "
            "lease_expires = NULL WHERE run_id = ? AND status IN ('queued', 'started')",
            (now, run_id),
        )
        c.execute(
            "UPDATE step_states SET status = 'cancelled', finished_at = ? "
            "WHERE run_id = ? AND status IN ('created', 'started')",
            (now, run_id),
        )

    # --- control -------------------------------------------------------------------------------

    def cancel(self, run_id: str) -> bool:
        now = self.clock.now()
        with self._write() as c:
            if not c.execute(
                "UPDATE runs SET status = 'cancelled', finished_at = ? "
                "WHERE id = ? AND status = 'started'",
                (now, run_id),
            ).rowcount:
                return False
            self._cancel_rest(c, run_id, now)
        return True

    def retry(self, run_id: str) -> bool:
        now = self.clock.now()
        with self._write() as c:
            clash = c.execute(
                "SELECT other.id FROM runs AS this JOIN runs AS other ON other.flow_slug = "
                "this.flow_slug AND other.key = this.key AND other.id != this.id "
                "AND other.status != 'cancelled' WHERE this.id = ?",
                (run_id,),
            ).fetchone()
            if clash is not None:
                raise InputError(
                    f"run {run_id} cannot be retried: its key now belongs to run {clash[0]}"
                )
            row = c.execute(
                "UPDATE runs SET status = 'started', error = NULL, output = NULL, "
                "started_at = NULL, finished_at = NULL "
                "WHERE id = ? AND status IN ('failed', 'cancelled') "
                "RETURNING flow_slug, priority",
                (run_id,),
            ).fetchone()
            if row is None:
                return False
            d = self._definition(row[0])
            old = c.execute(
                "SELECT max(flow_version) FROM step_tasks WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            if old is not None and old != self._definitions[d.slug][0]:
                raise ShapeMismatch(
                    f"run {run_id} was started before flow {d.slug!r} changed shape, so it "
                    "cannot be retried; start a new run with the same input instead"
                )
            # Tasks that did not complete run again with fresh attempts; history is kept.
            c.execute(
                "UPDATE step_tasks SET status = 'queued', attempts = 0, run_at = ?, "
                "finished_at = NULL WHERE run_id = ? AND status IN ('failed', 'cancelled')",
                (now, run_id),
            )
            # Steps that had tasks go back to work; the others wait for their dependencies.
            c.execute(
                "UPDATE step_states SET status = 'started', error = NULL, finished_at = NULL, "
                "remaining_tasks = (SELECT count(*) FROM step_tasks t WHERE t.run_id = "
                "step_states.run_id AND t.step_slug = step_states.step_slug "
                "AND t.status != 'completed') "
                "WHERE run_id = ? AND status IN ('failed', 'cancelled') "
                "AND remaining_tasks IS NOT NULL",
                (run_id,),
            )
            c.execute(
                "UPDATE step_states SET status = 'created', error = NULL, finished_at = NULL "
                "WHERE run_id = ? AND status IN ('failed', 'cancelled') AND remaining_tasks IS NULL",
                (run_id,),
            )
            # Waiting steps count again the dependencies that have not completed (a step
            # started on its sole dependency never had its count decremented).
            statuses = dict(c.execute(
                "SELECT step_slug, status FROM step_states WHERE run_id = ?", (run_id,)
            ).fetchall())
            waiting = {
                slug: sum(statuses.get(dep) != "completed" for dep in d.step(slug).depends_on)
                for slug, status in statuses.items() if status == "created"
            }
            c.executemany(
                "UPDATE step_states SET remaining_deps = ? WHERE run_id = ? AND step_slug = ?",
                [(left, run_id, slug) for slug, left in waiting.items()],
            )
            ready = [slug for slug, left in waiting.items() if left == 0]
            for slug in ready:
                done = self._begin_step(c, d, run_id, row[1], d.step(slug), now)
                if done:
                    self._complete_steps(c, d, run_id, row[1], done, now, [])
        return True

    def prune(self, before: float) -> int:
        with self._write() as c:
            ids = [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE status != 'started' AND finished_at < ?", (before,)
            ).fetchall()]
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start:chunk_start + 500]
                marks = _placeholders(len(chunk))
                c.execute(f"DELETE FROM step_tasks WHERE run_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM step_states WHERE run_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM runs WHERE id IN ({marks})", chunk)
        return len(ids)

    # --- reading runs --------------------------------------------------------------------------

    def get_run(self, run_id: str) -> Run | None:
        runs = self._read_runs(f"SELECT {_RUN_COLUMNS} FROM runs r WHERE r.id = :id", {"id": run_id})
        return runs[0] if runs else None

    def runs(
        self, flow_slug: str | None, status: str | None, key: str | None, limit: int
    ) -> list[Run]:
        where: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if flow_slug is not None:
            where.append("r.flow_slug = :flow")
            params["flow"] = flow_slug
        if key is not None:
            where.append("r.key = :key")
            params["key"] = key
        if status is not None:
            if RunStatus(status).is_terminal:
                where.append("r.status = :status")
            else:
                where.append(f"r.status = 'started' AND ({_STATUS_SQL}) = :status")
            params["status"] = str(RunStatus(status).value)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs r"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Newest first: rows are appended in creation order, so the rowid is that order too,
        # and walking it backwards stops after `limit` rows instead of sorting them all.
        sql += " ORDER BY r.rowid DESC LIMIT :limit"
        return self._read_runs(sql, params)

    def _read_runs(self, sql: str, params: dict[str, Any]) -> list[Run]:
        params = {**params, "now": self.clock.now()}
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            ids = [r[0] for r in rows]
            marks = _placeholders(len(ids))
            step_rows = conn.execute(
                "SELECT run_id, step_slug, status, output, error FROM step_states "
                f"WHERE run_id IN ({marks})",
                ids,
            ).fetchall()
            task_rows = conn.execute(
                "SELECT run_id, step_slug, task_index, status, attempts, output, error, history, "
                f"started_at FROM step_tasks WHERE run_id IN ({marks}) ORDER BY id",
                ids,
            ).fetchall()
        loads = _json.loads
        tasks: dict[tuple[str, str], list[tuple[TaskRun, float | None]]] = {}
        for run_id, step, index, status, attempts, output, error, history, started in task_rows:
            record = TaskRun(
                index=index,
                status=status,
                attempts=attempts,
                output=None if output is None else loads(output),
                error=error,
                history=tuple(
                    AttemptRecord(h["attempt"], h["error"], _dt(h["at"]), step, index)  # type: ignore[arg-type]
                    for h in (loads(history) if history else ())
                ),
            )
            tasks.setdefault((run_id, step), []).append((record, started))
        steps: dict[str, dict[str, StepRun]] = {}
        for run_id, step, status, output, error in step_rows:
            step_tasks = sorted(tasks.get((run_id, step), []), key=lambda t: t[0].index or 0)
            steps.setdefault(run_id, {})[step] = StepRun(
                slug=step,
                status=status,
                attempts=max((t.attempts for t, _ in step_tasks), default=0),
                output=None if output is None else loads(output),
                error=error,
                tasks=tuple(t for t, _ in step_tasks),
            )
        for (run_id, step), step_tasks in tasks.items():
            if step not in steps.get(run_id, {}):
                # A job's step has no state row: its one task is its state.
                task = step_tasks[0][0]
                steps.setdefault(run_id, {})[step] = StepRun(
                    slug=step,
                    status="started" if task.status in ("queued", "started") else task.status,
                    attempts=task.attempts,
                    output=task.output,
                    error=task.error if task.status == "failed" else None,
                    tasks=(task,),
                )
        result = []
        by_run: dict[str, list[tuple[TaskRun, float | None]]] = {}
        for (rid, _step), step_tasks in tasks.items():
            by_run.setdefault(rid, []).extend(step_tasks)
        for (run_id, flow_slug, status, inp, output, error, key, priority, created, started,
             finished) in rows:
            order = self._step_order(flow_slug)
            run_steps = steps.get(run_id, {})
            last = max(by_run.get(run_id, ()), key=lambda t: t[1] or 0.0, default=None)
            result.append(Run(
                id=run_id,
                flow_slug=flow_slug,
                status=RunStatus(status),
                input=loads(inp),
                output=None if output is None else loads(output),
                error=error,
                key=key,
                priority=priority,
                created_at=_dt(created),  # type: ignore[arg-type]
                started_at=_dt(started),
                finished_at=_dt(finished),
                attempts=last[0].attempts if last is not None else 0,
                steps=tuple(sorted(run_steps.values(), key=lambda s: order.get(s.slug, 0))),
            ))
        return result

    def _step_order(self, flow_slug: str) -> dict[str, int]:
        try:
            d = self._definition(flow_slug)
        except SchemaError:
            return {}
        return {s.slug: i for i, s in enumerate(d.steps)}
