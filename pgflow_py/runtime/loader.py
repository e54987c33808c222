"""Resolve handlers for a runner: from flow objects, or from the import paths in the store."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any

from ..definition import FlowDefinition
from ..dsl import Flow, Step
from ..errors import DefinitionError
from .executor import StepRuntime

__all__ = ("load_stored_flows", "step_runtimes")

log = logging.getLogger("pgflow_py.runner")


def step_runtimes(flow: Flow) -> list[StepRuntime]:
    """The runtime view of each step of a flow object."""
    definition = flow.definition
    return [
        StepRuntime(
            flow_slug=flow.slug,
            step_slug=step.slug,
            handler=flow.handler(step.slug),
            options=definition.effective(step.slug),
            on_failure=flow.on_failure,
            on_dead=flow.on_dead,
            is_job=definition.kind == "job",
            payloads=flow.payloads(step.slug),
        )
        for step in definition.steps
    ]


def resolve_import_path(path: str) -> Any:
    """Import ``module:qualname`` and return the object it names."""
    module_name, _, qualname = path.partition(":")
    if not qualname or "<locals>" in qualname:
        raise DefinitionError(
            f"handler {path!r} cannot be imported (it was defined inside a function); "
            "pass the flow to run_flows(...) instead of flows=None"
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _flow_from_path(definition: FlowDefinition) -> Flow:
    found: Flow | None = None
    for step in definition.steps:
        if step.handler is None:
            raise DefinitionError(f"step {definition.slug}.{step.slug} has no recorded handler")
        obj = resolve_import_path(step.handler)
        flow = obj.flow if isinstance(obj, Step) else obj if isinstance(obj, Flow) else None
        if flow is None:
            raise DefinitionError(
                f"{step.handler!r} is {obj!r}, not a pgflow job or step; "
                "was the module changed since the flow was registered?"
            )
        if flow.slug != definition.slug:
            raise DefinitionError(
                f"{step.handler!r} now belongs to flow {flow.slug!r}, not {definition.slug!r}"
            )
        found = flow
    assert found is not None
    return found


def load_stored_flows(definitions: Iterable[FlowDefinition]) -> list[Flow]:
    """Import the flow objects behind stored definitions; skip (and log) those that fail."""
    flows: list[Flow] = []
    for definition in definitions:
        try:
            flows.append(_flow_from_path(definition))
        except Exception as exc:
            log.error("cannot serve flow %r: %s", definition.slug, exc)
    return flows
