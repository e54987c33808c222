"""The ``pgflow worker`` command, run as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _helpers import stop_process
from click.testing import CliRunner

import pgflow_py as pf
from pgflow_py.cli import flows_in_modules, main

JOBS = textwrap.dedent("""
    import time
    import pgflow_py as pf

    @pf.job(queue="cli_echo")
    def cli_echo(input, ctx):
        return {"echo": input}

    @pf.job(queue="cli_slow", timeout=30)
    def cli_slow(input, ctx):
        time.sleep(input)
        return "slept"
""")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "cli_jobs.py").write_text(JOBS)
    return tmp_path


def _start(project: Path, *args: str, module: bool = False) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "pgflow_py"] if module else [
        sys.executable, "-c", "from pgflow_py.cli import main; main(prog_name='pgflow')"
    ]
    return subprocess.Popen(
        [*command, "worker", *args], cwd=project, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _wait_terminal(db: Path, run_ids: list[str], timeout: float = 20) -> list[pf.Run]:
    with pf.connect(db) as store:
        return [store.wait(run_id, timeout=timeout) for run_id in run_ids]


@pytest.mark.parametrize("module", [False, True], ids=["pgflow", "python-m"])
def test_worker_serves_the_jobs_of_its_modules_and_exits_zero_on_sigterm(project, module):
    sys.path.insert(0, str(project))
    try:
        import cli_jobs
    finally:
        sys.path.remove(str(project))
    db = project / "worker.db"
    with pf.connect(db) as store:
        runs = store.start_many(cli_jobs.cli_echo, [1, 2, 3])
    proc = _start(project, "cli_jobs", "--database", str(db), "--lease", "3", module=module)
    try:
        done = _wait_terminal(db, [r.id for r in runs])
    finally:
        code, err = stop_process(proc)
    assert [r.output for r in done] == [{"echo": 1}, {"echo": 2}, {"echo": 3}]
    assert code == 0, err
    assert "serving cli_echo, cli_slow" in err


def test_sigterm_lets_a_running_task_finish(project):
    db = project / "graceful.db"
    proc = _start(project, "cli_jobs", "--database", str(db), "--flows", "cli_slow")
    # Start by slug once the worker has registered its flows.
    deadline = time.monotonic() + 20
    while True:
        try:
            with pf.connect(db) as store:
                run = store.start("cli_slow", 1.0)
            break
        except pf.FlowNotFound:
            assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no register"
            time.sleep(0.05)
    with pf.connect(db) as store:
        while store.get_run(run.id).status is not pf.RunStatus.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    code, err = stop_process(proc)
    assert code == 0, err
    with pf.connect(db) as store:
        finished = store.get_run(run.id)
        leased = store.backend._conn.execute(
            "SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL"
        ).fetchone()[0]
    assert finished.status is pf.RunStatus.COMPLETED
    assert finished.output == "slept"
    assert leased == 0


def test_worker_without_modules_serves_the_stored_flows(project):
    db = project / "stored.db"
    env_path = os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-c",
         f"import cli_jobs, pgflow_py as pf; pf.connect({str(db)!r}).start(cli_jobs.cli_echo, 'x')"],
        cwd=project, check=True, env={**os.environ, "PYTHONPATH": env_path},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgflow_py", "worker", "--database", str(db)],
        cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    try:
        with pf.connect(db) as store:
            (run,) = store.runs()
        (done,) = _wait_terminal(db, [run.id])
    finally:
        code, err = stop_process(proc)
    assert done.output == {"echo": "x"}
    assert code == 0, err


def test_unknown_flow_in_flows_option_is_a_clear_error(project, monkeypatch):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(
        main, ["worker", "cli_jobs", "--database", str(project / "x.db"), "--flows", "nope"]
    )
    assert result.exit_code != 0
    assert "nope" in result.output and "cli_echo" in result.output


def test_unimportable_module_is_a_clear_error(project, monkeypatch):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["worker", "no_such_module", "--database", "x.db"])
    assert result.exit_code != 0
    assert "cannot import module 'no_such_module'" in result.output


def test_second_signal_exits_even_with_a_sync_handler_still_running(project):
    db = project / "twice.db"
    proc = _start(project, "cli_jobs", "--database", str(db), "--flows", "cli_slow", "--lease", "3")
    deadline = time.monotonic() + 20
    while True:
        try:
            with pf.connect(db) as store:
                run = store.start("cli_slow", 30)  # sleeps 30 s in a worker thread
            break
        except pf.FlowNotFound:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pf.connect(db) as store:
        while store.get_run(run.id).status is not pf.RunStatus.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)  # well before the handler's 30 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "second SIGTERM: stopping now" in err
    with pf.connect(db) as store:
        # The attempt was handed back without counting: the run is queued for another worker.
        back = store.get_run(run.id)
    assert back.status is pf.RunStatus.QUEUED
    assert back.attempts == 0


# --- what the worker refuses, in one line --------------------------------------------------------


def _worker_fails(project: Path, *args: str) -> str:
    """Run a worker expected to refuse to start; return its one-line error."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgflow_py", "worker", *args], cwd=project, text=True,
        capture_output=True, timeout=30,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: "), proc.stderr
    assert not [line for line in lines[:-1] if "Error" in line], proc.stderr
    return lines[-1]


def _job_module(queue: str, function: str) -> str:
    return textwrap.dedent(f"""
        import pgflow_py as pf

        @pf.job(queue={queue!r})
        def {function}(input, ctx):
            return {function!r}
    """)


def test_two_different_jobs_with_one_slug_are_an_error_naming_both(project):
    (project / "same_a.py").write_text(_job_module("same", "send_a"))
    (project / "same_b.py").write_text(_job_module("same", "send_b"))
    err = _worker_fails(project, "same_a", "same_b", "--database", str(project / "x.db"))
    assert "'same'" in err
    assert "same_a:send_a" in err and "same_b:send_b" in err


def test_one_job_imported_into_two_modules_is_served_once(project, monkeypatch):
    (project / "shared_job.py").write_text(_job_module("shared", "shared"))
    (project / "uses_shared_a.py").write_text("from shared_job import shared\n")
    (project / "uses_shared_b.py").write_text("from shared_job import shared as again\n")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    (found,) = flows_in_modules(["uses_shared_a", "uses_shared_b", "shared_job"])
    assert found.slug == "shared"

    db = project / "shared.db"
    with pf.connect(db) as store:
        run = store.start(found, None)
    proc = _start(project, "uses_shared_a", "uses_shared_b", "--database", str(db))
    try:
        (done,) = _wait_terminal(db, [run.id])
    finally:
        code, err = stop_process(proc)
    assert done.output == "shared"
    assert code == 0, err


def test_a_module_that_defines_no_job_is_an_error_naming_it(project):
    (project / "only_helpers.py").write_text("def helper():\n    return 1\n")
    db = str(project / "x.db")
    for modules in (["only_helpers"], ["cli_jobs", "only_helpers"]):
        err = _worker_fails(project, *modules, "--database", db)
        assert "module 'only_helpers' defines no pgflow job or flow" in err


def test_database_in_a_missing_directory_is_a_one_line_error(project):
    db = project / "no_such_directory" / "app.db"
    err = _worker_fails(project, "cli_jobs", "--database", str(db))
    assert str(db) in err
    err = _worker_fails(project, "--database", str(db))
    assert str(db) in err


def test_a_shape_mismatch_is_a_one_line_error(project):
    @pf.job(queue="reshaped")
    def reshaped(input, ctx):
        return input

    db = project / "shape.db"
    with pf.connect(db) as store:
        store.start(reshaped, 1)  # unfinished: the shape may not change
    (project / "reshaped_v2.py").write_text(textwrap.dedent("""
        import pgflow_py as pf

        reshaped = pf.flow("reshaped")

        @reshaped.step()
        def first(input, ctx):
            return input

        @reshaped.step(depends_on=["first"])
        def second(deps, ctx):
            return deps
    """))
    err = _worker_fails(project, "reshaped_v2", "--database", str(db))
    assert "'reshaped' changed shape" in err


def test_an_invalid_definition_is_a_one_line_error_naming_the_module(project):
    (project / "too_long.py").write_text(textwrap.dedent("""
        import pgflow_py as pf

        @pf.job(queue="too_long", timeout=10**12)
        def too_long(input, ctx):
            return input
    """))
    err = _worker_fails(project, "too_long", "--database", str(project / "x.db"))
    assert "module 'too_long'" in err
    assert "timeout must be" in err and "31536000" in err
