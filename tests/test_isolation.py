"""isolation="process": sync handlers in a child process that is killed at the timeout or on cancel."""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pgflow_py as pf

HANDLERS = textwrap.dedent("""
    import os, time
    import pgflow_py as pf

    MARKS = os.environ.get("ISOLATION_MARKS", "")

    @pf.job(queue="iso_square", isolation="process", max_attempts=2, base_delay=0)
    def iso_square(input, ctx):
        print("a print from the child must not corrupt the result")
        return {"square": input * input, "pid": os.getpid(), "attempt": ctx.attempt,
                "run_id": ctx.run_id}

    # The timeout counts from the claim, so it includes starting the child's interpreter
    # (seconds on a loaded machine): 5 s leaves room for that, then the handler spins forever.
    @pf.job(queue="iso_spin", isolation="process", timeout=5, max_attempts=2, base_delay=0)
    def iso_spin(input, ctx):
        if ctx.attempt == 1:
            with open(MARKS, "a") as f:  # the handler is running: a kill now proves the point
                f.write(f"{os.getpid()}\\n")
            while True:  # CPU-bound and never checks anything: only a kill stops it
                pass
        return "second attempt"

    @pf.job(queue="iso_fail", isolation="process", max_attempts=3, base_delay=0)
    def iso_fail(input, ctx):
        if input == "permanent":
            raise pf.PermanentFailure("no way")
        raise KeyError(f"missing {input}")

    @pf.job(queue="iso_cancel", isolation="process", timeout=60)
    def iso_cancel(input, ctx):
        with open(MARKS, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(60)

    @pf.job(queue="iso_retry", isolation="process", max_attempts=2)
    def iso_retry(input, ctx):
        if ctx.attempt == 1:
            raise pf.Retry(delay=7, reason="not ready yet")
        raise pf.PermanentFailure(f"gave up at attempt {ctx.attempt}")

    @pf.job(queue="iso_output", isolation="process", max_attempts=2, base_delay=0)
    def iso_output(input, ctx):
        return {
            "set": {"a set": {1, 2}}, "nan": {"nan": float("nan")}, "keys": {1: "a", "1": "b"},
        }[input]

    @pf.job(queue="iso_exit", isolation="process", max_attempts=2, base_delay=0)
    def iso_exit(input, ctx):
        os._exit(3)  # dies without reporting

    flow = pf.flow("iso_flow")

    @flow.step()
    def numbers(input, ctx):
        return list(range(input))

    @flow.map(array=numbers, isolation="process")
    def doubled(item, ctx):
        return item * 2
""")


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "iso_handlers.py").write_text(HANDLERS)
    marks = tmp_path / "marks.txt"
    monkeypatch.setenv("ISOLATION_MARKS", str(marks))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("iso_handlers", None)
    import iso_handlers

    yield iso_handlers
    sys.modules.pop("iso_handlers", None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child may linger as a zombie until reaped; read its state.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] != "Z"


def test_runs_in_a_child_process_and_returns_json(handlers, tmp_path):
    with pf.connect(tmp_path / "iso.db") as store:
        run = store.start(handlers.iso_square, 7)
        stats = pf.run_flows([handlers.iso_square], store=store, until_idle=True)
        done = store.get_run(run.id)
    assert stats.completed == 1
    assert done.output["square"] == 49
    assert done.output["pid"] != os.getpid()
    assert (done.output["attempt"], done.output["run_id"]) == (1, run.id)


def test_timeout_kills_cpu_bound_child_and_retries(handlers, tmp_path):
    with pf.connect(tmp_path / "spin.db") as store:
        run = store.start(handlers.iso_spin)
        stats = pf.run_flows([handlers.iso_spin], store=store, until_idle=True)
        done = store.get_run(run.id)
    marks = tmp_path / "marks.txt"
    assert marks.exists(), "the first attempt timed out before its handler started"
    (pid,) = [int(p) for p in marks.read_text().split()]
    assert done.status is pf.RunStatus.COMPLETED, done.history
    assert done.output == "second attempt"
    assert stats.timed_out == 1
    assert [h.error.split(":")[0] for h in done.history] == ["StepTimeout"]
    assert not _alive(pid)


def test_exceptions_cross_with_type_name_and_message(handlers, tmp_path):
    with pf.connect(tmp_path / "fail.db") as store:
        failing = store.start(handlers.iso_fail, "x")
        permanent = store.start(handlers.iso_fail, "permanent")
        pf.run_flows([handlers.iso_fail], store=store, until_idle=True)
        failing = store.get_run(failing.id)
        permanent = store.get_run(permanent.id)
    assert failing.status is pf.RunStatus.FAILED
    assert failing.error == "KeyError: 'missing x'"
    assert failing.attempts == 3
    # The child's own traceback comes back with each attempt's error.
    for record in failing.history:
        assert record.traceback is not None and "in iso_fail" in record.traceback
        assert record.traceback.rstrip().endswith("KeyError: 'missing x'")
    assert permanent.error == "PermanentFailure: no way"
    assert permanent.attempts == 1


def test_retry_raised_in_the_child_waits_its_delay(handlers, tmp_path):
    clock = pf.testing.FakeClock(1_800_000_000)
    with pf.connect(tmp_path / "retry.db", clock=clock) as store:
        run = store.start(handlers.iso_retry)
        stats = pf.run_flows([handlers.iso_retry], store=store, until_idle=True)
        failed = store.get_run(run.id)
    assert (stats.retried, stats.failed) == (1, 1)
    assert failed.status is pf.RunStatus.FAILED
    assert [(h.attempt, h.error) for h in failed.history] == [
        (1, "Retry: not ready yet"),
        (2, "PermanentFailure: gave up at attempt 2"),
    ]
    # Exactly the Retry's delay, not the job's backoff (base_delay 1 s).
    assert (failed.history[1].at - failed.history[0].at).total_seconds() == pytest.approx(7)


@pytest.mark.parametrize(("output", "error"), [
    ("set", r"^TypeError: the handler returned a value that cannot be stored as JSON: .*set"),
    ("nan", r"^TypeError: the handler returned a value that cannot be stored as JSON: Out of range"),
    ("keys", r"^TypeError: .*keys 1 and '1' are both '1' in JSON"),
])
def test_output_that_cannot_be_stored_fails_for_good_in_the_child(handlers, tmp_path, output, error):
    # As in a thread: the handler did its work, so it is not run again, and the output is
    # checked before it crosses as JSON (colliding keys would otherwise be merged on the way).
    with pf.connect(tmp_path / "output.db") as store:
        run = store.start(handlers.iso_output, output)
        stats = pf.run_flows([handlers.iso_output], store=store, until_idle=True)
        failed = store.get_run(run.id)
    assert (stats.completed, stats.retried, stats.failed) == (0, 0, 1)
    assert failed.status is pf.RunStatus.FAILED and failed.attempts == 1
    assert failed.output is None
    assert re.match(error, failed.error or ""), failed.error


def test_a_child_that_dies_without_reporting_is_a_failed_attempt(handlers, tmp_path):
    with pf.connect(tmp_path / "exit.db") as store:
        run = store.start(handlers.iso_exit)
        stats = pf.run_flows([handlers.iso_exit], store=store, until_idle=True)
        failed = store.get_run(run.id)
    assert (stats.retried, stats.failed) == (1, 1)
    assert failed.status is pf.RunStatus.FAILED
    assert [h.error for h in failed.history] == [
        "ChildProcessDied: the handler's process exited with code 3 before reporting"
    ] * 2


GONE = textwrap.dedent("""
    import pgflow_py as pf

    @pf.job(queue="iso_gone", isolation="process")
    def iso_gone(input, ctx):
        return "never"
""")


@pytest.mark.parametrize(("change", "error"), [
    ("module deleted", "ModuleNotFoundError: No module named 'iso_gone'"),
    ("handler renamed", "AttributeError: module 'iso_gone' has no attribute 'iso_gone'"),
])
def test_a_handler_the_child_cannot_import_fails_the_attempt(
    tmp_path, monkeypatch, change, error
):
    # The child imports the handler by its path: code deployed after this process imported it
    # (a module removed, a function renamed) fails the attempt with the import's error.
    code = tmp_path / "code"
    code.mkdir()
    (code / "iso_gone.py").write_text(GONE)
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("iso_gone", None)
    import iso_gone

    try:
        shutil.rmtree(code / "__pycache__", ignore_errors=True)
        if change == "module deleted":
            (code / "iso_gone.py").unlink()
        else:
            (code / "iso_gone.py").write_text(GONE.replace("def iso_gone(", "def iso_renamed("))
        with pf.connect(tmp_path / "gone.db") as store:
            run = store.start(iso_gone.iso_gone)
            stats = pf.run_flows([iso_gone.iso_gone], store=store, until_idle=True)
            failed = store.get_run(run.id)
    finally:
        sys.modules.pop("iso_gone", None)
    assert (stats.completed, stats.failed) == (0, 1)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error == error


def test_cancel_kills_the_child(handlers, tmp_path):
    store = pf.connect(tmp_path / "cancel.db")
    run = store.start(handlers.iso_cancel)
    marks = tmp_path / "marks.txt"

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 20
        while not marks.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        store.cancel(run.id)

    threading.Thread(target=cancel_when_running).start()
    stats = pf.run_flows([handlers.iso_cancel], store=store, until_idle=True)
    assert stats.cancelled == 1
    assert store.get_run(run.id).status is pf.RunStatus.CANCELLED
    (pid,) = [int(p) for p in marks.read_text().split()]
    assert not _alive(pid)
    store.close()


def test_step_level_isolation_in_a_flow(handlers, tmp_path):
    with pf.connect(tmp_path / "flow.db") as store:
        run = store.start(handlers.flow, 4)
        pf.run_flows([handlers.flow], store=store, until_idle=True)
        assert store.get_run(run.id).output == {"doubled": [0, 2, 4, 6]}
    assert handlers.flow.definition.effective("doubled").isolation == "process"
    assert handlers.flow.definition.effective("numbers").isolation == "thread"


def test_isolation_rules_at_decoration():
    with pytest.raises(pf.DefinitionError, match="sync handlers only"):

        @pf.job(queue="iso_async", isolation="process")
        async def iso_async(input, ctx):
            return None

    with pytest.raises(pf.DefinitionError, match="module-level function"):

        @pf.job(queue="iso_local", isolation="process")
        def iso_local(input, ctx):
            return None

    with pytest.raises(pf.DefinitionError, match="isolation must be 'thread' or 'process'"):
        pf.flow("iso_bad", isolation="fork")
