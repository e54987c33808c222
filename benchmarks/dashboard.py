"""Time the dashboard's pages and API on a database of many runs (not part of the suite).

    python -m benchmarks.dashboard [--runs 1000000] [--path /tmp] [--reuse] [--repeat 5]
    python -m benchmarks.dashboard --database 'postgresql://…?schema=bench_dash'  # an empty schema

Fills the database as ``benchmarks.count`` does (its ``fill``), then adds 2,000 runs with keys
and a few runs of a multi-step flow with a map step, run to completion (so a run page with a
DAG is timed; that leaves one worker row behind). Serves ``create_app(store)`` in-process through
Starlette's TestClient and prints, per request, the best and the median of ``--repeat``
responses in milliseconds (the best is the figure to compare: the median shows how noisy the
machine was). Needs the dashboard extra: ``pip install -e '.[dashboard]'``.
"""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import statistics
import time

import pgflow_py as pf

from . import filled_database, many_runs_parser
from .count import count_a, fill

KEYED = 2_000  # runs of count_a started with a key, key-0 … key-1999
DAG_RUNS = 5


dag = pf.flow("dash_dag")


@dag.step()
def fetch(input, ctx):
    return list(range(input["n"]))


@dag.map(array=fetch)
def each(item, ctx):
    return item * 2


@dag.step(depends_on=[each])
def total(deps, ctx):
    return sum(deps["each"])


@dag.step(depends_on=[fetch])
def audit(deps, ctx):
    return len(deps["fetch"])


def fill_dashboard(store: pf.Store, runs: int) -> None:
    fill(store, runs)
    t0 = time.perf_counter()
    for i in range(KEYED):
        store.start(count_a, {"keyed": i}, key=f"key-{i}")
    for _ in range(DAG_RUNS):
        store.start(dag, {"n": 20})
    pf.run_flows([dag], store=store, until_idle=True, handle_signals=False)
    print(f"{KEYED:,} keyed runs and {DAG_RUNS} runs of {dag.slug} in "
          f"{time.perf_counter() - t0:.1f}s")


def requests(client) -> list[tuple[str, str, dict[str, str]]]:  # type: ignore[no-untyped-def]
    """(label, url, headers) of every request timed; ids are looked up through the API."""
    failed = client.get("/api/runs", params={"status": "failed", "limit": 50}).json()
    job_run = failed[0]["id"]
    dag_run = client.get("/api/runs", params={"flow": dag.slug, "limit": 1}).json()[0]["id"]
    partial = {"X-Pgflow-Partial": "1"}
    a, key = count_a.slug, f"key-{KEYED // 2}"
    rows = [
        ("overview", "/", {}),
        ("overview, partial", "/", partial),
        ("runs", "/runs", {}),
    ]
    rows += [(f"runs status={s}", f"/runs?status={s}", {})
             for s in ("failed", "completed", "queued", "retrying", "running", "scheduled")]
    rows += [
        (f"runs flow={a} status=failed", f"/runs?flow={a}&status=failed", {}),
        (f"runs key={key}", f"/runs?key={key}", {}),
        (f"runs flow={a} key={key}", f"/runs?flow={a}&key={key}", {}),
        ("runs status=failed, page 2", f"/runs?status=failed&before={failed[-1]['id']}", {}),
        ("run (a job)", f"/runs/{job_run}", {}),
        ("run (a job), partial", f"/runs/{job_run}", partial),
        (f"run ({dag.slug}, DAG)", f"/runs/{dag_run}", {}),
        (f"run ({dag.slug}, DAG), partial", f"/runs/{dag_run}", partial),
        ("workers", "/workers", {}),
        ("api stats", "/api/stats", {}),
        ("api runs status=failed", "/api/runs?status=failed", {}),
    ]
    return rows


def measure(store: pf.Store, repeat: int) -> None:
    from starlette.testclient import TestClient

    from pgflow_py.dashboard import create_app

    with TestClient(create_app(store)) as client:
        print(f"{'request':<40} {'best ms':>9} {'median ms':>10}  status")
        for label, url, headers in requests(client):
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                response = client.get(url, headers=headers)
                times.append((time.perf_counter() - t0) * 1000)
            flag = "  <-- slow" if min(times) > 300 else ""
            print(f"{label:<40} {min(times):9.1f} {statistics.median(times):10.1f}  "
                  f"{response.status_code}{flag}", flush=True)


def main() -> None:
    parser = many_runs_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    path = filled_database(args, "pgflow_dashboard", fill_dashboard)
    with pf.connect(path) as store:
        print(f"{store.count():,} runs in {store.backend.location}; "
              f"best and median of {args.repeat}")
        measure(store, args.repeat)
    print(f"machine: {os.cpu_count()} cpus, {platform.platform()}, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{datetime.date.today()}")


if __name__ == "__main__":
    main()
