"""A flow's DAG laid out for drawing: steps as boxes in columns by depth, dependencies as edges.

Pure layout, no HTML: the run page's template draws the boxes and edges this returns as SVG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from ..definition import FlowDefinition
from ..models import StepRun

__all__ = ("BOX_HEIGHT", "BOX_WIDTH", "Box", "Edge", "Graph", "layout", "step_status")

BOX_WIDTH = 184
BOX_HEIGHT = 50
COLUMN_GAP = 64
ROW_GAP = 18
MARGIN = 8


@attrs.frozen
class Box:
    """A step: its place, what it shows and the status it is coloured by."""

    slug: str
    x: float
    y: float
    status: str
    """As :func:`step_status` says."""
    detail: str
    """``3/5 tasks`` (a map step), ``attempt 2``, ...: shown after the status."""
    is_map: bool


@attrs.frozen
class Edge:
    """A dependency, from the right side of ``source`` to the left side of ``target``."""

    source: str
    target: str
    path: str
    """An SVG path (a cubic curve) between the two boxes."""


@attrs.frozen
class Graph:
    boxes: tuple[Box, ...]
    edges: tuple[Edge, ...]
    width: float
    height: float


def layout(definition: FlowDefinition, steps: Sequence[StepRun] = ()) -> Graph:
    """Columns by longest path from a root step (a root feeding only later steps moved up to
    them); within a column, steps ordered by where their dependencies sit (fewer crossings),
    ties kept in definition order."""
    by_slug: Mapping[str, StepRun] = {s.slug: s for s in steps}
    depth: dict[str, int] = {}
    for step in definition.steps:  # topological order: dependencies come first
        depth[step.slug] = 1 + max((depth[d] for d in step.depends_on), default=-1)
    # A root step feeding only later steps sits just before the first of them, so that its
    # arrow does not cross the columns between.
    children: dict[str, list[str]] = {}
    for step in definition.steps:
        for dep in step.depends_on:
            children.setdefault(dep, []).append(step.slug)
    for step in definition.steps:
        if not step.depends_on and step.slug in children:
            depth[step.slug] = min(depth[c] for c in children[step.slug]) - 1
    columns: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for step in definition.steps:
        columns[depth[step.slug]].append(step.slug)

    row: dict[str, float] = {}
    deps = {step.slug: step.depends_on for step in definition.steps}
    for column in columns:
        order = {slug: i for i, slug in enumerate(column)}
        column.sort(key=lambda s: (
            sum(row[d] for d in deps[s]) / len(deps[s]) if deps[s] else order[s], order[s]
        ))
        for i, slug in enumerate(column):
            row[slug] = i

    tallest = max((len(c) for c in columns), default=0)
    height = MARGIN * 2 + tallest * BOX_HEIGHT + max(tallest - 1, 0) * ROW_GAP
    place: dict[str, tuple[float, float]] = {}
    for c, column in enumerate(columns):
        # Centre each column vertically, so a single step sits level with a fan-out beside it.
        used = len(column) * BOX_HEIGHT + (len(column) - 1) * ROW_GAP
        top = (height - used) / 2
        for i, slug in enumerate(column):
            place[slug] = (MARGIN + c * (BOX_WIDTH + COLUMN_GAP), top + i * (BOX_HEIGHT + ROW_GAP))

    boxes = []
    for step in definition.steps:
        x, y = place[step.slug]
        state = by_slug.get(step.slug)
        boxes.append(Box(
            slug=step.slug, x=x, y=y, status=step_status(state), detail=_detail(step.step_type, state),
            is_map=step.step_type == "map",
        ))
    edges = []
    for step in definition.steps:
        tx, ty = place[step.slug]
        for dep in step.depends_on:
            sx, sy = place[dep]
            x1, y1 = sx + BOX_WIDTH, sy + BOX_HEIGHT / 2
            x2, y2 = tx - 2, ty + BOX_HEIGHT / 2  # stop short: the arrow head ends at the box
            bend = (x2 - x1) / 2
            edges.append(Edge(
                source=dep, target=step.slug,
                path=f"M{x1:g},{y1:g} C{x1 + bend:g},{y1:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}",
            ))
    width = MARGIN * 2 + len(columns) * BOX_WIDTH + max(len(columns) - 1, 0) * COLUMN_GAP
    return Graph(boxes=tuple(boxes), edges=tuple(edges), width=width, height=height)


def step_status(state: StepRun | None) -> str:
    """A step's status as the page shows it: the store's (``created``: waiting for its
    dependencies, ``completed``, ``failed``, ...), except that a ``started`` step is ``running``
    while a task of it runs, ``retrying`` while one waits out a backoff, and ``queued`` while
    its tasks wait for a worker; ``unknown`` for a step the run does not have."""
    if state is None:
        return "unknown"
    if state.status != "started":
        return state.status
    if any(t.status == "started" for t in state.tasks):
        return "running"
    if any(t.status == "queued" and t.attempts > 0 for t in state.tasks):
        return "retrying"
    return "queued"


SKIP_REASONS = {
    "condition_unmet": "condition not met",
    "handler_failed": "failed, skipped",
    "dependency_skipped": "dependency skipped",
}
"""How the page words each :attr:`StepRun.skip_reason`."""


def _detail(step_type: str, state: StepRun | None) -> str:
    if state is None:
        return "map" if step_type == "map" else ""
    if state.status == "skipped":
        return SKIP_REASONS.get(state.skip_reason or "", state.skip_reason or "")
    if step_type == "map":
        if state.status == "created":
            return "map"
        done = sum(1 for t in state.tasks if t.status == "completed")
        return f"{done}/{len(state.tasks)} tasks"
    if state.attempts > 1:
        return f"attempt {state.attempts}"
    return ""
