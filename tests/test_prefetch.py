"""The runner's prefetch buffer: with short attempts a runner claims ahead of its workers.

What a user relies on, on both databases: tasks claimed ahead are leased like running ones (the
heartbeat renews them; one taken away is never run), they go back to the queue untouched when
the runner stops, a task's timeout counts from when it starts, nothing is buffered while
attempts are long, and two runners claiming ahead still run each task once.

Each test first runs a few no-op jobs, so the runner has seen short attempts and claims ahead;
whether it did is checked through the store (more runs "running" than the runner has workers),
so a test cannot pass because nothing was buffered.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from typing import Any

import pytest
from _helpers import BACKENDS, serve_then_stop, shared_database

import pgflow_py as pf
from pgflow_py.runtime.runner import _BUFFER_CAP, _Prefetch

WARM_UP = 5  # no-op jobs first: the runner sees short attempts and starts claiming ahead


def _running(store: pf.Store, slug: str) -> int:
    """Runs of ``slug`` whose task is claimed (running, or waiting in a runner's buffer)."""
    return len(store.runs(flow=slug, status=pf.RunStatus.RUNNING, limit=1000))


def _sleepy_job(slug: str, calls: list[str], **options: Any) -> pf.Job:
    """A job that sleeps ``input["sleep"]`` seconds (0: returns at once) and records its run."""

    @pf.job(queue=slug, **options)
    async def handler(input: dict[str, Any], ctx: pf.Context) -> str:
        calls.append(ctx.run_id)
        if input["sleep"]:
            await asyncio.sleep(input["sleep"])
        return "ok"

    return handler


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffered_tasks_keep_their_leases_while_they_wait(backend: str) -> None:
    """Tasks claimed behind a slow one wait longer than the lease: the heartbeat renews their
    leases, so the runner's own reclaim does not fail them as lost."""
    calls: list[str] = []
    seen_running: list[int] = []
    slug = "prefetch_leases"

    @pf.job(queue=slug, max_attempts=1)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        calls.append(ctx.run_id)
        if input["sleep"]:
            seen_running.append(_running(observer, slug))
            await asyncio.sleep(input["sleep"])
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        inputs = [{"sleep": 0}] * WARM_UP + [{"sleep": 1.2}] + [{"sleep": 0}] * 10
        runs = store.start_many(job, inputs)
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=1, lease=0.3,
                             handle_signals=False)
        assert seen_running and seen_running[0] > 1, "nothing was buffered behind the slow task"
        done = [store.get_run(run.id) for run in runs]
        assert [run.status for run in done] == [pf.RunStatus.COMPLETED] * len(runs)
        assert all(run.attempts == 1 for run in done)
        assert Counter(calls) == Counter(run.id for run in runs)
        assert stats.completed == len(runs) and stats.failed == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_buffered_task_taken_away_is_never_run(backend: str) -> None:
    """A run cancelled while its task waits in the buffer: the heartbeat reports the task lost,
    and the runner drops it instead of running it. (Cancelled through the runner's own store,
    which looks at its leases at once; from elsewhere, at the next heartbeat.)"""
    calls: list[str] = []
    seen_running: list[int] = []
    slug = "prefetch_lost"
    victims: list[str] = []

    @pf.job(queue=slug)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        calls.append(ctx.run_id)
        if input["sleep"]:
            seen_running.append(_running(observer, slug))
            for run_id in victims:
                store.cancel(run_id)
            await asyncio.sleep(input["sleep"])
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        inputs = [{"sleep": 0}] * WARM_UP + [{"sleep": 0.5}] + [{"sleep": 0}] * 6
        runs = store.start_many(job, inputs)
        victims += [runs[-4].id, runs[-1].id]
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=1,
                             handle_signals=False)
        assert seen_running and seen_running[0] > 1, "nothing was buffered behind the slow task"
        assert not set(victims) & set(calls), "a cancelled run's buffered task was run"
        for run in runs:
            expected = (
                pf.RunStatus.CANCELLED if run.id in victims else pf.RunStatus.COMPLETED
            )
            assert store.get_run(run.id).status is expected
        assert stats.completed == len(runs) - len(victims)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffered_tasks_go_back_to_the_queue_at_stop(backend: str) -> None:
    """At stop, tasks claimed ahead and never started are released at once (while the running
    one finishes), not failed: queued again, no attempt counted, and not run here."""
    calls: list[str] = []
    slug = "prefetch_stop"
    started = threading.Event()
    seen: dict[str, Any] = {}

    @pf.job(queue=slug, max_attempts=1)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        calls.append(ctx.run_id)
        if input["sleep"]:
            seen["running"] = _running(observer, slug)
            started.set()
            while not ctx.shutting_down:
                await asyncio.sleep(0.01)
            # The rest are back in the queue before this attempt ends.
            end = time.monotonic() + 5
            while time.monotonic() < end:
                queued = len(observer.runs(flow=slug, status=pf.RunStatus.QUEUED))
                if queued == 8:
                    break
                await asyncio.sleep(0.02)
            seen["queued"] = queued
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        inputs = [{"sleep": 0}] * WARM_UP + [{"sleep": 1}] + [{"sleep": 0}] * 8
        runs = store.start_many(job, inputs)
        stats, _ = serve_then_stop(store, [job], started, concurrency=1, shutdown_timeout=10)
        assert seen["running"] > 1, "nothing was buffered behind the slow task"
        assert seen["queued"] == 8, "buffered tasks were not released while one still ran"
        assert stats.completed == WARM_UP + 1 and stats.failed == 0 and stats.cancelled == 0
        assert Counter(calls) == Counter(run.id for run in runs[:WARM_UP + 1])
        for run in runs[WARM_UP + 1:]:
            left = store.get_run(run.id)
            assert left.status is pf.RunStatus.QUEUED
            assert left.attempts == 0
        # And another runner runs them once each.
        again = pf.run_flows([job], store=store, until_idle=True, handle_signals=False)
        assert again.completed == 8
        assert all(store.get_run(run.id).status is pf.RunStatus.COMPLETED for run in runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_buffered_tasks_timeout_counts_from_its_start(backend: str) -> None:
    """Tasks that wait in the buffer longer than their timeout still get all of it once they
    start (the context's deadline too)."""
    slug = "prefetch_timeout"
    seen_running: list[int] = []
    deadlines: list[float] = []

    @pf.job(queue=slug, timeout=0.6, max_attempts=1)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        if input["sleep"]:
            assert ctx.deadline is not None
            deadlines.append(ctx.deadline.timestamp() - time.time())
            seen_running.append(_running(observer, slug))
            await asyncio.sleep(input["sleep"])
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        # The second and third slow tasks are claimed with the first: they wait 0.4 and 0.8 s
        # in the buffer, then run 0.4 s each, within their 0.6 s.
        inputs = [{"sleep": 0}] * WARM_UP + [{"sleep": 0.4}] * 3
        runs = store.start_many(job, inputs)
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=1,
                             handle_signals=False)
        assert seen_running and seen_running[0] >= 3, "the slow tasks were not claimed together"
        assert stats.timed_out == 0 and stats.failed == 0
        assert all(store.get_run(run.id).status is pf.RunStatus.COMPLETED for run in runs)
        assert min(deadlines) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_is_claimed_ahead_while_attempts_are_long(backend: str) -> None:
    """Attempts far longer than an exchange: the runner claims for idle workers only, leaving
    the rest queued for other workers."""
    slug = "prefetch_long"
    seen_running: list[int] = []

    @pf.job(queue=slug)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        seen_running.append(_running(observer, slug))
        await asyncio.sleep(input["sleep"])
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        runs = store.start_many(job, [{"sleep": 0.15}] * 8)
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=2,
                             handle_signals=False)
        assert stats.completed == len(runs)
        assert max(seen_running) <= 2


def test_prefetch_targets_short_attempts_only_and_is_bounded() -> None:
    prefetch = _Prefetch(concurrency=10)
    assert prefetch.target() == 0  # nothing measured yet
    prefetch.exchange_took(0.001)
    for _ in range(20):
        prefetch.attempt_took(0.00002)  # a no-op
    assert prefetch.target() == prefetch.cap == 90  # an exchange tops up to 100 tasks
    for _ in range(100):
        prefetch.attempt_took(0.5)  # a network call
    assert prefetch.target() == 0
    assert _Prefetch(concurrency=2000).cap == _BUFFER_CAP
    assert _Prefetch(concurrency=1).cap == 99
    wide = _Prefetch(concurrency=100)
    wide.attempt_took(0.00002)
    assert wide.target() == 25  # a quarter of the concurrency, past 80
    # Between the two: what the workers get through in about an exchange's time.
    middle = _Prefetch(concurrency=10)
    middle.exchange_took(0.001)
    middle.attempt = 0.0002
    assert middle.target() == 40  # 10 workers get through 50 attempts in an exchange
    middle.attempt = 0.001  # as long as an exchange: no gain
    assert middle.target() == 0
    slow_store = _Prefetch(concurrency=10)
    slow_store.exchange = 0.05
    slow_store.attempt = 0.006  # shorter than the exchange, but long enough on its own
    assert slow_store.target() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runners_claiming_ahead_run_each_task_once(backend: str) -> None:
    """Two runners on one database, both buffering, short leases, a few slow tasks that keep
    buffered ones waiting past the lease: every task runs exactly once."""
    slug = "prefetch_twice"
    calls: list[str] = []
    seen_running: list[int] = []
    lock = threading.Lock()

    @pf.job(queue=slug, max_attempts=3, base_delay=0)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        with lock:
            calls.append(ctx.run_id)
        if input["sleep"]:
            seen_running.append(_running(observer, slug))
            await asyncio.sleep(input["sleep"])
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        inputs = [{"sleep": 0.5 if i % 100 == 50 else 0} for i in range(400)]
        runs = store.start_many(job, inputs)
        results: list[pf.RunnerStats] = []
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                results.append(pf.run_flows([job], store=open_store(), until_idle=True,
                                            concurrency=2, lease=0.3, handle_signals=False))
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=serve) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors and len(results) == 2
        assert max(seen_running) > 4, "neither runner buffered"
        assert Counter(calls) == Counter(run.id for run in runs)
        assert sum(r.completed for r in results) == len(runs)
        done = [store.get_run(run.id) for run in runs]
        assert all(run.status is pf.RunStatus.COMPLETED and run.attempts == 1 for run in done)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_attempts_are_exchanged_in_batches_larger_than_the_concurrency(
    backend: str,
) -> None:
    """One worker, no-op jobs: results and claims travel in batches of dozens, not one per
    exchange as the concurrency alone would allow; each result is still recorded once."""
    slug = "prefetch_batches"
    calls: list[str] = []
    job = _sleepy_job(slug, calls)

    with shared_database(backend) as open_store:
        store = open_store()
        runs = store.start_many(job, [{"sleep": 0}] * 300)
        backend_ = store.backend
        exchange = backend_.finish_and_claim
        sizes: list[tuple[int, int]] = []  # (results written, tasks claimed) per exchange

        def counting(successes: Any, failures: Any, *args: Any) -> Any:
            finished, claimed = exchange(successes, failures, *args)
            sizes.append((len(successes) + len(failures), len(claimed)))
            return finished, claimed

        backend_.finish_and_claim = counting  # type: ignore[method-assign]
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=1,
                             handle_signals=False)
        assert stats.completed == len(runs)
        assert sum(written for written, _ in sizes) == len(runs)
        assert len(sizes) < len(runs) / 5
        assert max(claimed for _, claimed in sizes) > 16
        assert max(written for written, _ in sizes) > 16
        assert Counter(calls) == Counter(run.id for run in runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_written_within_a_window_while_the_buffer_is_full(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result does not wait for the buffer to run low: with the only worker busy on a slow
    task and the buffer full behind it, the result before it is written within the window.
    (The buffer's size is fixed here: what it adapts to is tested above.)"""
    monkeypatch.setattr(_Prefetch, "target", lambda self: 40)
    slug = "prefetch_window"
    seen: dict[str, Any] = {}
    fast: list[str] = []

    @pf.job(queue=slug)
    async def job(input: dict[str, Any], ctx: pf.Context) -> str:
        if input["sleep"]:
            seen["running"] = _running(observer, slug)
            began = time.monotonic()
            while time.monotonic() - began < input["sleep"]:
                if observer.get_run(fast[0]).status is pf.RunStatus.COMPLETED:
                    seen["recorded after"] = time.monotonic() - began
                    break
                await asyncio.sleep(0.01)
        return "ok"

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        inputs = [{"sleep": 0}] * (WARM_UP + 1) + [{"sleep": 2}] + [{"sleep": 0}] * 60
        runs = store.start_many(job, inputs)
        fast.append(runs[WARM_UP].id)
        stats = pf.run_flows([job], store=store, until_idle=True, concurrency=1,
                             handle_signals=False)
        assert stats.completed == len(runs)
        assert seen["running"] > 21, "the buffer was not over half full behind the slow task"
        assert seen.get("recorded after", math.inf) < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_for_good_cancels_the_runs_buffered_tasks_unstarted(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map task fails for good while its siblings wait in the buffer: they never start, and
    are cancelled as queued tasks are, with no attempt counted. (Buffer size fixed here.)"""
    monkeypatch.setattr(_Prefetch, "target", lambda self: 40)
    calls: list[int] = []
    started: list[int] = []
    flow = pf.flow("prefetch_fan_out", max_attempts=1)

    @flow.step()
    async def items(input: Any, ctx: pf.Context) -> list[int]:
        return list(range(20))

    @flow.map(array=items)
    async def work(item: int, ctx: pf.Context) -> int:
        calls.append(item)
        if item == 0:
            run = observer.get_run(ctx.run_id)
            started.append(sum(t.status == "started" for t in run.step("work").tasks))
            raise ValueError("element 0 is broken")
        return item

    with shared_database(backend) as open_store:
        store, observer = open_store(), open_store()
        run = store.start(flow, {})
        stats = pf.run_flows([flow], store=store, until_idle=True, concurrency=1,
                             handle_signals=False)
        assert started == [20], "the siblings were not buffered"
        assert calls == [0]
        failed = store.get_run(run.id)
        assert failed.status is pf.RunStatus.FAILED
        tasks = failed.step("work").tasks
        assert [t.status for t in tasks[1:]] == ["cancelled"] * 19
        assert all(t.attempts == 0 for t in tasks[1:])
        assert stats.failed == 1 and stats.cancelled == 0
