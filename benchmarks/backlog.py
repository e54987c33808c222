"""Throughput with a large backlog: drain 10,000 jobs from the head of N queued ones."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pgflow_py as pf

from . import fresh_db


@pf.job(queue="bench_backlog")
async def bench_backlog(input, ctx):
    return None


def drain_head(directory: Path, queued: int, drained: int = 10_000) -> float:
    """Jobs per second while taking the first ``drained`` of ``queued`` queued jobs."""
    db = fresh_db(directory, f"backlog_{queued}")
    with pf.connect(db) as store:
        for chunk in range(0, queued, 5000):
            store.start_many(bench_backlog, [None] * min(5000, queued - chunk))

        async def main() -> float:
            done = 0
            finished = asyncio.Event()

            @pf.job(queue="bench_backlog")
            async def counting(input, ctx):
                nonlocal done
                done += 1
                if done >= drained:
                    finished.set()

            began = time.perf_counter()
            runner = asyncio.create_task(pf.arun_flows(
                [counting], store=store, concurrency=100, handle_signals=False
            ))
            await finished.wait()
            elapsed = time.perf_counter() - began
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            return drained / elapsed

        return asyncio.run(main())
