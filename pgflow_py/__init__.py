"""pgflow_py: background jobs and multi-step workflows on SQLite (or PostgreSQL), after PgFlow.

Everything public is importable from here: ``import pgflow_py as pf``.
"""

from . import testing
from .context import Context
from .definition import FlowDefinition, StepDefinition
from .dsl import Flow, Job, MapStep, Step, flow, job, perform
from .errors import (
    DefinitionError,
    FlowNotFound,
    InputError,
    IsolatedError,
    PermanentFailure,
    PgflowError,
    Retry,
    RunNotFound,
    SchemaError,
    ShapeMismatch,
    StepTimeout,
    StoreError,
    WaitTimeout,
)
from .models import (
    AttemptRecord,
    FlowStats,
    Run,
    RunStatus,
    StepRun,
    TaskRun,
    ThroughputPoint,
    WorkerInfo,
)
from .payloads import converter
from .runtime import RunnerStats, arun_flows, run_flows
from .store import Store, connect

__version__ = "0.1.0"

__all__ = (
    "AttemptRecord",
    "Context",
    "DefinitionError",
    "Flow",
    "FlowDefinition",
    "FlowNotFound",
    "FlowStats",
    "InputError",
    "IsolatedError",
    "Job",
    "MapStep",
    "PermanentFailure",
    "PgflowError",
    "Retry",
    "Run",
    "RunNotFound",
    "RunStatus",
    "RunnerStats",
    "SchemaError",
    "ShapeMismatch",
    "Step",
    "StepDefinition",
    "StepRun",
    "StepTimeout",
    "Store",
    "StoreError",
    "TaskRun",
    "ThroughputPoint",
    "WaitTimeout",
    "WorkerInfo",
    "__version__",
    "arun_flows",
    "connect",
    "converter",
    "flow",
    "job",
    "perform",
    "run_flows",
    "testing",
)
