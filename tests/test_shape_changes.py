"""Deploying a changed flow shape: runs that have not started move to it, started ones block it.

Runs on SQLite, and on PostgreSQL with ``$PGFLOW_TEST_POSTGRES`` set (see .ci/run).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.store import TaskFailure


def _v1(slug: str = "reshaped") -> pf.Flow:
    f = pf.flow(slug)

    @f.step()
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return {"n": input["n"], "v": 1}

    return f


def _v2(slug: str = "reshaped", start_delay: float = 0) -> pf.Flow:
    """v1 plus a step: what a deploy adds."""
    f = pf.flow(slug)

    @f.step()
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return {"n": input["n"], "v": 2}

    @f.step(depends_on=["fetch"], start_delay=start_delay)
    def enrich(deps: Any, ctx: pf.Context) -> Any:
        return {"enriched": deps["fetch"]["n"] + 1, "v": deps["fetch"]["v"]}

    return f


def test_a_queued_run_moves_to_the_new_shape_and_keeps_its_identity(store: pf.Store) -> None:
    v1, v2 = _v1(), _v2()
    older = store.start(v1, {"n": 1}, key="order-1", priority=5)
    newer = store.start(v1, {"n": 2})

    store.register(v2)  # a deploy: no ShapeMismatch, nothing had started

    assert store.backend.get_definition("reshaped") == v2.definition
    moved = store.get_run(older.id)
    assert moved.status is pf.RunStatus.QUEUED
    assert [(s.slug, s.status) for s in moved.steps] == [("fetch", "started"),
                                                         ("enrich", "created")]
    assert (moved.input, moved.key, moved.priority, moved.created_at) == (
        {"n": 1}, "order-1", 5, older.created_at)
    # Same runs, same order in the listing; the key still names the same run.
    assert [r.id for r in store.runs(flow="reshaped")] == [newer.id, older.id]
    assert store.start(v2, {"n": 9}, key="order-1").id == older.id

    drain(store, v2)
    assert store.get_run(older.id).output == {"enrich": {"enriched": 2, "v": 2}}
    assert store.get_run(newer.id).output == {"enrich": {"enriched": 3, "v": 2}}


def test_a_scheduled_run_moves_and_keeps_its_due_time(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    v1 = _v1()
    later = store.start(v1, {"n": 1}, delay=timedelta(days=30))
    clock.advance(60)
    store.register(_v2())

    assert store.get_run(later.id).status is pf.RunStatus.SCHEDULED
    assert [s.slug for s in store.get_run(later.id).steps] == ["fetch", "enrich"]
    # Due when it was before the deploy: not a second earlier.
    clock.advance(30 * 86400 - 61)
    assert store.get_run(later.id).status is pf.RunStatus.SCHEDULED
    clock.advance(1)
    assert store.get_run(later.id).status is pf.RunStatus.QUEUED
    drain(store, _v2())
    assert store.get_run(later.id).output == {"enrich": {"enriched": 2, "v": 2}}


def test_a_started_run_blocks_the_change_and_the_error_lists_it(store: pf.Store) -> None:
    v1, v2 = _v1(), _v2()
    running = store.start(v1, {"n": 1})
    waiting = store.start(v1, {"n": 2})
    (task,) = store.backend.claim("w", ["reshaped"], 1, 30)
    assert task.run_id == running.id

    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(v2)
    message = str(info.value)
    assert "'reshaped'" in message and "'enrich'" in message and "added" in message
    assert f"  {running.id}  running" in message
    assert f"pgflow cancel {running.id}" in message
    assert waiting.id not in message  # it would have moved: it does not block
    assert "new slug" in message
    # Refused as a whole: nothing moved, the stored shape is v1's.
    assert store.backend.get_definition("reshaped") == v1.definition
    assert [s.slug for s in store.get_run(waiting.id).steps] == ["fetch"]

    # Once the started run has finished, the change goes through and moves the waiting one.
    store.backend.finish(
        [pf.store.TaskSuccess(task.id, task.attempt, '{"n": 1, "v": 1}', running.id, "fetch",
                              False, task.claim)], [],
    )
    store.register(v2)
    drain(store, v2)
    assert store.get_run(running.id).output == {"fetch": {"n": 1, "v": 1}}
    assert store.get_run(waiting.id).output == {"enrich": {"enriched": 3, "v": 2}}


def test_a_run_waiting_out_a_backoff_blocks_and_the_error_says_when_it_is_due(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    v1 = pf.flow("reshaped", max_attempts=3, base_delay=600)

    @v1.step()
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return input

    run = store.start(v1, {"n": 1})
    (task,) = store.backend.claim("w", ["reshaped"], 1, 30)
    store.backend.finish(
        [], [TaskFailure(task.id, task.attempt, "boom",
                         clock.now() + 600, claim=task.claim)],
    )
    assert store.get_run(run.id).status is pf.RunStatus.RETRYING

    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(_v2())
    due = pf.clock.utc_datetime(clock.now() + 600)
    assert f"  {run.id}  retrying, due {due:%Y-%m-%d %H:%M:%S} UTC" in str(info.value)


def test_the_error_lists_ten_blocking_runs_and_counts_the_rest(store: pf.Store) -> None:
    v1 = _v1()
    runs = store.start_many(v1, [{"n": i} for i in range(12)])
    claimed = store.backend.claim("w", ["reshaped"], 12, 30)
    assert len(claimed) == 12

    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(_v2())
    message = str(info.value)
    assert "12 run(s)" in message and "(12 already started)" in message
    listed = [r.id for r in runs if f"  {r.id}  running" in message]
    assert listed == [r.id for r in runs[:10]]  # the oldest first
    assert "… and 2 more: pgflow runs --flow reshaped" in message


def test_a_run_queued_for_a_step_the_new_version_drops_blocks(store: pf.Store) -> None:
    old = pf.flow("renamed")

    @old.step()
    def download(input: Any, ctx: pf.Context) -> Any:
        return input

    new = pf.flow("renamed")

    @new.step()
    def fetch(input: Any, ctx: pf.Context) -> Any:
        return input

    run = store.start(old, {"n": 1})
    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(new)
    message = str(info.value)
    assert f"  {run.id}  queued (not started, but its step(s) 'download' are not in the new " \
        "version)" in message
    assert store.backend.get_definition("renamed") == old.definition


def test_a_run_whose_input_does_not_fit_a_new_root_map_blocks(store: pf.Store) -> None:
    old = pf.flow("mapped")

    @old.step()
    def each(input: Any, ctx: pf.Context) -> Any:
        return input

    new = pf.flow("mapped")

    @new.map("each")
    def each_item(item: Any, ctx: pf.Context) -> Any:
        return item * 2

    listed = store.start(old, [1, 2, 3])
    single = store.start(old, {"n": 1})
    with pytest.raises(pf.ShapeMismatch) as info:
        store.register(new)
    message = str(info.value)
    assert f"  {single.id}  queued (not started, but its input is not an array" in message
    assert listed.id not in message

    store.cancel(single.id)
    store.register(new)
    drain(store, new)
    assert store.get_run(listed.id).output == {"each": [2, 4, 6]}


def test_starting_a_run_of_a_new_shape_moves_nothing(store: pf.Store) -> None:
    """Only a registration (a deploy, a worker starting) moves runs: a process still running the
    old code may start runs, and must not move the new version's runs back."""
    v1, v2 = _v1(), _v2()
    queued = store.start(v1, {"n": 1})
    with pytest.raises(pf.ShapeMismatch) as info:
        store.start(v2, {"n": 2})
    message = str(info.value)
    assert f"  {queued.id}  queued (not started)" in message
    assert "store.register(flow), or start a worker with the new code" in message
    assert [r.id for r in store.runs(flow="reshaped")] == [queued.id]
    assert store.backend.get_definition("reshaped") == v1.definition

    store.register(v2)
    assert store.start(v2, {"n": 2}).status is pf.RunStatus.QUEUED


def test_a_worker_started_with_the_new_code_moves_queued_runs(store: pf.Store) -> None:
    store.start(_v1(), {"n": 1})
    stats = drain(store, _v2())  # run_flows registers each flow it serves
    assert stats.completed == 2
    (run,) = store.runs(flow="reshaped")
    assert run.output == {"enrich": {"enriched": 2, "v": 2}}


def test_a_moved_run_follows_the_new_versions_conditions(store: pf.Store) -> None:
    old = pf.flow("gated")

    @old.step()
    def check(input: Any, ctx: pf.Context) -> Any:
        return input

    new = pf.flow("gated")

    @new.step("check", if_={"plan": "premium"}, when_unmet="fail")
    def check3(input: Any, ctx: pf.Context) -> Any:
        return input

    free = store.start(old, {"plan": "free"})
    premium = store.start(old, {"plan": "premium"})
    store.register(new)
    assert store.get_run(free.id).status is pf.RunStatus.FAILED
    assert store.get_run(premium.id).status is pf.RunStatus.QUEUED
    drain(store, new)
    assert store.get_run(premium.id).output == {"check": {"plan": "premium"}}


def test_old_workers_stop_serving_a_flow_whose_queued_runs_moved(store: pf.Store) -> None:
    """Moved runs' tasks carry the new version: a worker that registered the old one before
    the deploy hands them back instead of running them with the old step graph."""
    v1, v2 = _v1(), _v2()
    run = store.start(v1, {"n": 1})
    old_version = store.register(v1)
    new_version = store.register(v2)
    assert new_version == old_version + 1
    (task,) = store.backend.claim("w", ["reshaped"], 1, 30)
    assert (task.run_id, task.flow_version) == (run.id, new_version)
