"""One task never takes the runner down: whatever a handler returns, raises or holds, and
whatever its input, only that task's attempt fails (counted, its error recorded)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest
from _helpers import drain, serve_then_stop

import pgflow_py as pf
from pgflow_py import _json
from pgflow_py.runtime import attempt as attempt_module
from pgflow_py.runtime import runner as runner_module
from pgflow_py.runtime.runner import Runner
from pgflow_py.runtime.threads import HandlerThreads
from pgflow_py.testing import FakeClock


def test_sync_handlers_queued_together_each_get_a_thread() -> None:
    # A thread counts itself idle just before it takes a job already queued: a second job
    # queued at that moment must still get a thread of its own, not wait for the first to end.
    async def main() -> None:
        threads = HandlerThreads(4)
        try:
            for _ in range(20):
                await threads.run(lambda: None)
                while threads._idle == 0:  # until its thread waits for the next job
                    await asyncio.sleep(0.0005)
                both = threading.Barrier(2, timeout=5)
                # Each waits for the other: they pass only if they run at once.
                await asyncio.gather(threads.run(both.wait), threads.run(both.wait))
        finally:
            threads.close()

    anyio.run(main)


# --- what a handler raises or returns ---------------------------------------------------------


class _Custom(BaseException):
    pass


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt(), _Custom("custom"), asyncio.CancelledError()],
    ids=lambda e: type(e).__name__,
)
def test_a_handlers_base_exception_is_a_counted_failed_attempt(tmp_path, exc, is_async) -> None:
    calls: list[int] = []

    def fail(input, ctx):
        calls.append(ctx.attempt)
        raise exc

    async def afail(input, ctx):
        fail(input, ctx)

    poison = pf.job(queue="poison", max_attempts=2, base_delay=0)(afail if is_async else fail)

    @pf.job(queue="fine")
    def fine(input, ctx):
        return input

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        bad = store.start(poison, {})
        good = store.start(fine, 7)
        stats = drain(store, poison, fine, concurrency=2)
        run = store.get_run(bad.id)
        assert run.status == "failed"
        assert run.attempts == 2 and calls == [1, 2]
        assert run.error is not None and run.error.startswith(type(exc).__name__)
        assert (stats.failed, stats.retried, stats.completed) == (1, 1, 1)
        assert store.get_run(good.id).output == 7  # the runner served on


def test_output_that_cannot_be_stored_fails_for_good_and_spares_the_batch(tmp_path) -> None:
    sent: list[str] = []

    @pf.job(queue="email", max_attempts=3)
    def email(input, ctx):
        sent.append(input)
        return {"at": datetime.now(timezone.utc)} if input == "dt" else "name \udcff.txt"

    @pf.job(queue="fine")
    async def fine(input, ctx):
        sent.append(input)
        return input

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        dt = store.start(email, "dt")
        surrogate = store.start(email, "surrogate")
        goods = store.start_many(fine, list(range(5)))
        drain(store, email, fine, concurrency=8)
        # A handler that returned has done its work: no retry, so one e-mail each.
        assert sorted(map(str, sent)) == sorted(["dt", "surrogate", *map(str, range(5))])
        for run in (store.get_run(dt.id), store.get_run(surrogate.id)):
            assert run.status == "failed" and run.attempts == 1
            assert "cannot be stored as JSON" in (run.error or "")
        assert "datetime" in (store.get_run(dt.id).error or "")
        assert "surrogate" in (store.get_run(surrogate.id).error or "")
        assert [store.get_run(r.id).output for r in goods] == list(range(5))


def test_an_error_message_that_is_not_utf8_is_recorded_escaped(tmp_path) -> None:
    name = os.fsdecode(b"/nonexistent/\xff.csv")  # a lone surrogate, as for such a file name

    @pf.job(queue="read", max_attempts=2, base_delay=0)
    def read(input, ctx):
        raise ValueError(f"cannot parse {name}")

    @pf.job(queue="fine")
    def fine(input, ctx):
        return "ok"

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        run = store.start(read, {})
        good = store.start(fine, {})
        stats = drain(store, read, fine, concurrency=2)
        run = store.get_run(run.id)
        assert run.status == "failed" and run.attempts == 2
        assert run.error is not None and "\\udcff.csv" in run.error
        assert run.error.startswith("ValueError: cannot parse ")
        assert [h.error for h in run.history] == [run.error, run.error]
        assert (stats.retried, stats.failed, stats.completed) == (1, 1, 1)
        assert store.get_run(good.id).output == "ok"


# --- the runner's own arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"lease": 0}, {"lease": math.nan}, {"lease": -1}, {"lease": math.inf},
        {"poll_interval": 0}, {"poll_interval": math.nan},
        {"shutdown_timeout": -1}, {"shutdown_timeout": math.nan},
        {"concurrency": 0}, {"concurrency": True}, {"concurrency": 2.5},
        {"resources": ["mailer"]},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
def test_runner_arguments_it_cannot_serve_with_are_refused(tmp_path, options) -> None:
    @pf.job(queue="noop")
    def noop(input, ctx):
        return 1

    with pf.connect(tmp_path / "db") as store:
        run = store.start(noop, {})
        name = next(iter(options))
        with pytest.raises(pf.InputError, match=name):
            drain(store, noop, **options)
        assert store.get_run(run.id).status == "queued"


# --- the event loop blocked, the database failing ---------------------------------------------


def test_a_late_heartbeat_is_logged(tmp_path, caplog) -> None:
    @pf.job(queue="blocking")
    async def blocking(input, ctx):
        time.sleep(0.7)  # blocks the event loop: no heartbeat meanwhile
        return 1

    with pf.connect(tmp_path / "db") as store:
        store.start(blocking, {})
        with caplog.at_level(logging.WARNING, logger="pgflow_py.runner"):
            drain(store, blocking, lease=0.6)
    late = [r.getMessage() for r in caplog.records if "heartbeat ran" in r.getMessage()]
    assert late and "isolation=\"process\"" in late[0]


def test_stopping_ends_within_the_shutdown_timeout_while_the_database_fails(tmp_path) -> None:
    started = threading.Event()

    @pf.job(queue="slow", timeout=60)
    async def slow(input, ctx):
        started.set()
        await anyio.sleep(30)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise pf.StoreError("the pgflow database is malformed")

    def break_the_database() -> None:
        for name in ("finish_and_claim", "finish", "heartbeat", "reclaim_expired",
                     "next_due", "data_version", "release", "forget_worker", "claim"):
            setattr(store.backend, name, broken)

    with pf.connect(tmp_path / "db") as store:
        run = store.start(slow, {})
        # It fails a few times, backing off, before it is told to stop.
        stats, took = serve_then_stop(
            store, [slow], started, break_the_database, lease=1.0, shutdown_timeout=0.5
        )
        # The running task was stopped at the shutdown timeout, not waited for.
        assert stats.completed == 0
        assert took < 10
    with pf.connect(tmp_path / "db") as store:
        assert store.get_run(run.id).status == "running"  # its lease will expire: not lost


# --- inputs and definitions -------------------------------------------------------------------


def test_an_input_that_cannot_be_read_fails_that_run_alone(tmp_path) -> None:
    calls: list[Any] = []

    @pf.job(queue="echo", max_attempts=3)
    def echo(input, ctx):
        calls.append(input)
        return input

    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        bad = store.start(echo, "will be garbled")
        goods = store.start_many(echo, [1, 2, 3])
    with sqlite3.connect(tmp_path / "db") as db:  # as a hand edit or an old bug might leave it
        db.execute("UPDATE runs SET input = ? WHERE id = ?", ("[" * 100_000 + "]" * 100_000, bad.id))
    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        stats = drain(store, echo)
        run = store.get_run(bad.id)
        assert run.status == "failed" and run.attempts == 1  # permanent: it would never read
        assert run.error is not None and "cannot be read: RecursionError" in run.error
        assert sorted(calls) == [1, 2, 3]  # the handler never saw it
        assert [store.get_run(r.id).output for r in goods] == [1, 2, 3]
        assert (stats.completed, stats.failed) == (3, 1)


def test_two_different_jobs_with_one_slug_are_refused_by_run_flows(tmp_path) -> None:
    @pf.job(queue="same")
    def first(input, ctx):
        return 1

    @pf.job(queue="same")
    def second(input, ctx):
        return 2

    with pf.connect(tmp_path / "db") as store:
        with pytest.raises(pf.DefinitionError, match=r"'same'.*first.*second"):
            drain(store, first, second)
        assert store.backend.definitions() == []  # refused before anything was written
        drain(store, first, first)  # the same object twice is served once


@pytest.mark.parametrize("delay", [-1, math.nan, math.inf, 10**12, True, "5"], ids=repr)
def test_a_retry_delay_that_cannot_be_served_is_refused(delay) -> None:
    with pytest.raises(ValueError, match="Retry delay"):
        pf.Retry(delay)


# --- a fault anywhere around one attempt fails that attempt only ------------------------------


def _fault_points() -> list[Any]:
    """(name, how to inject the fault, the error text expected on the poisoned run)."""

    def context(mp: pytest.MonkeyPatch) -> None:
        real = Runner._context

        def failing(self: Runner, task: Any, step: Any, handle: Any) -> pf.Context:
            if task.input == "poison":
                raise RuntimeError("injected: context")
            return real(self, task, step, handle)

        mp.setattr(Runner, "_context", failing)

    def encoding(mp: pytest.MonkeyPatch) -> None:
        real = _json.dumps

        def failing(value: Any) -> str:
            if value == "poison!":
                raise RuntimeError("injected: encoding")
            return real(value)

        mp.setattr(_json, "dumps", failing)

    def retry_policy(mp: pytest.MonkeyPatch) -> None:
        def failing(*args: Any, **kwargs: Any) -> float:
            raise RuntimeError("injected: retry policy")

        mp.setattr(attempt_module, "retry_delay", failing)

    def hook_machinery(mp: pytest.MonkeyPatch) -> None:
        async def failing(*args: Any) -> None:
            raise RuntimeError("injected: hook machinery")

        mp.setattr(runner_module, "call_hook", failing)

    def recording(mp: pytest.MonkeyPatch) -> None:
        # The backend cannot take one result (a bug, a value its driver refuses): the batch it
        # is in must not be lost, and only that task fails.
        def guard(real: Any) -> Any:
            def call(successes: Any, failures: Any, *args: Any, **kwargs: Any) -> Any:
                if any(s.output_json == '"poison!"' for s in successes):
                    raise RuntimeError("injected: recording")
                return real(successes, failures, *args, **kwargs)
            return call

        def patch(store: pf.Store) -> None:
            backend: Any = store.backend
            mp.setattr(backend, "finish_and_claim", guard(backend.finish_and_claim))
            mp.setattr(backend, "finish", guard(backend.finish))

        return patch

    return [
        ("context", context, "failed", "RuntimeError: injected: context"),
        ("encoding", encoding, "failed", "injected: encoding"),
        ("retry-policy", retry_policy, "failed", "RuntimeError: injected: retry policy"),
        # A hook's failure changes nothing: the retry runs and succeeds.
        ("hook-machinery", hook_machinery, "completed", "ValueError: poisoned"),
        ("recording", recording, "failed", "RuntimeError: injected: recording"),
    ]


@pytest.mark.parametrize(
    ("inject", "status", "expected"), [p[1:] for p in _fault_points()],
    ids=[p[0] for p in _fault_points()],
)
def test_a_fault_around_one_attempt_fails_that_attempt_and_the_runner_serves_on(
    tmp_path, monkeypatch, inject, status, expected
) -> None:
    seen: list[Any] = []

    def on_failure(ctx, error):
        seen.append(("on_failure", ctx.attempt))

    @pf.job(queue="work", max_attempts=2, base_delay=0, on_failure=on_failure)
    def work(input, ctx):
        seen.append(input)
        if input == "poison":
            if ctx.attempt == 1:
                raise ValueError("poisoned")
            return "poison!"
        return input * 2

    patch = inject(monkeypatch)
    with pf.connect(tmp_path / "db", clock=FakeClock()) as store:
        if patch is not None:
            patch(store)
        bad = store.start(work, "poison")
        goods = store.start_many(work, [1, 2, 3, 4])
        drain(store, work, concurrency=3)
        later = store.start(work, 5)  # the runner is still whole: a new runner serves it too
        drain(store, work)
        run = store.get_run(bad.id)
        assert run.status == status
        assert any(expected in h.error for h in run.history), run.history
        assert 1 <= run.attempts <= 2
        assert [store.get_run(r.id).output for r in goods] == [2, 4, 6, 8]
        assert store.get_run(later.id).output == 10
        assert seen.count(1) == 1  # results gathered beside the fault were not run again


@pytest.mark.acceptance
def test_a_worker_whose_database_is_garbled_honours_sigterm(tmp_path) -> None:
    (tmp_path / "garbled_jobs.py").write_text(textwrap.dedent('''
        import pathlib, time
        import pgflow_py as pf

        @pf.job(queue="slow", timeout=60)
        def slow(input, ctx):
            pathlib.Path(f"started-{input}").touch()
            time.sleep(2)
            return input
    '''))
    db = tmp_path / "app.db"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", "import pgflow_py as pf, garbled_jobs as j; "
         f"pf.connect({str(db)!r}).start_many(j.slow, list(range(40)))"],
        cwd=tmp_path, env=env, check=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgflow_py", "worker", "garbled_jobs", "--database", str(db),
         "--concurrency", "4", "--shutdown-timeout", "1"],
        cwd=tmp_path, env=env, text=True, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("started-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in ("app.db", "app.db-wal", "app.db-shm"):  # garbled mid-drain
            path = tmp_path / name
            if path.exists():
                path.write_bytes(os.urandom(max(path.stat().st_size, 4096)))
        time.sleep(3)  # the worker meets the garbled file and keeps retrying
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=20)  # a hang, not a speed: it took minutes before
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "not a SQLite database" in err  # said what is wrong
