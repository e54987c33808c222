"""Print throughput figures of pgflow_py on this machine; each is the median of N repetitions.

    python -m benchmarks [--repeat 3] [--jobs 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pgflow_py as pf

from . import backlog, huey_compare, latency, memory


@pf.job(queue="bench_async")
async def bench_async(input, ctx):
    return None


@pf.job(queue="bench_sync")
def bench_sync(input, ctx):
    return None


three = pf.flow("bench_three_steps")


@three.step()
async def root(input, ctx):
    return input


@three.step(depends_on=[root])
async def left(deps, ctx):
    return None


@three.step(depends_on=[root])
async def right(deps, ctx):
    return None


def _fresh_store(directory: Path, name: str) -> pf.Store:
    path = directory / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return pf.connect(path)


def start_one_at_a_time(directory: Path, n: int) -> float:
    with _fresh_store(directory, "start_one") as store:
        began = time.perf_counter()
        for i in range(n):
            store.start(bench_async, {"i": i})
        return n / (time.perf_counter() - began)


def start_many(directory: Path, n: int) -> float:
    with _fresh_store(directory, "start_many") as store:
        began = time.perf_counter()
        for chunk in range(0, n, 1000):
            store.start_many(bench_async, [{"i": i} for i in range(chunk, min(n, chunk + 1000))])
        return n / (time.perf_counter() - began)


def drain(job: pf.Flow, concurrency: int) -> Callable[[Path, int], float]:
    def measure(directory: Path, n: int) -> float:
        with _fresh_store(directory, f"drain_{job.slug}") as store:
            for chunk in range(0, n, 1000):
                store.start_many(job, [{"i": i} for i in range(chunk, min(n, chunk + 1000))])
            began = time.perf_counter()
            stats = pf.run_flows([job], store=store, until_idle=True, concurrency=concurrency)
            elapsed = time.perf_counter() - began
            assert stats.completed == n * len(job.definition.steps), stats
            return n / elapsed

    return measure


BENCHMARKS: list[tuple[str, str, Callable[[Path, int], float], float]] = [
    # name, unit, function, share of --jobs used as n
    ("start, one at a time", "runs/s", start_one_at_a_time, 0.5),
    ("start_many, batches of 1,000", "runs/s", start_many, 2.0),
    ("end-to-end no-op async jobs (concurrency 10)", "jobs/s", drain(bench_async, 10), 1.0),
    ("end-to-end no-op async jobs (concurrency 100)", "jobs/s", drain(bench_async, 100), 1.0),
    ("end-to-end no-op sync jobs (concurrency 10)", "jobs/s", drain(bench_sync, 10), 1.0),
    ("3-step flow runs (concurrency 10)", "runs/s", drain(three, 10), 0.2),
]


def _single_figures(directory: Path, backlog_size: int) -> list[tuple[str, str, float]]:
    """Latency percentiles (one series each), peak memory and the backlog ratio (one run)."""
    same_p50, same_p99 = latency.same_process(directory)
    other_p50, other_p99 = latency.other_process(directory)
    return [
        ("pick-up latency, same process, p50", "ms", same_p50),
        ("pick-up latency, same process, p99", "ms", same_p99),
        ("pick-up latency, other process, p50", "ms", other_p50),
        ("pick-up latency, other process, p99", "ms", other_p99),
        ("peak RSS of a runner draining 100,000 jobs", "MB", memory.peak_rss_mb(directory)),
        (f"10,000 jobs from {backlog_size:,} queued vs from 10,000", "x",
         backlog.drain_head(directory, backlog_size) / backlog.drain_head(directory, 10_000)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backlog", type=int, default=1_000_000,
                        help="queued jobs for the backlog ratio (filling 1,000,000 takes ~1 min)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, unit, function, share in BENCHMARKS:
            n = max(1, int(args.jobs * share))
            figures = [function(Path(tmp), n) for _ in range(args.repeat)]
            median = statistics.median(figures)
            results.append({"benchmark": name, "n": n, "unit": unit, "median": round(median),
                            "all": [round(f) for f in figures]})
            print(f"{name:<48} {median:>10,.0f} {unit:<7} (n={n:,}, runs: "
                  + ", ".join(f"{f:,.0f}" for f in figures) + ")", flush=True)
        for name, unit, value in _single_figures(Path(tmp), args.backlog):
            results.append({"benchmark": name, "unit": unit, "value": round(value, 2)})
            print(f"{name:<48} {value:>10,.1f} {unit}", flush=True)
        try:
            ours = drain(bench_async, 100)(Path(tmp), args.jobs)
            theirs, workers = huey_compare.best(Path(tmp), args.jobs)
        except ImportError:
            print("huey side by side: skipped (pip install -e '.[bench]')")
        else:
            for name, unit, value in (
                (f"huey SqliteHuey consumer, {workers} thread(s)", "jobs/s", theirs),
                ("pgflow_py (async, concurrency 100) / huey, same run", "x", ours / theirs),
            ):
                results.append({"benchmark": name, "unit": unit, "value": round(value, 2)})
                print(f"{name:<48} {value:>10,.1f} {unit}", flush=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
               "platform": platform.platform(), "sqlite": __import__("sqlite3").sqlite_version}
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
