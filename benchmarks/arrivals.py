"""Throughput with starts arriving: one runner drains ``n`` queued jobs while another thread
starts ``n // 2`` more, in batches of 100, through the same (thread-safe) ``pf.Store``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pgflow_py as pf

from . import fresh_db


def drain_while_starting(directory: Path, n: int, concurrency: int = 100) -> float:
    """Jobs per second: ``n + n // 2`` over the time until all are recorded completed.

    ``until_idle`` could stop the runner between two batches of starts, so the runner serves
    until its handler has counted every job and the store shows every run completed.
    """
    db = fresh_db(directory, "arrivals")
    arriving = n // 2
    total = n + arriving
    done = 0
    finished = asyncio.Event()

    @pf.job(queue="bench_arrivals")
    async def bench_arrivals(input, ctx):
        nonlocal done
        done += 1
        if done >= total:
            finished.set()

    def start(store: pf.Store, count: int, batch: int) -> None:
        for chunk in range(0, count, batch):
            store.start_many(bench_arrivals, [{"i": i} for i in range(chunk, min(count, chunk + batch))])

    async def main(store: pf.Store) -> float:
        began = time.perf_counter()
        runner = asyncio.create_task(pf.arun_flows(
            [bench_arrivals], store=store, concurrency=concurrency, handle_signals=False
        ))
        await asyncio.to_thread(start, store, arriving, 100)  # the runner drains meanwhile
        waiting = asyncio.create_task(finished.wait())
        await asyncio.wait([runner, waiting], return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            raise RuntimeError(f"runner stopped after {done} of {total} jobs: {runner!r}")
        while await asyncio.to_thread(completed, store) < total:  # the last results' batch
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - began
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return total / elapsed

    with pf.connect(db) as store:
        start(store, n, 1000)
        rate = asyncio.run(main(store))
        assert completed(store) == total, f"{completed(store)} of {total} runs completed"
    return rate


def completed(store: pf.Store) -> int:
    with store.backend._lock:  # the store's own connection, shared with the runner
        return store.backend._conn.execute(
            "SELECT count(*) FROM runs WHERE status = 'completed'"
        ).fetchone()[0]
