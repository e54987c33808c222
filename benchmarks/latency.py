"""Pick-up latency: from ``store.start`` to the handler's first line, on an idle runner."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pgflow_py as pf

WORKER = textwrap.dedent("""
    import sys, time
    import pgflow_py as pf

    @pf.job(queue="bench_latency_remote")
    async def bench_latency_remote(input, ctx):
        return {"entered": time.time()}

    pf.run_flows([bench_latency_remote], store=sys.argv[1], concurrency=10)
""")


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def same_process(directory: Path, samples: int = 200) -> tuple[float, float]:
    """p50 and p99 in milliseconds, the start made in the runner's own process."""
    db = directory / "latency_local.db"
    entered: dict[int, float] = {}

    @pf.job(queue="bench_latency_local")
    async def bench_latency_local(input, ctx):
        entered[input] = time.perf_counter()

    async def main() -> list[float]:
        with pf.connect(db) as store:
            runner = asyncio.create_task(pf.arun_flows(
                [bench_latency_local], store=store, handle_signals=False
            ))
            await asyncio.sleep(0.3)
            waits = []
            for i in range(samples):
                sent = time.perf_counter()
                store.start(bench_latency_local, i)
                while i not in entered:
                    await asyncio.sleep(0)
                waits.append(entered[i] - sent)
                await asyncio.sleep(0.005)  # idle again before the next start
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            return waits

    return _percentiles(asyncio.run(main()))


def other_process(
    directory: Path, samples: int = 100, database: str | None = None
) -> tuple[float, float]:
    """p50 and p99 in milliseconds, the start made by another process than the runner's, on
    ``database`` (a URL) or a SQLite file in ``directory``."""
    db = database or str(directory / "latency_remote.db")
    script = directory / "latency_worker.py"
    script.write_text(WORKER)
    # The worker imports the same pgflow_py as this process (an A/B run sets PYTHONPATH).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), *sys.path])}
    worker = subprocess.Popen([sys.executable, str(script), db], env=env)
    try:
        deadline = time.monotonic() + 20
        waits = []
        with pf.connect(db) as store:
            while True:
                try:
                    store.start("bench_latency_remote", 0)
                    break
                except pf.FlowNotFound:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            time.sleep(0.5)
            for _ in range(samples):
                time.sleep(0.2)  # let the runner's poll interval grow back to idle
                sent = time.time()
                run = store.start("bench_latency_remote", 0)
                done = store.wait(run.id, timeout=10)
                waits.append(done.output["entered"] - sent)
        return _percentiles(waits)
    finally:
        worker.terminate()
        worker.wait(10)
