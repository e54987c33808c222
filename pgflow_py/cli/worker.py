"""``pgflow worker MODULE [MODULE ...]``: serve the flows they define."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import click

from ..dsl import Flow, distinct_flows
from ..errors import PgflowError
from ..logformat import JsonFormatter
from ..runtime import run_flows
from ..store import connect
from .common import database_option

__all__ = ("flows_in_modules", "load_resources", "worker")


def _cwd_importable() -> None:
    # Like `python -m`, let modules next to where the worker starts be importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def flows_in_modules(names: Sequence[str]) -> list[Flow]:
    """Import each module and return the jobs and flows defined at their top level.

    A module that defines none is an error (a worker given a helper module by mistake would
    otherwise serve nothing, or everything); so are two different jobs or flows with one slug.
    """
    _cwd_importable()
    found: list[Flow] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise click.ClickException(f"cannot import module {name!r}: {exc}") from exc
        except PgflowError as exc:  # e.g. an invalid definition, refused at decoration
            raise click.ClickException(f"importing module {name!r}: {exc}") from exc
        defined = [value for value in vars(module).values() if isinstance(value, Flow)]
        if not defined:
            raise click.ClickException(
                f"module {name!r} defines no pgflow job or flow at its top level; give the "
                "module that defines them (or no module at all to serve every stored flow)"
            )
        found.extend(defined)
    return distinct_flows(found)


def load_resources(spec: str) -> Mapping[str, Any]:
    """Import ``MODULE:CALLABLE``, call it, and return the mapping it returns (the runner's
    ``resources``); anything amiss is a one-line error."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.ClickException(
            f"--resources {spec!r} should be MODULE:CALLABLE, e.g. myapp.worker:make_resources"
        )
    _cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.ClickException(
            f"--resources: cannot import module {module_name!r}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise click.ClickException(
                f"--resources: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise click.ClickException(
            f"--resources: {spec} is a {type(target).__name__}, not a callable; name a function "
            "that returns the resources mapping"
        )
    try:
        resources = target()
    except Exception as exc:
        raise click.ClickException(
            f"--resources: {spec}() raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(resources, Mapping):
        raise click.ClickException(
            f"--resources: {spec}() returned a {type(resources).__name__}, not a mapping of "
            "names to objects (e.g. {\"mailer\": Mailer()})"
        )
    return resources


@click.command()
@click.argument("modules", nargs=-1)
@database_option
@click.option("--concurrency", type=click.IntRange(min=1), default=10, show_default=True,
              help="Tasks run at once by this worker.")
@click.option("--flows", "flow_slugs", default=None,
              help="Comma-separated slugs: serve only these flows.")
@click.option("--lease", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a claimed task stays taken without a heartbeat.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="Seconds running tasks get to finish after SIGTERM/SIGINT.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one JSON object per line, for log shippers.")
@click.option("--resources", "resources_spec", default=None, metavar="MODULE:CALLABLE",
              help="A function returning the resources mapping handlers get as ctx.resources "
              "(called once at start).")
def worker(
    modules: tuple[str, ...],
    database: str,
    concurrency: int,
    flow_slugs: str | None,
    lease: float,
    shutdown_timeout: float,
    log_level: str,
    log_format: str,
    resources_spec: str | None,
) -> None:
    """Serve jobs and flows.

    Serves those defined in MODULES (with none given, every flow in the store).
    SIGTERM or SIGINT stops claiming and lets running tasks finish (up to the shutdown
    timeout); a second signal stops at once.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    log = logging.getLogger("pgflow_py.worker")
    try:
        _serve(
            modules, database, concurrency, flow_slugs, lease, shutdown_timeout, log,
            resources_spec,
        )
    except PgflowError as exc:
        # Library errors name the problem and the fix: one line says it better than a
        # traceback, which --log-level DEBUG still shows.
        log.debug("stopped by an error", exc_info=True)
        raise click.ClickException(" ".join(str(exc).split())) from exc
    lingering = [
        t for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if lingering:
        # Threads a handler started itself (the runner's own are daemons) would keep Python
        # waiting at exit; the tasks are released or reclaimed already.
        log.warning("exiting with %d non-daemon thread(s) still running", len(lingering))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _serve(
    modules: tuple[str, ...],
    database: str,
    concurrency: int,
    flow_slugs: str | None,
    lease: float,
    shutdown_timeout: float,
    log: logging.Logger,
    resources_spec: str | None = None,
) -> None:
    """Import the modules (or load the stored flows), connect, and serve until stopped."""
    flows = flows_in_modules(modules) if modules else None
    resources = load_resources(resources_spec) if resources_spec is not None else None
    with connect(database) as store:
        if flows is None:
            from ..runtime.loader import load_stored_flows

            flows = load_stored_flows(store.backend.definitions())
        if flow_slugs:
            wanted = {s.strip() for s in flow_slugs.split(",") if s.strip()}
            unknown = wanted - {f.slug for f in flows}
            if unknown:
                raise click.ClickException(
                    f"--flows names flows that are not available: {sorted(unknown)}; "
                    f"available: {sorted(f.slug for f in flows)}"
                )
            flows = [f for f in flows if f.slug in wanted]
        log.info(
            "serving %s from %s (concurrency %d)",
            ", ".join(sorted(f.slug for f in flows)) or "nothing", store.backend.location,
            concurrency,
        )
        stats = run_flows(
            flows, store=store, concurrency=concurrency, lease=lease,
            shutdown_timeout=shutdown_timeout, resources=resources,
        )
        log.info("stopped: %s", stats)
