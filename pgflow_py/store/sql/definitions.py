"""Flow definitions in the database: registered, checked against the code, cached."""

from __future__ import annotations

from typing import Any

from ...definition import FlowDefinition
from ...errors import SchemaError, ShapeMismatch
from .connection import Conn, _Connection


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._definitions: dict[str, tuple[int, FlowDefinition]] = {}
        self._json_cache: dict[str, tuple[FlowDefinition, str]] = {}
        self._graphs: dict[str, _Graph] = {}
        # flow slug -> (definition, version, data_version when found stored as is)
        self._verified: dict[str, tuple[FlowDefinition, int, int | None]] = {}

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

    def _register(self, c: Conn, definition: FlowDefinition) -> int:
        """Write or update ``definition`` inside the caller's transaction; return its version."""
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
            stored = FlowDefinition.from_stored_json(row[0])
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
        c: Conn, definition: FlowDefinition, stored: FlowDefinition
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
