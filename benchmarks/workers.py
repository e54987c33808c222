"""PostgreSQL throughput with 1, 2 and 4 worker processes draining one queue of no-op jobs.

    python -m benchmarks --postgres URL --only "worker processes" [--jobs 20000] [--repeat 3]

Each repetition fills a fresh schema with n jobs, then starts the processes (multiprocessing,
spawn). Each opens its own store on the schema with ``pf.connect(url)`` and waits at a barrier;
when all are there the clock starts and each calls ``pf.run_flows([job], store=store,
until_idle=True, concurrency=10)``, then reports when that returned. A process returns when it
finds nothing due and nothing of its own running, which can be before the others have finished
theirs (their claimed jobs are not due), so the clock stops when the last one returns, and the
store is then asked whether all n runs are completed (the figure fails otherwise).

The end is not found by polling ``store.count`` meanwhile: at 20,000 runs one count takes
~6 ms of the server's CPU, which every 10 ms would take a third of one of this machine's two
cores from the drain. The times are ``time.monotonic()``, one clock for every process on Linux.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pgflow_py as pf

PROCESSES = (1, 2, 4)
CONCURRENCY = 10  # per process
TIMEOUT = 600.0  # seconds for one drain, after which it fails


@pf.job(queue="bench_workers")
async def bench_workers(input, ctx):
    return None


def _worker(url: str, gate: Barrier, finished: Queue[tuple[int, float]]) -> None:
    """One worker process: connect, wait for the others, drain until idle, then report how many
    jobs it completed and when (``time.monotonic()``) its runner returned."""
    with pf.connect(url) as store:
        gate.wait()
        stats = pf.run_flows([bench_workers], store=store, until_idle=True,
                             concurrency=CONCURRENCY)
        finished.put((stats.completed, time.monotonic()))


def busy_jiffies() -> tuple[int, int] | None:
    """The machine's CPU time so far, total and not idle, in clock ticks (Linux; else None)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields), sum(fields) - fields[3] - fields[4]  # idle and iowait


def busy_cores(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """How many of the machine's cores were busy on average between two ``busy_jiffies()``."""
    if before is None or after is None or after[0] == before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0]) * (os.cpu_count() or 1)


def drain(url: str, n: int, processes: int) -> tuple[float, list[int], float | None]:
    """Jobs per second of ``processes`` worker processes draining ``n`` jobs queued in ``url``
    (a PostgreSQL URL of an empty schema), how many each completed, and how many of the
    machine's cores were busy meanwhile (the workers, the server and anything else)."""
    context = multiprocessing.get_context("spawn")
    gate = context.Barrier(processes + 1)
    finished: Queue[tuple[int, float]] = context.Queue()
    with pf.connect(url) as store:
        for chunk in range(0, n, 1000):
            store.start_many(bench_workers, [{"i": i} for i in range(chunk, min(n, chunk + 1000))])
        workers = [context.Process(target=_worker, args=(url, gate, finished), daemon=True)
                   for _ in range(processes)]
        for worker in workers:
            worker.start()
        try:
            try:
                gate.wait(timeout=120)  # every process has imported pgflow_py and connected
            except threading.BrokenBarrierError:
                raise RuntimeError("worker processes did not start: exit codes "
                                   f"{[w.exitcode for w in workers]}") from None
            began = time.monotonic()
            cpu_before = busy_jiffies()
            reports: list[tuple[int, float]] = []
            while len(reports) < processes:
                try:
                    reports.append(finished.get(timeout=1))
                except queue.Empty:
                    failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if failed or time.monotonic() - began > TIMEOUT:
                        raise RuntimeError(f"worker processes: exit codes {failed}, "
                                           f"{len(reports)} of {processes} reported") from None
            cores = busy_cores(cpu_before, busy_jiffies())
            elapsed = max(at for _completed, at in reports) - began
            for worker in workers:
                worker.join(60)
            if (done := store.count(bench_workers, "completed")) != n:
                raise RuntimeError(f"{processes} worker process(es) returned with {done} of {n} "
                                   "jobs completed")
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join(10)
    return n / elapsed, [completed for completed, _at in reports], cores
