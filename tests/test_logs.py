"""What a person following a worker's log sees, and what a handler learns of a shutdown."""

from __future__ import annotations

import logging
import threading

import anyio
import pytest
from _helpers import drain, serve_then_stop

import pgflow_py as pf
from pgflow_py.testing import FakeClock


def _lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def test_each_attempt_logs_its_start_and_end_at_debug_with_its_ids(tmp_path, caplog) -> None:
    flow = pf.flow("logged")

    @flow.step()
    def split(input, ctx):
        return [1, 2]

    @flow.map(array="split")
    def double(item, ctx):
        return item * 2

    with pf.connect(tmp_path / "db") as store:
        run = store.start(flow, {})
        with caplog.at_level(logging.DEBUG, logger="pgflow_py.runner"):
            drain(store, flow)
    messages = [r.getMessage() for r in _lines(caplog, "pgflow_py.runner")]
    for step in ("logged.split", "logged.double[0]", "logged.double[1]"):
        label = f"{step} run {run.id} attempt 1/1"
        assert f"{label}: started" in messages, messages
        assert any(m.startswith(f"{label}: completed in ") and m.endswith(" ms") for m in messages)


def test_every_failed_attempt_is_a_warning_with_its_traceback(tmp_path, caplog) -> None:
    @pf.job(queue="flaky", max_attempts=2, base_delay=0)
    def flaky(input, ctx):
        raise ValueError(f"card declined at attempt {ctx.attempt}")

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        run = store.start(flaky, {})
        with caplog.at_level(logging.INFO, logger="pgflow_py.runner"):
            drain(store, flaky)
    failures = [r for r in _lines(caplog, "pgflow_py.runner") if "failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.WARNING]
    assert failures[0].getMessage() == (
        f"flaky.flaky run {run.id} attempt 1/2: failed, retrying in 0s: "
        "ValueError: card declined at attempt 1"
    )
    assert failures[1].getMessage() == (
        f"flaky.flaky run {run.id} attempt 2/2: failed for good: "
        "ValueError: card declined at attempt 2"
    )
    for record in failures:  # the handler's frame is in each traceback
        assert record.exc_info is not None and record.exc_info[1] is not None
        assert "in flaky" in logging.Formatter().formatException(record.exc_info)


def test_a_handlers_log_lines_carry_the_attempts_ids(tmp_path, caplog) -> None:
    @pf.job(queue="chatty")
    def chatty(input, ctx):
        ctx.logger.info("sending to %s", input["to"])
        return True

    with pf.connect(tmp_path / "db") as store:
        run = store.start(chatty, {"to": "ada@example.com"})
        with caplog.at_level(logging.INFO, logger="pgflow_py.handler"):
            drain(store, chatty)
    (record,) = _lines(caplog, "pgflow_py.handler")
    # In the message itself, so the worker's default format shows them.
    assert record.getMessage() == f"chatty.chatty run {run.id} attempt 1/1: sending to ada@example.com"
    assert (record.run_id, record.flow_slug, record.attempt) == (run.id, "chatty", 1)


def test_a_handler_sees_the_shutdown_and_can_return_early(tmp_path) -> None:
    looping = threading.Event()

    @pf.job(queue="batch", timeout=60)
    async def batch(input, ctx):
        done = 0
        while not ctx.shutting_down:
            done += 1
            looping.set()
            await anyio.sleep(0.01)
        return {"saved_after": done}

    with pf.connect(tmp_path / "db") as store:
        run = store.start(batch, {})
        stats, _ = serve_then_stop(store, [batch], looping)
        done = store.get_run(run.id)
    assert stats.completed == 1
    assert done.status == "completed" and done.output["saved_after"] >= 1


def test_json_log_lines_carry_the_attempts_ids_and_traceback(tmp_path) -> None:
    import json

    from pgflow_py.logformat import JsonFormatter

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    runner_log = logging.getLogger("pgflow_py.runner")
    runner_log.addHandler(handler)

    @pf.job(queue="shipped")
    def shipped(input, ctx):
        ctx.logger.warning("about to fail")
        raise KeyError("mailer")

    handler_log = logging.getLogger("pgflow_py.handler")
    handler_log.addHandler(handler)
    try:
        with pf.connect(tmp_path / "db") as store:
            run = store.start(shipped, {})
            drain(store, shipped)
    finally:
        runner_log.removeHandler(handler)
        handler_log.removeHandler(handler)
    entries = [json.loads(line) for line in lines]
    mine = [e for e in entries if e.get("run_id") == run.id]
    assert [e["logger"] for e in mine] == ["pgflow_py.handler", "pgflow_py.runner"]
    for entry in mine:
        assert (entry["flow_slug"], entry["step_slug"], entry["attempt"]) == ("shipped", "shipped", 1)
        assert entry["level"] == "WARNING" and entry["time"].endswith("+00:00")
    assert "KeyError: 'mailer'" in mine[1]["exception"] and "in shipped" in mine[1]["exception"]


def test_the_worker_writes_json_lines_with_log_format_json(tmp_path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    (tmp_path / "json_jobs.py").write_text(textwrap.dedent('''
        import pgflow_py as pf

        @pf.job(queue="hello")
        def hello(input, ctx):
            ctx.logger.info("hello %s", input)
            return input
    '''))
    db = str(tmp_path / "app.db")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgflow_py", "worker", "json_jobs", "--database", db,
         "--log-format", "json"],
        cwd=tmp_path, env=env, text=True, stderr=subprocess.PIPE,
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import json_jobs as jobs

        with pf.connect(db) as store:
            run = store.start(jobs.hello, "ada")
            assert store.wait(run.id, timeout=30).output == "ada"
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    finally:
        sys.path.remove(str(tmp_path))
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    entries = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    hello = [e for e in entries if e["logger"] == "pgflow_py.handler"]
    assert hello and hello[0]["run_id"] == run.id
    assert hello[0]["message"].endswith("hello ada")


def test_each_failed_attempt_keeps_its_traceback(tmp_path) -> None:
    @pf.job(queue="charge", max_attempts=3, base_delay=0, timeout=0.2)
    async def charge(input, ctx):
        if ctx.attempt == 3:
            await anyio.sleep(5)  # times out
        raise ValueError(f"card declined ({ctx.attempt})")

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        run = store.start(charge, {})
        drain(store, charge)
        history = store.get_run(run.id).history
    assert [h.error for h in history] == [
        "ValueError: card declined (1)", "ValueError: card declined (2)",
        "StepTimeout: step charge.charge timed out after 0.2s (attempt 3 of 3)",
    ]
    for record in history[:2]:
        assert record.traceback is not None
        assert record.traceback.startswith("Traceback (most recent call last):")
        assert "in charge" in record.traceback
        assert "pgflow_py/runtime" not in record.traceback  # only frames that say something
        assert record.traceback.rstrip().endswith(record.error)
    assert history[2].traceback is None  # the runner stopped it: no frame of the handler's


def test_a_worker_warns_of_flows_with_runs_waiting_that_no_worker_serves(tmp_path, caplog) -> None:
    @pf.job(queue="orphan")
    def orphan(input, ctx):
        return input

    @pf.job(queue="served")
    def served(input, ctx):
        return input

    clock = FakeClock()
    with pf.connect(tmp_path / "db", clock=clock) as store:
        store.start(orphan, {})  # no worker imports this one
        store.start(served, {})
        fresh = store.start(served, {}, delay=0)
        with caplog.at_level(logging.WARNING, logger="pgflow_py.runner"):
            drain(store, served)  # due for 0 s: too soon to say
        assert not [r for r in caplog.records if "no live worker serves" in r.getMessage()]
        clock.advance(150)
        store.start(served, {})
        with caplog.at_level(logging.WARNING, logger="pgflow_py.runner"):
            drain(store, served)
        assert store.get_run(fresh.id).status == "completed"
    warnings = [r.getMessage() for r in caplog.records if "no live worker serves" in r.getMessage()]
    assert warnings == [
        "flow 'orphan' has runs queued for 2m that no live worker serves: start a worker with "
        "the module that defines it (pgflow worker MODULE), or cancel them"
    ]
