"""``run_flows`` and ``arun_flows``: check the arguments, load the flows, handle signals, and
serve with a :class:`~.runner.Runner`."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from ..dsl import Flow
from ..errors import InputError
from ..store import Store, connect
from ..telemetry import Telemetry
from .loader import load_stored_flows
from .runner import Runner, RunnerStats

__all__ = ("arun_flows", "run_flows")

log = logging.getLogger("pgflow_py.runner")

_MAX_CONCURRENCY = 10_000
_MAX_SECONDS = 366 * 86400.0  # a year: beyond it a lease or timeout is a mistake, not a choice


def _seconds(name: str, value: object, low: float, fix: str) -> None:
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not low <= value <= _MAX_SECONDS  # also refuses NaN
    ):
        raise InputError(
            f"{name} must be a number of seconds from {low:g} to {_MAX_SECONDS:g}, "
            f"got {value!r}{fix}"
        )


def _check_arguments(
    concurrency: object, lease: object, poll_interval: object, shutdown_timeout: object,
    resources: object,
) -> None:
    """Refuse arguments a runner cannot serve with, before it touches the store."""
    if (
        isinstance(concurrency, bool) or not isinstance(concurrency, int)
        or not 1 <= concurrency <= _MAX_CONCURRENCY
    ):
        raise InputError(
            f"concurrency must be an integer from 1 to {_MAX_CONCURRENCY}, got {concurrency!r}"
        )
    # A lease shorter than a heartbeat's round trip would hand live tasks to other workers.
    _seconds("lease", lease, 0.1, " (how long a claimed task stays taken between heartbeats)")
    _seconds("poll_interval", poll_interval, 0.001, "")
    _seconds("shutdown_timeout", shutdown_timeout, 0.0, "")
    if resources is not None and not isinstance(resources, Mapping):
        raise InputError(f"resources must be a mapping of names to objects, got {resources!r}")


async def arun_flows(
    flows: Sequence[Flow] | None = None,
    *,
    store: Store | str | None = None,
    concurrency: int = 10,
    until_idle: bool = False,
    resources: Mapping[str, Any] | None = None,
    lease: float = 30.0,
    poll_interval: float = 0.1,
    shutdown_timeout: float = 30.0,
    handle_signals: bool = True,
    telemetry: Telemetry | None = None,
) -> RunnerStats:
    """Serve ``flows`` (default: every flow in the store) inside a running event loop.

    Returns when idle (``until_idle=True``) or after SIGINT/SIGTERM: running tasks get up to
    ``shutdown_timeout`` seconds to finish; a second signal stops at once.
    """
    _check_arguments(concurrency, lease, poll_interval, shutdown_timeout, resources)
    own_store = not isinstance(store, Store)
    the_store = store if isinstance(store, Store) else connect(store)
    try:
        if flows is None:
            flows = load_stored_flows(the_store.backend.definitions())
        runner = Runner(
            the_store,
            list(flows),
            concurrency=concurrency,
            until_idle=until_idle,
            resources=dict(resources or {}),
            lease=lease,
            poll_interval=poll_interval,
            shutdown_timeout=shutdown_timeout,
            telemetry=telemetry,
        )
        if not (handle_signals and threading.current_thread() is threading.main_thread()):
            return await runner.run()
        return await _with_signals(runner)
    finally:
        if own_store:
            the_store.close()


async def _with_signals(runner: Runner) -> RunnerStats:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        if runner.stopping:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            if main is not None:
                main.cancel()
        else:
            log.info("%s: finishing running tasks, then stopping", signal.Signals(signum).name)
            runner.stop()

    installed = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # e.g. Windows
            pass
    try:
        return await runner.run()
    except asyncio.CancelledError:
        if not runner.stopping:
            raise
        return runner.counts.stats()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_flows(
    flows: Sequence[Flow] | None = None,
    *,
    store: Store | str | None = None,
    concurrency: int = 10,
    until_idle: bool = False,
    resources: Mapping[str, Any] | None = None,
    lease: float = 30.0,
    poll_interval: float = 0.1,
    shutdown_timeout: float = 30.0,
    handle_signals: bool = True,
    telemetry: Telemetry | None = None,
) -> RunnerStats:
    """Serve ``flows`` until idle or until SIGINT/SIGTERM; blocking (see :func:`arun_flows`)."""
    return anyio.run(
        lambda: arun_flows(
            flows, store=store, concurrency=concurrency, until_idle=until_idle,
            resources=resources, lease=lease, poll_interval=poll_interval,
            shutdown_timeout=shutdown_timeout, handle_signals=handle_signals,
            telemetry=telemetry,
        )
    )
