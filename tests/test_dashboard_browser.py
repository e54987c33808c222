"""The dashboard driven in a real browser: headless Chromium (Debian's ``chromium`` package at
/usr/bin/chromium, which ``.ci/run`` installs) through Playwright for Python, offline.

Each test serves a copy of the demo database (``dashboard_demo.fill``) with uvicorn on a free
loopback port, as ``pgflow dashboard`` does.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pgflow_py as pf

CHROMIUM = os.environ.get("PGFLOW_TEST_CHROMIUM", "/usr/bin/chromium")

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need Playwright: pip install -e '.[test]'"
)
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium), or its path "
        "in $PGFLOW_TEST_CHROMIUM", allow_module_level=True,
    )

# (imported after the checks above, which skip the module without them)
import dashboard_demo as demo  # noqa: E402
import uvicorn  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from pgflow_py.dashboard import create_app  # noqa: E402

pytestmark = pytest.mark.browser

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync", "--disable-quic"]
WAIT = 15_000  # ms: a live update comes within a page's refresh period (2-5 s)
expect.set_options(timeout=WAIT)  # (its default, 5 s, is one overview refresh: too close)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("browser") / "demo.db"
    with pf.connect(path) as store:
        named = {name: run.id for name, run in demo.fill(store).items()}
    return path, named


@pytest.fixture
def database(template_db: tuple[Path, dict[str, str]], tmp_path: Path) -> Path:
    path = tmp_path / "demo.db"
    shutil.copy(template_db[0], path)
    return path


@pytest.fixture
def named(template_db: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return template_db[1]


class Served:
    def __init__(self, database: Path, read_only: bool) -> None:
        self.store = pf.connect(database)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(self.store, read_only=read_only), host="127.0.0.1",
                                port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def serve(database: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(read_only: bool = False) -> Served:
        started.append(Served(database, read_only))
        return started[-1]

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page that fails the test on any script error, console error (a refused content
    security policy shows there) or dialog it did not expect."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
           if m.type == "error" else None)
    tab.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    tab.set_default_timeout(WAIT)
    yield tab
    context.close()
    assert problems == []


@pytest.fixture(autouse=True)
def declined_cards_fail() -> Iterator[None]:
    demo.CARD_ACCEPTED["declined"] = False
    yield
    demo.CARD_ACCEPTED["declined"] = False


def serve_in_background(database: Path, flows: list[pf.Flow]) -> threading.Thread:
    """A worker (in a thread) that serves ``flows`` until nothing is left to do."""

    def work() -> None:
        with pf.connect(database) as store:
            pf.run_flows(flows, store=store, until_idle=True, handle_signals=False)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


# --- the tests -------------------------------------------------------------------------------------


def test_the_overview_shows_every_flow_with_its_counts(serve: Callable[..., Served], page: Page) -> None:
    served = serve()
    page.goto(served.url + "/")
    expect(page).to_have_title("Overview · pgflow dashboard")
    rows = page.locator("#flows tbody tr")
    expect(rows).to_have_count(3)
    order_row = page.locator('#flows tr[data-flow="process_order"]')
    expect(order_row.locator("td.c-failed")).to_have_text("1")
    expect(order_row.locator("td.c-completed")).to_have_text("8")
    expect(order_row.locator("svg.chart rect.bar-done").first).to_be_visible()
    expect(page.locator("#live-state")).to_have_text("live")


def test_filter_runs_then_open_a_failed_run_and_read_its_traceback(
    serve: Callable[..., Served], page: Page, named: dict[str, str]
) -> None:
    served = serve()
    page.goto(served.url + "/runs")
    expect(page.locator("#runs tbody tr")).to_have_count(29)
    page.select_option('select[name="status"]', "failed")
    page.select_option('select[name="flow"]', "process_order")
    page.click("#filters button[type=submit]")
    expect(page).to_have_url(f"{served.url}/runs?flow=process_order&status=failed&key=")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    expect(page.locator("#runs-total")).to_have_text("1")

    page.click(f'a[href="/runs/{named["declined"]}"]')
    expect(page.locator("#run-id")).to_have_text(named["declined"])
    expect(page.locator('#dag .step-box[data-step="charge"]')).to_have_attribute("data-status", "failed")
    expect(page.locator('#dag .step-box[data-step="validate"]')).to_have_attribute(
        "data-status", "completed")
    traceback = page.locator("#tb-charge-None-3 pre.traceback")
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("raise PaymentDeclined")
    expect(page.locator("#tb-charge-None-1 pre.traceback")).to_be_hidden()  # earlier ones folded


def test_retry_then_watch_the_run_complete_without_a_reload(
    serve: Callable[..., Served], page: Page, database: Path, named: dict[str, str]
) -> None:
    served = serve()
    page.goto(f"{served.url}/runs/{named['declined']}")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.locator("#tb-charge-None-1 summary").click()  # opened by the reader: stays open

    demo.CARD_ACCEPTED["declined"] = True  # the fix is deployed
    page.click("button[data-action=retry]")
    expect(page.locator("#flash")).to_contain_text("retry: the run is now queued")
    expect(page.locator(".run-head .status")).to_have_text("queued")
    expect(page.locator("button[data-action=retry]")).to_have_count(0)

    worker = serve_in_background(database, [demo.orders])  # (a nightly_report run is due tomorrow)
    expect(page.locator(".run-head .status")).to_have_text("completed")
    worker.join(30)
    assert not worker.is_alive()
    for step in ["validate", "reserve", "charge", "ship", "notify"]:
        expect(page.locator(f'#dag .step-box[data-step="{step}"]')).to_have_attribute(
            "data-status", "completed")
    expect(page.locator('#dag .step-box[data-step="wrap_gift"]')).to_have_attribute(
        "data-status", "skipped")  # not a gift
    expect(page.locator("#run-output")).to_contain_text('"sent_to": "buyer9@example.com"')
    assert page.evaluate("window.loadedOnce") is True
    # the failed attempts of before the retry are kept, and the one the reader opened is open
    expect(page.locator("#tb-charge-None-1 pre.traceback")).to_be_visible()


def test_cancel_asks_first_then_cancels(
    serve: Callable[..., Served], browser: Browser, named: dict[str, str]
) -> None:
    served = serve()
    tab = browser.new_page()
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept() if len(asked) > 1 else dialog.dismiss()

    tab.on("dialog", answer)
    tab.goto(f"{served.url}/runs/{named['queued']}")
    tab.click("button[data-action=cancel]")  # dismissed: nothing happens
    expect(tab.locator(".run-head .status")).to_have_text("queued")
    tab.click("button[data-action=cancel]")
    expect(tab.locator(".run-head .status")).to_have_text("cancelled", timeout=WAIT)
    assert asked == [f"Cancel run {named['queued']}? Its unfinished tasks will not run."] * 2
    assert served.store.get_run(named["queued"]).status is pf.RunStatus.CANCELLED
    tab.close()


def test_the_runs_list_updates_live(serve: Callable[..., Served], page: Page) -> None:
    served = serve()
    page.goto(served.url + "/runs?flow=send_email")
    expect(page.locator("#runs tbody tr")).to_have_count(14)
    run = served.store.start(demo.send_email, {"to": "new@example.com"})
    expect(page.locator(f'#runs tr[data-run="{run.id}"]')).to_have_attribute("data-status", "queued")
    expect(page.locator("#runs-total")).to_have_text("15")


def test_read_only_has_no_buttons_and_its_api_refuses_posts(
    serve: Callable[..., Served], page: Page, named: dict[str, str]
) -> None:
    served = serve(read_only=True)
    page.goto(f"{served.url}/runs/{named['declined']}")
    expect(page.locator(".badge.read-only")).to_be_visible()
    expect(page.locator("#tb-charge-None-3 pre.traceback")).to_be_visible()
    expect(page.locator("button[data-action]")).to_have_count(0)
    answer = page.request.post(f"{served.url}/api/runs/{named['declined']}/retry",
                               headers={"X-Pgflow": "1", "Origin": served.url})
    assert answer.status == 403
    assert served.store.get_run(named["declined"]).status is pf.RunStatus.FAILED


def test_markup_in_a_runs_input_is_shown_never_run(serve: Callable[..., Served], page: Page) -> None:
    served = serve()
    evil = {"to": "<script>window.pwned = 1</script>", "note": '<img src=x onerror="window.pwned = 2">'}
    run = served.store.start(demo.send_email, evil, key="<b onmouseover=alert(3)>k</b>")
    for path in [f"/runs/{run.id}", "/runs", "/runs?key=%3Cb%20onmouseover%3Dalert(3)%3Ek%3C%2Fb%3E"]:
        page.goto(served.url + path)
        expect(page.locator("#live")).to_be_visible()
        assert page.evaluate("window.pwned") is None, path
        assert page.locator("#live script, #live img, #live b").count() == 0, path
    page.goto(f"{served.url}/runs/{run.id}")
    expect(page.locator("#run-input")).to_contain_text('"to": "<script>window.pwned = 1</script>"')
    page.wait_for_timeout(2500)  # one live refresh: the swapped-in part runs nothing either
    assert page.evaluate("window.pwned") is None


def test_workers_marks_a_lost_worker(serve: Callable[..., Served], page: Page) -> None:
    served = serve()
    served.store.backend.heartbeat("web-1:4242:a", ["process_order"], [], 30)
    served.store.backend.heartbeat("web-2:4343:b", ["send_email"], [], 0.01)
    time.sleep(0.05)  # web-2's lease is over: it is lost
    page.goto(served.url + "/workers")
    expect(page.locator("#workers tbody tr")).to_have_count(2)
    expect(page.locator("#workers tr.lost")).to_contain_text("send_email")
    expect(page.locator("#workers tr.alive")).to_contain_text("process_order")


def test_a_live_update_keeps_scroll_positions_folds_and_focus(
    serve: Callable[..., Served], page: Page
) -> None:
    served = serve()
    run = served.store.start(demo.nightly_report, {"rows": list(range(300))})
    page.goto(f"{served.url}/runs/{run.id}")
    page.locator("#run-input").evaluate("e => { e.scrollTop = 400; }")
    page.locator("button[data-action=cancel]").focus()
    page.evaluate("window.loadedOnce = true")
    served.store.cancel(run.id)  # what the next refresh shows: the part is swapped
    expect(page.locator(".run-head .status")).to_have_text("cancelled")
    assert page.locator("#run-input").evaluate("e => e.scrollTop") == 400
    assert page.evaluate("window.loadedOnce") is True


def test_the_page_says_when_the_server_is_gone(serve: Callable[..., Served], browser: Browser) -> None:
    served = serve()
    tab = browser.new_page()  # (not the page fixture: the refused connections are logged)
    tab.goto(served.url + "/workers")
    expect(tab.locator("#live-state")).to_have_text("live")
    served.stop()
    expect(tab.locator("#live-state")).to_have_text("offline", timeout=WAIT)
    tab.close()


def test_find_a_run_by_key_from_the_header(
    serve: Callable[..., Served], page: Page, named: dict[str, str]
) -> None:
    served = serve()
    page.goto(served.url + "/")
    page.fill('form.find input[name="q"]', "order-9")
    page.press('form.find input[name="q"]', "Enter")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    page.fill('form.find input[name="q"]', named["declined"])
    page.press('form.find input[name="q"]', "Enter")
    expect(page.locator("#run-id")).to_have_text(named["declined"])


def test_retry_all_failed_from_the_overview(
    serve: Callable[..., Served], browser: Browser, named: dict[str, str]
) -> None:
    served = serve()
    tab = browser.new_page()
    tab.on("dialog", lambda d: d.accept())
    tab.goto(served.url + "/")
    tab.click('#flows tr[data-flow="send_email"] button[data-action="retry failed"]')
    expect(tab.locator("#flash")).to_contain_text("retry failed: 1 run(s) queued again")
    expect(tab.locator('#flows tr[data-flow="send_email"] td.c-failed')).to_have_text("0")
    assert served.store.get_run(named["bad_email"]).status is pf.RunStatus.QUEUED
    tab.close()
