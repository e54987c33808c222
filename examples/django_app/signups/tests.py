"""The example's own tests, run by Django's test runner: ``python manage.py test``.

Each test gets a pgflow store of its own (a SQLite file in a temporary directory), through
``override_settings(PGFLOW_DATABASE=...)``.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.test import SimpleTestCase, override_settings

import pgflow_py as pf

from .jobs import welcome_email
from .pgflow import close_stores, get_store


class PgflowTestCase(SimpleTestCase):
    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        settings = override_settings(PGFLOW_DATABASE=str(Path(tmp.name) / "pgflow.db"))
        settings.enable()
        self.addCleanup(settings.disable)
        self.addCleanup(close_stores)

    def sign_up(self, email: str) -> dict[str, Any]:
        response = self.client.post("/signups/", {"email": email})
        self.assertEqual(response.status_code, 202, response.content)
        body: dict[str, Any] = response.json()
        return body


class SignupViewTests(PgflowTestCase):
    def test_a_signup_starts_a_run_that_the_worker_command_completes(self) -> None:
        started = self.sign_up("ada@example.com")
        self.assertEqual(started["status"], "queued")
        run = get_store().get_run(started["run_id"])
        self.assertEqual((run.flow_slug, run.input), ("welcome_email", {"email": "ada@example.com"}))

        out = io.StringIO()
        call_command("pgflow_worker", until_idle=True, stdout=out)
        self.assertIn("completed=1", out.getvalue())

        state = self.client.get(f"/runs/{started['run_id']}/").json()
        self.assertEqual(state["status"], "completed")
        self.assertEqual(state["output"], {"sent_to": "ada@example.com"})

    def test_a_double_submit_starts_one_run(self) -> None:
        first = self.sign_up("grace@example.com")
        second = self.sign_up("grace@example.com")
        self.assertEqual(first["run_id"], second["run_id"])
        self.assertEqual(len(get_store().runs(flow="welcome_email")), 1)

    def test_a_bad_address_starts_nothing(self) -> None:
        response = self.client.post("/signups/", {"email": "nobody"})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(get_store().runs(flow="welcome_email"), [])

    def test_an_unknown_run_is_404(self) -> None:
        self.assertEqual(self.client.get("/runs/no-such-run/").status_code, 404)

    def test_the_handler_runs_directly_in_a_unit_test(self) -> None:
        self.assertEqual(welcome_email.perform({"email": "a@b"}), {"sent_to": "a@b"})


class DashboardTests(PgflowTestCase):
    def test_the_asgi_entry_serves_the_dashboard_and_django(self) -> None:
        from signups_site import asgi
        from starlette.testclient import TestClient

        store = get_store()
        run = store.start(welcome_email, {"email": "linus@example.com"})
        # (asgi.application serves the store of the settings when first imported: build one
        # over this test's.)
        with TestClient(asgi.build_application(store)) as client:
            page = client.get("/pgflow/")
            self.assertEqual(page.status_code, 200)
            self.assertIn("text/html", page.headers["content-type"])
            api = client.get(f"/pgflow/api/runs/{run.id}").json()
            self.assertEqual((api["id"], api["status"]), (run.id, "queued"))
            refused = client.post(f"/pgflow/api/runs/{run.id}/cancel", headers={"X-Pgflow": "1"})
            self.assertEqual(refused.status_code, 403)  # mounted read-only
            self.assertEqual(client.get(f"/runs/{run.id}/").json()["status"], "queued")
        self.assertIsInstance(store.get_run(run.id), pf.Run)
