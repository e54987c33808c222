"""Several connections writing one database at once: what a user relies on must hold however
their transactions interleave.

Each test opens several stores (``pf.connect``) on one fresh database (a SQLite file, or a
PostgreSQL schema of its own with ``$PGFLOW_TEST_POSTGRES``) and uses each from its own thread at
the same time, on the real clock: starts (with and without keys, some keys shared between
threads, with priorities), runners draining work (``pf.run_flows(until_idle=True)``), cancels and
retries. Handlers record every execution they see; afterwards the test checks the runs, the
stats and those records: every run ends in the state its definition and the cancels allow, with
the output computed from its input; no task is run twice for one attempt, nor past its maximum;
one key, one run; nothing started is lost.

Only the public API is used. These tests guard the PostgreSQL backend's locking: with writes
serialised by one lock per schema they pass; a claim or a result that races another
connection's shows up here as a task run twice, a run that never finishes, or counts that
disagree.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from _helpers import BACKENDS, shared_database
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pgflow_py as pf

JOIN_TIMEOUT = 120.0  # seconds a thread may take before the test calls it a hang
TERMINAL = {pf.RunStatus.COMPLETED, pf.RunStatus.FAILED, pf.RunStatus.CANCELLED}


def run_threads(bodies: list[Callable[[], None]]) -> None:
    """Run each body in its own thread, all released at once; re-raise the first error, and
    fail if one does not finish (a hang)."""
    barrier = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def wrap(body: Callable[[], None]) -> Callable[[], None]:
        def target() -> None:
            try:
                barrier.wait(timeout=30)
                body()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        return target

    threads = [threading.Thread(target=wrap(b), daemon=True) for b in bodies]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    assert not hung, f"{hung} thread(s) still running after {JOIN_TIMEOUT}s"


# --- what handlers record --------------------------------------------------------------------

@dataclass
class Execution:
    run_id: str
    step: str
    index: int | None
    attempt: int
    max_attempts: int
    began: float
    ended: float | None = None
    ok: bool = False


@dataclass
class Recorder:
    """Every handler execution, across all threads (handed to handlers as a resource)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    executions: list[Execution] = field(default_factory=list)

    def run(self, ctx: pf.Context, compute: Callable[[], Any]) -> Any:
        entry = Execution(ctx.run_id, ctx.step_slug, ctx.task_index, ctx.attempt,
                          ctx.max_attempts, time.monotonic())
        with self.lock:
            self.executions.append(entry)
        try:
            out = compute()
            entry.ok = True
            return out
        finally:
            entry.ended = time.monotonic()


def _record(ctx: pf.Context, compute: Callable[[], Any]) -> Any:
    recorder: Recorder = ctx.resources["record"]
    return recorder.run(ctx, compute)


def _pause(n: int) -> None:
    """A little work, different per input, so executions interleave differently."""
    time.sleep((n % 3) * 0.001)


# --- the definitions of the mixed test -------------------------------------------------------

@pf.job(queue="cc_job")
def cc_job(input: Any, ctx: pf.Context) -> Any:
    def compute() -> Any:
        _pause(input["n"])
        return {"double": 2 * input["n"]}

    return _record(ctx, compute)


# A diamond with a map: items -> (squares: one task per item, total) -> join.
cc_diamond = pf.flow("cc_diamond")


@cc_diamond.step()
def items(input: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: list(range(input["n"], input["n"] + input["width"])))


@cc_diamond.map(array="items")
def squares(item: Any, ctx: pf.Context) -> Any:
    def compute() -> Any:
        _pause(item)
        return item * item

    return _record(ctx, compute)


@cc_diamond.step(depends_on=["items"])
def total(deps: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: sum(deps["items"]))


@cc_diamond.step(depends_on=["squares", "total"])
def join(deps: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: {"squares": deps["squares"], "total": deps["total"]})


# Its first step fails the first ``fails`` attempts (fewer than its three), then succeeds.
cc_flaky = pf.flow("cc_flaky", max_attempts=3, base_delay=0.005)


@cc_flaky.step()
def first(input: Any, ctx: pf.Context) -> Any:
    def compute() -> Any:
        if ctx.attempt <= input["fails"]:
            raise RuntimeError(f"scripted failure {ctx.attempt} of {input['fails']}")
        return input["n"] + 1

    return _record(ctx, compute)


@cc_flaky.step(depends_on=["first"])
def second(deps: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: deps["first"] * 10)


# Its second step always fails: each run fails (for good, after two attempts).
cc_doomed = pf.flow("cc_doomed", max_attempts=2, base_delay=0.005)
DOOMED = "doomed by design"


@cc_doomed.step()
def prepare(input: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: input["n"])


@cc_doomed.step(depends_on=["prepare"])
def boom(deps: Any, ctx: pf.Context) -> Any:
    def compute() -> Any:
        raise RuntimeError(DOOMED)

    return _record(ctx, compute)


MIXED = {f.slug: f for f in (cc_job, cc_diamond, cc_flaky, cc_doomed)}
MAX_ATTEMPTS = {
    (f.slug, s.slug): f.definition.effective(s.slug).max_attempts
    for f in MIXED.values() for s in f.definition.steps
}


def expected_output(slug: str, input: Any) -> Any:
    """What a completed run of ``slug`` must have returned for ``input``."""
    n = input["n"]
    if slug == "cc_job":
        return {"double": 2 * n}
    if slug == "cc_diamond":
        values = list(range(n, n + input["width"]))
        return {"join": {"squares": [v * v for v in values], "total": sum(values)}}
    if slug == "cc_flaky":
        return {"second": (n + 1) * 10}
    raise AssertionError(f"a run of {slug} completed")


def expected_tasks(slug: str, input: Any) -> set[tuple[str, int | None]]:
    """The tasks a completed run of ``slug`` must have executed successfully."""
    if slug == "cc_job":
        return {("cc_job", None)}
    if slug == "cc_diamond":
        return {("items", None), ("total", None), ("join", None)} | {
            ("squares", i) for i in range(input["width"])
        }
    return {("first", None), ("second", None)}


# --- the mixed test --------------------------------------------------------------------------

@st.composite
def starts(draw: st.DrawFn) -> tuple[Any, ...]:
    """One ``store.start``: a flow, its input, maybe a key (few, so threads share them) and a
    priority."""
    slug = draw(st.sampled_from(sorted(MIXED)))
    input = {"n": draw(st.integers(0, 99))}
    if slug == "cc_diamond":
        input["width"] = draw(st.integers(0, 3))  # 0: the map runs over an empty array
    elif slug == "cc_flaky":
        input["fails"] = draw(st.integers(0, 2))
    key = draw(st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])))
    return ("start", slug, input, key, draw(st.sampled_from([0, 0, 5, -3])))


start_manys = st.builds(
    lambda slug, ns, priority: ("start_many", slug, [
        {"n": n, "width": n % 4, "fails": n % 3} for n in ns
    ], priority),
    st.sampled_from(sorted(MIXED)),
    st.lists(st.integers(0, 99), min_size=1, max_size=10),
    st.sampled_from([0, 7]),
)
operations = st.one_of(
    starts(),
    start_manys,
    st.tuples(st.just("drain"), st.integers(1, 4)),
    st.tuples(st.just("cancel"), st.integers(0, 10_000)),
    st.tuples(st.just("retry"), st.integers(0, 10_000)),
)
programs = st.lists(st.lists(operations, min_size=2, max_size=12), min_size=3, max_size=4)


@dataclass
class Journal:
    """What the threads did, as the test saw it (appended to from every thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    """(run id, flow, key, priority) of every start that returned."""
    cancelled: set[str] = field(default_factory=set)  # runs a cancel was asked for
    retries: Counter[str] = field(default_factory=Counter)  # retries the store accepted

    def pick(self, i: int, flow: str | None = None) -> str | None:
        with self.lock:
            ids = [r[0] for r in self.started if flow is None or r[1] == flow]
        return ids[i % len(ids)] if ids else None


def serve(store: pf.Store, recorder: Recorder, concurrency: int) -> None:
    pf.run_flows(list(MIXED.values()), store=store, until_idle=True, concurrency=concurrency,
                 resources={"record": recorder}, handle_signals=False)


def perform(store: pf.Store, program: list[Any], journal: Journal, recorder: Recorder) -> None:
    for op in program:
        kind = op[0]
        if kind == "start":
            _, slug, input, key, priority = op
            run = store.start(MIXED[slug], input, key=key, priority=priority)
            with journal.lock:
                journal.started.append((run.id, slug, key, priority))
        elif kind == "start_many":
            _, slug, inputs, priority = op
            runs = store.start_many(MIXED[slug], inputs, priority=priority)
            assert len(runs) == len(inputs)
            with journal.lock:
                journal.started += [(r.id, slug, None, priority) for r in runs]
        elif kind == "drain":
            serve(store, recorder, op[1])
        elif kind == "cancel":
            run_id = journal.pick(op[1])
            if run_id is not None:
                with journal.lock:
                    journal.cancelled.add(run_id)
                store.cancel(run_id)
        elif kind == "retry":
            # Mostly a run that has failed or was cancelled, as listed now, else any run (a
            # retry of a run that is neither is refused).
            if op[1] % 3:
                status = pf.RunStatus.FAILED if op[1] % 3 == 1 else pf.RunStatus.CANCELLED
                ended = [run.id for run in store.runs(status=status, limit=1000)]
                run_id = ended[op[1] % len(ended)] if ended else None
            else:
                run_id = journal.pick(op[1])
            if run_id is not None:
                try:
                    store.retry(run_id)
                except pf.InputError as exc:
                    assert "only failed or cancelled" in str(exc) or "key now belongs" in str(exc)
                else:
                    with journal.lock:
                        journal.retries[run_id] += 1
    serve(store, recorder, 3)  # every thread ends serving, while the others may still be


def check_runs(store: pf.Store, journal: Journal, recorder: Recorder) -> None:
    started_ids = {r[0] for r in journal.started}
    listed = store.runs(limit=100_000)
    by_id = {run.id: run for run in listed}
    # Nothing lost, nothing made up: every run started is there, and only those.
    assert set(by_id) == started_ids
    assert len(listed) == len(by_id)
    for run_id in started_ids:
        assert store.get_run(run_id) == by_id[run_id]

    done: dict[str, dict[tuple[str, int | None], list[Execution]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for ex in recorder.executions:
        done[ex.run_id][(ex.step, ex.index)].append(ex)

    for run in listed:
        where = f"run {run.id} of {run.flow_slug} ({run.input}): {run.status.value}, {run.error}"
        assert run.status in TERMINAL, where
        if run.status == pf.RunStatus.COMPLETED:
            assert run.flow_slug != "cc_doomed", where
            assert run.output == expected_output(run.flow_slug, run.input), where
            ran_ok = {task for task, exs in done[run.id].items() if any(e.ok for e in exs)}
            assert expected_tasks(run.flow_slug, run.input) <= ran_ok, where
        elif run.status == pf.RunStatus.FAILED:
            assert run.flow_slug == "cc_doomed", where
            assert run.error is not None and DOOMED in run.error, where
            attempts = {e.attempt for e in done[run.id][("boom", None)]}
            assert MAX_ATTEMPTS["cc_doomed", "boom"] in attempts, where
        else:
            assert run.id in journal.cancelled, f"{where}, but nobody cancelled it"

    # Priorities as given (a keyed start may have returned an earlier start's run).
    for run_id, _, key, priority in journal.started:
        if key is None:
            assert by_id[run_id].priority == priority

    # One key, one run: all starts with a flow's key got one run, unless it was cancelled
    # (a cancelled run frees its key); never two live runs of one key.
    keyed: dict[tuple[str, str], set[str]] = defaultdict(set)
    for run_id, slug, key, _ in journal.started:
        if key is not None:
            keyed[slug, key].add(run_id)
    for (slug, key), ids in keyed.items():
        holding = [run for run in listed if run.flow_slug == slug and run.key == key]
        assert {run.id for run in holding} == ids, (slug, key)
        live = [run.id for run in holding if run.status != pf.RunStatus.CANCELLED]
        assert len(live) <= 1, (slug, key, live)
        if not ids & journal.cancelled:
            assert len(ids) == 1, (slug, key, ids)

    # The stats and counts say what the listing says.
    statuses = Counter((run.flow_slug, run.status.value) for run in listed)
    stats = {s.flow_slug: s for s in store.stats()}
    assert store.count() == len(listed)
    for slug in MIXED:
        if slug not in stats:
            assert not any(run.flow_slug == slug for run in listed)
            continue
        for status in pf.RunStatus:
            want = statuses[slug, status.value]
            assert stats[slug].counts[status.value] == want, (slug, status, stats[slug])
            assert store.count(flow=slug, status=status) == want, (slug, status)
        assert stats[slug].oldest_queued_age is None


def check_executions(journal: Journal, recorder: Recorder) -> None:
    per_task: dict[tuple[str, str, int | None], list[Execution]] = defaultdict(list)
    # Every runner has returned, so every handler has ended, except that a sync handler whose
    # run was cancelled under it is abandoned to finish on its own thread: give those a moment.
    deadline = time.monotonic() + 5
    while any(ex.ended is None for ex in recorder.executions) and time.monotonic() < deadline:
        time.sleep(0.01)
    for ex in recorder.executions:
        assert ex.ended is not None or ex.run_id in journal.cancelled, f"still running: {ex}"
        limit = MAX_ATTEMPTS[_flow_of(journal, ex.run_id), ex.step]
        assert ex.max_attempts == limit, ex
        assert 1 <= ex.attempt <= limit, f"attempt past the maximum: {ex}"
        per_task[ex.run_id, ex.step, ex.index].append(ex)
    for (run_id, step, index), exs in per_task.items():
        # A retry starts the task's attempts again (and may overlap a cancelled attempt
        # still finishing), so each retry the store accepted allows one more of each.
        allowed = 1 + journal.retries[run_id]
        attempts = Counter(e.attempt for e in exs)
        twice = {a: n for a, n in attempts.items() if n > allowed}
        assert not twice, (
            f"{run_id} {step}[{index}]: attempts run more than once: {twice} "
            f"({journal.retries[run_id]} retries)"
        )
        assert sum(e.ok for e in exs) <= allowed, f"{run_id} {step}[{index}] succeeded twice"
        if run_id not in journal.cancelled:
            # Nothing cancelled it, so nothing lets two executions of it overlap.
            exs = sorted(exs, key=lambda e: e.began)
            for earlier, later in itertools.pairwise(exs):
                assert earlier.ended is not None and earlier.ended <= later.began, (
                    f"{run_id} {step}[{index}] ran twice at once: {earlier} and {later}"
                )


def _flow_of(journal: Journal, run_id: str) -> str:
    for started_id, slug, _, _ in journal.started:
        if started_id == run_id:
            return slug
    raise AssertionError(f"a handler ran for {run_id}, which no start returned")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Threads interleave differently on every run of an example, so shrinking one mostly
    # chases that: report the example as found.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(program=programs)
def test_concurrent_starts_runners_cancels_and_retries_keep_every_promise(
    backend: str, program: list[list[Any]]
) -> None:
    journal, recorder = Journal(), Recorder()
    with shared_database(backend) as open_store:
        stores = [open_store() for _ in program]
        for flow in MIXED.values():  # every thread finds every definition in place
            stores[0].register(flow)
        run_threads([
            (lambda s=store, p=ops: perform(s, p, journal, recorder))
            for store, ops in zip(stores, program, strict=True)
        ])
        serve(stores[0], recorder, 4)  # the last runner may have stopped before a retry
        check_runs(stores[0], journal, recorder)
        check_executions(journal, recorder)


# --- many jobs and flow runs, four runners ---------------------------------------------------

@pf.job(queue="cc_bulk")
def cc_bulk(input: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: input + 1)


cc_chain = pf.flow("cc_chain")  # three steps: a -> b (one task per item of a) -> c


@cc_chain.step()
def a(input: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: [input, input + 1, input + 2])


@cc_chain.map(array="a")
def b(item: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: item * 2)


@cc_chain.step(depends_on=["b"])
def c(deps: Any, ctx: pf.Context) -> Any:
    return _record(ctx, lambda: sum(deps["b"]))


RUNNERS = 4
JOBS_EACH = 500
FLOWS_EACH = 50
KEYED = 20  # runs every thread starts with the same keys, all at once
KEYED_INPUT = 1_000_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_runners_run_every_task_of_thousands_of_runs_exactly_once(backend: str) -> None:
    recorder = Recorder()
    ids: list[str] = []
    keyed: list[list[str]] = []  # per thread, what its keyed starts returned (or raised)
    lock = threading.Lock()
    ready = threading.Barrier(RUNNERS)

    def start_keyed(store: pf.Store, k: int) -> str:
        try:
            return store.start(cc_bulk, KEYED_INPUT + k, key=f"same-{k}").id
        except pf.StoreError as exc:  # reported with the rest, after the drain
            return f"raised {exc}"

    def work(store: pf.Store, part: int) -> None:
        base = part * JOBS_EACH
        jobs = [r.id for chunk in range(0, JOBS_EACH, 100) for r in store.start_many(
            cc_bulk, list(range(base + chunk, base + chunk + 100))
        )]
        flows = store.start_many(cc_chain, list(range(part * FLOWS_EACH, (part + 1) * FLOWS_EACH)))
        with lock:
            ids.extend(jobs + [r.id for r in flows])
        ready.wait(timeout=30)  # all started: now every thread starts the same keyed runs,
        same = [start_keyed(store, k) for k in range(KEYED)]
        with lock:
            keyed.append(same)
        # then the runners compete for the same tasks.
        pf.run_flows([cc_bulk, cc_chain], store=store, until_idle=True, concurrency=8,
                     resources={"record": recorder}, handle_signals=False)

    with shared_database(backend) as open_store:
        stores = [open_store() for _ in range(RUNNERS)]
        for flow in (cc_bulk, cc_chain):
            stores[0].register(flow)
        run_threads([(lambda s=store, i=i: work(s, i)) for i, store in enumerate(stores)])
        runs = stores[0].runs(limit=100_000)

    problems: list[str] = []
    assert len(keyed) == RUNNERS
    split = {k: sorted(set(got)) for k, got in enumerate(zip(*keyed, strict=True))
             if len(set(got)) != 1}
    if split:
        k, got = next(iter(split.items()))
        problems.append(f"{len(split)} of {KEYED} keys: the concurrent starts did not all "
                        f"return one run, e.g. same-{k}: {[text[:150] for text in got]}")
    ids += {run_id for got in keyed for run_id in got if not run_id.startswith("raised")}
    listed = {run.id for run in runs}
    if listed != set(ids) or len(ids) != len(set(ids)):
        problems.append(f"{len(set(ids) - listed)} run(s) started but not listed, "
                        f"{len(listed - set(ids))} listed but never started")
    not_completed = [(r.id, r.flow_slug, r.status.value) for r in runs
                     if r.status != pf.RunStatus.COMPLETED]
    if not_completed:
        problems.append(f"{len(not_completed)} run(s) not completed, e.g. {not_completed[:3]}")
    wrong = [(run.id, run.input, run.output) for run in runs
             if run.status == pf.RunStatus.COMPLETED and run.output != (
                 run.input + 1 if run.flow_slug == "cc_bulk" else {"c": 6 * run.input + 6})]
    if wrong:
        problems.append(f"{len(wrong)} run(s) with a wrong output, e.g. {wrong[:3]}")
    ran = Counter((e.run_id, e.step, e.index) for e in recorder.executions)
    twice = [task for task, n in ran.items() if n != 1]
    if twice:
        problems.append(f"{len(twice)} task(s) ran more than once, e.g. {twice[:3]}")
    retried = [e for e in recorder.executions if e.attempt != 1 or not e.ok]
    if retried:
        problems.append(f"{len(retried)} execution(s) not a successful first attempt, "
                        f"e.g. {retried[:2]}")
    # A flow run has 1 + 3 + 1 tasks.
    expected = RUNNERS * (JOBS_EACH + FLOWS_EACH * 5) + KEYED
    if len(ran) != expected:
        problems.append(f"{len(ran)} distinct tasks ran, not {expected}")
    assert not problems, "\n".join(problems)
