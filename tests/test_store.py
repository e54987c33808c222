"""The public store: starting runs, reading them, control (cancel/retry/prune), schema, register."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from _helpers import as_schema_version, drain

import pgflow_py as pf
from pgflow_py.store.sqlite import SCHEMA_VERSION

# --- module-level jobs and flows ----------------------------------------------------------------


@pf.job(queue="echo")
def echo(input: Any, ctx: pf.Context) -> Any:
    return input


@pf.job(queue="other_echo")
def other_echo(input: Any, ctx: pf.Context) -> Any:
    return input


pipeline = pf.flow("pipeline")


@pipeline.step()
def fetch(input: Any, ctx: pf.Context) -> Any:
    return {"n": input["n"]}


@pipeline.step(depends_on=["fetch"])
def double(deps: Any, ctx: pf.Context) -> Any:
    return deps["fetch"]["n"] * 2


# --- helpers ------------------------------------------------------------------------------------


def table_counts(path: Path) -> dict[str, int]:
    """Row count of every table in the SQLite file (read through a separate connection)."""
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        conn.close()


def assert_identical(actual: Any, expected: Any) -> None:
    """Equal, and of the same type all the way down (False is not 0, 0 is not 0.0)."""
    assert type(actual) is type(expected), f"{actual!r} is {type(actual)}, not {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for k in expected:
            assert_identical(actual[k], expected[k])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_identical(a, e)
    else:
        assert actual == expected



# --- Run fields ---------------------------------------------------------------------------------


def test_started_run_fields(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    run = store.start(echo, {"to": "a@b"})
    assert isinstance(run, pf.Run)
    assert isinstance(run.id, str) and run.id
    assert run.flow_slug == "echo"
    assert isinstance(run.status, pf.RunStatus)
    assert isinstance(run.status, str)
    assert run.status == pf.RunStatus.QUEUED == "queued"
    assert run.input == {"to": "a@b"}
    assert run.output is None and run.error is None
    assert run.key is None and run.priority == 0
    assert run.created_at.tzinfo is not None
    assert run.created_at == clock.datetime()
    assert run.started_at is None and run.finished_at is None
    assert run.attempts == 0
    assert [s.slug for s in run.steps] == ["echo"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        run.status = pf.RunStatus.COMPLETED  # type: ignore[misc]

    stored = store.get_run(run.id)
    assert stored.id == run.id
    assert stored.status == pf.RunStatus.QUEUED
    assert stored.input == {"to": "a@b"}
    assert stored.created_at == run.created_at
    assert stored.started_at is None and stored.finished_at is None
    assert stored.attempts == 0


def test_run_fields_after_processing(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    run = store.start(echo, {"x": 1})
    assert store.get_run(run.id).started_at is None
    clock.advance(5)
    drain(store, echo)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED
    assert done.output == {"x": 1}
    assert done.error is None
    assert done.started_at is not None and done.started_at.tzinfo is not None
    assert done.finished_at is not None and done.finished_at.tzinfo is not None
    assert done.created_at < done.started_at <= done.finished_at
    assert done.attempts == 1
    (step,) = done.steps
    assert isinstance(step, pf.StepRun)
    assert (step.slug, step.status, step.attempts, step.output) == ("echo", "completed", 1, {"x": 1})


def test_flow_steps_in_order_with_status_and_output(store: pf.Store) -> None:
    run = store.start(pipeline, {"n": 21})
    assert [s.slug for s in run.steps] == ["fetch", "double"]
    before = store.get_run(run.id)
    assert [(s.slug, s.status, s.attempts) for s in before.steps] == [
        ("fetch", "started", 0),
        ("double", "created", 0),
    ]
    drain(store, pipeline)
    done = store.get_run(run.id)
    assert done.status == "completed"
    assert done.output == {"double": 42}
    assert [(s.slug, s.status, s.attempts, s.output) for s in done.steps] == [
        ("fetch", "completed", 1, {"n": 21}),
        ("double", "completed", 1, 42),
    ]
    assert done.step("double").output == 42


# --- start: delay, run_at, priority, key ---------------------------------------------------------


@pytest.mark.parametrize("delay", [30, 30.0, timedelta(seconds=30)], ids=["int", "float", "td"])
def test_delay_schedules_until_due(
    store: pf.Store, clock: pf.testing.FakeClock, delay: float | timedelta
) -> None:
    run = store.start(echo, {"d": 1}, delay=delay)
    assert run.status == pf.RunStatus.SCHEDULED
    assert store.get_run(run.id).status == pf.RunStatus.SCHEDULED
    assert [r.id for r in store.runs(status="scheduled")] == [run.id]
    assert store.runs(status="queued") == []
    clock.advance(29)
    assert store.get_run(run.id).status == pf.RunStatus.SCHEDULED
    clock.advance(1)
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED
    assert [r.id for r in store.runs(status="queued")] == [run.id]


def test_delayed_run_does_not_start_before_it_is_due(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    run = store.start(echo, "later", delay=timedelta(hours=2))
    drain(store, echo)  # until_idle waits out the delay on the fake clock
    done = store.get_run(run.id)
    assert done.status == "completed"
    assert done.started_at is not None
    assert done.started_at >= run.created_at + timedelta(hours=2)


def test_run_at_aware_datetime(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    plus5 = timezone(timedelta(hours=5))
    when = (clock.datetime() + timedelta(minutes=10)).astimezone(plus5)
    run = store.start(echo, 1, run_at=when)
    assert run.status == pf.RunStatus.SCHEDULED
    clock.advance(timedelta(minutes=9))
    assert store.get_run(run.id).status == pf.RunStatus.SCHEDULED
    clock.advance(timedelta(minutes=1))
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED


def test_run_at_in_the_past_is_queued(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    run = store.start(echo, 1, run_at=clock.datetime() - timedelta(days=1))
    assert run.status == pf.RunStatus.QUEUED
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"run_at": datetime(2030, 1, 1)}, id="naive-run_at"),
        pytest.param(
            {"delay": 5, "run_at": datetime(2030, 1, 1, tzinfo=timezone.utc)}, id="delay+run_at"
        ),
        pytest.param({"delay": -1}, id="negative-delay"),
        pytest.param({"delay": timedelta(seconds=-1)}, id="negative-timedelta"),
        pytest.param({"delay": float("nan")}, id="nan-delay"),
    ],
)
def test_bad_schedule_is_input_error(
    store: pf.Store, db_path: Path, options: dict[str, Any]
) -> None:
    store.register(echo)
    before = table_counts(db_path)
    with pytest.raises(pf.InputError) as info:
        store.start(echo, {"a": 1}, **options)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pf.PgflowError)
    assert table_counts(db_path) == before


def test_priority_is_stored(store: pf.Store) -> None:
    high = store.start(echo, 1, priority=10)
    low = store.start(echo, 2, priority=-3)
    default = store.start(echo, 3)
    assert (high.priority, low.priority, default.priority) == (10, -3, 0)
    assert store.get_run(high.id).priority == 10
    assert store.get_run(low.id).priority == -3
    assert store.get_run(default.id).priority == 0


def test_higher_priority_runs_first(store: pf.Store) -> None:
    order: list[str] = []

    @pf.job(queue="ordered")
    def ordered(input: str, ctx: pf.Context) -> None:
        order.append(input)

    store.start(ordered, "low-1")
    store.start(ordered, "high", priority=5)
    store.start(ordered, "low-2")
    pf.run_flows([ordered], store=store, until_idle=True, concurrency=1)
    assert order == ["high", "low-1", "low-2"]


def test_key_is_idempotent(store: pf.Store, db_path: Path) -> None:
    first = store.start(echo, {"order": 42}, key="order-42")
    assert first.key == "order-42"
    runs_before = table_counts(db_path)["runs"]
    again = store.start(echo, {"order": 43}, key="order-42")
    assert again.id == first.id
    assert again.input == {"order": 42}
    assert table_counts(db_path)["runs"] == runs_before == 1
    assert [r.id for r in store.runs(flow=echo)] == [first.id]


def test_key_stays_idempotent_after_the_run_finished(store: pf.Store) -> None:
    first = store.start(echo, "x", key="once")
    drain(store, echo)
    again = store.start(echo, "y", key="once")
    assert again.id == first.id
    assert again.status == pf.RunStatus.COMPLETED
    assert len(store.runs(flow=echo)) == 1


def test_same_key_on_different_flows_makes_two_runs(store: pf.Store) -> None:
    a = store.start(echo, 1, key="shared")
    b = store.start(other_echo, 2, key="shared")
    assert a.id != b.id
    assert {r.id for r in store.runs(key="shared")} == {a.id, b.id}
    assert [r.id for r in store.runs(flow="echo", key="shared")] == [a.id]
    assert [r.id for r in store.runs(flow=other_echo, key="shared")] == [b.id]
    assert store.runs(key="nope") == []


def test_start_by_slug_after_register(store: pf.Store) -> None:
    store.register(echo)
    run = store.start("echo", {"by": "slug"})
    assert run.flow_slug == "echo"
    assert run.status == pf.RunStatus.QUEUED
    drain(store, echo)
    assert store.get_run(run.id).output == {"by": "slug"}


def test_start_by_slug_after_a_start_from_the_object(store: pf.Store) -> None:
    store.start(echo, 1)
    run = store.start("echo", 2)
    assert store.get_run(run.id).input == 2


def test_start_unknown_slug_is_flow_not_found(store: pf.Store, db_path: Path) -> None:
    before = table_counts(db_path)
    with pytest.raises(pf.FlowNotFound) as info:
        store.start("never_registered", {})
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, pf.PgflowError)
    assert "never_registered" in str(info.value)
    assert "register" in str(info.value)
    assert table_counts(db_path) == before


def test_start_many(store: pf.Store) -> None:
    runs = store.start_many(echo, [{"i": 0}, {"i": 1}, {"i": 2}])
    assert [r.input for r in runs] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert len({r.id for r in runs}) == 3
    assert all(r.status == pf.RunStatus.QUEUED for r in runs)
    assert len(store.runs(flow=echo)) == 3
    drain(store, echo)
    assert [store.get_run(r.id).output for r in runs] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_start_many_accepts_a_generator_and_options(store: pf.Store) -> None:
    runs = store.start_many(echo, ({"i": i} for i in range(4)), delay=60, priority=3)
    assert len(runs) == 4
    assert all(r.status == pf.RunStatus.SCHEDULED and r.priority == 3 for r in runs)
    assert store.start_many(echo, []) == []


def test_start_many_is_all_or_nothing(store: pf.Store, db_path: Path) -> None:
    store.register(echo)
    before = table_counts(db_path)
    with pytest.raises(pf.InputError):
        store.start_many(echo, [{"i": 0}, {"i": 1}, {"bad": {1, 2}}, {"i": 3}])
    assert table_counts(db_path) == before
    assert store.runs() == []


# --- input validation ---------------------------------------------------------------------------


def _cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"a set": {1, 2}}, id="set"),
        pytest.param(_cyclic(), id="cycle"),
        pytest.param({"x": float("nan")}, id="nan"),
        pytest.param({(1, 2): "tuple key"}, id="tuple-key"),
    ],
)
def test_input_that_is_not_json_is_input_error_naming_the_flow(
    store: pf.Store, db_path: Path, bad: Any
) -> None:
    store.register(echo)
    before = table_counts(db_path)
    with pytest.raises(pf.InputError, match="input of flow 'echo' must be JSON-serializable"):
        store.start(echo, bad)
    assert table_counts(db_path) == before



class _Opaque:
    pass


BAD_INPUTS = [
    pytest.param({1, 2}, id="set"),
    pytest.param(_Opaque(), id="object"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param({"nested": [1, {"deep": {3}}]}, id="nested-set"),
    pytest.param(b"bytes", id="bytes"),
]


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_non_json_input_is_refused_and_nothing_is_written(
    store: pf.Store, db_path: Path, bad: Any
) -> None:
    store.register(echo)
    before = table_counts(db_path)
    with pytest.raises(pf.InputError) as info:
        store.start(echo, bad, key="k")
    assert isinstance(info.value, ValueError)
    assert table_counts(db_path) == before
    assert store.runs() == []


@pytest.mark.parametrize("how", ["start", "start_many"])
def test_refused_input_writes_nothing_on_a_fresh_database(
    store: pf.Store, db_path: Path, how: str
) -> None:
    # "Anything else raises pf.InputError and nothing is written": that includes the definition
    # that a first start of a flow object would otherwise write.
    before = table_counts(db_path)
    with pytest.raises(pf.InputError):
        if how == "start":
            store.start(echo, {1, 2})
        else:
            store.start_many(echo, [1, 2, {1, 2}])
    assert table_counts(db_path) == before


@attrs.define
class AttrsAddress:
    street: str
    number: int


@attrs.define
class AttrsUser:
    name: str
    address: AttrsAddress
    tags: list[str]


@dataclasses.dataclass
class DataPoint:
    x: float
    label: str | None = None


def test_attrs_and_dataclass_inputs_are_unstructured(store: pf.Store) -> None:
    user = AttrsUser("ann", AttrsAddress("Main", 3), ["a", "b"])
    expected_user = {"name": "ann", "address": {"street": "Main", "number": 3}, "tags": ["a", "b"]}
    run = store.start(echo, user)
    assert run.input == expected_user
    assert store.get_run(run.id).input == expected_user

    point_run = store.start(echo, [DataPoint(1.5), DataPoint(2.0, "b")])
    expected_points = [{"x": 1.5, "label": None}, {"x": 2.0, "label": "b"}]
    assert store.get_run(point_run.id).input == expected_points

    drain(store, echo)
    assert store.get_run(run.id).output == expected_user
    assert store.get_run(point_run.id).output == expected_points


# --- output round trip --------------------------------------------------------------------------

ROUND_TRIP = [
    pytest.param(False, id="False"),
    pytest.param(True, id="True"),
    pytest.param(0, id="zero"),
    pytest.param(0.0, id="zero-float"),
    pytest.param("", id="empty-str"),
    pytest.param(None, id="None"),
    pytest.param(0.5, id="half"),
    pytest.param(-1e300, id="big-float"),
    pytest.param(2**62, id="big-int"),
    pytest.param([], id="empty-list"),
    pytest.param({}, id="empty-dict"),
    pytest.param(
        {"a": [1, {"b": None, "c": False, "d": ""}], "e": {"f": [[], {}]}, "g": 0}, id="nested"
    ),
    pytest.param([None, False, 0, "", [], {}], id="falsy-list"),
    pytest.param("héllo ✓ 日本語 😀 \u0000 \"quoted\" \\", id="unicode"),
    pytest.param({"ключ": "значение", "😀": ["é"]}, id="unicode-keys"),
]


@pytest.mark.parametrize("value", ROUND_TRIP)
def test_job_output_round_trips_exactly(store: pf.Store, value: Any) -> None:
    @pf.job(queue="constant")
    def constant(input: Any, ctx: pf.Context) -> Any:
        return value

    run = store.start(constant, {"ignored": True})
    drain(store, constant)
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert_identical(done.output, value)
    assert_identical(done.steps[0].output, value)
    assert_identical(store.wait(run.id, timeout=1).output, value)


@pytest.mark.parametrize("value", ROUND_TRIP)
def test_input_round_trips_exactly(store: pf.Store, value: Any) -> None:
    run = store.start(echo, value)
    assert_identical(run.input, value)
    assert_identical(store.get_run(run.id).input, value)


def test_flow_leaf_output_round_trips_exactly(store: pf.Store) -> None:
    f = pf.flow("falsy_leaves")

    @f.step()
    def root(input: Any, ctx: pf.Context) -> Any:
        return 0

    @f.step(depends_on=["root"])
    def no(deps: Any, ctx: pf.Context) -> Any:
        return False

    @f.step(depends_on=["root"])
    def nothing(deps: Any, ctx: pf.Context) -> Any:
        return None

    run = store.start(f, None)
    drain(store, f)
    done = store.get_run(run.id)
    assert_identical(done.output, {"no": False, "nothing": None})
    assert_identical(done.step("root").output, 0)


# --- schema -------------------------------------------------------------------------------------


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    pf.connect(path, clock=pf.testing.FakeClock()).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(pf.SchemaError, match="newer"):
        pf.connect(path, clock=pf.testing.FakeClock())


def test_database_with_other_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "someone_else.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ann')")
    conn.commit()
    conn.close()
    with pytest.raises(pf.SchemaError) as info:
        pf.connect(path, clock=pf.testing.FakeClock())
    assert "not a pgflow database" in str(info.value)
    assert "customers" in str(info.value)
    # Nothing was added to the other application's database.
    assert table_counts(path) == {"customers": 1}


def test_random_bytes_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(random.Random(0).randbytes(8192))
    with pytest.raises(pf.SchemaError) as info:
        pf.connect(path, clock=pf.testing.FakeClock())
    assert str(path) in str(info.value)


def test_empty_file_is_initialised(tmp_path: Path) -> None:
    path = tmp_path / "touched.db"
    path.touch()
    with pf.connect(path, clock=pf.testing.FakeClock()) as s:
        run = s.start(echo, 1)
        assert s.get_run(run.id).input == 1


def test_reopening_keeps_runs_and_definitions(tmp_path: Path) -> None:
    path = tmp_path / "keep.db"
    clock = pf.testing.FakeClock()
    with pf.connect(path, clock=clock) as s:
        done = s.start(echo, {"n": 1}, key="k1")
        drain(s, echo)
        queued = s.start(pipeline, {"n": 2})
    with pf.connect(path, clock=clock) as s:
        assert s.get_run(done.id).status == pf.RunStatus.COMPLETED
        assert s.get_run(done.id).output == {"n": 1}
        assert s.get_run(queued.id).status == pf.RunStatus.QUEUED
        assert {r.id for r in s.runs()} == {done.id, queued.id}
        assert s.start(echo, {"n": 9}, key="k1").id == done.id
        by_slug = s.start("pipeline", {"n": 5})  # the definition survived the reopen
        drain(s, pipeline)
        assert s.get_run(queued.id).output == {"double": 4}
        assert s.get_run(by_slug.id).output == {"double": 10}


def test_pgflow_tables_exist_and_are_versioned(store: pf.Store, db_path: Path) -> None:
    tables = set(table_counts(db_path))
    assert {"flows", "steps", "deps", "runs", "step_states", "step_tasks", "workers"} <= tables
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_with_its_runs(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        as_schema_version(patch, 1)
        with pf.connect(db_path) as old:
            done = old.start(echo, {"n": 1})
            waiting = old.start(echo, {"n": 2})
            flow_run = old.start(pipeline, {"n": 3})
            # Version 1 kept a state row for a job's step too.
            old.backend._conn.executemany(
                "INSERT INTO step_states (run_id, step_slug, status, remaining_deps, "
                "remaining_tasks, started_at) VALUES (?, 'echo', 'started', 0, 1, 0)",
                [(done.id,), (waiting.id,)],
            )
            old.backend.cancel(waiting.id)
        assert table_counts(db_path)["step_states"] == 2 + 2  # two jobs' rows, two of the flow

    with pf.connect(db_path) as new:
        assert table_counts(db_path)["step_states"] == 2  # only the flow's
        assert new.get_run(waiting.id).steps[0].status == "cancelled"
        drain(new, echo)
        assert new.get_run(done.id).steps[0].status == "completed"
        assert new.get_run(done.id).steps[0].output == {"n": 1}
        new.retry(waiting.id)
        drain(new, echo, pipeline)
        assert new.get_run(waiting.id).output == {"n": 2}
        assert new.get_run(flow_run.id).output == {"double": 6}


def test_two_stores_on_one_file_share_runs_and_keys(db_path: Path) -> None:
    clock = pf.testing.FakeClock()
    with pf.connect(db_path, clock=clock) as a, pf.connect(db_path, clock=clock) as b:
        first = a.start(echo, "from a", key="shared-key")
        assert b.start(echo, "from b", key="shared-key").id == first.id
        assert b.get_run(first.id).input == "from a"
        drain(b, echo)
        assert a.wait(first.id, timeout=1).output == "from a"


def test_memory_store() -> None:
    with pf.connect(":memory:", clock=pf.testing.FakeClock()) as s:
        run = s.start(pipeline, {"n": 4})
        drain(s, pipeline)
        assert s.get_run(run.id).output == {"double": 8}
    with pf.connect(":memory:", clock=pf.testing.FakeClock()) as s:
        assert s.runs() == []  # each :memory: store is its own database


# --- reading ------------------------------------------------------------------------------------


def test_get_run_unknown_id(store: pf.Store) -> None:
    with pytest.raises(pf.RunNotFound) as info:
        store.get_run("no-such-run")
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, pf.PgflowError)
    assert "no-such-run" in str(info.value)


def test_runs_newest_first(store: pf.Store, clock: pf.testing.FakeClock) -> None:
    a = store.start(echo, "a")
    clock.advance(1)
    b = store.start(other_echo, "b")
    clock.advance(1)
    c = store.start(echo, "c")
    d = store.start(echo, "d")  # same created_at as c: insertion order breaks the tie
    assert [r.id for r in store.runs()] == [d.id, c.id, b.id, a.id]
    assert [r.id for r in store.runs(limit=2)] == [d.id, c.id]
    assert [r.id for r in store.runs(flow=echo)] == [d.id, c.id, a.id]
    assert [r.id for r in store.runs(flow="other_echo")] == [b.id]
    assert store.runs(flow="unknown_flow") == []


def test_runs_filter_by_status(store: pf.Store) -> None:
    done = store.start(echo, 1)
    drain(store, echo)
    queued = store.start(echo, 2)
    scheduled = store.start(echo, 3, delay=60)
    cancelled = store.start(echo, 4)
    store.cancel(cancelled.id)
    assert [r.id for r in store.runs(status=pf.RunStatus.COMPLETED)] == [done.id]
    assert [r.id for r in store.runs(status="completed")] == [done.id]
    assert [r.id for r in store.runs(status="queued")] == [queued.id]
    assert [r.id for r in store.runs(status="scheduled")] == [scheduled.id]
    assert [r.id for r in store.runs(status="cancelled")] == [cancelled.id]
    assert store.runs(status="failed") == []
    assert [r.id for r in store.runs(flow=echo, status="queued", limit=5)] == [queued.id]
    assert store.runs(flow=other_echo, status="queued") == []
    with pytest.raises(pf.InputError):
        store.runs(status="bogus")


def test_wait_returns_terminal_run(store: pf.Store) -> None:
    run = store.start(echo, {"w": 1})
    drain(store, echo)
    waited = store.wait(run.id, timeout=1)
    assert waited.status == pf.RunStatus.COMPLETED
    assert waited.output == {"w": 1}


def test_wait_is_woken_by_a_runner_in_another_thread(store: pf.Store) -> None:
    run = store.start(echo, {"w": 2})
    result: list[pf.Run] = []
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            result.append(store.wait(run.id, timeout=10))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    drain(store, echo)
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert errors == []
    assert result[0].status == pf.RunStatus.COMPLETED
    assert result[0].output == {"w": 2}


def test_wait_times_out_when_nothing_serves_the_flow(store: pf.Store) -> None:
    run = store.start(echo, 1)
    with pytest.raises(pf.WaitTimeout) as info:
        store.wait(run.id, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, pf.PgflowError)
    assert run.id in str(info.value)
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED


def test_wait_unknown_run(store: pf.Store) -> None:
    with pytest.raises(pf.RunNotFound):
        store.wait("missing", timeout=0.2)


# --- control ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [None, 60], ids=["queued", "scheduled"])
def test_cancelled_run_never_runs(store: pf.Store, delay: float | None) -> None:
    calls: list[Any] = []

    @pf.job(queue="watched")
    def watched(input: Any, ctx: pf.Context) -> None:
        calls.append(input)

    run = store.start(watched, "cancel-me", delay=delay)
    keep = store.start(watched, "keep-me", delay=delay)
    cancelled = store.cancel(run.id)
    assert cancelled.status == pf.RunStatus.CANCELLED
    assert cancelled.finished_at is not None
    assert store.get_run(run.id).status == pf.RunStatus.CANCELLED
    stats = pf.run_flows([watched], store=store, until_idle=True)
    assert calls == ["keep-me"]
    assert stats.completed == 1
    assert store.get_run(run.id).status == pf.RunStatus.CANCELLED
    assert store.get_run(keep.id).status == pf.RunStatus.COMPLETED
    assert store.wait(run.id, timeout=1).status == pf.RunStatus.CANCELLED


def test_cancel_does_not_change_a_finished_run(store: pf.Store) -> None:
    run = store.start(echo, 1)
    drain(store, echo)
    with contextlib.suppress(pf.PgflowError):  # refusing is fine; rewriting history is not
        store.cancel(run.id)
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert done.output == 1


def test_cancel_unknown_run(store: pf.Store) -> None:
    with pytest.raises(pf.RunNotFound):
        store.cancel("missing")


def test_retry_failed_run_completes_and_keeps_history(store: pf.Store) -> None:
    calls: list[int] = []

    @pf.job(queue="flaky_once")
    def flaky_once(input: Any, ctx: pf.Context) -> str:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise RuntimeError("boom the first time")
        return "ok"

    run = store.start(flaky_once, {"x": 1})
    drain(store, flaky_once)
    failed = store.get_run(run.id)
    assert failed.status == pf.RunStatus.FAILED
    assert failed.output is None
    assert failed.error is not None and "boom the first time" in failed.error
    assert [r.id for r in store.runs(status="failed")] == [run.id]

    retried = store.retry(run.id)
    assert not retried.status.is_terminal
    assert retried.error is None and retried.finished_at is None
    drain(store, flaky_once)
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert done.output == "ok"
    assert done.error is None
    assert done.attempts == 1  # attempts were reset
    assert calls == [1, 1]
    task = done.steps[0].tasks[0]
    assert task.status == "completed"
    assert len(task.history) == 1
    record = task.history[0]
    assert isinstance(record, pf.AttemptRecord)
    assert record.attempt == 1
    assert "boom the first time" in record.error
    assert record.at.tzinfo is not None


def test_retried_run_reads_queued_until_a_worker_takes_it(store: pf.Store) -> None:
    @pf.job(queue="fails_once")
    def fails_once(input: Any, ctx: pf.Context) -> None:
        raise RuntimeError("no")

    run = store.start(fails_once, None)
    drain(store, fails_once)
    assert store.get_run(run.id).status == pf.RunStatus.FAILED
    # Nothing is running now: the run waits for a worker, like a fresh start (and like a retried
    # run that was cancelled before it ever started, see test_retry_cancelled_run).
    assert store.retry(run.id).status == pf.RunStatus.QUEUED
    assert store.get_run(run.id).status == pf.RunStatus.QUEUED
    assert [r.id for r in store.runs(status="queued")] == [run.id]
    assert store.runs(status="running") == []


def test_retry_gives_fresh_attempts(store: pf.Store) -> None:
    calls: list[int] = []

    @pf.job(queue="flaky_thrice", max_attempts=2, base_delay=60)
    def flaky_thrice(input: Any, ctx: pf.Context) -> int:
        calls.append(ctx.attempt)
        if len(calls) <= 3:
            raise ValueError(f"failure {len(calls)}")
        return len(calls)

    run = store.start(flaky_thrice, None)
    drain(store, flaky_thrice)
    assert store.get_run(run.id).status == pf.RunStatus.FAILED
    assert store.get_run(run.id).attempts == 2
    store.retry(run.id)
    drain(store, flaky_thrice)
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert done.output == 4
    assert calls == [1, 2, 1, 2]
    history = done.steps[0].tasks[0].history
    assert [h.attempt for h in history] == [1, 2, 1]
    for record, text in zip(history, ["failure 1", "failure 2", "failure 3"], strict=True):
        assert text in record.error


def test_retry_cancelled_run(store: pf.Store) -> None:
    run = store.start(pipeline, {"n": 3})
    store.cancel(run.id)
    assert store.retry(run.id).status == pf.RunStatus.QUEUED
    assert store.get_run(run.id).error is None
    drain(store, pipeline)
    assert store.get_run(run.id).output == {"double": 6}


def test_retry_of_unfinished_or_completed_run_is_refused(store: pf.Store) -> None:
    run = store.start(echo, 1)
    with pytest.raises(pf.InputError):
        store.retry(run.id)
    drain(store, echo)
    with pytest.raises(pf.InputError):
        store.retry(run.id)
    assert store.get_run(run.id).status == pf.RunStatus.COMPLETED
    with pytest.raises(pf.RunNotFound):
        store.retry("missing")


def test_prune_deletes_only_old_terminal_runs(
    store: pf.Store, clock: pf.testing.FakeClock, db_path: Path
) -> None:
    @pf.job(queue="always_fails")
    def always_fails(input: Any, ctx: pf.Context) -> None:
        raise RuntimeError("no")

    old_done = store.start(echo, "old")
    old_failed = store.start(always_fails, "old")
    old_cancelled = store.start(echo, "old-cancelled", delay=3600)
    store.cancel(old_cancelled.id)
    never_served = store.start(other_echo, "queued forever")
    drain(store, echo, always_fails)
    assert store.get_run(old_failed.id).status == pf.RunStatus.FAILED

    clock.advance(timedelta(days=5))
    recent_done = store.start(echo, "recent")
    drain(store, echo)
    clock.advance(timedelta(days=3))  # old ones finished 8 days ago, the recent one 3 days ago

    assert store.prune(older_than=timedelta(days=7)) == 3
    for gone in (old_done, old_failed, old_cancelled):
        with pytest.raises(pf.RunNotFound):
            store.get_run(gone.id)
    assert store.get_run(recent_done.id).status == pf.RunStatus.COMPLETED
    assert store.get_run(never_served.id).status == pf.RunStatus.QUEUED
    assert {r.id for r in store.runs()} == {recent_done.id, never_served.id}
    counts = table_counts(db_path)
    assert counts["runs"] == 2
    # A job is one row: its run's row holds its one task, and its step's state is the task's.
    assert counts["step_states"] == 0
    assert counts["step_tasks"] == 0
    assert store.prune(older_than=timedelta(days=7)) == 0
    assert store.prune(older_than=3600) == 1  # seconds work too
    assert store.get_run(never_served.id).status == pf.RunStatus.QUEUED


def test_prune_with_a_negative_age_is_refused(store: pf.Store) -> None:
    with pytest.raises(pf.InputError):
        store.prune(older_than=timedelta(days=-1))


def test_context_manager_closes(tmp_path: Path) -> None:
    path = tmp_path / "closing.db"
    with pf.connect(path, clock=pf.testing.FakeClock()) as s:
        assert isinstance(s, pf.Store)
        run = s.start(echo, 1)
    # The last connection to a WAL database checkpoints and removes the -wal file on close.
    assert not Path(f"{path}-wal").exists()
    with pytest.raises(pf.StoreError, match="closed"):
        s.get_run(run.id)
    with pf.connect(path, clock=pf.testing.FakeClock()) as again:
        assert again.get_run(run.id).input == 1


# --- register -----------------------------------------------------------------------------------


def _stored_definition(db_path: Path, slug: str) -> dict[str, Any]:
    conn = sqlite3.connect(db_path)
    try:
        (text,) = conn.execute("SELECT definition FROM flows WHERE flow_slug = ?", (slug,)).fetchone()
    finally:
        conn.close()
    return json.loads(text)


def test_register_updates_options(store: pf.Store, db_path: Path) -> None:
    calls: list[int] = []

    def handler(input: Any, ctx: pf.Context) -> int:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return ctx.max_attempts

    v1 = pf.job(queue="tunable", max_attempts=1)(handler)
    v2 = pf.job(queue="tunable", max_attempts=3, base_delay=2)(handler)
    store.register(v1)
    unfinished = store.start(v1, "v1 run")  # an options change is allowed even so
    store.register(v2)
    stored = _stored_definition(db_path, "tunable")
    assert stored["max_attempts"] == 3
    assert stored["base_delay"] == 2
    # A start by slug uses the stored (updated) definition.
    run = store.start("tunable", "v2 run")
    store.cancel(unfinished.id)
    drain(store, v2)
    done = store.get_run(run.id)
    assert done.status == pf.RunStatus.COMPLETED
    assert done.output == 3
    assert done.attempts == 3


def _two_step_flow(slug: str, extra_step: bool) -> pf.Flow:
    f = pf.flow(slug)

    @f.step()
    def first(input: Any, ctx: pf.Context) -> Any:
        return input

    if extra_step:

        @f.step(depends_on=["first"])
        def audit(deps: Any, ctx: pf.Context) -> Any:
            return {"audited": deps["first"]}

    return f


def test_shape_change_with_unfinished_runs_is_refused(store: pf.Store, db_path: Path) -> None:
    v1 = _two_step_flow("evolving", extra_step=False)
    v2 = _two_step_flow("evolving", extra_step=True)
    pending = store.start(v1, 1)
    store.backend.claim("w", ["evolving"], 10, 30)  # started: it blocks the change
    before = table_counts(db_path)
    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(v2)
    message = str(info.value)
    assert isinstance(info.value, pf.PgflowError)
    assert "evolving" in message
    assert "'audit'" in message
    assert "added" in message
    assert "cancel" in message and "new slug" in message
    with pytest.raises(pf.ShapeMismatch):
        store.start(v2, 2)
    assert table_counts(db_path) == before
    assert _stored_definition(db_path, "evolving")["steps"][-1]["slug"] == "first"

    # Once the old run is out of the way the new shape is accepted.
    store.cancel(pending.id)
    run = store.start(v2, 3)
    drain(store, v2)
    assert store.get_run(run.id).output == {"audit": {"audited": 3}}


def test_shape_change_without_unfinished_runs_replaces_the_shape(
    store: pf.Store, db_path: Path
) -> None:
    v1 = _two_step_flow("replaced", extra_step=False)
    v2 = _two_step_flow("replaced", extra_step=True)
    old = store.start(v1, "old")
    drain(store, v1)
    store.register(v2)
    assert [s["slug"] for s in _stored_definition(db_path, "replaced")["steps"]] == [
        "first",
        "audit",
    ]
    run = store.start("replaced", "new")
    assert [s.slug for s in store.get_run(run.id).steps] == ["first", "audit"]
    drain(store, v2)
    assert store.get_run(run.id).output == {"audit": {"audited": "new"}}
    assert store.get_run(old.id).output == {"first": "old"}


def test_an_old_definition_object_in_the_same_process_is_checked_again(store: pf.Store) -> None:
    # Registrations are remembered to skip re-reading the stored definition, but a newer shape
    # written through this very connection must still be noticed.
    v1 = _two_step_flow("reshaped", extra_step=False)
    v2 = _two_step_flow("reshaped", extra_step=True)
    store.start(v1, "old")
    drain(store, v1)
    store.start(v1, "again")  # v1 is stored and unchanged: remembered
    drain(store, v1)
    unfinished = store.start(v2, "new")  # replaces the shape
    with pytest.raises(pf.ShapeMismatch):
        store.start(v1, "stale")
    assert [s.slug for s in store.get_run(unfinished.id).steps] == ["first", "audit"]


# --- testing helpers ----------------------------------------------------------------------------


def test_assert_started(store: pf.Store) -> None:
    first = store.start(echo, {"to": "a@b"})
    second = store.start(echo, {"to": "c@d"})
    assert pf.testing.assert_started(store, echo, input={"to": "a@b"}).id == first.id
    assert pf.testing.assert_started(store, "echo", input={"to": "c@d"}).id == second.id
    assert pf.testing.assert_started(store, echo).id == second.id  # the newest
    with pytest.raises(AssertionError) as info:
        pf.testing.assert_started(store, echo, input={"to": "x@y"})
    message = str(info.value)
    assert "{'to': 'x@y'}" in message
    assert "{'to': 'a@b'}" in message and "{'to': 'c@d'}" in message
    with pytest.raises(AssertionError, match="other_echo"):
        pf.testing.assert_started(store, other_echo)


def test_pgflow_store_fixture(pgflow_store: pf.Store, pgflow_clock: pf.testing.FakeClock) -> None:
    assert isinstance(pgflow_store, pf.Store)
    run = pgflow_store.start(echo, "fixture", delay=60)
    assert run.status == pf.RunStatus.SCHEDULED
    pgflow_clock.advance(60)  # the fixture store runs on the fixture clock
    assert pgflow_store.get_run(run.id).status == pf.RunStatus.QUEUED
    drain(pgflow_store, echo)
    assert pf.testing.assert_started(pgflow_store, echo, input="fixture").output == "fixture"


def test_claims_across_flows_and_priority_levels_take_due_tasks_in_claim_order(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    # Claims look each flow up on its own and each priority level on its own (so not-yet-due
    # tasks at a high priority are never scanned); the merged order must still be priority
    # first, then due time.
    high_later = store.start(echo, {"n": "high, due in 60s"}, priority=9, delay=60)
    low_first = store.start(echo, {"n": "low"}, priority=-1)
    clock.advance(1)
    mid_other = store.start(other_echo, {"n": "mid"}, priority=5)
    zero_other = store.start(other_echo, {"n": "zero"})
    clock.advance(1)
    mid_echo = store.start(echo, {"n": "mid, later"}, priority=5)
    store.register(echo)
    store.register(other_echo)
    backend = store.backend

    claimed = backend.claim("w", ["echo", "other_echo"], 3, 30)
    assert [t.run_id for t in claimed] == [mid_other.id, mid_echo.id, zero_other.id]
    assert backend.next_due(["echo"]) == clock.now() - 2  # low_first, due since it started
    assert [t.run_id for t in backend.claim("w", ["echo"], 5, 30)] == [low_first.id]
    # Only the high-priority task remains, due in 58 s.
    assert backend.next_due(["echo", "other_echo"]) == pytest.approx(clock.now() + 58)
    assert backend.claim("w", ["echo", "other_echo"], 5, 30) == []
    clock.advance(58)
    assert [t.run_id for t in backend.claim("w", ["echo"], 5, 30)] == [high_later.id]
    assert backend.next_due(["echo", "other_echo"]) is None


def test_run_ids_are_uuid7_and_ordered_by_creation_time(store: pf.Store) -> None:
    import uuid

    first = store.start_many(echo, [{"n": i} for i in range(500)])
    later = store.start(echo, {"n": "later"})
    ids = [r.id for r in first] + [later.id]
    assert len(set(ids)) == len(ids)
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, run_id)
    # The first 48 bits are the creation time in milliseconds: ids sort by when they were made.
    stamps = [int(run_id.replace("-", "")[:12], 16) for run_id in ids]
    assert stamps == sorted(stamps)


def test_data_version_changes_when_another_connection_commits(db_path: Path) -> None:
    # An idle runner watches this counter to notice work started by other processes.
    with pf.connect(db_path) as mine, pf.connect(db_path) as theirs:
        before = mine.backend.data_version()
        mine.start(echo, {"n": 1})
        assert mine.backend.data_version() == before  # its own commits do not count
        theirs.start(echo, {"n": 2})
        assert mine.backend.data_version() != before


@pytest.mark.parametrize(
    ("url", "rest", "schema"),
    [
        ("postgresql:///app?host=/tmp&schema=jobs", "postgresql:///app?host=/tmp", "jobs"),
        ("postgresql:///app?host=/tmp", "postgresql:///app?host=/tmp", None),
        ("postgresql://u:p@h:5432/app", "postgresql://u:p@h:5432/app", None),
        ("postgresql://h/app?schema=jobs", "postgresql://h/app", "jobs"),
        ("postgresql://h/app?options=-c%20statement_timeout%3D5s&schema=jobs",
         "postgresql://h/app?options=-c%20statement_timeout%3D5s", "jobs"),
    ],
)
def test_a_postgresql_urls_schema_parameter_is_taken_off_and_the_rest_left_as_it_was(
    url: str, rest: str, schema: str | None
) -> None:
    from pgflow_py.store.store import _pop_schema

    assert _pop_schema(url) == (rest, schema)
