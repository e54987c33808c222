"""Print throughput figures of pgflow_py on this machine; each is the median of N repetitions.

    python -m benchmarks [--repeat 3] [--jobs 20000] [--json out.json] [--only latency ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

import pgflow_py as pf

from . import arrivals, backlog, floor, fresh_db, huey_compare, latency, memory, workers


@pf.job(queue="bench_async")
async def bench_async(input, ctx):
    return None


@pf.job(queue="bench_sync")
def bench_sync(input, ctx):
    return None


@attrs.frozen
class BenchInput:
    i: int


@attrs.frozen
class BenchOutput:
    i: int


@pf.job(queue="bench_typed")
async def bench_typed(input: BenchInput, ctx: pf.Context) -> BenchOutput:
    """bench_async with typed payloads: the input structured, the output unstructured."""
    return BenchOutput(input.i)


@pf.job(queue="bench_typed_sync")
def bench_typed_sync(input: BenchInput, ctx: pf.Context) -> BenchOutput:
    return BenchOutput(input.i)


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


mapped = pf.flow("bench_map")


@mapped.step()
async def elements(input, ctx):
    return list(range(input["n"]))


@mapped.map(array=elements)
async def each(item, ctx):
    return None


POSTGRES: str | None = None  # --postgres: the server the table's figures run on instead


def _fresh_store(directory: Path, name: str) -> pf.Store:
    url = _postgres_url(name)
    return pf.connect(fresh_db(directory, name) if url is None else url)


def _postgres_url(name: str) -> str | None:
    """With --postgres, the URL of a new, empty schema for ``name``."""
    if POSTGRES is None:
        return None
    schema = f"bench_{name}"
    _drop_schemas(schema)
    _schemas.add(schema)
    return f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={schema}"


_schemas: set[str] = set()  # made on the --postgres server, dropped at the end


def _drop_schemas(*names: str) -> None:
    import psycopg

    assert POSTGRES is not None
    with psycopg.connect(POSTGRES, autocommit=True) as db:
        for name in names:
            db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def start_one_at_a_time(directory: Path, n: int) -> float:
    with _fresh_store(directory, "start_one") as store:
        began = time.perf_counter()
        for i in range(n):
            store.start(bench_async, {"i": i})
        return n / (time.perf_counter() - began)


def start_from_threads(threads: int) -> Callable[[Path, int], float]:
    """``store.start`` called from ``threads`` threads at once (a web app's request threads),
    n runs in all; the clock runs from when they are released together until the last
    returns."""

    def run(directory: Path, n: int) -> float:
        with _fresh_store(directory, f"start_threads_{threads}") as store:
            store.register(bench_async)
            gate = threading.Barrier(threads + 1)
            each = [n // threads + (k < n % threads) for k in range(threads)]

            def starter(count: int) -> None:
                gate.wait()
                for i in range(count):
                    store.start(bench_async, {"i": i})

            workers = [threading.Thread(target=starter, args=(count,)) for count in each]
            for worker in workers:
                worker.start()
            gate.wait()
            began = time.perf_counter()
            for worker in workers:
                worker.join()
            return n / (time.perf_counter() - began)

    return run


def start_many(directory: Path, n: int) -> float:
    with _fresh_store(directory, "start_many") as store:
        began = time.perf_counter()
        for chunk in range(0, n, 1000):
            store.start_many(bench_async, [{"i": i} for i in range(chunk, min(n, chunk + 1000))])
        return n / (time.perf_counter() - began)


def drain(
    job: pf.Flow, concurrency: int, telemetry: Callable[[], Any] | None = None
) -> Callable[[Path, int], float]:
    def measure(directory: Path, n: int) -> float:
        with _fresh_store(directory, f"drain_{job.slug}") as store:
            for chunk in range(0, n, 1000):
                store.start_many(job, [{"i": i} for i in range(chunk, min(n, chunk + 1000))])
            hooks = None if telemetry is None else telemetry()
            began = time.perf_counter()
            stats = pf.run_flows([job], store=store, until_idle=True, concurrency=concurrency,
                                 telemetry=hooks)
            elapsed = time.perf_counter() - began
            assert stats.completed == n * len(job.definition.steps), stats
            return n / elapsed

    return measure


def map_tasks(directory: Path, n: int) -> float:
    """Tasks per second of one map step over ``n`` elements (its root step included)."""
    with _fresh_store(directory, "map") as store:
        store.start(mapped, {"n": n})
        began = time.perf_counter()
        stats = pf.run_flows([mapped], store=store, until_idle=True, concurrency=100)
        elapsed = time.perf_counter() - began
        assert stats.completed == n + 1, stats
        return n / elapsed


BENCHMARKS: list[tuple[str, str, Callable[[Path, int], float], float]] = [
    # name, unit, function, share of --jobs used as n
    ("start, one at a time", "runs/s", start_one_at_a_time, 0.5),
    ("start from 8 threads at once", "runs/s", start_from_threads(8), 0.5),
    ("start_many, batches of 1,000", "runs/s", start_many, 2.0),
    ("end-to-end no-op async jobs (concurrency 10)", "jobs/s", drain(bench_async, 10), 1.0),
    ("end-to-end no-op async jobs (concurrency 100)", "jobs/s", drain(bench_async, 100), 1.0),
    ("end-to-end no-op sync jobs (concurrency 10)", "jobs/s", drain(bench_sync, 10), 1.0),
    ("end-to-end no-op sync jobs (concurrency 100)", "jobs/s", drain(bench_sync, 100), 1.0),
    ("end-to-end no-op async jobs, typed attrs in/out (concurrency 100)", "jobs/s",
     drain(bench_typed, 100), 1.0),
    ("end-to-end async jobs, +50% arriving (concurrency 100)", "jobs/s",
     arrivals.drain_while_starting, 1.0),
    ("map step over n elements (concurrency 100)", "tasks/s", map_tasks, 0.5),
    ("3-step flow runs (concurrency 10)", "runs/s", drain(three, 10), 0.1),
    ("3-step flow runs (concurrency 100)", "runs/s", drain(three, 100), 0.1),
    # Ceilings: the store's statements alone (SQLite), and a queue that keeps one row per job.
    ("SQL alone: start's statements, one at a time", "runs/s", floor.start, 0.5),
    ("SQL alone: start_many's statements", "runs/s", floor.start_many, 2.0),
    ("SQL alone: a drain's statements, jobs", "jobs/s", floor.drain, 1.0),
    ("bare one-table queue, SQL alone", "jobs/s", floor.bare_queue, 1.0),
]


Rows = list[tuple[str, str, float]]  # name, unit, value


def _latency_same(directory: Path, args: argparse.Namespace) -> Rows:
    p50, p99 = latency.same_process(directory)
    return [("pick-up latency, same process, p50", "ms", p50),
            ("pick-up latency, same process, p99", "ms", p99)]


def _latency_other(directory: Path, args: argparse.Namespace) -> Rows:
    p50, p99 = latency.other_process(directory, database=_postgres_url("latency"))
    return [("pick-up latency, other process, p50", "ms", p50),
            ("pick-up latency, other process, p99", "ms", p99)]


def _rss(directory: Path, args: argparse.Namespace) -> Rows:
    return [("peak RSS of a runner draining 100,000 jobs", "MB", memory.peak_rss_mb(directory))]


def _backlog(directory: Path, args: argparse.Namespace) -> Rows:
    ratio = (backlog.drain_head(directory, args.backlog)
             / backlog.drain_head(directory, 10_000))
    return [(f"10,000 jobs from {args.backlog:,} queued vs from 10,000", "x", ratio)]


def _telemetry(directory: Path, args: argparse.Namespace) -> Rows:
    from . import otel  # ImportError without the SDK

    off, on = [], []
    for _ in range(args.repeat):  # interleaved, so the machine's phase moves both alike
        off.append(drain(bench_async, 100)(directory, args.jobs))
        on.append(drain(bench_async, 100, otel.telemetry)(directory, args.jobs))
    return [("async jobs (concurrency 100), telemetry off", "jobs/s", statistics.median(off)),
            ("the same with OpenTelemetry spans and metrics", "jobs/s", statistics.median(on))]


def _typed(directory: Path, args: argparse.Namespace) -> Rows:
    rows: Rows = []
    for label, plain, typed, concurrency in (
        ("async", bench_async, bench_typed, 100), ("sync", bench_sync, bench_typed_sync, 10),
    ):
        untyped, attrs_in_out = [], []
        for _ in range(args.repeat):  # interleaved, so the machine's phase moves both alike
            untyped.append(drain(plain, concurrency)(directory, args.jobs))
            attrs_in_out.append(drain(typed, concurrency)(directory, args.jobs))
        rows += [
            (f"no-op {label} jobs (concurrency {concurrency}), untyped", "jobs/s",
             statistics.median(untyped)),
            ("the same, typed (attrs input and output)", "jobs/s", statistics.median(attrs_in_out)),
        ]
    return rows


def _huey(directory: Path, args: argparse.Namespace) -> Rows:
    """huey at each durability setting (huey_compare.SETTINGS), at its better of 1 and 4
    threads, and pgflow_py; interleaved, medians of --repeat."""
    figures: dict[tuple[str, int], list[float]] = {}
    pragmas: dict[str, str] = {}
    ours = []
    for _ in range(args.repeat):  # interleaved, so the machine's phase moves all alike
        for setting, _kwargs in huey_compare.SETTINGS:
            for threads in (1, 4):  # ImportError without huey
                value, pragmas[setting] = huey_compare.drain(directory, args.jobs, threads, setting)
                figures.setdefault((setting, threads), []).append(value)
        ours.append(drain(bench_async, 100)(directory, args.jobs))
    ours_durability = huey_compare.pgflow_durability(directory)
    for (setting, threads), values in figures.items():
        print(f"  huey {setting}, {threads} thread(s), runs: "
              + ", ".join(f"{f:,.0f}" for f in values), flush=True)
    print("  pgflow_py, runs: " + ", ".join(f"{f:,.0f}" for f in ours), flush=True)
    median = {key: statistics.median(values) for key, values in figures.items()}
    best: dict[str, tuple[float, int]] = {}
    rows: Rows = []
    for setting, _kwargs in huey_compare.SETTINGS:
        threads = max((1, 4), key=lambda t: median[setting, t])
        best[setting] = median[setting, threads], threads
        rows.append((f"huey {setting} ({pragmas[setting]}), {threads} thr. "
                     f"[{5 - threads}: {median[setting, 5 - threads]:,.0f}]", "jobs/s",
                     median[setting, threads]))
    mine = statistics.median(ours)
    rows.append((f"pgflow_py async, concurrency 100 ({ours_durability})", "jobs/s", mine))
    top = max(best, key=lambda setting: best[setting][0])
    rows.append((f"pgflow_py / huey's best: {top}, {best[top][1]} thr.", "x",
                 mine / best[top][0]))
    for setting, _kwargs in huey_compare.SETTINGS:
        if pragmas[setting] == ours_durability:
            rows.append((f"pgflow_py / huey at equal durability: {setting}", "x",
                         mine / best[setting][0]))
    return rows


def _workers(directory: Path, args: argparse.Namespace) -> Rows:
    """PostgreSQL only: worker processes draining one queue; interleaved, medians of --repeat."""
    figures: dict[int, list[float]] = {k: [] for k in workers.PROCESSES}
    cores: dict[int, list[float]] = {k: [] for k in workers.PROCESSES}
    for _ in range(args.repeat):  # interleaved, so the machine's phase moves all alike
        for k in workers.PROCESSES:
            url = _postgres_url(f"workers_{k}")
            assert url is not None
            rate, _shares, busy = workers.drain(url, args.jobs, k)
            figures[k].append(rate)
            if busy is not None:
                cores[k].append(busy)
    rows: Rows = []
    for k, values in figures.items():
        rows.append((f"PostgreSQL, {k} worker process(es) x concurrency {workers.CONCURRENCY}",
                     "jobs/s", statistics.median(values)))
        # What limits a machine with few cores: how many were busy (workers and server).
        shown = (f", cores busy of {os.cpu_count()}: " + ", ".join(f"{c:.2f}" for c in cores[k])
                 if cores[k] else "")
        print(f"  {k} process(es), runs: " + ", ".join(f"{f:,.0f}" for f in values) + shown,
              flush=True)
    rows.append((f"{workers.PROCESSES[-1]} processes / 1", "x",
                 statistics.median(figures[workers.PROCESSES[-1]]) / statistics.median(figures[1])))
    return rows


# Measured once each (latency percentiles are over a series of starts); --only matches the key.
SINGLE_FIGURES: list[tuple[str, Callable[[Path, argparse.Namespace], Rows]]] = [
    ("pick-up latency, same process", _latency_same),
    ("pick-up latency, other process", _latency_other),
    ("peak RSS", _rss),
    ("backlog ratio", _backlog),
    ("huey side by side", _huey),
    ("telemetry off and on", _telemetry),
    ("typed payloads", _typed),
    ("PostgreSQL worker processes", _workers),
]
POSTGRES_ONLY = {"PostgreSQL worker processes"}  # skipped, with a line saying so, without --postgres


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20_000,
                        help="n of the end-to-end drains; the other sizes scale from it")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backlog", type=int, default=1_000_000,
                        help="queued jobs for the backlog ratio (filling 1,000,000 takes ~1 min)")
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="run the throughput table on this PostgreSQL server instead of "
                        "SQLite files (schemas bench_*), the other-process latency and the "
                        "worker processes (PostgreSQL only); the ceilings, the arrivals row "
                        "and the other single figures are SQLite's and are skipped")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only the benchmarks whose name contains it (any case; "
                        "repeatable), e.g. arriving, map, latency, rss, backlog, huey, "
                        "'worker processes'")
    args = parser.parse_args()

    global POSTGRES
    POSTGRES = args.postgres
    sqlite_only = {key for key, _ in SINGLE_FIGURES
                   if key != "pick-up latency, other process" and key not in POSTGRES_ONLY} | {
        name for name, _unit, function, _share in BENCHMARKS
        if function.__module__ in (floor.__name__, arrivals.__name__)
    }

    def wanted(name: str) -> bool:
        if POSTGRES is not None and name in sqlite_only:
            return False
        return not args.only or any(part.lower() in name.lower() for part in args.only)

    names = [name for name, *_ in BENCHMARKS] + [key for key, _ in SINGLE_FIGURES]
    if not any(wanted(name) for name in names):
        parser.error(f"--only matches none of {names}")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, unit, function, share in BENCHMARKS:
            if not wanted(name):
                continue
            n = max(1, int(args.jobs * share))
            figures = [function(Path(tmp), n) for _ in range(args.repeat)]
            median = statistics.median(figures)
            results.append({"benchmark": name, "n": n, "unit": unit, "median": round(median),
                            "all": [round(f) for f in figures]})
            print(f"{name:<56} {median:>10,.0f} {unit:<7} (n={n:,}, runs: "
                  + ", ".join(f"{f:,.0f}" for f in figures) + ")", flush=True)
        for key, measure in SINGLE_FIGURES:
            if not wanted(key):
                continue
            if POSTGRES is None and key in POSTGRES_ONLY:
                print(f"{key}: skipped (PostgreSQL only: --postgres URL)", flush=True)
                continue
            try:
                rows = measure(Path(tmp), args)
            except ImportError as exc:
                print(f"{key}: skipped ({exc}; pip install -e '.[bench,test]')", flush=True)
                continue
            for name, unit, value in rows:
                results.append({"benchmark": name, "unit": unit, "value": round(value, 2)})
                print(f"{name:<56} {value:>10,.1f} {unit}", flush=True)
    if POSTGRES is not None and _schemas:
        _drop_schemas(*_schemas)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
               "platform": platform.platform(), "sqlite": __import__("sqlite3").sqlite_version,
               "database": "SQLite" if POSTGRES is None else "PostgreSQL"}
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
