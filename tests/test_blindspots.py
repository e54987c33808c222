"""Behaviour that once passed unchecked: each test here fails on a wrong change the rest of the
suite let through (see the commit that added it for the change it was checked against)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pgflow_py as pf


def test_start_on_a_closed_store_raises_store_error(tmp_path: Path) -> None:
    # Any exception is not enough: callers catch pf.StoreError (pf.PgflowError) for database
    # trouble, and a bare sqlite3 error escapes that.
    @pf.job(queue="after_close")
    def after_close(input, ctx):
        return input

    store = pf.connect(tmp_path / "closed.db", clock=pf.testing.FakeClock())
    run = store.start(after_close, 1)
    store.close()
    with pytest.raises(pf.StoreError):
        store.start(after_close, 2)
    with pytest.raises(pf.StoreError):
        store.start("after_close", 3)
    with pytest.raises(pf.StoreError):
        store.get_run(run.id)


# --- the worker command's exit with a handler's thread still running (cli.py) ------------------

LINGERING = textwrap.dedent("""
    import pathlib, threading, time
    import pgflow_py as pf

    @pf.job(queue="leaves_a_thread")
    def leaves_a_thread(input, ctx):
        # A thread the handler starts itself and never stops, not a daemon (a thread started
        # from the runner's daemon threads would be one by default): Python would wait for it
        # at exit for an hour.
        threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
        pathlib.Path(input).write_text("done")
        return "ok"
""")


def test_worker_exits_zero_after_sigterm_despite_a_thread_its_handler_left_running(tmp_path):
    (tmp_path / "lingering_jobs.py").write_text(LINGERING)
    db = tmp_path / "lingering.db"
    marker = tmp_path / "handled"
    log = tmp_path / "worker.log"
    pf.connect(db).close()  # created and migrated before the worker starts
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgflow_py", "worker", "lingering_jobs", "--database", str(db)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        with pf.connect(db) as store:
            deadline = time.monotonic() + 30  # generous: only detects a worker that never starts
            while store.backend.get_definition("leaves_a_thread") is None:  # registered: serving
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            run = store.start("leaves_a_thread", str(marker))
            assert store.wait(run.id, timeout=30).output == "ok"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # generous: a worker waiting on the thread would take an hour
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "exiting with 1 non-daemon thread(s) still running" in text
    assert "stopped: RunnerStats(completed=1" in text


# --- flows=None: recorded handler paths that no longer lead to the flow (loader.py) ------------

FIRST_DEPLOY = textwrap.dedent("""
    import pgflow_py as pf

    @pf.job(queue="moved_job")
    def handler(input, ctx):
        return "v1"
""")

LATER_DEPLOYS = {
    # The recorded path now names a plain function, not a job or step.
    "not a job": (
        "def handler(input, ctx):\n    return 'plain'\n",
        "is <function handler",
    ),
    # The recorded path now names a job of another slug.
    "another flow": (
        "import pgflow_py as pf\n\n@pf.job(queue='renamed_job')\n"
        "def handler(input, ctx):\n    return 'v2'\n",
        "now belongs to flow 'renamed_job', not 'moved_job'",
    ),
}


@pytest.mark.parametrize("deploy", sorted(LATER_DEPLOYS))
def test_flows_none_refuses_a_recorded_path_that_leads_elsewhere_now(
    tmp_path, monkeypatch, caplog, deploy
):
    code = tmp_path / "code"
    code.mkdir()
    module = code / "moved_jobs.py"
    module.write_text(FIRST_DEPLOY)
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("moved_jobs", None)
    try:
        import moved_jobs

        with pf.connect(tmp_path / "moved.db", clock=pf.testing.FakeClock()) as store:
            run = store.start(moved_jobs.handler)
            # The next deploy changes the module; the runner imports it afresh.
            source, message = LATER_DEPLOYS[deploy]
            shutil.rmtree(code / "__pycache__", ignore_errors=True)
            module.write_text(source)
            sys.modules.pop("moved_jobs", None)
            with caplog.at_level("ERROR", logger="pgflow_py.runner"):
                stats = pf.run_flows(None, store=store, until_idle=True)
            assert stats == pf.RunnerStats()
            assert store.get_run(run.id).status is pf.RunStatus.QUEUED  # left for a right runner
    finally:
        sys.modules.pop("moved_jobs", None)
    assert "cannot serve flow 'moved_job'" in caplog.text
    assert message in caplog.text
