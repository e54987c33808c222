"""PostgreSQL's writers side by side: claims skip each other's tasks instead of waiting, results
of different runs apply at once while one run's wait their turn, operations that must run alone
wait for the shared ones, and keyed starts from several connections still give one run a key.

Each test holds one connection's transaction open in a thread and watches what another
connection can do meanwhile; with one lock for every writer (before), the other would wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from _helpers import POSTGRES_URL
from test_postgres import _backend, schema  # noqa: F401  (the fixture)

import pgflow_py as pf
from pgflow_py.store.base import TaskSuccess

pytestmark = pytest.mark.skipif(
    POSTGRES_URL is None, reason="needs a PostgreSQL server: set $PGFLOW_TEST_POSTGRES"
)


@pf.job(queue="pg_shared_job")
def shared_job(input, ctx):
    return input


shared_flow = pf.flow("pg_shared_flow")


@shared_flow.step()
def first(input, ctx):
    return 1


@shared_flow.step(depends_on=[first])
def second(deps, ctx):
    return 2


@contextmanager
def holding(backend: Any, work: Callable[[Any], Any]) -> Iterator[Any]:
    """Run ``work(c)`` in a shared write transaction of ``backend`` in another thread and keep
    the transaction open (its locks held) until the block ends; yield what ``work`` returned."""
    held, release = threading.Event(), threading.Event()
    out: list[Any] = []
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with backend._write(shared=True) as c:
                out.append(work(c))
                held.set()
                release.wait(30)
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)
            held.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        assert not errors, errors
        yield out[0]
    finally:
        release.set()
        thread.join(30)
    assert not errors, errors


def in_thread(call: Callable[[], Any]) -> tuple[threading.Event, list[Any]]:
    """Start ``call()`` in a thread; the event is set when it returned (its result in the list)."""
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            result.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, result


def test_a_claim_takes_other_tasks_while_another_connections_claim_is_uncommitted(
    schema: str,  # noqa: F811
) -> None:
    a, b = _backend(schema), _backend(schema)
    with pf.Store(a) as store_a, pf.Store(b):
        store_a.start_many(shared_job, [{"n": i} for i in range(4)])
        with holding(a, lambda c: a._claim(c, "worker-a", [shared_job.slug], 2, 30.0,
                                           a.clock.now())[0]) as taken_by_a:
            done, result = in_thread(lambda: b.claim("worker-b", [shared_job.slug], 10, 30.0))
            # Finished while the first claim is still open: it skipped those two tasks.
            assert done.wait(20), "the second claim waited for the first one's transaction"
            taken_by_b = result[0]
        assert len(taken_by_a) == 2
        assert len(taken_by_b) == 2
        assert {row[0] for row in taken_by_a}.isdisjoint({t.id for t in taken_by_b})


def test_results_of_other_runs_apply_while_one_runs_results_wait_their_turn(
    schema: str,  # noqa: F811
) -> None:
    a, b = _backend(schema), _backend(schema)
    with pf.Store(a) as store_a, pf.Store(b) as store_b:
        busy, other = store_a.start(shared_flow, {}), store_a.start(shared_flow, {})
        tasks = {t.run_id: t for t in b.claim("worker-b", [shared_flow.slug], 10, 30.0)}

        def done_with(run_id: str) -> list[TaskSuccess]:
            t = tasks[run_id]
            return [TaskSuccess(t.id, t.attempt, "1", run_id, t.step_slug, claim=t.claim)]

        # Connection a holds the busy run's row, as a result of that run being applied does.
        with holding(a, lambda c: a._lock_runs(c, done_with(busy.id), ())):
            other_done, _ = in_thread(lambda: b.finish(done_with(other.id), ()))
            assert other_done.wait(20), "a result of another run waited"
            busy_done, _ = in_thread(lambda: b.finish(done_with(busy.id), ()))
            assert not busy_done.wait(0.5), "a result of the locked run did not wait"
        assert busy_done.wait(20)
        for run in (busy, other):
            steps = {s.slug: s.status for s in store_b.get_run(run.id).steps}
            assert steps == {"first": "completed", "second": "started"}  # its next step queued


def test_an_operation_that_runs_alone_waits_for_the_shared_writers(
    schema: str,  # noqa: F811
) -> None:
    a, b = _backend(schema), _backend(schema)
    with pf.Store(a) as store_a, pf.Store(b) as store_b:
        run = store_a.start(shared_job, {"n": 1})
        with holding(a, lambda c: a._claim(c, "worker-a", [shared_job.slug], 1, 30.0,
                                           a.clock.now())[0]):
            cancelled, result = in_thread(lambda: store_b.cancel(run.id))
            assert not cancelled.wait(0.5), "cancel ran beside an uncommitted claim"
        assert cancelled.wait(20)
        assert result[0].status == pf.RunStatus.CANCELLED


def test_keyed_starts_from_several_connections_at_once_give_each_key_one_run(
    schema: str,  # noqa: F811
) -> None:
    backends = [_backend(schema) for _ in range(4)]
    stores = [pf.Store(backend) for backend in backends]
    stores[0].register(shared_job)
    keys = [f"order-{i}" for i in range(40)]
    gate = threading.Barrier(len(stores))
    found: list[list[str]] = [[] for _ in stores]

    def start_all(index: int) -> None:
        gate.wait()
        # Each connection starts every key, half of them in the opposite order.
        order = keys if index % 2 == 0 else keys[::-1]
        for key in order:
            found[index].append(stores[index].start(shared_job, {"key": key}, key=key).id)

    threads = [threading.Thread(target=start_all, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        ids_by_key = {}
        for index, ids in enumerate(found):
            order = keys if index % 2 == 0 else keys[::-1]
            for key, run_id in zip(order, ids, strict=True):
                assert ids_by_key.setdefault(key, run_id) == run_id, key
        assert stores[0].count(shared_job) == len(keys)
        assert {r.key for r in stores[0].runs(shared_job, limit=100)} == set(keys)
    finally:
        for store in stores:
            store.close()


def test_a_shared_transaction_that_loses_a_deadlock_runs_again(
    schema: str,  # noqa: F811
) -> None:
    a, b = _backend(schema), _backend(schema)
    with pf.Store(a) as store_a, pf.Store(b):
        first, second = store_a.start(shared_flow, {}), store_a.start(shared_flow, {})

        def locking(run_id: str) -> list[TaskSuccess]:
            return [TaskSuccess(0, 1, "1", run_id, "first")]

        holds = {a: threading.Event(), b: threading.Event()}
        tries = {a: 0, b: 0}

        def body(backend: Any, mine: str, theirs: str, other: Any) -> Callable[[Any], str]:
            def run(c: Any) -> str:
                tries[backend] += 1
                backend._lock_runs(c, locking(mine), ())
                backend._translating.pipeline.sync()  # sent and granted, not just queued
                holds[backend].set()
                if tries[backend] == 1:  # the first time, each then wants the other's run
                    assert holds[other].wait(20)
                backend._lock_runs(c, locking(theirs), ())
                backend._translating.pipeline.sync()
                return mine
            return run

        done_a, result_a = in_thread(lambda: a._transact(body(a, first.id, second.id, b), shared=True))
        done_b, result_b = in_thread(lambda: b._transact(body(b, second.id, first.id, a), shared=True))
        assert done_a.wait(30) and done_b.wait(30)
        # Both committed; PostgreSQL rolled one back as the deadlock's victim, and it ran again.
        assert (result_a, result_b) == ([first.id], [second.id])
        assert sorted(tries.values()) == [1, 2]


def test_a_transaction_of_many_keyed_starts_writes_alone_rather_than_take_a_lock_per_key(
    schema: str,  # noqa: F811
) -> None:
    import uuid as uuid_module

    from pgflow_py.store.base import NewRun

    backend = _backend(schema)
    with pf.Store(backend) as store:
        store.register(shared_job)
        modes: list[bool] = []
        begin = backend._begin

        def recording_begin(shared: bool) -> None:
            modes.append(shared)
            begin(shared)

        backend._begin = recording_begin  # type: ignore[method-assign]
        now = backend.clock.now()

        def keyed(n: int, prefix: str) -> list[NewRun]:
            return [NewRun(str(uuid_module.uuid4()), "1", now, now, key=f"{prefix}-{i}")
                    for i in range(n)]

        backend.start_runs(shared_job.definition, keyed(10, "few"))
        assert modes == [True]  # ten key locks, beside other writers
        modes.clear()
        # More keys than the server's lock table holds per connection by default (64).
        ids = backend.start_runs(shared_job.definition, keyed(100, "many"))
        assert modes == [True, False]  # tried shared, then wrote alone
        again = backend.start_runs(shared_job.definition, keyed(100, "many"))
        assert again == ids  # each key still has its one run
        assert store.count(shared_job) == 110
