"""Quickstart: define a job, start a few runs into ./pgflow.db, process them, print the results.

Run it with:  python examples/quickstart.py
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pgflow_py as pf


@pf.job(queue="greet", max_attempts=3, base_delay=0.1, timeout=10)
def greet(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    """A handler: takes the run input and a context, returns any JSON value."""
    return {"greeting": f"Hello, {input['name']}!", "attempt": ctx.attempt}


def main(database: str = "pgflow.db") -> list[pf.Run]:
    with pf.connect(database) as store:
        runs = store.start_many(greet, [{"name": n} for n in ("Ada", "Grace", "Linus")])
        stats = pf.run_flows([greet], store=store, until_idle=True)
        print(f"processed: {stats}")
        done = [store.get_run(run.id) for run in runs]
        for run in done:
            print(f"{run.id}  {run.status.value:<9}  {run.output}")
        return done


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGFLOW_DATABASE", "pgflow.db"))
