"""FastAPI: start runs from requests, read their status, and serve the dashboard under /pgflow.

Needs ``pip install fastapi uvicorn 'pgflow_py[dashboard]'``. From the examples/ directory:

    uvicorn --factory fastapi_app:make_app          # the web app, on http://127.0.0.1:8000/
    pgflow worker fastapi_app                       # a worker, in another terminal

    curl -X POST localhost:8000/signups -H 'content-type: application/json' \\
         -d '{"email": "ada@example.com"}'          # -> {"run_id": "…", "status": "queued"}
    curl localhost:8000/runs/RUN_ID                 # -> {"status": "completed", "output": …}

Both use ``$PGFLOW_DATABASE`` (default ./pgflow.db). ``python fastapi_app.py`` runs the whole
round trip in-process instead (FastAPI's test client, then a worker until idle).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import pgflow_py as pf
from pgflow_py.dashboard import create_app


@pf.job(queue="welcome_email", max_attempts=3, base_delay=5, timeout=30)
def welcome_email(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    """The job the web app starts: send the mail (here: pretend to)."""
    return {"sent_to": input["email"]}


class Signup(BaseModel):
    email: str


class Started(BaseModel):
    run_id: str
    status: str


class RunState(BaseModel):
    run_id: str
    status: str
    output: Any = None
    error: str | None = None


def make_app(store: pf.Store | None = None) -> FastAPI:
    """The web app over ``store``; without one, it connects as ``pf.connect()`` does (and closes
    the store when the app shuts down)."""
    owned = store is None
    db = pf.connect() if store is None else store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            db.close()

    app = FastAPI(title="signups", lifespan=lifespan)

    # Plain `def` endpoints: FastAPI runs them in its thread pool, so the store's (blocking)
    # calls do not hold up the event loop.
    @app.post("/signups", status_code=202)
    def signup(body: Signup) -> Started:
        # The key makes a double submit start one run, not two.
        run = db.start(welcome_email, {"email": body.email}, key=f"welcome:{body.email}")
        return Started(run_id=run.id, status=run.status.value)

    @app.get("/runs/{run_id}")
    def run_state(run_id: str) -> RunState:
        try:
            run = db.get_run(run_id)
        except pf.RunNotFound:
            raise HTTPException(status_code=404, detail=f"no run {run_id}") from None
        return RunState(run_id=run.id, status=run.status.value, output=run.output, error=run.error)

    # The dashboard: pages at /pgflow/, its JSON API at /pgflow/api/. Put it behind your own
    # authentication before exposing it (it has none).
    app.mount("/pgflow", create_app(db))
    return app


def main(database: str = "pgflow.db") -> list[pf.Run]:
    """One round trip in-process: two signups through the API, a worker until idle, the states."""
    from fastapi.testclient import TestClient  # needs httpx; the app itself does not

    with pf.connect(database) as store, TestClient(make_app(store)) as client:
        ids = []
        for email in ("ada@example.com", "grace@example.com"):
            answer = client.post("/signups", json={"email": email})
            answer.raise_for_status()
            ids.append(answer.json()["run_id"])
        pf.run_flows([welcome_email], store=store, until_idle=True)
        for run_id in ids:
            print(client.get(f"/runs/{run_id}").json())
        return [store.get_run(run_id) for run_id in ids]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGFLOW_DATABASE", "pgflow.db"))
