"""Group commit of concurrent ``store.start`` calls: starts that arrive while a commit is in
flight join the next one, and each caller gets its own run or its own error, as if the starts
had been made one after another in the order they queued."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import fresh_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgflow_py as pf


@pf.job(queue="gc_echo")
def gc_echo(input: Any, ctx: pf.Context) -> Any:
    return input


@pf.job(queue="gc_other")
def gc_other(input: Any, ctx: pf.Context) -> Any:
    return input


shaped = pf.flow("gc_shaped")


@shaped.step()
def first(input: Any, ctx: pf.Context) -> Any:
    return input


reshaped = pf.flow("gc_shaped")  # the same flow, deployed with another step


@reshaped.step()
def second(input: Any, ctx: pf.Context) -> Any:
    return input


def _transactions(store: pf.Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of runs each start transaction commits, appended as they commit."""
    backend: Any = store.backend
    sizes: list[int] = []
    real = backend._started_runs

    def record(count: int) -> None:
        sizes.append(count)
        real(count)

    monkeypatch.setattr(backend, "_started_runs", record)
    return sizes


def _fields(run: pf.Run) -> tuple[Any, ...]:
    """What ``start`` returns of a run (its steps' detail is read from the database)."""
    return (run.id, run.flow_slug, run.status, run.input, run.key, run.priority,
            run.created_at)


class _Outcome:
    def __init__(self) -> None:
        self.run: pf.Run | None = None
        self.error: BaseException | None = None


def _queued(store: pf.Store) -> int:
    backend: Any = store.backend
    with backend._starts_mutex:
        return len(backend._starts_queue)


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if timeout < 10 and time.monotonic() >= deadline:
            return
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _in_one_batch(
    store: pf.Store, calls: list[Callable[[], pf.Run]], by_slug: frozenset[int] = frozenset()
) -> list[_Outcome]:
    """Make ``calls`` (each a ``store.start``) from a thread each, queued in this order while
    the store's write lock is held here, so that they commit as one batch. The calls numbered
    in ``by_slug`` start a flow by a slug that is not stored: they wait for the lock to read
    it, then fail without queueing."""
    backend: Any = store.backend
    outcomes = [_Outcome() for _ in calls]
    threads: list[threading.Thread] = []

    def call(outcome: _Outcome, function: Callable[[], pf.Run]) -> None:
        try:
            outcome.run = function()
        except BaseException as exc:
            outcome.error = exc

    with backend._lock:  # the leader waits for it; everyone after queues behind the leader
        queued = 0
        for i, (outcome, function) in enumerate(zip(outcomes, calls, strict=True)):
            thread = threading.Thread(target=call, args=(outcome, function))
            thread.start()
            threads.append(thread)
            # Each queues before the next starts (or fails validation without queueing).
            _wait_for(
                lambda t=thread, q=queued: _queued(store) > q or not t.is_alive(),
                0.05 if i in by_slug else 10,
            )
            queued = _queued(store)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    return outcomes


@pytest.fixture
def gc_store(tmp_path: Path) -> Iterator[pf.Store]:
    with fresh_store(tmp_path / "gc.db") as store:
        yield store


def test_a_single_caller_commits_alone_and_at_once(
    gc_store: pf.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _transactions(gc_store, monkeypatch)
    run = gc_store.start(gc_echo, {"n": 1})
    assert sizes == [1]
    stored = gc_store.get_run(run.id)
    assert (stored.status, stored.input, stored.flow_slug) == ("queued", {"n": 1}, "gc_echo")
    assert _fields(run) == _fields(stored)
    keyed = gc_store.start(gc_echo, {"n": 2}, key="k")
    assert gc_store.start(gc_echo, {"n": 3}, key="k").id == keyed.id
    assert gc_store.get_run(keyed.id).input == {"n": 2}
    assert sizes == [1, 1, 1]
    backend: Any = gc_store.backend
    assert not backend._starts_committing and not backend._starts_queue


def test_starts_queued_during_a_commit_join_one_batch(
    gc_store: pf.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc_store.register(gc_echo)
    gc_store.register(gc_other)
    sizes = _transactions(gc_store, monkeypatch)
    calls: list[Callable[[], pf.Run]] = [
        (lambda i=i: gc_store.start(gc_echo if i % 3 else gc_other, {"i": i}, priority=i))
        for i in range(10)
    ]
    outcomes = _in_one_batch(gc_store, calls)
    assert sizes == [10]
    for i, outcome in enumerate(outcomes):
        assert outcome.error is None and outcome.run is not None
        stored = gc_store.get_run(outcome.run.id)
        assert stored.input == {"i": i} and stored.priority == i
        assert stored.flow_slug == ("gc_echo" if i % 3 else "gc_other")
        assert _fields(stored) == _fields(outcome.run)
    assert len({o.run.id for o in outcomes if o.run}) == 10


def test_many_threads_each_get_their_own_committed_runs_in_order(gc_store: pf.Store) -> None:
    threads, each = 8, 60
    runs: dict[int, list[pf.Run]] = {t: [] for t in range(threads)}
    gate = threading.Barrier(threads)

    def starter(t: int) -> None:
        gate.wait()
        for i in range(each):
            runs[t].append(gc_store.start(gc_echo, {"t": t, "i": i}))

    workers = [threading.Thread(target=starter, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert not worker.is_alive()
    listed = list(reversed(gc_store.runs(flow=gc_echo, limit=threads * each)))
    assert len(listed) == threads * each
    by_id = {run.id: run for run in listed}
    for t in range(threads):
        assert [run.input for run in runs[t]] == [{"t": t, "i": i} for i in range(each)]
        for run in runs[t]:
            assert _fields(by_id[run.id]) == _fields(run)  # committed, and returned as stored
        # In each thread's order in the listing (the order of insertion).
        assert [run.input["i"] for run in listed if run.input["t"] == t] == list(range(each))


def test_a_bad_start_in_a_batch_fails_alone(
    gc_store: pf.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = gc_store.start(shaped, "blocks a change of shape")
    sizes = _transactions(gc_store, monkeypatch)
    calls: list[Callable[[], pf.Run]] = [
        lambda: gc_store.start(gc_echo, 1),
        lambda: gc_store.start(reshaped, "refused: a run of the old shape is unfinished"),
        lambda: gc_store.start(gc_echo, 2),
        lambda: gc_store.start(gc_echo, {1, 2}),  # not JSON: refused before queueing
        lambda: gc_store.start("gc_missing", 3),  # unknown flow: refused before queueing
        lambda: gc_store.start(gc_other, 4, key="k"),
    ]
    outcomes = _in_one_batch(gc_store, calls, frozenset({4}))
    assert isinstance(outcomes[1].error, pf.ShapeMismatch)
    assert isinstance(outcomes[3].error, pf.InputError)
    assert isinstance(outcomes[4].error, pf.FlowNotFound)
    good = [outcomes[i] for i in (0, 2, 5)]
    for outcome, value in zip(good, (1, 2, 4), strict=True):
        assert outcome.error is None and outcome.run is not None
        assert gc_store.get_run(outcome.run.id).input == value
    # The batch of four failed as a whole, then each was committed alone, in queued order.
    assert sizes == [1, 1, 1]
    assert [r.input for r in reversed(gc_store.runs())] == [
        "blocks a change of shape", 1, 2, 4
    ]
    assert gc_store.get_run(blocker.id).flow_slug == "gc_shaped"


def test_the_same_key_twice_in_a_batch_behaves_as_one_after_another(
    gc_store: pf.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = gc_store.start(gc_echo, "earlier", key="old")
    sizes = _transactions(gc_store, monkeypatch)
    calls: list[Callable[[], pf.Run]] = [
        lambda: gc_store.start(gc_echo, "a1", key="a"),
        lambda: gc_store.start(gc_echo, "b1", key="b"),
        lambda: gc_store.start(gc_echo, "a2", key="a"),
        lambda: gc_store.start(gc_other, "a-other", key="a"),  # another flow: its own run
        lambda: gc_store.start(gc_echo, "old2", key="old"),
        lambda: gc_store.start(gc_echo, "a3", key="a"),
    ]
    outcomes = _in_one_batch(gc_store, calls)
    assert sizes == [6]
    runs = [o.run for o in outcomes]
    assert all(o.error is None for o in outcomes) and all(runs)
    assert [r.input for r in runs if r] == ["a1", "b1", "a1", "a-other", "earlier", "a1"]
    ids = [r.id for r in runs if r]
    assert ids[0] == ids[2] == ids[5] and ids[4] == earlier.id
    assert len(set(ids)) == 4
    assert len(gc_store.runs(flow=gc_echo, key="a")) == 1
    assert len(gc_store.runs()) == 4


def test_a_closed_store_fails_every_queued_start(tmp_path: Path) -> None:
    with fresh_store(tmp_path / "closed.db") as store:
        store.register(gc_echo)
        backend: Any = store.backend
        backend._closed = True  # as close() leaves it, without closing the connection
        try:
            outcomes = _in_one_batch(store, [lambda i=i: store.start(gc_echo, i) for i in range(3)])
        finally:
            backend._closed = False
        assert all(isinstance(o.error, pf.StoreError) for o in outcomes)
        assert "closed" in str(outcomes[0].error)
        assert store.runs() == []
        assert not backend._starts_committing and not backend._starts_queue


# --- concurrent mixes against a sequential model -------------------------------------------------

_FLOWS = {"echo": gc_echo, "other": gc_other}
_starts = st.lists(
    st.tuples(
        st.sampled_from(["echo", "other", "missing"]),
        st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
        st.booleans(),  # a good input, or one that is not JSON
    ),
    min_size=1,
    max_size=8,
)


def _call(store: pf.Store, i: int, flow: str, key: str | None, good: bool) -> pf.Run:
    return store.start(_FLOWS.get(flow, "gc_missing"), i if good else {i}, key=key)


def _summary(outcomes: list[tuple[pf.Run | None, BaseException | None]]) -> list[Any]:
    """Each start's error type, or the input its run has (the start that made it)."""
    return [
        type(error).__name__ if error is not None else (run.flow_slug, run.input, run.key)
        for run, error in outcomes
    ]


@settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(starts=_starts, earlier=st.lists(st.sampled_from(["k1", "k2"]), max_size=1))
def test_a_concurrent_batch_matches_starting_one_after_another(
    tmp_path: Path, starts: list[tuple[str, str | None, bool]], earlier: list[str]
) -> None:
    results = []
    for batched in (False, True):
        with fresh_store(tmp_path / f"{uuid.uuid4().hex}.db") as store:
            store.register(gc_echo)
            store.register(gc_other)
            for key in earlier:
                store.start(gc_echo, "earlier", key=key)
            calls: list[Callable[[], pf.Run]] = [
                (lambda i=i, s=s: _call(store, i, *s)) for i, s in enumerate(starts)
            ]
            if batched:
                missing = frozenset(i for i, s in enumerate(starts) if s[0] == "missing")
                outcomes = [(o.run, o.error) for o in _in_one_batch(store, calls, missing)]
            else:
                outcomes = []
                for function in calls:
                    try:
                        outcomes.append((function(), None))
                    except pf.PgflowError as exc:
                        outcomes.append((None, exc))
            stored = [(r.flow_slug, r.input, r.key) for r in reversed(store.runs(limit=1000))]
            results.append((_summary(outcomes), stored))
    assert results[1] == results[0]
