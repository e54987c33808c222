"""The store at its edges: what it refuses (and how it says so), values it cannot read back,
paths it cannot use, passwords it must not repeat, and a store used after ``close``.

Most tests take the ``store`` fixture, so they run on PostgreSQL too with
``$PGFLOW_TEST_POSTGRES`` set; tables are read through the backend, not the SQLite file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _helpers import POSTGRES_URL

import pgflow_py as pf
from pgflow_py.store import base
from pgflow_py.store.base import TaskFailure, TaskSuccess


@pf.job(queue="rb_echo")
def rb_echo(input: Any, ctx: pf.Context) -> Any:
    return input


fan = pf.flow("rb_fan")


@fan.step()
def split(input: Any, ctx: pf.Context) -> Any:
    return input


@fan.map(array="split")
def each(item: Any, ctx: pf.Context) -> Any:
    return item


root_map = pf.flow("rb_root_map")


@root_map.map()
def item(value: Any, ctx: pf.Context) -> Any:
    return value


# --- helpers ------------------------------------------------------------------------------------

TOO_DEEP = "[" * 100_000 + "]" * 100_000  # no decoder recursion survives this
NOT_JSON = '{"oops'


def sql(store: pf.Store, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of ``query`` on the store's own connection (either backend)."""
    backend: Any = store.backend
    with backend._lock:
        return list(backend._conn.execute(query, params).fetchall())


def write(store: pf.Store, query: str, params: tuple[Any, ...] = ()) -> None:
    backend: Any = store.backend
    with backend._write() as c:
        c.execute(query, params)


def row_counts(store: pf.Store) -> dict[str, int]:
    return {t: sql(store, f"SELECT count(*) FROM {t}")[0][0]
            for t in ("runs", "step_states", "step_tasks")}


def finishes_within(seconds: float, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` in a thread; fail the test if it is still running after ``seconds``
    (so a call that would hang fails instead of hanging the suite); return what it raised."""
    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            raised[0] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s"
    return raised[0]


def is_undecodable(value: Any, error_type: str) -> bool:
    return isinstance(value, base.Undecodable) and value.error.startswith(f"{error_type}: ")


# --- 1. inputs that could not be read back ------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class _Items(list):  # type: ignore[type-arg]
    """A list subclass: its items are encoded one by one for a root map."""


BAD_INPUTS = [
    pytest.param(_nested(990), "nests arrays or objects more than 256 levels deep", id="deep"),
    pytest.param({"name": "caf\udce9"}, "lone surrogate", id="surrogate-value"),
    pytest.param({"caf\udce9": 1}, "lone surrogate", id="surrogate-key"),
    pytest.param({1: "a", "1": "b"}, "keys 1 and '1' are both '1'", id="colliding-keys"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_INPUTS)
def test_start_refuses_inputs_that_could_not_be_read_back(
    store: pf.Store, bad: Any, problem: str
) -> None:
    store.register(rb_echo)
    store.register(root_map)
    before = row_counts(store)
    starts: list[Callable[[], Any]] = [
        lambda: store.start(rb_echo, bad),
        lambda: store.start("rb_echo", bad, key="k"),
        lambda: store.start_many(rb_echo, [1, bad]),
        lambda: store.start(root_map, [1, bad]),
        lambda: store.start(root_map, _Items([1, bad])),  # encoded item by item
    ]
    for start in starts:
        with pytest.raises(pf.InputError, match="must be JSON-serializable") as caught:
            start()
        assert problem in str(caught.value)
        str(caught.value).encode("utf-8")  # printable: no lone surrogate in the message
    assert row_counts(store) == before


def test_a_root_map_refuses_items_whose_keys_collide(store: pf.Store) -> None:
    # The items of a list subclass are encoded on their own: the same checks apply to each.
    with pytest.raises(pf.InputError, match=r"rb_root_map.*keys 1 and '1' are both '1'"):
        store.start(root_map, _Items([{"ok": 1}, {1: "a", "1": "b"}]))
    assert store.runs() == []


def test_a_cycle_is_still_named_a_cycle(store: pf.Store) -> None:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    with pytest.raises(pf.InputError, match="circular reference detected"):
        store.start(rb_echo, [[cyclic]])


def _corrupt_run_input(store: pf.Store, run_id: str, text: str) -> None:
    """Store ``text`` as a run's input, as an older version or a hand edit might have."""
    write(store, "UPDATE runs SET input = ? WHERE id = ?", (text, run_id))


@pytest.mark.parametrize(("text", "error_type"), [
    pytest.param(TOO_DEEP, "RecursionError", id="too-deep"),
    pytest.param(NOT_JSON, "JSONDecodeError", id="not-json"),
])
def test_a_run_input_that_cannot_be_decoded_is_handed_over_as_undecodable(
    store: pf.Store, text: str, error_type: str
) -> None:
    good = store.start(rb_echo, {"n": 1})
    bad = store.start(rb_echo, {"n": 2})
    _corrupt_run_input(store, bad.id, text)
    claimed = {t.run_id: t for t in store.backend.claim("w", ["rb_echo"], 10, 60)}
    assert set(claimed) == {good.id, bad.id}  # the bad one does not abort the claim
    assert claimed[good.id].input == {"n": 1} and claimed[good.id].flow_input == {"n": 1}
    task = claimed[bad.id]
    assert is_undecodable(task.input, error_type), task.input
    assert is_undecodable(task.flow_input, error_type)
    assert "\n" not in task.input.error
    # Nothing else is left in a state a runner would trip on: the task is held, as claimed.
    assert sql(store, "SELECT status FROM tasks WHERE run_id = ?", (bad.id,)) == [("started",)]


def test_a_task_input_that_cannot_be_decoded_leaves_its_flow_input_readable(
    store: pf.Store,
) -> None:
    run = store.start(fan, {"items": True})
    (split_task,) = store.backend.claim("w", ["rb_fan"], 10, 60)
    store.backend.finish([TaskSuccess(split_task.id, split_task.attempt, "[1,2]")], [])
    write(store, "UPDATE step_tasks SET input = ? WHERE run_id = ? AND task_index = 1",
          (TOO_DEEP, run.id))
    tasks = sorted(store.backend.claim("w", ["rb_fan"], 10, 60), key=lambda t: t.task_index or 0)
    assert [t.task_index for t in tasks] == [0, 1]
    assert tasks[0].input == 1
    assert is_undecodable(tasks[1].input, "RecursionError")
    assert tasks[1].flow_input == {"items": True}


def test_get_run_and_runs_read_an_undecodable_input_as_undecodable(store: pf.Store) -> None:
    good = store.start(rb_echo, "fine")
    bad = store.start(rb_echo, "fine")
    _corrupt_run_input(store, bad.id, TOO_DEEP)
    shown = store.get_run(bad.id)
    assert is_undecodable(shown.input, "RecursionError")
    assert shown.status is pf.RunStatus.QUEUED
    listed = {r.id: r for r in store.runs()}
    assert listed[good.id].input == "fine"
    assert is_undecodable(listed[bad.id].input, "RecursionError")


def test_failing_a_run_whose_input_cannot_be_decoded_reports_it_undecodable(
    store: pf.Store,
) -> None:
    run = store.start(rb_echo, 1)
    (task,) = store.backend.claim("w", ["rb_echo"], 10, 60)
    _corrupt_run_input(store, run.id, TOO_DEEP)
    failed: list[base.RunFailure] = []
    finished = store.backend.finish(
        [], [TaskFailure(task.id, task.attempt, "Boom: x", None, task.claim)], failed
    )
    assert finished == [run.id]
    assert [f.run_id for f in failed] == [run.id]
    assert is_undecodable(failed[0].flow_input, "RecursionError")
    assert store.get_run(run.id).status is pf.RunStatus.FAILED


def test_a_map_fed_an_output_it_cannot_decode_fails_its_run_not_the_whole_batch(
    store: pf.Store,
) -> None:
    other = store.start(rb_echo, "other")
    run = store.start(fan, None)
    tasks = {t.flow_slug: t for t in store.backend.claim("w", ["rb_fan", "rb_echo"], 10, 60)}
    split_task, echo_task = tasks["rb_fan"], tasks["rb_echo"]
    finished = store.backend.finish([
        TaskSuccess(split_task.id, split_task.attempt, TOO_DEEP, claim=split_task.claim),
        TaskSuccess(echo_task.id, echo_task.attempt, '"other"', other.id, "rb_echo", True,
                    echo_task.claim),
    ], [])
    assert sorted(finished) == sorted([run.id, other.id])
    failed = store.get_run(run.id)
    assert failed.status is pf.RunStatus.FAILED
    assert failed.error is not None
    assert "map step 'each' cannot read the output of step 'split': RecursionError" in failed.error
    assert store.get_run(other.id).output == "other"  # the rest of the batch was recorded


# --- 2. arguments the databases cannot store ----------------------------------------------------


@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, 2**31, -(2**31) - 1, 10**30])
def test_a_priority_out_of_range_is_an_input_error(store: pf.Store, priority: int) -> None:
    store.register(rb_echo)
    before = row_counts(store)
    with pytest.raises(pf.InputError, match="priority must fit in a signed 32-bit integer"):
        store.start(rb_echo, 1, priority=priority)
    with pytest.raises(pf.InputError, match="priority must fit"):
        store.start_many(rb_echo, [1, 2], priority=priority)
    assert row_counts(store) == before


def test_the_extreme_priorities_are_stored_on_every_backend(store: pf.Store) -> None:
    low = store.start(rb_echo, 1, priority=-(2**31))
    high = store.start(rb_echo, 2, priority=2**31 - 1)
    assert store.get_run(low.id).priority == -(2**31)
    assert store.get_run(high.id).priority == 2**31 - 1
    claimed = store.backend.claim("w", ["rb_echo"], 10, 60)
    assert [t.run_id for t in claimed] == [high.id, low.id]


SURROGATE = "order-\udc80"
NUL = "order-\x00"

CALLS_WITH_TEXT = [
    pytest.param(lambda s, v: s.start(rb_echo, 1, key=v), "key", id="start-key"),
    pytest.param(lambda s, v: s.start(v, 1), "flow slug", id="start-slug"),
    pytest.param(lambda s, v: s.start_many(v, [1]), "flow slug", id="start_many-slug"),
    pytest.param(lambda s, v: s.runs(flow=v), "flow", id="runs-flow"),
    pytest.param(lambda s, v: s.runs(key=v), "key", id="runs-key"),
    pytest.param(lambda s, v: s.get_run(v), "run id", id="get_run"),
    pytest.param(lambda s, v: s.cancel(v), "run id", id="cancel"),
    pytest.param(lambda s, v: s.retry(v), "run id", id="retry"),
    pytest.param(lambda s, v: s.wait(v, timeout=1), "run id", id="wait"),
]


@pytest.mark.parametrize(("call", "argument"), CALLS_WITH_TEXT)
def test_a_lone_surrogate_in_an_argument_is_an_input_error_naming_it(
    store: pf.Store, call: Callable[[pf.Store, str], Any], argument: str
) -> None:
    store.register(rb_echo)
    before = row_counts(store)
    with pytest.raises(pf.InputError) as caught:
        call(store, SURROGATE)
    message = str(caught.value)
    assert message.startswith(f"{argument} 'order-\\udc80' holds '\\udc80', a lone surrogate")
    message.encode("utf-8")
    assert row_counts(store) == before


@pytest.mark.parametrize(("call", "argument"), CALLS_WITH_TEXT)
def test_a_nul_in_an_argument_is_an_input_error_on_every_backend(
    store: pf.Store, call: Callable[[pf.Store, str], Any], argument: str
) -> None:
    # PostgreSQL's text cannot hold NUL (a StoreError there before); SQLite refuses it alike.
    store.register(rb_echo)
    before = row_counts(store)
    with pytest.raises(pf.InputError, match=rf"^{argument} 'order-\\x00' holds a NUL character"):
        call(store, NUL)
    assert row_counts(store) == before


@pytest.mark.parametrize("limit", [-1, 2**63, 1.5, None])
def test_runs_refuses_a_limit_the_databases_cannot_take(store: pf.Store, limit: Any) -> None:
    with pytest.raises(pf.InputError, match="limit must be a non-negative integer"):
        store.runs(limit=limit)


# --- 3. times that never come -------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1, 10**400, -math.inf])
def test_wait_refuses_a_timeout_that_is_not_a_finite_duration(
    store: pf.Store, timeout: Any
) -> None:
    run = store.start(rb_echo, 1)  # queued: nothing serves it, so a bad timeout would hang
    raised = finishes_within(5, lambda: store.wait(run.id, timeout=timeout))
    assert isinstance(raised, pf.InputError), raised
    assert "timeout must" in str(raised)


def test_wait_takes_a_timedelta_timeout(store: pf.Store) -> None:
    run = store.start(rb_echo, 1)
    with pytest.raises(pf.WaitTimeout):
        store.wait(run.id, timeout=timedelta(milliseconds=20))


@pytest.mark.parametrize(("when", "match"), [
    pytest.param({"delay": math.nan}, "delay must be a finite number", id="delay-nan"),
    pytest.param({"delay": math.inf}, "delay must be a finite number", id="delay-inf"),
    pytest.param({"delay": 10**400}, "delay must be a finite number", id="delay-huge-int"),
    pytest.param({"delay": 1e300}, "after the year 9999", id="delay-1e300"),
    pytest.param({"delay": timedelta.max}, "after the year 9999", id="delay-timedelta-max"),
    pytest.param({"run_at": datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))},
                 "after the year 9999 in UTC", id="run_at-past-9999-utc"),
])
def test_start_refuses_a_due_time_out_of_range(
    store: pf.Store, when: dict[str, Any], match: str
) -> None:
    store.register(rb_echo)
    before = row_counts(store)
    with pytest.raises(pf.InputError, match=match):
        store.start(rb_echo, 1, **when)
    with pytest.raises(pf.InputError, match=match):
        store.start_many(rb_echo, [1], **when)
    assert row_counts(store) == before


def test_the_latest_due_time_allowed_reads_back(store: pf.Store) -> None:
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
    run = store.start(rb_echo, 1, run_at=last)
    assert store.get_run(run.id).status is pf.RunStatus.SCHEDULED
    earliest = store.start(rb_echo, 2, run_at=datetime.min.replace(tzinfo=timezone.utc))
    assert store.get_run(earliest.id).status is pf.RunStatus.QUEUED


@pytest.mark.parametrize("older_than", [math.nan, math.inf, 10**400, -1])
def test_prune_refuses_an_age_that_is_not_a_finite_duration(
    store: pf.Store, older_than: Any
) -> None:
    with pytest.raises(pf.InputError, match="older_than must"):
        store.prune(older_than=older_than)


# --- 4. database paths that cannot be used ------------------------------------------------------


def test_a_missing_directory_is_named_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "missing_dir" / "app.db"
    with pytest.raises(pf.StoreError) as caught:
        pf.connect(path)
    assert str(caught.value) == (
        f"cannot create database file {str(path)!r}: directory {str(path.parent)!r} "
        "does not exist (create it first)"
    )
    assert isinstance(caught.value, pf.SchemaError)  # what it raised before it said why
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not path.parent.exists()


def test_a_path_through_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(pf.StoreError, match=r"'.*plain' is not a directory"):
        pf.connect(tmp_path / "plain" / "app.db")


def test_a_directory_given_as_the_database_is_named(tmp_path: Path) -> None:
    with pytest.raises(pf.StoreError, match="it is a directory; point pgflow at a file path"):
        pf.connect(tmp_path)


def test_a_file_that_is_not_sqlite_is_named(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(pf.StoreError) as caught:
        pf.connect(path)
    assert str(caught.value) == (
        f"cannot use the pgflow database {str(path)!r}: the file is not an SQLite database "
        "(or is encrypted); point pgflow at another path"
    )
    assert path.read_bytes() == b"this is not sqlite at all" * 100  # untouched


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to this one)."""
    path = Path(tempfile.mkdtemp(prefix="pgflow-perm-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        if child.is_dir():
            child.chmod(0o755)
    shutil.rmtree(path)


def run_unprivileged(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process without root's power to ignore permissions: as this
    user when it is not root, else as ``nobody`` (skipping the test if that cannot be done)."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no 'nobody' user to drop privileges to")
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv is missing to drop privileges")
        command = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                   "--clear-groups", *command]
    probe = subprocess.run([*command[:-1], "import pgflow_py"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot import pgflow_py: {probe.stderr[-300:]}")
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


CONNECT_AND_REPORT = """
    import sys
    import pgflow_py as pf
    try:
        pf.connect(sys.argv[-1] if len(sys.argv) > 1 else {path!r}).close()
    except pf.StoreError as exc:
        print(type(exc).__name__, exc)
    else:
        print("opened")
"""


def test_a_read_only_directory_for_a_new_database_is_named(shared_dir: Path) -> None:
    ro = shared_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    path = ro / "app.db"
    done = run_unprivileged(CONNECT_AND_REPORT.format(path=str(path)))
    assert done.stdout.strip() == (
        f"UnusableDatabase cannot create database file {str(path)!r}: directory {str(ro)!r} "
        "is not writable by this user (give it write access, or point pgflow at another "
        "directory)"
    ), done.stderr


def test_a_read_only_directory_of_an_existing_database_names_the_wal_files(
    shared_dir: Path,
) -> None:
    ro = shared_dir / "ro"
    ro.mkdir()
    path = ro / "app.db"
    pf.connect(path).close()
    path.chmod(0o666)  # the file itself is writable by anyone: only the directory is not
    ro.chmod(0o555)
    done = run_unprivileged(CONNECT_AND_REPORT.format(path=str(path)))
    assert done.stdout.strip() == (
        f"UnusableDatabase cannot use the pgflow database {str(path)!r}: directory {str(ro)!r} "
        "is not writable by this user (SQLite needs to create app.db-wal and app.db-shm beside "
        "the database; give it write access)"
    ), done.stderr


def test_a_database_file_this_user_cannot_write_is_named(shared_dir: Path) -> None:
    path = shared_dir / "app.db"
    pf.connect(path).close()
    path.chmod(0o444)
    done = run_unprivileged(CONNECT_AND_REPORT.format(path=str(path)))
    assert done.stdout.strip() == (
        f"UnusableDatabase cannot use the pgflow database {str(path)!r}: the file is not "
        "readable and writable by this user (give it access)"
    ), done.stderr


# --- 5. cancelling keeps when a run started -----------------------------------------------------


def test_cancelling_a_running_run_keeps_when_it_started(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    run = store.start(rb_echo, 1)
    clock.advance(5)
    store.backend.claim("w", ["rb_echo"], 10, 60)
    running = store.get_run(run.id)
    assert running.status is pf.RunStatus.RUNNING and running.started_at is not None
    clock.advance(5)
    cancelled = store.cancel(run.id)
    assert cancelled.status is pf.RunStatus.CANCELLED
    assert cancelled.started_at == running.started_at
    assert cancelled.finished_at is not None and cancelled.finished_at > cancelled.started_at
    assert store.get_run(run.id).started_at == running.started_at


def test_cancelling_a_run_that_never_started_leaves_no_start(store: pf.Store) -> None:
    run = store.start(rb_echo, 1)
    cancelled = store.cancel(run.id)
    assert cancelled.status is pf.RunStatus.CANCELLED
    assert cancelled.started_at is None and cancelled.finished_at is not None


def test_cancelling_a_retrying_run_keeps_its_first_start(
    store: pf.Store, clock: pf.testing.FakeClock
) -> None:
    run = store.start(rb_echo, 1)
    (task,) = store.backend.claim("w", ["rb_echo"], 10, 60)
    store.backend.finish([], [TaskFailure(task.id, task.attempt, "E: x", clock.now() + 60,
                                          task.claim)])
    started = store.get_run(run.id).started_at
    assert started is not None
    assert store.cancel(run.id).started_at == started


# --- 6. files only their owner can read ---------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(path: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode)
            for p in path.parent.iterdir() if p.name.startswith(path.name)}


def test_a_new_database_and_its_wal_files_are_private(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "app.db"
    with pf.connect(path) as store:
        store.start(rb_echo, {"card": "4111 1111 1111 1111"})
        assert _modes(path) == {"app.db": 0o600, "app.db-wal": 0o600, "app.db-shm": 0o600}


def test_an_existing_database_keeps_the_permissions_its_owner_gave_it(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "shared.db"
    pf.connect(path).close()
    path.chmod(0o640)
    with pf.connect(path) as store:
        store.start(rb_echo, 1)
        assert _modes(path) == {"shared.db": 0o640, "shared.db-wal": 0o640, "shared.db-shm": 0o640}


# --- 7. passwords stay out of errors and logs ---------------------------------------------------

SECRET = "s3cr3tPW"


def _texts(exc: BaseException) -> Iterator[str]:
    """Everything a traceback of ``exc`` could show, and its chain's texts."""
    yield "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        yield str(item)
        yield repr(item)
        yield from (str(a) for a in item.args)
        if item.__cause__ is not None:
            yield from _texts(item.__cause__)
        item = item.__context__


BAD_URLS = [
    pytest.param(f"postgresql://u:pa%ss{SECRET}@localhost/db", id="bad-percent-in-password"),
    pytest.param(f"postgresql://u:{SECRET}%@localhost/db", id="bad-percent-at-end"),
    pytest.param(f"postgresql://u%zz:{SECRET}@localhost/db", id="bad-percent-in-user"),
    pytest.param(f"postgresql://u:{SECRET}@localhost:abc/db", id="bad-port"),
    pytest.param(f"postgresql://u:{SECRET}@localhost/db?bogus=1", id="unknown-option"),
    pytest.param(f"postgresql://u:{SECRET}@[::1", id="unclosed-bracket"),
    pytest.param(f"postgresql://u:{SECRET}@[::1/db", id="unclosed-bracket-db"),
    pytest.param(f"postgresql://u:{SECRET}@local@host/db?schema=x", id="two-ats"),
    pytest.param(f"postgresql://u@localhost/db?password={SECRET}&bogus=1", id="query-password"),
    pytest.param(f"postgresql://u:{SECRET}@127.0.0.1:1/db?connect_timeout=2", id="refused"),
    pytest.param(f"postgres://u:{SECRET}@localhost/db?connect_timeout=abc", id="bad-timeout"),
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_url_that_fails_never_repeats_its_password(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("psycopg")
    with caplog.at_level(logging.DEBUG), pytest.raises(pf.StoreError) as caught:
        pf.connect(url)
    for text in _texts(caught.value):
        assert SECRET not in text and "pa%ss" not in text, text
    for record in caplog.records:
        assert SECRET not in record.getMessage() and SECRET not in str(record.exc_info)
    assert "failed" in str(caught.value)  # still says what went wrong
    if "percent" in str(caught.value):
        assert "%25" in str(caught.value)  # and how to write the URL


@pytest.mark.parametrize("url", [
    pytest.param(f"postgresql+psycopg://u:{SECRET}@localhost/db", id="sqlalchemy-scheme"),
    pytest.param(f"mysql://u:{SECRET}@localhost/db", id="other-scheme"),
    pytest.param(f"host=localhost user=u password={SECRET} dbname=db", id="libpq-keywords"),
])
def test_what_is_not_our_url_is_refused_without_being_taken_for_a_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pf.StoreError) as caught:
        pf.connect(url)
    assert "postgresql://" in str(caught.value)  # says what to give instead
    for text in _texts(caught.value):
        assert SECRET not in text, text
    assert list(tmp_path.iterdir()) == []  # no file, no directory made of it


@pytest.mark.skipif(POSTGRES_URL is None, reason="needs a PostgreSQL server")
def test_a_refused_login_never_repeats_its_password(caplog: pytest.LogCaptureFixture) -> None:
    assert POSTGRES_URL is not None
    url = POSTGRES_URL.replace("postgresql://postgres@", f"postgresql://no_such_role:{SECRET}@")
    assert SECRET in url
    with caplog.at_level(logging.DEBUG), pytest.raises(pf.StoreError) as caught:
        pf.connect(url)
    assert "no_such_role" in str(caught.value)
    for text in _texts(caught.value):
        assert SECRET not in text, text
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_redaction_hides_a_quoted_piece_of_a_password() -> None:
    pytest.importorskip("psycopg")
    from pgflow_py.store.postgres import _redact, _secrets

    secrets = _secrets("postgresql://u:ab%zzcd@h/db")
    assert _redact('invalid percent-encoded token: "%zzcd"', secrets) == (
        'invalid percent-encoded token: "***"'
    )
    assert _redact('bad host "h"', secrets) == 'bad host "h"'  # not a piece of it
    assert _redact("x", _secrets("postgresql://u@h/db")) == "x"


# --- 8. a closed store ----------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.start(rb_echo, 1), id="start"),
    pytest.param(lambda s: s.start_many(rb_echo, [1]), id="start_many"),
    pytest.param(lambda s: s.start("rb_echo", 1), id="start-by-slug"),
    pytest.param(lambda s: s.get_run("x"), id="get_run"),
    pytest.param(lambda s: s.runs(), id="runs"),
    pytest.param(lambda s: s.cancel("x"), id="cancel"),
    pytest.param(lambda s: s.prune(), id="prune"),
    pytest.param(lambda s: s.register(rb_echo), id="register"),
    pytest.param(lambda s: s.backend.claim("w", ["rb_echo"], 1, 60), id="claim"),
    pytest.param(lambda s: s.backend.data_version(), id="data_version"),
])
def test_a_closed_store_says_so(store: pf.Store, call: Callable[[pf.Store], Any]) -> None:
    store.register(rb_echo)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(pf.StoreError, match=r"^the store .* is closed .*open it again") as caught:
        call(store)
    assert caught.value.__cause__ is None


def test_a_definition_stored_before_the_options_were_bounded_still_reads(tmp_path: Path) -> None:
    # An earlier version accepted timeout=10**12; upgrading must not lock that flow out.
    @pf.job(queue="rb_old_bounds", timeout=60)
    def rb_old_bounds(input: Any, ctx: pf.Context) -> Any:
        return input

    path = tmp_path / "old.db"
    with pf.connect(path) as store:
        store.register(rb_old_bounds)
    with sqlite3.connect(path) as db:
        (text,) = db.execute(
            "SELECT definition FROM flows WHERE flow_slug = 'rb_old_bounds'"
        ).fetchone()
        data = json.loads(text)
        data["timeout"] = 10**12
        db.execute("UPDATE flows SET definition = ? WHERE flow_slug = 'rb_old_bounds'",
                   (json.dumps(data),))
    with pf.connect(path) as store:
        (stored,) = store.flows()
        assert stored.timeout == 10**12  # read as it was written
        run = store.start("rb_old_bounds", 1)  # by slug, from the stored definition
        store.register(rb_old_bounds)  # the code's (bounded) options replace it
        assert store.flows()[0].timeout == 60
        pf.run_flows([rb_old_bounds], store=store, until_idle=True)
        assert store.get_run(run.id).output == 1
    with pytest.raises(pf.DefinitionError, match="timeout"):
        pf.FlowDefinition.from_json(json.dumps(data))  # new definitions are still checked
