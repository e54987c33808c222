"""The runtime: the runner, attempt execution and handler loading."""

from .entry import arun_flows, run_flows
from .runner import RunnerStats

__all__ = ("RunnerStats", "arun_flows", "run_flows")
