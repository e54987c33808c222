"""The dashboard's HTML pages, read over HTTP (the browser tests drive them in Chromium)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgflow_py as pf

pytest.importorskip("starlette")
pytest.importorskip("httpx")

import dashboard_demo as demo
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from pgflow_py.dashboard import create_app
from pgflow_py.dashboard.graph import BOX_HEIGHT, BOX_WIDTH, layout
from pgflow_py.dashboard.pages import PAGE_SIZE
from pgflow_py.dashboard.present import JSON_LIMIT, TASKS_SHOWN
from pgflow_py.definition import FlowDefinition, StepDefinition
from pgflow_py.errors import StoreError

PARTIAL = {"X-Pgflow-Partial": "1"}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The demo's runs, filled once; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("dash") / "demo.db"
    with pf.connect(path) as store:
        named = {name: run.id for name, run in demo.fill(store).items()}
    return path, named


@pytest.fixture
def store(template_db: tuple[Path, dict[str, str]], tmp_path: Path) -> Iterator[pf.Store]:
    path = tmp_path / "demo.db"
    shutil.copy(template_db[0], path)
    with pf.connect(path) as s:
        yield s


@pytest.fixture
def named(template_db: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return template_db[1]


@pytest.fixture
def client(store: pf.Store) -> Iterator[TestClient]:
    with TestClient(create_app(store)) as c:
        yield c


def text(html: str) -> str:
    """The page's visible text, tags dropped, whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


# --- the overview ----------------------------------------------------------------------------------


def test_the_overview_counts_each_flows_runs_by_status(client: TestClient, store: pf.Store) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for flow in store.stats():
        row = re.search(rf'<tr data-flow="{flow.flow_slug}">(.*?)</tr>', page.text, re.S)
        assert row is not None, flow.flow_slug
        for status, n in flow.counts.items():
            cell = re.search(rf'<td class="num c-{status}">(.*?)</td>', row.group(1), re.S)
            assert cell is not None and text(cell.group(1)) == f"{n:,}", (flow.flow_slug, status)
            if n:
                assert f'href="/runs?flow={flow.flow_slug}&amp;status={status}"' in cell.group(1)
    assert text(re.search(r'<a class="tile s-failed"[^>]*>(.*?)</a>', page.text, re.S).group(1)) == "2 failed"


def test_the_overview_charts_the_last_hours_completed_tasks_and_failed_attempts(
    client: TestClient, store: pf.Store
) -> None:
    page = client.get("/").text
    row = re.search(r'<tr data-flow="send_email">(.*?)</tr>', page, re.S).group(1)
    # 12 e-mails sent; the bad address failed twice (max_attempts=2), all in the last minute(s)
    assert re.search(r'aria-label="12 done, 2 failed attempts in the last hour"', row)
    assert row.count('class="bar-done"') >= 1 and row.count('class="bar-failed"') >= 1
    nightly = re.search(r'<tr data-flow="nightly_report">(.*?)</tr>', page, re.S).group(1)
    assert 'aria-label="1 done, 0 failed attempts in the last hour"' in nightly


def test_the_overview_shows_the_oldest_queued_age_and_workers(client: TestClient, store: pf.Store) -> None:
    store.backend.heartbeat("web:1:a", ["process_order"], [], 30)
    page = client.get("/").text
    row = re.search(r'<tr data-flow="process_order">(.*?)</tr>', page, re.S).group(1)
    cells = [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert re.fullmatch(r"\d+s", cells[8])  # queued runs waiting for seconds
    assert cells[9] == "1"
    assert "1 workers" in text(page)


def test_the_overview_lists_the_latest_failed_runs_with_their_errors(
    client: TestClient, store: pf.Store, named: dict[str, str]
) -> None:
    page = client.get("/").text
    table = re.search(r'<table class="grid runs" id="failures">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r'<tr data-run="([^"]+)"', table) == [
        r.id for r in store.runs(status="failed", limit=8)
    ] == [named["bad_email"], named["declined"]]
    assert f'href="/runs/{named["declined"]}"' in table
    assert "PaymentDeclined: card declined for 9.50 EUR" in text(table)


# --- runs ------------------------------------------------------------------------------------------


def listed(html: str) -> list[str]:
    return re.findall(r'<tr data-run="([^"]+)"', html)


@pytest.mark.parametrize("query", [
    {}, {"flow": "send_email"}, {"status": "failed"}, {"flow": "process_order", "status": "queued"},
    {"key": "order-9"}, {"flow": "no_such_flow"},
])
def test_runs_lists_what_the_store_lists_with_the_same_filters(
    client: TestClient, store: pf.Store, query: dict[str, str]
) -> None:
    page = client.get("/runs", params=query)
    assert page.status_code == 200
    expected = store.runs(query.get("flow"), query.get("status"), query.get("key"), PAGE_SIZE)
    assert listed(page.text) == [r.id for r in expected]
    if "key" not in query:
        total = store.count(query.get("flow"), query.get("status"))
        assert f'<span class="count" id="runs-total">{total:,}</span>' in page.text
    if not expected:
        assert "No runs match these filters" in text(page.text)


def test_the_filter_form_keeps_the_chosen_filters(client: TestClient) -> None:
    page = client.get("/runs", params={"flow": "send_email", "status": "failed", "key": "k1"}).text
    assert '<option value="send_email" selected>' in page
    assert '<option value="failed" selected>' in page
    assert 'name="key" value="k1"' in page


def test_runs_pages_back_without_overlap(client: TestClient, store: pf.Store) -> None:
    store.start_many(demo.nightly_report, range(PAGE_SIZE + 5))
    everything = [r.id for r in store.runs(limit=1000)]
    first = client.get("/runs").text
    assert listed(first) == everything[:PAGE_SIZE]
    older = re.search(r'<a id="older" href="([^"]+)"', first).group(1)
    second = client.get(unescape(older)).text
    assert listed(second) == everything[PAGE_SIZE:2 * PAGE_SIZE]
    assert "« newest" in second


def test_an_unknown_status_is_a_400_page_naming_it(client: TestClient) -> None:
    page = client.get("/runs", params={"status": "exploded"})
    assert page.status_code == 400
    assert "unknown status 'exploded'" in text(page.text)


# --- one run ---------------------------------------------------------------------------------------


def boxes(html: str) -> dict[str, str]:
    return dict(re.findall(r'data-step="([^"]+)" data-status="([^"]+)"', html))


def test_a_runs_dag_has_a_box_per_step_coloured_by_status_and_an_arrow_per_dependency(
    client: TestClient, named: dict[str, str]
) -> None:
    page = client.get(f"/runs/{named['declined']}").text
    assert boxes(page) == {
        "validate": "completed", "reserve": "completed", "charge": "failed",
        "wrap_gift": "skipped", "ship": "cancelled", "notify": "cancelled",
    }
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', page))
    assert edges == {("validate", "reserve"), ("validate", "charge"), ("charge", "ship"),
                     ("reserve", "ship"), ("wrap_gift", "ship"), ("ship", "notify")}
    # not a gift: the conditional step was skipped, and says why
    assert "skipped · condition not met" in page
    assert re.search(r'<h3>wrap_gift <span class="status s-skipped">skipped</span>\s*'
                     r'<span class="muted skip-reason" title="condition_unmet">condition not met</span>',
                     page)
    assert re.search(r'class="step-box s-failed" data-step="charge"', page)
    # the order had one item: the map step ran one task
    assert "completed · 1/1 tasks" in page


def test_a_failed_run_shows_each_attempts_error_and_the_last_traceback(
    client: TestClient, named: dict[str, str]
) -> None:
    page = client.get(f"/runs/{named['declined']}").text
    assert "PaymentDeclined: card declined for 9.50 EUR" in text(page)
    for attempt in (1, 2, 3):
        assert f"attempt {attempt} failed" in text(page)
    last = re.search(r'<details id="tb-charge-None-3" open>(.*?)</details>', page, re.S)
    assert last is not None
    assert "Traceback (most recent call last)" in last.group(1)
    assert "raise PaymentDeclined" in unescape(last.group(1))
    assert 'data-action="retry"' in page and 'data-action="cancel"' not in page


def test_a_runs_input_and_output_are_formatted_json(client: TestClient, store: pf.Store) -> None:
    done = store.runs(demo.orders, "completed", limit=1)[0]
    page = client.get(f"/runs/{done.id}").text
    shown_input = unescape(re.search(r'id="run-input"[^>]*>(.*?)</pre>', page, re.S).group(1))
    shown_output = unescape(re.search(r'id="run-output"[^>]*>(.*?)</pre>', page, re.S).group(1))
    assert json.loads(shown_input) == done.input
    assert json.loads(shown_output) == done.output
    assert '\n  "order":' in shown_input  # indented
    assert 'data-action=' not in page  # a completed run can be neither retried nor cancelled


def test_an_unfinished_run_offers_cancel(client: TestClient, named: dict[str, str]) -> None:
    page = client.get(f"/runs/{named['queued']}").text
    assert 'data-action="cancel"' in page and 'data-action="retry"' not in page
    # waiting for a worker, not running; the steps after it wait for their dependencies
    assert boxes(page) == {"validate": "queued", "reserve": "created", "charge": "created",
                           "wrap_gift": "skipped", "ship": "created", "notify": "created"}
    assert re.search(r'<h3>validate <span class="status s-queued">queued</span>', page)


def test_an_unknown_run_is_a_404_page(client: TestClient) -> None:
    page = client.get("/runs/no-such-run")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "no run 'no-such-run'" in text(page.text)


# --- workers ---------------------------------------------------------------------------------------


def test_workers_lists_each_worker_and_marks_lost_ones(client: TestClient, store: pf.Store) -> None:
    store.backend.heartbeat("web-1:101:a", ["process_order", "send_email"], [], 30)
    store.backend.heartbeat("web-2:202:b", ["send_email"], [], 0.01)
    time.sleep(0.05)  # web-2 is lost
    page = client.get("/workers").text
    rows = re.findall(r'<tr class="(alive|lost)">(.*?)</tr>', page, re.S)
    assert [state for state, _ in rows] == ["alive", "lost"]
    alive = text(rows[0][1])
    assert "process_order" in alive and "send_email" in alive and "alive" in alive
    assert "lost" in text(rows[1][1])


def test_workers_says_how_to_start_one_when_there_is_none(client: TestClient) -> None:
    assert "pgflow worker MODULE" in text(client.get("/workers").text)


# --- live updates, safety, mounting ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/runs", "/workers", "RUN"])
def test_the_live_part_alone_is_answered_to_the_pages_script(
    client: TestClient, named: dict[str, str], path: str
) -> None:
    path = f"/runs/{named['declined']}" if path == "RUN" else path
    whole = client.get(path).text
    part = client.get(path, headers=PARTIAL).text
    assert "<html" not in part and "<main" not in part
    live = re.search(r'<main id="live" data-refresh="\d+">\n(.*)</main>', whole, re.S).group(1)
    # the clock moves between the two requests: compare without the relative times
    def steady(html: str) -> str:
        return re.sub(r"<time[^>]*>.*?</time>|\d+s", "", html)
    assert steady(part).strip() == steady(live).strip()


def test_the_live_part_follows_the_store(client: TestClient, store: pf.Store, named: dict[str, str]) -> None:
    before = client.get(f"/runs/{named['queued']}", headers=PARTIAL).text
    assert 'class="status s-queued"' in before
    store.cancel(named["queued"])
    after = client.get(f"/runs/{named['queued']}", headers=PARTIAL).text
    assert 'class="status s-cancelled"' in after and 'data-action="cancel"' not in after


def test_markup_in_inputs_keys_and_errors_is_shown_as_text(client: TestClient, store: pf.Store) -> None:
    evil = "<script>alert(1)</script>"
    run = store.start(demo.send_email, {"to": evil, "note": '"><img src=x onerror=alert(2)>'},
                      key="<b>key</b>")
    pf.run_flows([demo.send_email], store=store, until_idle=True, handle_signals=False)
    assert store.get_run(run.id).status is pf.RunStatus.FAILED  # its error repeats the input
    for path in [f"/runs/{run.id}", "/runs", f"/runs?key={evil}", "/"]:
        page = client.get(path)
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "<b>key</b>" not in page.text
    page = client.get(f"/runs/{run.id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "not an e-mail address: &#39;&lt;script&gt;" in page


def test_pages_forbid_inline_scripts_and_foreign_assets(client: TestClient) -> None:
    page = client.get("/runs")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert re.findall(r'<script\b[^>]*>', page.text) == ['<script src="/static/dashboard.js" defer>']
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from another host
    for asset in ["dashboard.js", "dashboard.css", "favicon.svg"]:
        assert client.get(f"/static/{asset}").status_code == 200


def test_read_only_pages_have_no_buttons(store: pf.Store, named: dict[str, str]) -> None:
    with TestClient(create_app(store, read_only=True)) as client:
        failed = client.get(f"/runs/{named['declined']}").text
        queued = client.get(f"/runs/{named['queued']}").text
    assert "data-action" not in failed and "data-action" not in queued
    assert "read-only" in text(failed)


def test_mounted_under_a_path_every_link_and_asset_keeps_it(store: pf.Store, named: dict[str, str]) -> None:
    outer = Starlette(routes=[Mount("/ops/pgflow", create_app(store))])
    with TestClient(outer) as client:
        page = client.get(f"/ops/pgflow/runs/{named['declined']}").text
        links = re.findall(r'(?:href|src|data-url)="(/[^"]*)"', page)
        assert links and all(link.startswith("/ops/pgflow/") for link in links), links
        assert client.get("/ops/pgflow/static/dashboard.css").status_code == 200
        assert listed(client.get("/ops/pgflow/runs").text)


def test_quotes_in_a_key_stay_inside_the_attribute(client: TestClient, store: pf.Store) -> None:
    key = '"><img src=x onerror=alert(1)>'
    store.start(demo.send_email, {"to": "q@example.com"}, key=key)
    page = client.get("/runs", params={"key": key}).text
    assert "<img" not in page
    value = re.search(r'<input name="key" value="([^"]*)"', page).group(1)
    assert unescape(value) == key
    assert len(listed(page)) == 1


# --- hard cases ------------------------------------------------------------------------------------


def test_a_run_whose_flow_definition_is_gone_shows_without_a_graph(
    client: TestClient, store: pf.Store, named: dict[str, str]
) -> None:
    failed = store.get_run(named["bad_email"])
    with store.backend._write() as c:  # a definition gone (as if deleted by hand), its runs kept
        c.execute("DELETE FROM steps WHERE flow_slug = 'send_email'")
        c.execute("DELETE FROM flows WHERE flow_slug = 'send_email'")
    page = client.get(f"/runs/{failed.id}")
    assert page.status_code == 200
    assert "has no stored definition" in text(page.text)
    assert "ValueError: not an e-mail address" in text(page.text)  # the rest is all there


def test_an_input_that_cannot_be_decoded_is_shown_as_such(client: TestClient, store: pf.Store) -> None:
    run = store.start(demo.nightly_report, {"day": "x"})
    with store.backend._write() as c:
        c.execute("UPDATE runs SET input = ? WHERE id = ?", ("{not json", run.id))
    page = client.get(f"/runs/{run.id}")
    assert page.status_code == 200
    shown = unescape(re.search(r'id="run-input"[^>]*>(.*?)</pre>', page.text, re.S).group(1))
    assert '"undecodable"' in shown


def test_a_huge_input_is_cut_with_a_link_to_all_of_it(client: TestClient, store: pf.Store) -> None:
    run = store.start(demo.nightly_report, {"blob": "x" * (3 * JSON_LIMIT)})
    page = client.get(f"/runs/{run.id}").text
    shown = re.search(r'id="run-input"[^>]*>(.*?)</pre>', page, re.S).group(1)
    assert len(unescape(shown)) == JSON_LIMIT
    assert f'href="/api/runs/{run.id}"' in page and "Cut at 65,536 of" in text(page)


def test_a_large_map_lists_the_tasks_that_need_a_look_first(client: TestClient, store: pf.Store) -> None:
    flaky = pf.flow("dash_big_map", max_attempts=1)

    @flaky.step()
    def items(input, ctx):
        return list(range(input))

    @flaky.map(array=items)
    def each(n, ctx):
        if n == 70:
            raise ValueError(f"bad item {n}")
        return n

    run = store.start(flaky, 120)
    pf.run_flows([flaky], store=store, until_idle=True, handle_signals=False, concurrency=1)
    page = client.get(f"/runs/{run.id}").text
    step = re.search(r'<section class="step" id="step-each">(.*?)</section>', page, re.S).group(1)
    rows = re.findall(r'<tr>\s*<td class="num">(\d+)</td>\s*<td><span class="status s-(\w+)', step)
    assert len(rows) == TASKS_SHOWN
    failed = [int(i) for i, status in rows if status == "failed"]
    assert failed == [70] and rows[0] == ("70", "failed")  # the failed one first
    assert f"{TASKS_SHOWN} of 120 tasks shown" in text(step)


def test_a_store_error_is_a_page_saying_what_failed(client: TestClient, store: pf.Store,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def locked() -> None:
        raise StoreError("database is locked")

    monkeypatch.setattr(store, "stats", locked)
    for headers in ({}, PARTIAL):
        page = client.get("/", headers=headers)
        assert page.status_code == 503
        assert page.headers["content-type"].startswith("text/html")
        assert "StoreError: database is locked" in text(page.text)
    assert client.get("/", headers=PARTIAL).headers["x-pgflow-partial"] == "1"


def test_find_opens_a_run_by_id_or_lists_runs_by_key(client: TestClient, named: dict[str, str]) -> None:
    found = client.get("/find", params={"q": f" {named['declined']} "}, follow_redirects=False)
    assert (found.status_code, found.headers["location"]) == (303, f"/runs/{named['declined']}")
    by_key = client.get("/find", params={"q": "order-9"}, follow_redirects=False)
    assert by_key.headers["location"] == "/runs?key=order-9"
    assert listed(client.get(by_key.headers["location"]).text) == [named["declined"]]


def test_retry_all_failed_is_offered_where_failed_runs_are_listed(
    client: TestClient, store: pf.Store
) -> None:
    overview = client.get("/").text
    row = re.search(r'<tr data-flow="process_order">(.*?)</tr>', overview, re.S).group(1)
    assert 'data-url="/api/retry-failed?flow=process_order"' in row
    listing = client.get("/runs", params={"status": "failed", "flow": "send_email"}).text
    assert 'data-url="/api/retry-failed?flow=send_email"' in listing
    assert "data-action" not in client.get("/runs", params={"status": "completed"}).text


def test_only_allowed_host_names_are_answered(store: pf.Store) -> None:
    app = create_app(store, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with TestClient(app, base_url="http://127.0.0.1:8787") as client:
        assert client.get("/runs").status_code == 200
        for host in ["localhost:8787", "[::1]:8787", "LOCALHOST"]:
            assert client.get("/runs", headers={"Host": host}).status_code == 200, host
        for host in ["evil.example:8787", "evil.example", "127.0.0.1.evil.example", "[::2]:80"]:
            refused = client.get("/api/stats", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "is not allowed here" in refused.json()["error"]


# --- the DAG's layout ------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> FlowDefinition:
    size = draw(st.integers(1, 14))
    steps = []
    for i in range(size):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        steps.append(StepDefinition(f"s{i}", depends_on=tuple(f"s{d}" for d in sorted(deps))))
    return FlowDefinition("dag", tuple(steps))


@given(dags())
def test_every_arrow_points_right_and_no_boxes_overlap(definition: FlowDefinition) -> None:
    graph = layout(definition)
    place = {b.slug: (b.x, b.y) for b in graph.boxes}
    assert set(place) == {s.slug for s in definition.steps}
    for step in definition.steps:
        for dep in step.depends_on:
            assert place[dep][0] + BOX_WIDTH < place[step.slug][0]
    spots = sorted(place.values())
    for (x1, y1), (x2, y2) in itertools.pairwise(spots):
        assert x1 != x2 or y2 - y1 >= BOX_HEIGHT
    assert {(e.source, e.target) for e in graph.edges} == {
        (d, s.slug) for s in definition.steps for d in s.depends_on
    }
    assert all(b.x >= 0 and b.x + BOX_WIDTH <= graph.width for b in graph.boxes)
    assert all(b.y >= 0 and b.y + BOX_HEIGHT <= graph.height for b in graph.boxes)
