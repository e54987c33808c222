"""The operations commands: ``pgflow runs``, ``show``, ``start``, ``retry``, ``cancel``, ``prune``,
``stats``, ``workers``, and ``worker --resources``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from _helpers import POSTGRES_URL, stop_process
from click.testing import CliRunner, Result

import pgflow_py as pf
from pgflow_py.cli import main
from pgflow_py.cli.output import parse_duration, pretty_json, relative_time, truncate
from pgflow_py.cli.runs import render_run
from pgflow_py.ops_json import run_to_json, to_json
from pgflow_py.store.base import Undecodable

# --- flows and a database with runs in every state --------------------------------------------


@pf.job(queue="ops_mail", max_attempts=2, base_delay=60)
def ops_mail(input, ctx):
    if input.get("fail"):
        raise ConnectionError("SMTP server unavailable")
    return {"sent": input["to"]}


ops_site = pf.flow("ops_site", max_attempts=2, base_delay=60)


@ops_site.step()
def pages_of(input, ctx):
    return list(range(input["pages"]))


@ops_site.map(array="pages_of")
def fetch(page, ctx):
    if page == ctx.flow_input.get("bad_page"):
        raise ValueError(f"cannot parse page {page}")
    return page * 10


@ops_site.step(depends_on=["fetch"])
def total(deps, ctx):
    return sum(deps["fetch"])


@attrs.frozen
class Runs:
    db: str | Path
    done: pf.Run
    failed: pf.Run
    mapped: pf.Run
    map_failed: pf.Run
    queued: pf.Run
    scheduled: pf.Run


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str | Path]:
    """A SQLite file, or with $PGFLOW_TEST_POSTGRES a schema of its own on that server: the
    commands take either as --database."""
    if POSTGRES_URL is None:
        yield tmp_path / "ops.db"
        return
    from pgflow_py.store.postgres import PostgresBackend

    schema = f"test_cli_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema={schema}"
    PostgresBackend(POSTGRES_URL, pf.testing.FakeClock(), schema=schema).drop_schema_and_close()


@pytest.fixture
def runs(database: str | Path, monkeypatch: pytest.MonkeyPatch) -> Runs:
    monkeypatch.delenv("PGFLOW_DATABASE", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    db = database
    # An hour ago on a fake clock, so that backoffs take no time and end in the past.
    with pf.connect(db, clock=pf.testing.FakeClock(time.time() - 3600)) as store:
        done = store.start(ops_mail, {"to": "ada@example.com"})
        failed = store.start(ops_mail, {"to": "bob@example.com", "fail": True}, key="order-42")
        mapped = store.start(ops_site, {"pages": 3})
        map_failed = store.start(ops_site, {"pages": 4, "bad_page": 2})
        pf.run_flows([ops_mail, ops_site], store=store, until_idle=True)
    with pf.connect(db) as store:
        queued = store.start(ops_mail, {"to": "later@example.com"}, priority=5)
        scheduled = store.start(ops_mail, {"to": "much-later@example.com"}, delay=3600)
        got = [store.get_run(r.id) for r in (done, failed, mapped, map_failed, queued, scheduled)]
    return Runs(db, *got)


def cli(*args: str, input: str | None = None, color: bool = False, env: dict[str, str] | None = None
        ) -> Result:
    return CliRunner().invoke(main, list(args), input=input, color=color, env=env)


def ok(*args: str, **kwargs: Any) -> str:
    result = cli(*args, **kwargs)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def fails(*args: str, code: int = 1, **kwargs: Any) -> Result:
    result = cli(*args, **kwargs)
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_the_fixture_has_runs_in_every_state(runs):
    assert runs.done.status is pf.RunStatus.COMPLETED
    assert runs.failed.status is pf.RunStatus.FAILED
    assert runs.mapped.status is pf.RunStatus.COMPLETED
    assert runs.map_failed.status is pf.RunStatus.FAILED
    assert runs.queued.status is pf.RunStatus.QUEUED
    assert runs.scheduled.status is pf.RunStatus.SCHEDULED


# --- runs --------------------------------------------------------------------------------------


def test_runs_prints_an_aligned_table_newest_first(runs):
    out = ok("runs", "--database", str(runs.db))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "FLOW", "STATUS", "ATTEMPTS", "CREATED", "FINISHED", "ERROR"]
    body = lines[1:-1]
    order = [runs.scheduled, runs.queued, runs.map_failed, runs.mapped, runs.failed, runs.done]
    assert [line.split()[0] for line in body] == [r.id for r in order]
    # Aligned: every column starts where its header does.
    for header in ("FLOW", "STATUS", "ATTEMPTS", "CREATED"):
        column = lines[0].index(header)
        assert all(line[column - 2:column] == "  " and line[column] != " " for line in body)
    failed_line = body[4]
    assert failed_line.split()[1:4] == ["ops_mail", "failed", "2"]
    assert "ConnectionError: SMTP server unavailable" in failed_line
    assert "ago" in failed_line
    assert lines[-1] == "6 runs shown"
    assert "\x1b[" not in out  # no colour when stdout is not a terminal


def test_runs_filters_by_flow_and_status_and_says_when_the_limit_cut_the_list(runs):
    db = ("--database", str(runs.db))
    out = ok("runs", "--flow", "ops_site", *db)
    assert {line.split()[1] for line in out.splitlines()[1:-1]} == {"ops_site"}
    out = ok("runs", "--status", "failed", *db)
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == [runs.map_failed.id, runs.failed.id]
    out = ok("runs", "--limit", "2", *db)
    assert len(out.splitlines()) == 4
    assert out.splitlines()[-1] == "2 runs shown (limit 2; use --limit)"
    assert ok("runs", "--flow", "nothing_here", *db).strip() == "no runs (flow nothing_here)"
    out = ok("runs", "--key", "order-42", *db)
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == [runs.failed.id]
    assert ok("runs", "--key", "k", "--status", "failed", *db).strip() == (
        "no runs (status failed, key k)"
    )
    assert "'bogus' is not one of" in fails("runs", "--status", "bogus", *db, code=2).stderr


def test_runs_truncates_long_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PGFLOW_DATABASE", raising=False)

    @pf.job(queue="ops_long_error")
    def ops_long_error(input, ctx):
        raise RuntimeError("x" * 1000)

    db = tmp_path / "long.db"
    with pf.connect(db) as store:
        store.start(ops_long_error, None)
        pf.run_flows([ops_long_error], store=store, until_idle=True)
    (line,) = ok("runs", "--database", str(db)).splitlines()[1:-1]
    assert line.endswith("…")
    assert len(line) <= 200


def test_runs_colours_the_status_on_a_terminal_unless_no_color(runs):
    out = ok("runs", "--database", str(runs.db), color=True)
    assert "\x1b[" in out
    failed_line = next(line for line in out.splitlines() if runs.failed.id in line)
    assert "\x1b[31" in failed_line  # red
    assert "\x1b[" not in failed_line.split("\x1b[")[0]  # the id itself is plain
    out = ok("runs", "--database", str(runs.db), color=True, env={"NO_COLOR": "1"})
    assert "\x1b[" not in out


def test_runs_json_is_a_list_of_runs_with_every_field(runs):
    data = json.loads(ok("runs", "--json", "--database", str(runs.db)))
    assert [item["id"] for item in data][-1] == runs.done.id
    run_fields = [f.name for f in attrs.fields(pf.Run)]
    for item in data:
        assert list(item) == run_fields
    by_id = {item["id"]: item for item in data}
    failed = by_id[runs.failed.id]
    assert failed["status"] == "failed"
    assert failed["key"] == "order-42"
    assert failed["input"] == {"to": "bob@example.com", "fail": True}
    assert failed["error"] == "ConnectionError: SMTP server unavailable"
    assert datetime.fromisoformat(failed["created_at"]) == runs.failed.created_at
    assert datetime.fromisoformat(failed["finished_at"]) == runs.failed.finished_at
    (step,) = failed["steps"]
    assert list(step) == [f.name for f in attrs.fields(pf.StepRun)]
    (task,) = step["tasks"]
    assert list(task) == [f.name for f in attrs.fields(pf.TaskRun)]
    assert [h["attempt"] for h in task["history"]] == [1, 2]
    assert list(task["history"][0]) == [f.name for f in attrs.fields(pf.AttemptRecord)]
    assert by_id[runs.queued.id]["priority"] == 5
    assert by_id[runs.mapped.id]["output"] == {"total": 30}
    assert json.loads(ok("runs", "--json", "--flow", "none", "--database", str(runs.db))) == []


def test_the_database_comes_from_the_environment(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("PGFLOW_DATABASE", str(runs.db))
    assert len(json.loads(ok("runs", "--json"))) == 6
    monkeypatch.delenv("PGFLOW_DATABASE")
    monkeypatch.chdir(tmp_path)
    err = one_error_line(fails("runs"))  # ./pgflow.db does not exist
    assert "no pgflow database at pgflow.db" in err
    assert not (tmp_path / "pgflow.db").exists()  # and was not created


@pytest.mark.parametrize("command", [
    ["runs"], ["show", "some-id"], ["start", "ops_mail"], ["retry", "some-id"],
    ["cancel", "some-id"], ["prune"], ["stats"], ["workers"], ["dashboard"],
])
def test_every_command_refuses_a_missing_database_in_one_line(tmp_path, command):
    db = tmp_path / "typo.db"
    err = one_error_line(fails(*command, "--database", str(db)))
    assert f"no pgflow database at {db}" in err
    assert not db.exists()


# --- show --------------------------------------------------------------------------------------


def test_show_a_failed_map_run(runs):
    out = ok("show", runs.map_failed.id, "--database", str(runs.db))
    lines = out.splitlines()
    assert lines[0].split() == ["run", runs.map_failed.id]
    header = {line.split()[0]: line.split(None, 1)[1] for line in lines[:10] if line.strip()}
    assert header["flow"] == "ops_site"
    assert header["status"] == "failed"
    assert header["key"] == "-"
    assert header["priority"] == "0"
    assert header["attempts"] == "2"
    assert header["error"] == "ValueError: cannot parse page 2"
    assert header["created"].endswith("ago)") and "UTC" in header["created"]
    assert '"bad_page": 2' in out
    steps = out[out.index("\nsteps\n"):]
    assert steps.index("pages_of") < steps.index("fetch") < steps.index("total")
    assert "4 tasks: 3 completed, 1 failed" in out
    task_lines = [line.split() for line in lines if line.strip().startswith("[")]
    assert task_lines[2][:3] == ["[2]", "failed", "2"]
    assert task_lines[0][:3] == ["[0]", "completed", "1"]
    assert "failed attempts (2)" in out
    assert "fetch[2]  attempt 1: ValueError: cannot parse page 2" in out
    assert "fetch[2]  attempt 2: ValueError: cannot parse page 2" in out


def test_show_a_completed_job_and_a_queued_one(runs):
    out = ok("show", runs.done.id, "--database", str(runs.db))
    assert '"sent": "ada@example.com"' in out
    assert "failed attempts" not in out
    out = ok("show", runs.queued.id, "--database", str(runs.db))
    assert "status    queued" in out
    assert "priority  5" in out
    assert "finished  -" in out


def test_show_json_round_trips(runs):
    data = json.loads(ok("show", runs.map_failed.id, "--json", "--database", str(runs.db)))
    assert data == json.loads(json.dumps(run_to_json(runs.map_failed)))
    assert list(data) == [f.name for f in attrs.fields(pf.Run)]
    assert [s["slug"] for s in data["steps"]] == ["pages_of", "fetch", "total"]
    fetch = data["steps"][1]
    assert [t["index"] for t in fetch["tasks"]] == [0, 1, 2, 3]
    assert fetch["tasks"][2]["history"][0]["error"] == "ValueError: cannot parse page 2"
    assert fetch["tasks"][2]["history"][0]["task_index"] == 2


def test_show_a_missing_run_is_one_line(runs):
    err = one_error_line(fails("show", "no-such-run", "--database", str(runs.db)))
    assert "no run 'no-such-run' in" in err


@attrs.frozen
class AttemptWithTraceback:
    """An AttemptRecord as it will be once it keeps tracebacks."""

    attempt: int
    error: str
    at: datetime
    step_slug: str | None = None
    task_index: int | None = None
    traceback: str | None = None


def test_show_prints_tracebacks_and_json_includes_new_fields(runs):
    record = AttemptWithTraceback(
        1, "ValueError: bad", datetime(2026, 1, 1, tzinfo=timezone.utc), "pages_of", None,
        'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n',
    )
    task = pf.TaskRun(None, "failed", 1, None, "ValueError: bad", (record,))  # type: ignore[arg-type]
    run = attrs.evolve(runs.failed, steps=(pf.StepRun("pages_of", "failed", 1, None, "x", (task,)),))
    lines = render_run(run)
    at = lines.index("  2026-01-01 00:00:00  pages_of  attempt 1: ValueError: bad")
    assert lines[at + 1:at + 4] == [
        "      Traceback (most recent call last):", '        File "x.py", line 1',
        "      ValueError: bad",
    ]
    history = run_to_json(run)["steps"][0]["tasks"][0]["history"]
    assert history[0]["traceback"].startswith("Traceback")


def test_show_cuts_huge_inputs():
    lines = pretty_json({"body": "x" * 5000, "items": list(range(100))})
    assert len(lines) == 41
    assert lines[-1] == "… 65 more lines (use --json for all)"
    assert max(len(line) for line in lines) <= 200


# --- start -------------------------------------------------------------------------------------


def test_start_by_slug(runs):
    db = ("--database", str(runs.db))
    run_id = ok("start", "ops_mail", '{"to": "cli@example.com"}', *db).strip()
    with pf.connect(runs.db) as store:
        run = store.get_run(run_id)
    assert run.input == {"to": "cli@example.com"}
    assert run.status is pf.RunStatus.QUEUED

    data = json.loads(ok("start", "ops_mail", '{"to": "k"}', "--key", "k1", "--priority", "7",
                         "--delay", "15m", "--json", *db))
    assert list(data) == [f.name for f in attrs.fields(pf.Run)]
    assert (data["key"], data["priority"], data["status"]) == ("k1", 7, "scheduled")
    again = ok("start", "ops_mail", '{"to": "k"}', "--key", "k1", *db).strip()
    assert again == data["id"]  # idempotent by key

    none_id = ok("start", "ops_mail", *db).strip()
    stdin_id = ok("start", "ops_mail", "-", *db, input='[1, 2]').strip()
    with pf.connect(runs.db) as store:
        assert store.get_run(none_id).input is None
        assert store.get_run(stdin_id).input == [1, 2]
        assert store.get_run(data["id"]).status is pf.RunStatus.SCHEDULED


def test_start_errors_are_one_line(runs):
    db = ("--database", str(runs.db))
    err = one_error_line(fails("start", "ops_mail", "{to: 1}", *db))
    assert "INPUT_JSON is not valid JSON: Expecting property name enclosed in double quotes" in err
    err = one_error_line(fails("start", "no_such_flow", *db))
    assert "no_such_flow" in err
    err = one_error_line(fails("start", "ops_site", '{"pages": 1}', "--priority", str(2**40), *db))
    assert "priority" in err
    assert "duration" in fails("start", "ops_mail", "--delay", "soon", *db, code=2).stderr


# --- retry, cancel -----------------------------------------------------------------------------


def test_retry_each_run_and_report_the_missing_one_after_the_others(runs):
    result = fails("retry", runs.failed.id, "missing-run", runs.map_failed.id,
                   "--database", str(runs.db))
    assert result.stdout.splitlines() == [f"{runs.failed.id} queued", f"{runs.map_failed.id} queued"]
    assert "no run 'missing-run'" in one_error_line(result)
    with pf.connect(runs.db) as store:
        assert store.get_run(runs.failed.id).status is pf.RunStatus.QUEUED
        assert not store.get_run(runs.map_failed.id).status.is_terminal


def test_retry_of_a_completed_run_is_refused(runs):
    err = one_error_line(fails("retry", runs.done.id, "--database", str(runs.db)))
    assert "only failed or cancelled runs can be retried" in err


def test_retry_usage_errors(runs):
    db = ("--database", str(runs.db))
    assert "--failed" in fails("retry", *db, code=2).stderr
    assert "not both" in fails("retry", runs.failed.id, "--failed", *db, code=2).stderr
    assert "--flow goes with --failed" in fails("retry", "--flow", "ops_mail", *db, code=2).stderr


def test_retry_failed_of_a_flow(runs):
    out = ok("retry", "--failed", "--flow", "ops_mail", "--database", str(runs.db))
    assert out.strip() == "1 failed run retried (flow ops_mail)"
    out = ok("retry", "--failed", "--database", str(runs.db))
    assert out.strip() == "1 failed run retried"


def test_cancel(runs):
    db = ("--database", str(runs.db))
    result = fails("cancel", runs.queued.id, runs.done.id, "missing-run", runs.scheduled.id, *db)
    assert result.stdout.splitlines() == [
        f"{runs.queued.id} cancelled", f"{runs.scheduled.id} cancelled"
    ]
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"Error: run {runs.done.id} is completed; only unfinished runs can be cancelled",
        errors[1],
    ]
    assert "no run 'missing-run'" in errors[1]
    # Cancelling a cancelled run again is fine.
    assert ok("cancel", runs.queued.id, *db).strip() == f"{runs.queued.id} cancelled"
    with pf.connect(runs.db) as store:
        assert store.get_run(runs.scheduled.id).status is pf.RunStatus.CANCELLED
    fails("cancel", *db, code=2)  # no id


# --- prune -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("90", 90),
    ("1.5h", 5400), (" 3D ", 259200),
])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7 days", "-1d", "d", "1y", "1e999d"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_prune(runs):
    db = ("--database", str(runs.db))
    assert ok("prune", *db).strip() == "0 runs deleted"  # all finished about an hour ago
    assert ok("prune", "--older-than", "2h", *db).strip() == "0 runs deleted"
    assert ok("prune", "--older-than", "30m", *db).strip() == "4 runs deleted"
    with pf.connect(runs.db) as store:
        assert {r.id for r in store.runs()} == {runs.queued.id, runs.scheduled.id}
    err = fails("prune", "--older-than", "a week", *db, code=2).stderr
    assert "'a week' is not a duration" in err


# --- stats, workers ----------------------------------------------------------------------------


@attrs.frozen
class FakeFlowStats:
    flow_slug: str | None
    counts: dict[str, int]
    oldest_queued_age: float | None
    workers: int


@attrs.frozen
class FakeWorkerInfo:
    id: str
    hostname: str
    pid: int
    flows: tuple[str, ...]
    started_at: datetime
    last_heartbeat: datetime
    running: int
    lost: bool


class FakeStore:
    def stats(self) -> list[FakeFlowStats]:
        return [
            FakeFlowStats("ops_mail", {"completed": 3, "failed": 1, "queued": 2}, 125.0, 2),
            FakeFlowStats("ops_site", {"running": 4}, None, 0),
        ]

    def workers(self) -> list[FakeWorkerInfo]:
        now = datetime.now(timezone.utc)
        return [
            FakeWorkerInfo("w-1", "box-a", 4242, ("ops_mail", "ops_site"),
                           now - timedelta(hours=2), now - timedelta(seconds=3), 5, False),
            FakeWorkerInfo("w-2", "box-b", 7, ("ops_mail",), now - timedelta(days=1),
                           now - timedelta(minutes=10), 0, True),
        ]


@pytest.fixture
def fake_store(monkeypatch):
    """The stats and workers commands against store methods of the expected shape."""

    @contextmanager
    def open_store(database: str) -> Iterator[FakeStore]:
        yield FakeStore()

    monkeypatch.setattr("pgflow_py.cli.monitor.open_store", open_store)


def test_stats_table_and_json(fake_store):
    lines = ok("stats").splitlines()
    assert lines[0].split()[:3] == ["FLOW", "SCHEDULED", "QUEUED"]
    assert lines[0].endswith("OLDEST QUEUED  WORKERS")
    assert lines[1].split() == ["ops_mail", "0", "2", "0", "0", "3", "1", "0", "2m", "2"]
    assert lines[2].split() == ["ops_site", "0", "0", "4", "0", "0", "0", "0", "-", "0"]
    data = json.loads(ok("stats", "--json"))
    assert data[0] == {
        "flow_slug": "ops_mail", "counts": {"completed": 3, "failed": 1, "queued": 2},
        "oldest_queued_age": 125.0, "workers": 2,
    }


def test_workers_table_and_json(fake_store):
    lines = ok("workers").splitlines()
    assert lines[0].split() == ["ID", "HOST", "PID", "FLOWS", "STARTED", "HEARTBEAT", "RUNNING",
                                "STATE"]
    assert lines[1].split() == ["w-1", "box-a", "4242", "ops_mail,ops_site", "2h", "ago", "3s",
                                "ago", "5", "alive"]
    assert lines[2].split()[-1] == "lost"
    data = json.loads(ok("workers", "--json"))
    assert list(data[0]) == [f.name for f in attrs.fields(FakeWorkerInfo)]
    assert data[0]["flows"] == ["ops_mail", "ops_site"]
    assert datetime.fromisoformat(data[0]["last_heartbeat"]).tzinfo is not None


def test_stats_and_workers_against_the_real_store(runs):
    db = ("--database", str(runs.db))
    stats = {s["flow_slug"]: s for s in json.loads(ok("stats", "--json", *db))}
    assert stats["ops_mail"]["counts"] == {
        "scheduled": 1, "queued": 1, "running": 0, "retrying": 0, "completed": 1, "failed": 1,
        "cancelled": 0,
    }
    assert stats["ops_site"]["counts"]["completed"] == 1
    assert stats["ops_site"]["counts"]["failed"] == 1
    assert stats["ops_mail"]["workers"] == 0  # the runner that served them has stopped
    lines = ok("stats", *db).splitlines()
    assert lines[0].split()[:3] == ["FLOW", "SCHEDULED", "QUEUED"]
    assert lines[1].split()[:3] == ["ops_mail", "1", "1"]
    assert json.loads(ok("workers", "--json", *db)) == []  # a stopped runner is forgotten
    assert ok("workers", *db).strip() == "no workers"


# --- the JSON and text helpers -----------------------------------------------------------------


def test_to_json_of_undecodable_values_and_other_types():
    assert to_json(Undecodable("JSONDecodeError: bad")) == {"undecodable": "JSONDecodeError: bad"}
    assert to_json(pf.RunStatus.FAILED) == "failed"
    assert to_json(timedelta(minutes=1)) == 60.0
    assert to_json({1: (1, 2), "s": {3}}) == {"1": [1, 2], "s": [3]}
    assert to_json(datetime(2026, 1, 1, tzinfo=timezone.utc)) == "2026-01-01T00:00:00+00:00"


def test_relative_times_and_truncation():
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    assert relative_time(None, now) == "-"
    assert relative_time(now, now) == "just now"
    assert relative_time(now - timedelta(seconds=42), now) == "42s ago"
    assert relative_time(now - timedelta(minutes=3, seconds=5), now) == "3m ago"
    assert relative_time(now - timedelta(hours=5), now) == "5h ago"
    assert relative_time(now - timedelta(days=9), now) == "9d ago"
    assert relative_time(now + timedelta(minutes=5), now) == "in 5m"
    assert truncate("a\nb  c", 10) == "a b c"
    assert truncate("abcdefghijk", 5) == "abcd…"


# --- worker --resources ------------------------------------------------------------------------

WELCOME = textwrap.dedent("""
    import pgflow_py as pf

    @pf.job(queue="send_welcome", max_attempts=5, base_delay=60)
    def send_welcome(input: dict, ctx: pf.Context) -> dict:
        mailer = ctx.resources["mailer"]          # injected by the runner (resources=...)
        mailer.send(input["email"], "Welcome!")
        return {"sent_to": input["email"], "attempt": ctx.attempt}
""")

RESOURCES = textwrap.dedent("""
    import os
    from pathlib import Path

    class FileMailer:
        def send(self, to, subject):
            with Path(os.environ["MAILBOX"]).open("a") as out:
                out.write(f"{to}: {subject}\\n")

    def make_resources():
        return {"mailer": FileMailer()}

    def not_a_mapping():
        return ["mailer"]

    def broken():
        raise RuntimeError("no SMTP settings")

    NOT_CALLABLE = {"mailer": None}
""")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "welcome_jobs.py").write_text(WELCOME)
    (tmp_path / "welcome_resources.py").write_text(RESOURCES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PGFLOW_DATABASE", raising=False)
    return tmp_path


@pytest.mark.parametrize(("spec", "message"), [
    ("welcome_resources", "should be MODULE:CALLABLE"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("welcome_resources:missing", "module 'welcome_resources' has no attribute 'missing'"),
    ("welcome_resources:NOT_CALLABLE", "is a dict, not a callable"),
    ("welcome_resources:not_a_mapping", "returned a list, not a mapping"),
    ("welcome_resources:broken", "raised RuntimeError: no SMTP settings"),
])
def test_worker_resources_errors_are_one_line(project, spec, message):
    result = CliRunner().invoke(
        main, ["worker", "welcome_jobs", "--database", str(project / "w.db"), "--resources", spec]
    )
    assert result.exit_code == 1, result.output
    err = one_error_line(result)
    assert message in err


def _pgflow(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgflow_py", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
    )


def _start_when_served(db: Path, flow: str, input: Any, proc: subprocess.Popen[str]) -> pf.Run:
    deadline = time.monotonic() + 30
    while True:
        try:
            with pf.connect(db) as store:
                return store.start(flow, input)
        except pf.FlowNotFound:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker never registered its flows"
            time.sleep(0.05)


def test_a_worker_with_resources_serves_send_welcome(project):
    db = project / "welcome.db"
    mailbox = project / "mailbox.txt"
    pf.connect(db).close()
    proc = _pgflow("worker", "welcome_jobs", "--database", str(db), "--resources",
                   "welcome_resources:make_resources", cwd=project, env={"MAILBOX": str(mailbox)})
    try:
        run = _start_when_served(db, "send_welcome", {"email": "ada@example.com"}, proc)
        with pf.connect(db) as store:
            done = store.wait(run.id, timeout=30)
    finally:
        code, err = stop_process(proc)
    assert done.output == {"sent_to": "ada@example.com", "attempt": 1}, done.error
    assert mailbox.read_text() == "ada@example.com: Welcome!\n"
    assert code == 0, err


# --- runs and show as real processes, against a database a live worker serves -----------------

SITE = textwrap.dedent("""
    import pgflow_py as pf

    site = pf.flow("live_site")

    @site.step()
    def pages(input, ctx):
        return list(range(input))

    @site.map(array="pages")
    def fetch(page, ctx):
        if page == 3:
            raise ValueError("page 3 is broken")
        return page

    @pf.job(queue="live_echo")
    def live_echo(input, ctx):
        return {"echo": input}
""")


def test_runs_and_show_processes_against_a_live_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("PGFLOW_DATABASE", raising=False)
    (tmp_path / "live_jobs.py").write_text(SITE)
    db = tmp_path / "live.db"
    pf.connect(db).close()
    worker = _pgflow("worker", "live_jobs", "--database", str(db), cwd=tmp_path)
    try:
        good = _start_when_served(db, "live_site", 3, worker)
        with pf.connect(db) as store:
            bad = store.start("live_site", 5)
            echo = store.start("live_echo", "hi")
            for run in (good, bad, echo):
                store.wait(run.id, timeout=30)

        def pgflow(*args: str) -> str:
            proc = subprocess.run(
                [sys.executable, "-m", "pgflow_py", *args], cwd=tmp_path, text=True,
                capture_output=True, timeout=60, env={**os.environ, "PGFLOW_DATABASE": str(db)},
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        table = pgflow("runs")
        shown = pgflow("show", bad.id)
        data = json.loads(pgflow("show", good.id, "--json"))
        listed = json.loads(pgflow("runs", "--json", "--status", "failed"))
        assert worker.poll() is None  # still serving throughout
    finally:
        code, err = stop_process(worker)
    assert code == 0, err
    rows = [line.split() for line in table.splitlines()[1:-1]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (echo.id, "live_echo", "completed"), (bad.id, "live_site", "failed"),
        (good.id, "live_site", "completed"),
    ]
    assert "ValueError: page 3 is broken" in table
    assert "\x1b[" not in table
    assert "status    failed" in shown
    assert "5 tasks: " in shown and "1 failed" in shown
    assert "fetch[3]  attempt 1: ValueError: page 3 is broken" in shown
    assert data["output"] == {"fetch": [0, 1, 2]}
    assert data["status"] == "completed"
    assert [item["id"] for item in listed] == [bad.id]


def test_a_url_of_another_database_is_refused_without_quoting_it(tmp_path):
    err = one_error_line(fails("runs", "--database", "mysql://user:secret@host/db"))
    assert "secret" not in err
    assert "unsupported database URL scheme 'mysql'" in err
    db = tmp_path / "url.db"
    pf.connect(db).close()
    assert ok("runs", "--database", f"sqlite:///{db}").strip() == "no runs"
    err = one_error_line(fails("runs", "--database", f"sqlite:///{tmp_path / 'nope.db'}"))
    assert "no pgflow database at" in err


def test_retry_cancel_and_prune_speak_json_too(runs):
    db = ("--database", str(runs.db))
    retried = json.loads(ok("retry", runs.failed.id, "--json", *db))
    assert [(r["id"], r["status"]) for r in retried] == [(runs.failed.id, "queued")]
    assert retried[0]["flow_slug"] == "ops_mail" and retried[0]["attempts"] == 0
    result = fails("cancel", runs.queued.id, "missing-run", "--json", *db)
    assert [(r["id"], r["status"]) for r in json.loads(result.stdout)] == [
        (runs.queued.id, "cancelled")
    ]
    assert "missing-run" in result.stderr  # errors stay on stderr, one line each
    assert json.loads(ok("retry", "--failed", "--flow", "ops_site", "--json", *db)) == {
        "retried": 1, "flow": "ops_site"
    }
    assert json.loads(ok("prune", "--older-than", "30m", "--json", *db)) == {"deleted": 2}
