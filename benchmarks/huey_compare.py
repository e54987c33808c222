"""huey's SqliteHuey consumer on the same no-op workload, for a side-by-side figure.

Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from . import fresh_db


def drain(directory: Path, n: int, workers: int) -> float:
    """Jobs per second for huey's consumer draining ``n`` queued no-op tasks."""
    from huey import SqliteHuey

    db = fresh_db(directory, f"huey_{workers}")
    huey = SqliteHuey(filename=str(db), results=False)
    done = 0
    lock = threading.Lock()
    finished = threading.Event()

    @huey.task()
    def noop(i: int) -> None:
        nonlocal done
        with lock:
            done += 1
            if done >= n:
                finished.set()

    for i in range(n):
        noop(i)
    consumer = huey.create_consumer(
        workers=workers, worker_type="thread", periodic=False, initial_delay=0.001,
        max_delay=0.01, check_worker_health=False,
    )
    began = time.perf_counter()
    consumer.start()  # its worker threads take tasks; run() would only add health checks
    finished.wait()
    elapsed = time.perf_counter() - began
    consumer.stop(graceful=True)
    return n / elapsed


def best(directory: Path, n: int) -> tuple[float, int]:
    """huey's better figure of 1 and 4 worker threads, and which it was."""
    figures = {workers: drain(directory, n, workers) for workers in (1, 4)}
    workers = max(figures, key=lambda w: figures[w])
    return figures[workers], workers
