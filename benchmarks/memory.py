"""Peak resident memory of a runner draining many queued no-op jobs (in a fresh process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import resource, sys
    import pgflow_py as pf

    @pf.job(queue="bench_memory")
    async def bench_memory(input, ctx):
        return None

    mode, n = sys.argv[2], int(sys.argv[3])
    if mode == "fill":
        with pf.connect(sys.argv[1]) as store:
            for chunk in range(0, n, 1000):
                store.start_many(
                    bench_memory, [{"i": i} for i in range(chunk, min(n, chunk + 1000))]
                )
    else:
        stats = pf.run_flows([bench_memory], store=sys.argv[1], until_idle=True, concurrency=100)
        assert stats.completed == n, stats
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
""")


def peak_rss_mb(directory: Path, n: int = 100_000) -> float:
    """Peak RSS (MB) of the process while its runner drains ``n`` queued jobs."""
    db = directory / "memory.db"
    # Filled by one process and drained by another, so the figure is the runner's alone.
    subprocess.run([sys.executable, "-c", SCRIPT, str(db), "fill", str(n)], check=True)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db), "drain", str(n)],
        capture_output=True, text=True, check=True,
    )
    return float(done.stdout.strip())
