"""Cron (one run per tick, however many runners), priorities, and per-flow concurrency caps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.testing import FakeClock

T0 = 1_800_000_000  # a whole hour, so also a 5-minute boundary (UTC)
assert T0 % 3600 == 0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sched.db"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[pf.Store]:
    with pf.connect(db_path, clock=clock) as s:
        yield s



def keys(store: pf.Store, flow: pf.Flow) -> list[str | None]:
    return sorted(r.key for r in store.runs(flow=flow, limit=1000))  # type: ignore[type-var]


def cron_key(offset: int) -> str:
    return f"cron:{T0 + offset}"


# --- cron ---------------------------------------------------------------------------------------


def test_cron_job_starts_one_run_per_tick_with_its_input(store, clock):
    calls: list[tuple[Any, float]] = []

    @pf.job(queue="digest", cron="*/5 * * * *", cron_input={"kind": "daily digest"})
    def digest(input, ctx):
        calls.append((input, clock.now()))
        return "sent"

    drain(store, digest)
    (first,) = store.runs(flow=digest)
    assert first.key == cron_key(0)
    assert first.input == {"kind": "daily digest"}
    assert first.status is pf.RunStatus.COMPLETED
    assert first.output == "sent"
    # until_idle never waits for the next tick: the clock did not jump to it.
    assert clock.now() < T0 + 300

    drain(store, digest)  # the same tick again: nothing new
    clock.advance(299)
    drain(store, digest)  # still the same tick
    assert keys(store, digest) == [cron_key(0)]

    clock.advance(1)
    drain(store, digest)
    clock.advance(300)
    drain(store, digest)
    assert keys(store, digest) == [cron_key(0), cron_key(300), cron_key(600)]
    assert [inp for inp, _ in calls] == [{"kind": "daily digest"}] * 3
    assert [t - T0 for _, t in calls] == [0, 300, 600]
    assert all(r.status is pf.RunStatus.COMPLETED for r in store.runs(flow=digest))


def test_cron_on_a_multi_step_flow(store, clock):
    hourly = pf.flow("hourly_report", cron="0 * * * *", cron_input={"window": "1h"})

    @hourly.step()
    def gather(input, ctx):
        return {"window": input["window"], "rows": 10}

    @hourly.step(depends_on=[gather])
    def send(deps, ctx):
        return f"{deps['gather']['rows']} rows for {ctx.flow_input['window']}"

    drain(store, hourly)
    clock.advance(1800)
    drain(store, hourly)  # half past: no tick
    clock.advance(1800)
    drain(store, hourly)
    runs = sorted(store.runs(flow=hourly), key=lambda r: r.key or "")
    assert [r.key for r in runs] == [cron_key(0), cron_key(3600)]
    assert [r.output for r in runs] == [{"send": "10 rows for 1h"}] * 2


def test_two_runners_on_one_file_start_one_run_per_tick(db_path, clock):
    calls: list[float] = []

    @pf.job(queue="cleanup", cron="*/5 * * * *")
    def cleanup(input, ctx):
        calls.append(clock.now())

    with pf.connect(db_path, clock=clock) as a, pf.connect(db_path, clock=clock) as b:
        for _ in range(3):
            drain(a, cleanup)
            drain(b, cleanup)
            drain(a, cleanup)
            clock.advance(300)
        drain(b, cleanup)
        assert keys(a, cleanup) == [cron_key(0), cron_key(300), cron_key(600), cron_key(900)]
        assert len(a.runs(flow=cleanup)) == 4
        assert len(calls) == 4


def test_two_runners_reaching_a_tick_at_the_same_time_start_one_run(db_path, clock):
    calls: list[Any] = []
    lock = threading.Lock()

    @pf.job(queue="sweep", cron="* * * * *", cron_input="sweep")
    def sweep(input, ctx):
        with lock:
            calls.append(input)

    errors: list[BaseException] = []
    stores = [pf.connect(db_path, clock=clock) for _ in range(3)]
    try:
        stores[0].register(sweep)
        for _ in range(3):
            barrier = threading.Barrier(len(stores))

            def serve(s: pf.Store, barrier: threading.Barrier = barrier) -> None:
                try:
                    barrier.wait(timeout=10)
                    pf.run_flows([sweep], store=s, until_idle=True, handle_signals=False)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=serve, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            clock.advance(60)
        assert errors == []
        assert keys(stores[0], sweep) == [cron_key(0), cron_key(60), cron_key(120)]
        assert calls == ["sweep"] * 3
    finally:
        for s in stores:
            s.close()


def test_after_downtime_only_the_latest_missed_tick_runs_once(store, clock):
    calls: list[float] = []

    @pf.job(queue="every5", cron="*/5 * * * *")
    def every5(input, ctx):
        calls.append(clock.now())

    drain(store, every5)
    clock.advance(3600 + 120)  # down for an hour: 12 ticks missed, the latest at T0 + 3600
    drain(store, every5)
    drain(store, every5)
    assert keys(store, every5) == [cron_key(0), cron_key(3600)]
    assert len(calls) == 2
    clock.advance(180)  # the next tick after coming back runs as usual
    drain(store, every5)
    assert keys(store, every5) == [cron_key(0), cron_key(3600), cron_key(3900)]
    assert len(calls) == 3


def test_no_tick_from_before_the_flow_was_first_registered(store, clock):
    @pf.job(queue="fresh", cron="*/5 * * * *")
    def fresh(input, ctx):
        return None

    clock.advance(60)
    store.register(fresh)
    drain(store, fresh)  # the latest tick (T0) is before the flow existed
    assert store.runs(flow=fresh) == []
    clock.advance(240)
    drain(store, fresh)
    assert keys(store, fresh) == [cron_key(300)]


def test_a_runner_not_serving_a_cron_flow_does_not_start_it(store, clock):
    @pf.job(queue="cron_elsewhere", cron="*/5 * * * *")
    def cron_elsewhere(input, ctx):
        return None

    @pf.job(queue="unrelated")
    def unrelated(input, ctx):
        return None

    store.register(cron_elsewhere)
    drain(store, unrelated)
    assert store.runs(flow=cron_elsewhere) == []


@pytest.mark.parametrize(
    "expression",
    ["bad", "* * * *", "* * * * * *", "61 * * * *", "* 24 * * *", "", 5],
    ids=["word", "four_fields", "six_fields", "minute_61", "hour_24", "empty", "int"],
)
def test_invalid_cron_is_rejected_at_decoration(expression):
    with pytest.raises(pf.DefinitionError, match="cron"):

        @pf.job(queue="bad_cron", cron=expression)
        def bad_cron(input, ctx):
            return None

    with pytest.raises(pf.DefinitionError, match="cron"):
        pf.flow("bad_cron_flow", cron=expression)


def test_valid_cron_expressions_are_accepted_and_kept_in_the_definition():
    @pf.job(queue="weekday_mornings", cron="30 9 * * 1-5", cron_input={"a": [1, 2]})
    def weekday_mornings(input, ctx):
        return None

    assert weekday_mornings.definition.cron == "30 9 * * 1-5"
    assert weekday_mornings.definition.cron_input == {"a": [1, 2]}
    again = pf.FlowDefinition.from_json(weekday_mornings.definition.to_json())
    assert (again.cron, again.cron_input) == ("30 9 * * 1-5", {"a": [1, 2]})
    assert pf.flow("nightly", cron="0 3 * * *").slug == "nightly"


def test_cron_input_without_cron_is_rejected():
    with pytest.raises(pf.DefinitionError, match="cron"):

        @pf.job(queue="no_cron", cron_input={"x": 1})
        def no_cron(input, ctx):
            return None

    with pytest.raises(pf.DefinitionError, match="cron"):
        pf.flow("no_cron_flow", cron_input=[1])


def test_cron_input_must_be_json():
    with pytest.raises(pf.DefinitionError, match="cron_input"):
        pf.flow("bad_input", cron="* * * * *", cron_input={"when": object()})


@pytest.mark.parametrize("value", [0, -1, True, False, 1.5, "2"])
def test_invalid_concurrency_is_rejected_at_decoration(value):
    with pytest.raises(pf.DefinitionError, match="concurrency"):

        @pf.job(queue="bad_cap", concurrency=value)
        def bad_cap(input, ctx):
            return None

    with pytest.raises(pf.DefinitionError, match="concurrency"):
        pf.flow("bad_cap_flow", concurrency=value)


# --- priorities ---------------------------------------------------------------------------------


def test_priority_orders_claims_across_flows_then_oldest_first(store, clock):
    order: list[str] = []

    @pf.job(queue="emails")
    def emails(input, ctx):
        order.append(input)

    @pf.job(queue="reports")
    def reports(input, ctx):
        order.append(input)

    for flow, name, priority in [
        (emails, "e_old", 0),
        (reports, "r_old", 0),
        (emails, "e_urgent", 5),
        (reports, "r_most_urgent", 10),
        (emails, "e_new", 0),
        (reports, "r_whenever", -1),
        (reports, "r_urgent_too", 5),
    ]:
        store.start(flow, name, priority=priority)
        clock.advance(1)
    drain(store, emails, reports, concurrency=1)
    assert order == ["r_most_urgent", "e_urgent", "r_urgent_too", "e_old", "r_old", "e_new", "r_whenever"]


def test_priority_carries_to_the_later_steps_of_a_run(store, clock):
    order: list[str] = []
    two = pf.flow("two_step")

    @two.step()
    def first(input, ctx):
        order.append(f"{input}.first")
        return input

    @two.step(depends_on=[first])
    def second(deps, ctx):
        order.append(f"{deps['first']}.second")

    store.start(two, "low")
    clock.advance(1)
    store.start(two, "high", priority=10)
    drain(store, two, concurrency=1)
    assert order == ["high.first", "high.second", "low.first", "low.second"]


def test_a_high_priority_run_does_not_start_before_it_is_due(store, clock):
    order: list[str] = []

    @pf.job(queue="due")
    def due(input, ctx):
        order.append(input)

    store.start(due, "later_but_urgent", delay=60, priority=100)
    store.start(due, "now")
    drain(store, due, concurrency=1)
    assert order == ["now", "later_but_urgent"]


def test_priority_order_holds_under_a_concurrency_cap(store, clock):
    order: list[str] = []

    @pf.job(queue="capped_prio", concurrency=1)
    async def capped_prio(input, ctx):
        order.append(input)
        await asyncio.sleep(0.002)

    for name, priority in [("p0", 0), ("p3", 3), ("p1", 1), ("p9", 9), ("p0b", 0)]:
        store.start(capped_prio, name, priority=priority)
        clock.advance(1)
    drain(store, capped_prio, concurrency=4)
    assert order == ["p9", "p3", "p1", "p0", "p0b"]


# --- concurrency caps ---------------------------------------------------------------------------


class Gauge:
    """Counts simultaneous executions and keeps the peak (thread-safe)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1
            self.done += 1


def test_capped_job_never_exceeds_its_cap_while_another_flow_progresses(store):
    capped_gauge, free_gauge = Gauge(), Gauge()
    finished: list[str] = []

    @pf.job(queue="capped", concurrency=2)
    async def capped(input, ctx):
        capped_gauge.enter()
        await asyncio.sleep(0.02)
        capped_gauge.leave()
        finished.append("capped")

    @pf.job(queue="free")
    async def free(input, ctx):
        free_gauge.enter()
        await asyncio.sleep(0.02)
        free_gauge.leave()
        finished.append("free")

    capped_runs = store.start_many(capped, range(20))
    free_runs = store.start_many(free, range(20))
    stats = drain(store, capped, free, concurrency=10)

    assert stats.completed == 40
    assert capped_gauge.done == free_gauge.done == 20
    assert capped_gauge.peak == 2  # reached, never passed
    # The other flow used the rest of the pool meanwhile, and was not held back by the cap.
    assert free_gauge.peak > 2
    last_free = max(i for i, f in enumerate(finished) if f == "free")
    last_capped = max(i for i, f in enumerate(finished) if f == "capped")
    assert last_free < last_capped
    for run in capped_runs + free_runs:
        assert store.get_run(run.id).status is pf.RunStatus.COMPLETED


def test_concurrency_on_a_flow_caps_its_map_tasks(store):
    gauge = Gauge()
    fan = pf.flow("capped_fan", concurrency=3)

    @fan.map()
    async def each(item, ctx):
        gauge.enter()
        await asyncio.sleep(0.01)
        gauge.leave()
        return item * 2

    run = store.start(fan, list(range(12)))
    drain(store, fan, concurrency=10)
    assert gauge.peak == 3
    assert store.get_run(run.id).output == {"each": [i * 2 for i in range(12)]}


def test_cap_holds_across_two_runners_on_one_file(db_path, clock):
    gauge = Gauge()
    cap = 2

    @pf.job(queue="shared_cap", concurrency=cap)
    async def shared_cap(input, ctx):
        gauge.enter()
        await asyncio.sleep(0.02)
        gauge.leave()
        return input

    with pf.connect(db_path, clock=clock) as s:
        runs = s.start_many(shared_cap, range(16))

    errors: list[BaseException] = []
    stats: list[pf.RunnerStats] = []
    barrier = threading.Barrier(2)
    stores = [pf.connect(db_path, clock=clock) for _ in range(2)]

    def serve(s: pf.Store) -> None:
        try:
            barrier.wait(timeout=10)
            stats.append(pf.run_flows(
                [shared_cap], store=s, until_idle=True, handle_signals=False, concurrency=10
            ))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert 1 <= gauge.peak <= cap
        assert gauge.done == 16
        assert sum(st.completed for st in stats) == 16
        for run in runs:
            assert stores[0].get_run(run.id).status is pf.RunStatus.COMPLETED
    finally:
        for s in stores:
            s.close()


def test_a_cron_tick_runs_once_even_after_its_run_is_pruned_or_cancelled(tmp_path):
    clock = FakeClock(1_800_000_000 + 1)  # just after an hour boundary
    ran: list[float] = []

    @pf.job(queue="hourly_once", cron="0 * * * *")
    def hourly_once(input, ctx):
        ran.append(clock.now())

    with pf.connect(tmp_path / "cron_once.db", clock=clock) as store:
        pf.run_flows([hourly_once], store=store, until_idle=True)  # registers; no tick yet
        clock.advance(3600)
        pf.run_flows([hourly_once], store=store, until_idle=True)
        assert len(ran) == 1
        clock.advance(1)
        assert store.prune(older_than=0) == 1
        pf.run_flows([hourly_once], store=store, until_idle=True)  # the same tick again
        assert len(ran) == 1 and store.runs() == []
        # A cancelled tick run does not come back either.
        clock.advance(3600)
        (run,) = [r for r in [store.start_cron_tick(hourly_once, clock.now() - 1, "cron:x")] if r]
        store.cancel(run.id)
        pf.run_flows([hourly_once], store=store, until_idle=True)
        assert len(ran) == 1
        assert [r.status for r in store.runs()] == [pf.RunStatus.CANCELLED]
