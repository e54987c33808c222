"""Flow definitions in the database: registered, checked against the code, cached."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from ... import _json
from ...clock import utc_datetime
from ...definition import FlowDefinition
from ...errors import SchemaError, ShapeMismatch
from ..base import NewRun
from .connection import _STATUS_SQL, Conn, NeedsExclusive, _Connection


class _Graph:
    """What completing steps needs of a definition, looked up once per definition."""

    __slots__ = (
        "conditional", "definition", "dependents", "downstream", "leaves", "max_attempts",
        "skip_exhausted",
    )

    def __init__(self, d: FlowDefinition) -> None:
        self.definition = d
        self.dependents = {s.slug: d.dependents(s.slug) for s in d.steps}
        self.leaves = tuple(s.slug for s in d.leaf_steps)
        self.max_attempts = {s.slug: d.effective(s.slug).max_attempts for s in d.steps}
        # Conditional execution: empty for most flows, which then take no other path.
        self.conditional = frozenset(s.slug for s in d.steps if s.conditional)
        self.skip_exhausted = {
            s.slug: s.when_exhausted for s in d.steps if s.when_exhausted != "fail"
        }
        # Every step below each step (its dependents, theirs, ...), in topological order.
        below: dict[str, set[str]] = {}
        for step in reversed(d.steps):
            below[step.slug] = set()
            for dependent in self.dependents[step.slug]:
                below[step.slug] |= {dependent.slug} | below[dependent.slug]
        order = {s.slug: i for i, s in enumerate(d.steps)}
        self.downstream = {
            slug: tuple(sorted(steps, key=order.__getitem__)) for slug, steps in below.items()
        }



class _Definitions(_Connection):
    """Flow definitions: registered in the write that starts their runs, cached per version."""

    _SEQ: ClassVar[str] = "rowid"  # the column of runs in insertion order
    # Whether a job's run row holds its task (whose id is then minus the run's _SEQ) rather
    # than a row of step_tasks. Reads and results handle both either way.
    _JOB_ROWS: ClassVar[bool] = True
    # What reads every task through: the view over step_tasks and the job runs' rows.
    @property
    def _tasks(self) -> str:
        return "tasks" if self._JOB_ROWS else "step_tasks"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._definitions: dict[str, tuple[int, FlowDefinition]] = {}
        self._json_cache: dict[str, tuple[FlowDefinition, str]] = {}
        self._graphs: dict[str, _Graph] = {}
        # flow slug -> (definition, version, data_version when found stored as is)
        self._verified: dict[str, tuple[FlowDefinition, int, int | None]] = {}

    def register(self, definition: FlowDefinition) -> int:
        with self._write() as c:
            return self._register(c, definition, move=True)

    def _json_of(self, definition: FlowDefinition) -> str:
        # Definitions are immutable: encode each once; one entry per flow slug.
        cached = self._json_cache.get(definition.slug)
        if cached is None or cached[0] is not definition:
            cached = (definition, definition.to_json())
            self._json_cache[definition.slug] = cached
        return cached[1]

    def _register(self, c: Conn, definition: FlowDefinition, move: bool = False) -> int:
        """Write or update ``definition`` inside the caller's transaction; return its version.

        A changed shape is refused (:class:`ShapeMismatch`) while runs of the stored version
        have started and are unfinished. With ``move`` (an explicit registration: a deploy, a
        worker starting), runs that have not started are re-planned under the new shape instead
        of blocking it; without (registration by ``start``), they block too, so that a process
        still running the old code cannot move the new version's runs back.
        """
        # Unchanged since this connection found it stored, if no other connection has committed
        # anything since: then the read can be skipped.
        seen = self._unchanged_token(c)
        verified = self._verified.get(definition.slug)
        if (verified is not None and seen is not None and verified[0] is definition
                and verified[2] == seen):
            return verified[1]
        now = self.clock.now()
        text = self._json_of(definition)
        row = c.execute(
            "SELECT definition, version FROM flows WHERE flow_slug = ?", (definition.slug,)
        ).fetchone()
        moving: list[NewRun] = []
        if row is not None and row[0] == text:
            version = int(row[1])
            self._verified[definition.slug] = (definition, version, seen)
        elif self._shared_tx:
            raise NeedsExclusive  # a new or changed definition is written alone
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
            stored = FlowDefinition.from_stored_json(row[0])
            version = int(row[1])
            if stored.shape() != definition.shape():
                moving = self._unfinished_runs(c, definition, stored, move, now)
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
        if moving:
            self._replan(c, definition, version, moving, now)
        return version

    def _unfinished_runs(
        self, c: Conn, definition: FlowDefinition, stored: FlowDefinition, move: bool,
        now: float,
    ) -> list[NewRun]:
        """The flow's unfinished runs, to move to ``definition``'s shape; if any of them may
        not move (or ``move`` is false), raise :class:`ShapeMismatch` listing those, and
        nothing moves."""
        rows = c.execute(
            "SELECT r.id, r.input, r.run_at, r.created_at, r.priority, r.key, r.trace_context, "
            "r.started_at IS NULL AND NOT EXISTS (SELECT 1 FROM tasks t "
            "WHERE t.run_id = r.id AND (t.claims > 0 OR t.status != 'queued')) "
            f"FROM runs r WHERE r.flow_slug = ? AND r.status = 'started' ORDER BY r.{self._SEQ}",
            (definition.slug,),
        ).fetchall()
        if not rows:
            return []
        # The steps each run has work queued for: it moves only if they are all still steps.
        queued: dict[str, set[str]] = {}
        for run_id, step_slug in c.execute(
            "SELECT DISTINCT run_id, step_slug FROM tasks "
            "WHERE flow_slug = ? AND status = 'queued'",
            (definition.slug,),
        ).fetchall():
            queued.setdefault(run_id, set()).add(step_slug)
        steps = {s.slug for s in definition.steps}
        root_map = next(
            (s for s in definition.steps if not s.depends_on and s.step_type == "map"), None
        )
        movable: list[NewRun] = []
        blocking: list[tuple[str, str]] = []  # (run id, why)
        for run_id, input_json, run_at, created_at, priority, key, trace, unstarted in rows:
            gone = sorted(queued.get(run_id, set()) - steps)
            items: tuple[str, ...] | None = None
            if root_map is not None:
                try:
                    value = _json.loads(input_json)
                except ValueError:
                    value = None
                if isinstance(value, list):
                    items = tuple(_json.dumps(item) for item in value)
            if not unstarted:
                blocking.append((run_id, ""))
            elif not move:
                blocking.append((run_id, "not started"))
            elif gone:
                blocking.append((
                    run_id,
                    "not started, but its step(s) " + ", ".join(map(repr, gone))
                    + " are not in the new version",
                ))
            elif root_map is not None and items is None:
                blocking.append((
                    run_id,
                    f"not started, but its input is not an array, which the new root map step "
                    f"{root_map.slug!r} needs",
                ))
            else:
                movable.append(NewRun(
                    run_id, input_json, float(run_at), float(created_at), int(priority), key,
                    items, None, trace,
                ))
        if blocking:
            raise ShapeMismatch(self._blocked_message(c, definition, stored, blocking, move, now))
        return movable

    _LISTED = 10  # blocking runs named in a ShapeMismatch message

    def _blocked_message(
        self, c: Conn, definition: FlowDefinition, stored: FlowDefinition,
        blocking: list[tuple[str, str]], move: bool, now: float,
    ) -> str:
        slug = definition.slug
        diffs = "; ".join(definition.shape_differences(stored))
        listed = blocking[: self._LISTED]
        why = dict(listed)
        details = self._run_details(c, [run_id for run_id, _ in listed], now)
        lines = []
        for run_id, _ in listed:
            status, due = details.get(run_id, ("unfinished", None))
            line = f"  {run_id}  {status}"
            if due is not None and status in ("scheduled", "retrying"):
                line += f", due {utc_datetime(float(due)):%Y-%m-%d %H:%M:%S} UTC"
            if why[run_id]:
                line += f" ({why[run_id]})"
            lines.append(line)
        if len(blocking) > len(listed):
            lines.append(
                f"  … and {len(blocking) - len(listed)} more: pgflow runs --flow {slug} "
                f"--limit {len(blocking)}"
            )
        ids = " ".join(run_id for run_id, _ in listed)
        started = sum(1 for _, w in blocking if not w)
        if move:
            head = (
                f"flow {slug!r} changed shape ({diffs}) while {len(blocking)} run(s) of the "
                "stored version are unfinished and cannot move to the new shape "
                f"({started} already started):"
            )
            moved = (
                "Runs that have not started do not block: they move to the new shape when it "
                "is registered."
            )
        else:
            head = (
                f"flow {slug!r} changed shape ({diffs}) while {len(blocking)} run(s) of the "
                "stored version are unfinished:"
            )
            moved = (
                "Runs that have not started would move to the new shape if it were registered "
                "first: store.register(flow), or start a worker with the new code (starting a "
                "run never moves other runs, so a process with old code cannot move them back)."
            )
        return "\n".join([
            head,
            *lines,
            "Let them finish (a worker with the old code), or cancel them "
            f"(pgflow cancel {ids}, or store.cancel(run_id)) and start them again once the new "
            f"version is registered, or give the new version a new slug. {moved}",
        ])

    def _run_details(
        self, c: Conn, run_ids: list[str], now: float
    ) -> dict[str, tuple[str, float | None]]:
        """Each run's status (as listed) and when its next queued task is due."""
        details: dict[str, tuple[str, float | None]] = {}
        for run_id in run_ids:
            row = c.execute(
                f"SELECT {_STATUS_SQL}, (SELECT min(t.run_at) FROM tasks t "
                "WHERE t.run_id = r.id AND t.status = 'queued') FROM runs r WHERE r.id = :id",
                {"id": run_id, "now": now},
            ).fetchone()
            if row is not None:
                details[run_id] = (str(row[0]), None if row[1] is None else float(row[1]))
        return details

    @abc.abstractmethod
    def _replan(
        self, c: Conn, d: FlowDefinition, version: int, runs: list[NewRun], now: float
    ) -> None:
        """Replace the step states and tasks of ``runs`` (not started) with ``d``'s."""

    @staticmethod
    def _insert_steps(c: Conn, d: FlowDefinition) -> None:
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
            definition = FlowDefinition.from_stored_json(row[0])
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
        return [FlowDefinition.from_stored_json(r[0]) for r in rows]

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
