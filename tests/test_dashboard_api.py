"""The dashboard's JSON API (``pgflow_py.dashboard.create_app``) and ``pgflow dashboard``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import POSTGRES_URL, drain

import pgflow_py as pf

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from pgflow_py.cli import main
from pgflow_py.dashboard import create_app

POST = {"X-Pgflow": "1"}


@pf.job(queue="dash_mail", max_attempts=2, base_delay=60)
def dash_mail(input, ctx):
    if input.get("fail"):
        raise ConnectionError("SMTP server unavailable")
    return {"sent": input["to"]}


dash_site = pf.flow("dash_site", max_attempts=1)


@dash_site.step()
def dash_pages(input, ctx):
    return list(range(input["pages"]))


@dash_site.map(array="dash_pages")
def dash_fetch(page, ctx):
    if page == ctx.flow_input.get("bad_page"):
        raise ValueError(f"cannot parse page {page}")
    return page * 10


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    """A SQLite file, or with $PGFLOW_TEST_POSTGRES a schema of its own on that server: what the
    CLI and ``pf.connect`` both take."""
    if POSTGRES_URL is None:
        yield str(tmp_path / "dash.db")
        return
    from pgflow_py.store.postgres import PostgresBackend

    schema = f"test_dash_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema={schema}"
    PostgresBackend(POSTGRES_URL, pf.testing.FakeClock(), schema=schema).drop_schema_and_close()


def populate(store: pf.Store) -> dict[str, pf.Run]:
    """Runs in every state: done, failed (a job and a map), queued, scheduled, cancelled."""
    runs = {
        "done": store.start(dash_mail, {"to": "ada@example.com"}),
        "failed": store.start(dash_mail, {"to": "bob@example.com", "fail": True}, key="order-42"),
        "mapped": store.start(dash_site, {"pages": 3}),
        "map_failed": store.start(dash_site, {"pages": 4, "bad_page": 2}),
    }
    drain(store, dash_mail, dash_site)
    runs["queued"] = store.start(dash_mail, {"to": "later@example.com"}, priority=5)
    runs["scheduled"] = store.start(dash_mail, {"to": "much-later@example.com"}, delay=3600)
    runs["cancelled"] = store.cancel(store.start(dash_mail, {"to": "nobody@example.com"}).id)
    return {name: store.get_run(run.id) for name, run in runs.items()}


@pytest.fixture
def filled(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[pf.Store, dict[str, pf.Run]]]:
    """A store at ``database`` (the CLI can open it too) with :func:`populate`'s runs."""
    monkeypatch.delenv("PGFLOW_DATABASE", raising=False)
    # An hour ago on a fake clock, so that backoffs take no time and end in the past.
    with pf.connect(database, clock=pf.testing.FakeClock(time.time() - 3600)) as store:
        runs = populate(store)
    with pf.connect(database) as store:
        yield store, runs


@pytest.fixture
def runs(store: pf.Store) -> dict[str, pf.Run]:
    return populate(store)


@pytest.fixture
def client(store: pf.Store) -> Iterator[TestClient]:
    with TestClient(create_app(store)) as c:
        yield c


def cli_json(database: str, *args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--json", "--database", database])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def ids(listed: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in listed]


# --- GET: the same JSON as the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("query", [
    {}, {"flow": "dash_mail"}, {"status": "failed"}, {"flow": "dash_site", "status": "failed"},
    {"status": "completed", "limit": "1"}, {"key": "order-42"}, {"flow": "no_such_flow"},
])
def test_runs_equal_pgflow_runs_json(filled, database, query):
    store, _ = filled
    args = [a for name, value in query.items() for a in (f"--{name}", value)]
    if "limit" not in query:
        args += ["--limit", "50"]  # the API's default (the CLI's is 20)
    with TestClient(create_app(store)) as client:
        answer = client.get("/api/runs", params=query)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == cli_json(database, "runs", *args)


def test_runs_lists_every_state_newest_first_and_empty_parameters_mean_no_filter(client, runs):
    listed = client.get("/api/runs").json()
    assert ids(listed) == [r.id for r in reversed(runs.values())]  # in the order started
    assert client.get("/api/runs?flow=&status=&limit=&before=&key=").json() == listed
    failed = client.get("/api/runs", params={"status": "failed"}).json()
    assert sorted(ids(failed)) == sorted([runs["failed"].id, runs["map_failed"].id])
    assert {r["status"] for r in failed} == {"failed"}
    assert ids(client.get("/api/runs?flow=dash_site").json()) == [runs["map_failed"].id, runs["mapped"].id]


def test_show_equals_pgflow_show_json(filled, database):
    store, runs = filled
    with TestClient(create_app(store)) as client:
        for run in runs.values():
            answer = client.get(f"/api/runs/{run.id}")
            assert answer.status_code == 200
            assert answer.json() == cli_json(database, "show", run.id)
    shown = answer.json()
    assert shown["status"] == "cancelled"
    failed = client.get(f"/api/runs/{runs['map_failed'].id}").json()
    assert any("cannot parse page 2" in (step["error"] or "") for step in failed["steps"])


def test_stats_and_workers_as_the_cli(filled, database):
    store, _ = filled
    store.backend.heartbeat("worker-1", ["dash_mail"], [], 30.0)
    with TestClient(create_app(store)) as client:
        stats = client.get("/api/stats").json()
        workers = client.get("/api/workers").json()

    def without_ages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "oldest_queued_age"} for item in items]

    assert without_ages(stats) == without_ages(cli_json(database, "stats"))
    assert {s["flow_slug"] for s in stats} == {"dash_mail", "dash_site"}
    mail = next(s for s in stats if s["flow_slug"] == "dash_mail")
    assert mail["counts"]["failed"] == 1 and mail["workers"] == 1
    assert workers == cli_json(database, "workers")
    assert [w["id"] for w in workers] == ["worker-1"]


def test_paging_with_before(client, store):
    started = [store.start(dash_mail, {"to": f"{i}@example.com"}).id for i in range(7)]
    pages, before = [], ""
    while True:
        page = client.get("/api/runs", params={"limit": 3, "before": before}).json()
        if not page:
            break
        pages.append(ids(page))
        before = page[-1]["id"]
    assert pages == [started[:3:-1], started[3:0:-1], started[:1]]
    # A run started meanwhile does not shift the pages; an id no longer stored still works.
    store.start(dash_mail, {"to": "new@example.com"})
    assert ids(client.get("/api/runs", params={"limit": 3, "before": started[4]}).json()) == pages[1]


def test_limit_defaults_to_50_and_allows_500(client, store):
    for i in range(55):
        store.start(dash_mail, {"to": f"{i}@example.com"})
    assert len(client.get("/api/runs").json()) == 50
    assert len(client.get("/api/runs?limit=500").json()) == 55
    assert len(client.get("/api/runs?limit=1").json()) == 1


def test_the_store_is_called_in_a_worker_thread(store):
    threads = []
    real = store.stats

    def stats():
        threads.append(threading.current_thread())
        return real()

    store.stats = stats  # type: ignore[method-assign]
    app = create_app(store)
    with TestClient(app) as client:
        assert client.get("/api/stats").status_code == 200
    assert threads and threads[0] is not threading.main_thread()


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "message"), [
    ("status=bogus", "unknown status 'bogus'"),
    ("limit=0", "limit must be an integer from 1 to 500, got '0'"),
    ("limit=501", "from 1 to 500"),
    ("limit=-1", "from 1 to 500"),
    ("limit=abc", "from 1 to 500"),
    ("limit=1.5", "from 1 to 500"),
    ("limit=99999999999999999999", "from 1 to 500"),
    ("before=a%00b", "NUL"),
    ("key=a%00b", "NUL"),
])
def test_bad_query_parameters_are_400(client, query, message):
    answer = client.get(f"/api/runs?{query}")
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"]


def test_unknown_runs_and_paths_are_404_json(client):
    for method, path in [("GET", "/api/runs/no-such-run"), ("POST", "/api/runs/no-such-run/retry"),
                         ("POST", "/api/runs/no-such-run/cancel"), ("GET", "/api/nothing")]:
        answer = client.request(method, path, headers=POST)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/json"
        assert "error" in answer.json()
    assert "no-such-run" in client.get("/api/runs/no-such-run").json()["error"]
    assert client.get("/api/runs/a%00b").status_code == 400
    assert client.post("/api/runs/a%00b/retry", headers=POST).status_code == 400


def test_a_wrong_method_is_405_json(client):
    answer = client.post("/api/stats", headers=POST)
    assert answer.status_code == 405
    assert "error" in answer.json()
    assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert client.get("/api/runs/some-id/retry").status_code == 405


def test_retry_and_cancel_the_state_refuses_are_409(client, runs, store):
    done = runs["done"].id
    for action, message in [("retry", "only failed or cancelled runs can be retried"),
                            ("cancel", "only unfinished runs can be cancelled")]:
        answer = client.post(f"/api/runs/{done}/{action}", headers=POST)
        assert answer.status_code == 409
        assert answer.json() == {"error": f"run {done} is completed; {message}"}
    assert store.get_run(done).status is pf.RunStatus.COMPLETED
    queued = runs["queued"].id
    assert client.post(f"/api/runs/{queued}/retry", headers=POST).status_code == 409
    assert client.post(f"/api/runs/{runs['failed'].id}/cancel", headers=POST).status_code == 409


# --- POST: retry and cancel ----------------------------------------------------------------------


def test_retry_runs_a_failed_run_again(client, runs, store):
    failed = runs["failed"].id
    answer = client.post(f"/api/runs/{failed}/retry", headers=POST)
    assert answer.status_code == 200
    assert answer.json()["id"] == failed
    assert answer.json()["status"] == store.get_run(failed).status.value != "failed"
    drain(store, dash_mail)
    again = store.get_run(failed)
    assert again.status is pf.RunStatus.FAILED and again.attempts == 2
    assert len(again.history) == 4  # both attempts of both tries are kept
    cancelled = runs["cancelled"].id
    assert client.post(f"/api/runs/{cancelled}/retry", headers=POST).status_code == 200
    assert store.get_run(cancelled).status is not pf.RunStatus.CANCELLED


def test_cancel_an_unfinished_run_and_a_cancelled_one_again(client, runs, store):
    for name in ("queued", "scheduled"):
        run_id = runs[name].id
        answer = client.post(f"/api/runs/{run_id}/cancel", headers=POST)
        assert answer.status_code == 200
        assert answer.json()["status"] == "cancelled"
        assert store.get_run(run_id).status is pf.RunStatus.CANCELLED
    again = client.post(f"/api/runs/{runs['queued'].id}/cancel", headers=POST)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_read_only_refuses_every_post_with_403(store, runs):
    with TestClient(create_app(store, read_only=True)) as client:
        for action, name in [("retry", "failed"), ("cancel", "queued")]:
            answer = client.post(f"/api/runs/{runs[name].id}/{action}", headers=POST)
            assert answer.status_code == 403
            assert answer.json() == {"error": "read-only dashboard"}
            assert store.get_run(runs[name].id).status is runs[name].status
        assert client.get("/api/runs").status_code == 200
        assert client.get(f"/api/runs/{runs['failed'].id}").status_code == 200


@pytest.mark.parametrize(("headers", "allowed"), [
    ({"X-Pgflow": "1"}, True),  # no Origin nor Referer: not a browser page (curl, a script)
    ({"X-Pgflow": "1", "Origin": "http://testserver"}, True),
    ({"X-Pgflow": "1", "Origin": "http://TestServer:80"}, True),
    ({"X-Pgflow": "1", "Referer": "http://testserver/some/page?x=1"}, True),
    ({}, False),  # a form post or a simple cross-site fetch cannot add the header
    ({"X-Pgflow": "0"}, False),
    ({"Content-Type": "application/json", "Origin": "http://testserver"}, False),
    ({"X-Pgflow": "1", "Origin": "http://evil.example"}, False),
    ({"X-Pgflow": "1", "Origin": "http://testserver.evil.example"}, False),
    ({"X-Pgflow": "1", "Origin": "http://testserver:8080"}, False),
    ({"X-Pgflow": "1", "Origin": "null"}, False),
    ({"X-Pgflow": "1", "Origin": "http://evil.example", "Referer": "http://testserver/"}, False),
    ({"X-Pgflow": "1", "Referer": "http://evil.example/testserver"}, False),
    ({"X-Pgflow": "1", "Referer": "http://testserver@evil.example/"}, False),
    ({"X-Pgflow": "1", "Referer": "javascript:alert(1)"}, False),
])
def test_cross_site_posts_are_refused(client, runs, store, headers, allowed):
    run_id = runs["queued"].id
    answer = client.post(f"/api/runs/{run_id}/cancel", headers=headers)
    if allowed:
        assert answer.status_code == 200, answer.json()
        assert store.get_run(run_id).status is pf.RunStatus.CANCELLED
    else:
        assert answer.status_code == 403
        assert "error" in answer.json()
        assert store.get_run(run_id).status is pf.RunStatus.QUEUED


def test_get_answers_are_json_and_never_cached(client, runs):
    for path in ["/api/runs", f"/api/runs/{runs['done'].id}", "/api/stats", "/api/workers",
                 "/api/runs?status=bogus", "/api/runs/missing", "/"]:
        answer = client.get(path)
        assert answer.headers["cache-control"] == "no-store", path
        assert answer.headers["x-content-type-options"] == "nosniff"
        if path != "/":
            assert answer.headers["content-type"] == "application/json"


def test_json_values_are_never_html(client, store):
    run = store.start(dash_mail, {"to": "<script>alert(1)</script>"})
    answer = client.get(f"/api/runs/{run.id}")
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["input"] == {"to": "<script>alert(1)</script>"}


def test_retry_failed_runs_every_failed_run_of_a_flow_again(client, runs, store):
    answer = client.post("/api/retry-failed", params={"flow": "dash_site"}, headers=POST)
    assert answer.status_code == 200 and answer.json() == {"retried": 1}
    assert store.get_run(runs["map_failed"].id).status is pf.RunStatus.QUEUED
    assert store.get_run(runs["failed"].id).status is pf.RunStatus.FAILED  # another flow
    assert client.post("/api/retry-failed", headers=POST).json() == {"retried": 1}
    assert store.get_run(runs["failed"].id).status is pf.RunStatus.QUEUED
    assert client.post("/api/retry-failed", headers={}).status_code == 403  # the POST rule holds


# --- mounting -----------------------------------------------------------------------------------


def test_mounted_in_another_app(store, runs):
    outer = Starlette(routes=[Mount("/pgflow", create_app(store))])
    with TestClient(outer) as client:
        assert client.get("/pgflow/api/stats").status_code == 200
        assert client.get(f"/pgflow/api/runs/{runs['done'].id}").json()["id"] == runs["done"].id
        assert 'href="/pgflow/runs"' in client.get("/pgflow/runs").text
        answer = client.post(f"/pgflow/api/runs/{runs['queued'].id}/cancel",
                             headers={**POST, "Origin": "http://testserver"})
        assert answer.status_code == 200


# --- pgflow dashboard ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_pgflow_dashboard_serves_the_api(filled, database):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PGFLOW_DATABASE", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pgflow_py", "dashboard", "--database", database, "--port", str(port),
         "--read-only"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as r:
                    assert r.headers["Content-Type"] == "application/json"
                    stats = json.load(r)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the dashboard did not answer in 30 s"
                time.sleep(0.1)
        assert {s["flow_slug"] for s in stats} == {"dash_mail", "dash_site"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/runs/x/cancel", method="POST", headers=POST
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403
        # Listening on 127.0.0.1: another name in Host (DNS rebinding) is refused.
        rebound = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/stats", headers={"Host": f"evil.example:{port}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=5)
        assert refused.value.code == 400
        localhost = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/stats", headers={"Host": f"localhost:{port}"}
        )
        with urllib.request.urlopen(localhost, timeout=5) as r:
            assert r.status == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0].decode()
    # Shut down cleanly; uvicorn >= 0.30 then re-raises SIGTERM to exit by it.
    assert "Application shutdown complete" in output
    assert "GET /api/stats" not in output  # no access log: open pages poll every few seconds
    assert process.returncode in (0, -signal.SIGTERM), output


def test_pgflow_dashboard_without_the_extra_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "from pgflow_py.cli import main\n"
        f"main(['dashboard', '--database', {str(tmp_path / 'x.db')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "pgflow dashboard needs the dashboard extra: pip install 'pgflow_py[dashboard]'\n"
    )
    assert not (tmp_path / "x.db").exists()


def test_importing_the_dashboard_without_starlette_names_the_extra():
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "try:\n    import pgflow_py.dashboard\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'pgflow_py[dashboard]'" in result.stdout
