"""Take the dashboard screenshots in docs/images from the demo database (tests/dashboard_demo.py).

    python tools/dashboard_screenshots.py   # needs .[test] (Playwright) and Debian's chromium

Serves a fresh demo database with uvicorn on a free port, opens each page in headless
Chromium and saves it as a PNG.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

import pgflow_py as pf
from pgflow_py.dashboard import create_app

ROOT = Path(__file__).parent.parent
IMAGES = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "tests"))
import dashboard_demo as demo  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main() -> None:
    path = str(Path(tempfile.mkdtemp()) / "demo.db")
    demo.fill_hour(path)
    with pf.connect(path) as store:
        named = demo.fill(store)
        store.backend.heartbeat("web-1:4242:9f3c", [f.slug for f in demo.FLOWS], [], 30)
        store.backend.heartbeat("web-2:5151:77ab", ["send_email"], [], 30)
        store.backend.heartbeat("batch-1:818:0d1e", ["nightly_report"], [], 0.01)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(store), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        shots = {
            "dashboard-overview.png": "/",
            "dashboard-runs.png": "/runs?flow=process_order",
            "dashboard-run.png": f"/runs/{named['declined'].id}",
            "dashboard-workers.png": "/workers",
        }
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            for name, url in shots.items():
                page.goto(base + url)
                page.wait_for_timeout(200)
                page.screenshot(path=str(IMAGES / name), full_page=name != "dashboard-runs.png")
                print("saved", IMAGES / name)
            browser.close()
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
