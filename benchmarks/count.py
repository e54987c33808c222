"""Time ``store.count()`` per status on a SQLite file of many runs (not part of the suite).

    python -m benchmarks.count [--runs 1000000] [--path /tmp] [--reuse]
    python -m benchmarks.count --database 'postgresql://…?schema=bench_count'   # an empty schema

Fills the file with ``start_many`` in batches, then completes, fails and cancels shares of the
runs through the backend, leaving a backlog of queued runs and a few scheduled, running and
retrying ones. Prints the time of each count (the best of 5) with its value.
"""

from __future__ import annotations

import time

import pgflow_py as pf
from pgflow_py.store.base import TaskFailure, TaskSuccess

from . import filled_database, many_runs_parser


@pf.job(queue="count_a", max_attempts=3)
def count_a(input, ctx):
    return None


@pf.job(queue="count_b")
def count_b(input, ctx):
    return None


def fill(store: pf.Store, runs: int) -> None:
    batch = 10_000
    t0 = time.perf_counter()
    for start in range(0, runs, batch):
        flow = count_a if (start // batch) % 4 else count_b  # three quarters in count_a
        store.start_many(flow, range(min(batch, runs - start)))
    print(f"started {runs:,} runs in {time.perf_counter() - t0:.1f}s")
    backend = store.backend
    now = store.clock.now()
    t0 = time.perf_counter()
    # About 80% completed, 2% failed, 1% cancelled, 1% retrying, 100 running; the rest queued.
    for flow in (count_a, count_b):
        todo = int(store.count(flow) * 0.84)
        while todo > 0:
            tasks = backend.claim("bench", [flow.slug], min(todo, 5_000), 600)
            if not tasks:
                break
            todo -= len(tasks)
            ok = [TaskSuccess(t.id, t.attempt, "null", t.run_id, t.step_slug, True, t.claim)
                  for t in tasks[: int(len(tasks) * 0.80 / 0.84)]]
            bad = tasks[len(ok):]
            failed = [TaskFailure(t.id, t.attempt, "ValueError: x", None, t.claim)
                      for t in bad[: len(bad) // 2]]
            retrying = [TaskFailure(t.id, t.attempt, "ValueError: x", now + 3600, t.claim)
                        for t in bad[len(bad) // 2: len(bad) * 3 // 4]]
            cancel = bad[len(bad) * 3 // 4:]
            backend.finish(ok, failed + retrying)
            for t in cancel:
                backend.cancel(t.run_id)
    backend.claim("bench", [count_a.slug], 100, 600)
    store.start_many(count_a, range(1_000), delay=3600)
    print(f"completed, failed and cancelled shares in {time.perf_counter() - t0:.1f}s")


def main() -> None:
    parser = many_runs_parser(__doc__)
    args = parser.parse_args()
    path = filled_database(args, "pgflow_count", fill)
    with pf.connect(path) as store:
        total = store.count()
        print(f"{total:,} runs in {store.backend.location}")
        for flow in (None, "count_a"):
            for status in (None, *pf.RunStatus):
                best, value = float("inf"), 0
                for _ in range(5):
                    t0 = time.perf_counter()
                    value = store.count(flow, status)
                    best = min(best, time.perf_counter() - t0)
                print(f"count(flow={flow!r:10}, status={str(status)!r:12}) = {value:>9,}"
                      f"  {best * 1000:8.1f} ms")
        t0 = time.perf_counter()
        store.stats()
        print(f"stats(): {(time.perf_counter() - t0) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
