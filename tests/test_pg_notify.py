"""LISTEN/NOTIFY wake-ups on PostgreSQL: a runner picks up work committed by another
connection at once, not at its next poll; schemas do not wake each other; polling covers a
lost LISTEN connection until it is back; a runner with one stops promptly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import POSTGRES_URL

import pgflow_py as pf
from pgflow_py.clock import SystemClock
from pgflow_py.runtime.runner import Runner

pytestmark = pytest.mark.skipif(
    POSTGRES_URL is None, reason="needs a PostgreSQL server: set $PGFLOW_TEST_POSTGRES"
)

POLL = 5.0  # seconds: a pick-up much faster than this is a notification's doing


def _store(schema: str) -> pf.Store:
    from pgflow_py.store.postgres import PostgresBackend

    assert POSTGRES_URL is not None
    return pf.Store(PostgresBackend(POSTGRES_URL, SystemClock(), schema=schema))


def _new_schema() -> str:
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def schemas() -> Iterator[Callable[[], str]]:
    import psycopg

    made: list[str] = []

    def make() -> str:
        made.append(_new_schema())
        return made[-1]

    yield make
    assert POSTGRES_URL is not None
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        for name in made:
            db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pf.job(queue="pg_notify_echo")
def pg_notify_echo(input: Any, ctx: pf.Context) -> Any:
    return input


class _Serving:
    """A runner of ``pg_notify_echo`` in a thread of its own, polling every ``POLL`` s."""

    def __init__(self, store: pf.Store, **options: Any) -> None:
        self.runner = Runner(
            store, [pg_notify_echo], concurrency=4, until_idle=False, resources={},
            lease=30.0, poll_interval=POLL, shutdown_timeout=options.get("shutdown_timeout", 5.0),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.runner._listener is None or not self.runner._listener.connected:
            assert time.monotonic() < deadline, "the runner never listened"
            time.sleep(0.01)
        # Idle long enough, the runner polls every POLL seconds; skip the short polls first.
        self.runner._pause = POLL
        time.sleep(0.3)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.runner.run()

        asyncio.run(main())

    def stop(self, timeout: float = 10.0) -> float:
        """Stop the runner; return how long it took to return."""
        began = time.monotonic()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.runner.stop)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the runner did not stop"
        return time.monotonic() - began


def _picked_up_within(other: pf.Store, seconds: float) -> float:
    """Start a run from ``other`` (another connection); return how long until it completed."""
    began = time.monotonic()
    run = other.start(pg_notify_echo, {"n": 1})
    done = other.wait(run.id, timeout=seconds)
    assert done.status == pf.RunStatus.COMPLETED
    return time.monotonic() - began


def test_work_from_another_connection_is_picked_up_at_once(
    schemas: Callable[[], str],
) -> None:
    schema = schemas()
    with _store(schema) as store, _store(schema) as other:
        other.register(pg_notify_echo)
        serving = _Serving(store)
        try:
            took = [_picked_up_within(other, POLL * 2) for _ in range(5)]
            runs = other.start_many(pg_notify_echo, [1, 2, 3])
            assert [other.wait(r.id, timeout=POLL * 2).output for r in runs] == [1, 2, 3]
        finally:
            serving.stop()
    # store.wait on the other connection looks every few ms; a poll would take POLL seconds
    assert max(took) < 1.0, took


def test_a_retry_from_another_connection_is_picked_up_at_once(
    schemas: Callable[[], str],
) -> None:
    schema = schemas()
    with _store(schema) as store, _store(schema) as other:
        run = other.start(pg_notify_echo, {"n": 2})
        other.cancel(run.id)
        serving = _Serving(store)
        try:
            began = time.monotonic()
            other.retry(run.id)
            assert other.wait(run.id, timeout=POLL * 2).status == pf.RunStatus.COMPLETED
            took = time.monotonic() - began
        finally:
            serving.stop()
    assert took < 1.0


def test_schemas_do_not_wake_each_other(schemas: Callable[[], str]) -> None:
    from pgflow_py.store.postgres.listen import channel_for

    first, second = schemas(), schemas()
    assert channel_for(first) != channel_for(second)
    long_a, long_b = "a" * 60 + "_x", "a" * 60 + "_y"
    assert channel_for(long_a) != channel_for(long_b)
    assert len(channel_for(long_a)) <= 63
    with _store(first) as store, _store(first) as same, _store(second) as other:
        woken: list[frozenset[str] | None] = []
        listener = store.backend.listen(woken.append)  # type: ignore[attr-defined]
        try:
            assert listener.connected
            other.start(pg_notify_echo, {"n": 3})
            other.start_many(pg_notify_echo, [4, 5])
            time.sleep(0.5)
            assert woken == []  # another schema's work
            same.start(pg_notify_echo, {"n": 6})
            deadline = time.monotonic() + 5
            while not woken and time.monotonic() < deadline:
                time.sleep(0.01)
            assert woken == [frozenset({"pg_notify_echo"})]
            store.start(pg_notify_echo, {"n": 7})  # its own connection: not news
            time.sleep(0.3)
            assert len(woken) == 1
        finally:
            listener.close()


def test_one_notification_per_transaction_not_per_row(schemas: Callable[[], str]) -> None:
    schema = schemas()
    with _store(schema) as store, _store(schema) as other:
        other.register(pg_notify_echo)
        woken: list[frozenset[str] | None] = []
        listener = store.backend.listen(woken.append)  # type: ignore[attr-defined]
        try:
            other.start_many(pg_notify_echo, list(range(50)))
            time.sleep(0.5)
        finally:
            listener.close()
    assert woken == [frozenset({"pg_notify_echo"})]


def _terminate_listeners(schema: str) -> int:
    import psycopg

    from pgflow_py.store.postgres.listen import channel_for

    assert POSTGRES_URL is not None
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        # A LISTEN connection's last statement is its LISTEN.
        return len(db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
            (f"LISTEN {channel_for(schema)}",),
        ).fetchall())


def test_the_listener_reconnects_after_its_connection_is_terminated(
    schemas: Callable[[], str], caplog: pytest.LogCaptureFixture,
) -> None:
    schema = schemas()
    with _store(schema) as store, _store(schema) as other:
        other.register(pg_notify_echo)
        serving = _Serving(store)
        try:
            assert _terminate_listeners(schema) == 1
            # Picked up meanwhile, at worst by polling (the LISTEN connection may be down).
            assert _picked_up_within(other, POLL * 3) < POLL * 3
            listener = serving.runner._listener
            assert listener is not None
            deadline = time.monotonic() + 10
            while not listener.connected:
                assert time.monotonic() < deadline, "the listener never reconnected"
                time.sleep(0.01)
            serving.runner._pause = POLL
            time.sleep(0.3)
            assert _picked_up_within(other, POLL * 2) < 1.0  # notified again
        finally:
            serving.stop()
    lost = [r for r in caplog.records if "lost the LISTEN connection" in r.getMessage()]
    assert len(lost) == 1


def test_a_runner_with_a_listener_stops_promptly(schemas: Callable[[], str]) -> None:
    schema = schemas()
    with _store(schema) as store:
        serving = _Serving(store)
        assert serving.stop() < 2.0
    assert not [t for t in threading.enumerate() if t.name.startswith("pgflow-listen-")]


WORKER = textwrap.dedent("""
    import sys
    import pgflow_py as pf
    from pgflow_py.clock import SystemClock
    from pgflow_py.store.postgres import PostgresBackend

    @pf.job(queue="pg_notify_remote")
    def pg_notify_remote(input, ctx):
        return input

    store = pf.Store(PostgresBackend(sys.argv[1], SystemClock(), schema=sys.argv[2]))
    print("serving", flush=True)
    pf.run_flows([pg_notify_remote], store=store, poll_interval=5.0, shutdown_timeout=3.0)
    print("stopped", flush=True)
""")


def test_a_worker_process_with_a_listener_stops_on_sigterm(
    schemas: Callable[[], str], tmp_path: Path,
) -> None:
    schema = schemas()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    assert POSTGRES_URL is not None
    worker = subprocess.Popen(
        [sys.executable, str(script), POSTGRES_URL, schema], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "serving"
        with _store(schema) as other:
            deadline = time.monotonic() + 20
            while True:  # the worker registers the flow as it starts serving
                try:
                    run = other.start("pg_notify_remote", {"n": 8})
                    break
                except pf.FlowNotFound:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert other.wait(run.id, timeout=POLL * 2).output == {"n": 8}
            time.sleep(2.6)  # idle, into a poll of 2.56 s (5 ms doubling)
            took = _picked_up_within_remote(other)
            assert took < 1.0
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
        assert time.monotonic() - began < 3.0
        assert worker.stdout.read().strip() == "stopped"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _picked_up_within_remote(other: pf.Store) -> float:
    began = time.monotonic()
    run = other.start("pg_notify_remote", {"n": 9})
    assert other.wait(run.id, timeout=POLL * 2).status == pf.RunStatus.COMPLETED
    return time.monotonic() - began
