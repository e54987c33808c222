"""The FastAPI and Django examples, run as a user would: through FastAPI's test client, and by
Django's own test runner (``manage.py test``). Each skips, saying why, without its framework
(``pip install -e '.[integrations]'``); .ci/run installs both.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load_fastapi_example() -> ModuleType:
    pytest.importorskip("fastapi", reason="FastAPI is not installed (the integrations extra)")
    pytest.importorskip("httpx", reason="httpx (FastAPI's test client) is not installed")
    path = EXAMPLES / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("example_fastapi_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fastapi_example() -> ModuleType:
    return _load_fastapi_example()


@pytest.fixture
def client(fastapi_example: ModuleType, store: pf.Store) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(fastapi_example.make_app(store)) as c:
        yield c


def test_fastapi_a_post_starts_a_run_and_a_get_follows_it(
    fastapi_example: ModuleType, client: Any, store: pf.Store
) -> None:
    answer = client.post("/signups", json={"email": "ada@example.com"})
    assert answer.status_code == 202
    started = answer.json()
    assert started["status"] == "queued"
    run = store.get_run(started["run_id"])
    assert (run.flow_slug, run.input) == ("welcome_email", {"email": "ada@example.com"})
    assert client.get(f"/runs/{run.id}").json() == {
        "run_id": run.id, "status": "queued", "output": None, "error": None,
    }

    drain(store, fastapi_example.welcome_email)
    assert client.get(f"/runs/{run.id}").json() == {
        "run_id": run.id, "status": "completed", "output": {"sent_to": "ada@example.com"},
        "error": None,
    }


def test_fastapi_a_double_submit_starts_one_run(client: Any, store: pf.Store) -> None:
    first = client.post("/signups", json={"email": "grace@example.com"}).json()
    second = client.post("/signups", json={"email": "grace@example.com"}).json()
    assert first["run_id"] == second["run_id"]
    assert len(store.runs(flow="welcome_email")) == 1


def test_fastapi_bad_requests_are_refused(client: Any, store: pf.Store) -> None:
    assert client.post("/signups", json={"name": "no email"}).status_code == 422
    assert store.runs() == []
    missing = client.get("/runs/no-such-run")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no run no-such-run"}


def test_fastapi_serves_the_dashboard_under_pgflow(client: Any, store: pf.Store) -> None:
    run = client.post("/signups", json={"email": "linus@example.com"}).json()
    page = client.get("/pgflow/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    shown = client.get(f"/pgflow/api/runs/{run['run_id']}").json()
    assert (shown["id"], shown["status"]) == (run["run_id"], "queued")
    # Its buttons work through the mount: cancel, as the page's button does.
    cancelled = client.post(f"/pgflow/api/runs/{run['run_id']}/cancel", headers={"X-Pgflow": "1"})
    assert cancelled.status_code == 200, cancelled.text
    assert store.get_run(run["run_id"]).status is pf.RunStatus.CANCELLED


def test_fastapi_app_without_a_store_connects_from_the_environment_and_closes_it(
    fastapi_example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("PGFLOW_DATABASE", str(tmp_path / "env.db"))
    with TestClient(fastapi_example.make_app()) as c:
        run_id = c.post("/signups", json={"email": "ada@example.com"}).json()["run_id"]
    with pf.connect(tmp_path / "env.db") as store:
        assert store.get_run(run_id).status is pf.RunStatus.QUEUED


def test_django_example_passes_its_own_test_suite(tmp_path: Path) -> None:
    pytest.importorskip("django", reason="Django is not installed (the integrations extra)")
    project = EXAMPLES / "django_app"
    env = {**os.environ, "PGFLOW_DATABASE": str(tmp_path / "pgflow.db")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "manage.py", "test", "--verbosity", "2"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ran 6 tests" in done.stderr and "\nOK" in done.stderr, done.stderr
    # The view's test ran the worker management command for real.
    assert re.search(
        r"^test_a_signup_starts_a_run_that_the_worker_command_completes \(.*\) \.\.\. ok$",
        done.stderr, re.MULTILINE,
    ), done.stderr


def test_django_worker_command_serves_until_sigterm(tmp_path: Path) -> None:
    """`manage.py pgflow_worker` as a deploy runs it: started, given work, stopped by SIGTERM."""
    pytest.importorskip("django", reason="Django is not installed (the integrations extra)")
    project = EXAMPLES / "django_app"
    database = tmp_path / "pgflow.db"
    with pf.connect(database) as store:
        spec = importlib.util.spec_from_file_location(
            "example_signups_jobs", project / "signups" / "jobs.py"
        )
        assert spec is not None and spec.loader is not None
        jobs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(jobs)
        run = store.start(jobs.welcome_email, {"email": "ada@example.com"})
        env = {**os.environ, "PGFLOW_DATABASE": str(database)}
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "pgflow_worker", "--concurrency", "2",
             "--shutdown-timeout", "5"],
            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            done = store.wait(run.id, timeout=60)
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
        assert done.output == {"sent_to": "ada@example.com"}
        assert proc.returncode == 0, err
        assert "worker stopped: " in out
