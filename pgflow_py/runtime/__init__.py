"""The runtime: the runner, attempt execution and handler loading."""

from .runner import RunnerStats, arun_flows, run_flows

__all__ = ("RunnerStats", "arun_flows", "run_flows")
