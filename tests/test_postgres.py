"""What only the PostgreSQL backend has: its own schema, connecting by URL, several processes'
connections on one schema, reconnecting. The shared behaviour is the rest of the suite, run on
PostgreSQL with ``$PGFLOW_TEST_POSTGRES`` (see .ci/run)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from _helpers import POSTGRES_URL, drain

import pgflow_py as pf

pytestmark = pytest.mark.skipif(
    POSTGRES_URL is None, reason="needs a PostgreSQL server: set $PGFLOW_TEST_POSTGRES"
)


@pf.job(queue="pg_echo")
def pg_echo(input, ctx):
    return input


def _backend(schema: str, clock: pf.testing.FakeClock | None = None):  # type: ignore[no-untyped-def]
    from pgflow_py.store.postgres import PostgresBackend

    assert POSTGRES_URL is not None
    return PostgresBackend(POSTGRES_URL, clock or pf.testing.FakeClock(), schema=schema)


@pytest.fixture
def schema() -> Iterator[str]:
    import psycopg

    assert POSTGRES_URL is not None
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def test_connect_by_url_keeps_the_tables_in_a_pgflow_schema() -> None:
    assert POSTGRES_URL is not None
    with pf.connect(POSTGRES_URL) as store:
        run = store.start(pg_echo, {"n": 1})
        drain(store, pg_echo)
        assert store.get_run(run.id).output == {"n": 1}
        tables = {row[0] for row in store.backend._conn.execute(  # type: ignore[attr-defined]
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgflow'"
        ).fetchall()}
    assert {"flows", "runs", "step_states", "step_tasks", "workers"} <= tables
    _backend("pgflow").drop_schema_and_close()


def test_a_second_connection_sees_the_runs_and_the_schema_is_not_created_twice(schema: str) -> None:
    with pf.Store(_backend(schema)) as first, pf.Store(_backend(schema)) as second:
        run = first.start(pg_echo, {"n": 2})
        assert second.get_run(run.id).status == pf.RunStatus.QUEUED
        drain(second, pg_echo)
        assert first.get_run(run.id).output == {"n": 2}


def test_a_schema_holding_other_tables_is_refused(schema: str) -> None:
    import psycopg

    assert POSTGRES_URL is not None
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
        db.execute(f"CREATE TABLE {schema}.orders (id int)")
    with pytest.raises(pf.SchemaError, match=rf"schema {schema}, holds tables that are not pgflow's "
                       r"\(\['orders'\]\); give pgflow a schema of its own"):
        _backend(schema)


def test_a_schema_name_that_is_not_plain_is_refused() -> None:
    with pytest.raises(pf.SchemaError, match="plain PostgreSQL name"):
        _backend("pgflow; DROP TABLE x")


def test_without_psycopg_connect_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    assert POSTGRES_URL is not None
    with pytest.raises(pf.SchemaError, match=r"pip install 'pgflow_py\[postgres\]'"):
        pf.connect(POSTGRES_URL)


def test_two_runners_on_one_schema_run_every_job_exactly_once(schema: str) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    @pf.job(queue="pg_once")
    async def pg_once(input, ctx):
        with lock:
            seen.append(input["i"])

    with pf.Store(_backend(schema)) as a, pf.Store(_backend(schema)) as b:
        a.start_many(pg_once, [{"i": i} for i in range(300)])
        other = threading.Thread(target=drain, args=(b, pg_once), kwargs={"concurrency": 20})
        other.start()
        drain(a, pg_once, concurrency=20)
        other.join()
        assert sorted(seen) == list(range(300))
        assert {r.status for r in a.runs(flow=pg_once, limit=1000)} == {pf.RunStatus.COMPLETED}


def test_another_connections_write_moves_data_version(schema: str) -> None:
    with pf.Store(_backend(schema)) as a, pf.Store(_backend(schema)) as b:
        before = a.backend.data_version()
        b.start(pg_echo, {"n": 3})
        assert a.backend.data_version() != before


def test_after_the_server_drops_the_connection_the_next_call_reconnects(schema: str) -> None:
    import psycopg

    assert POSTGRES_URL is not None
    with pf.Store(_backend(schema)) as store:
        store.start(pg_echo, {"n": 4})
        pid = store.backend._db.info.backend_pid  # type: ignore[attr-defined]
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(pf.StoreError, match=r"pgflow database .* failed"):
            store.start(pg_echo, {"n": 5})  # the call that finds the connection gone
        run = store.start(pg_echo, {"n": 6})
        drain(store, pg_echo)
        assert store.get_run(run.id).output == {"n": 6}
        assert len(store.runs(flow=pg_echo)) == 2  # nothing half-written by the failed call


def test_the_password_never_reaches_messages_or_repr() -> None:
    assert POSTGRES_URL is not None
    url = POSTGRES_URL.replace("postgresql://postgres@", "postgresql://postgres:sekrit@")
    assert "sekrit" in url  # the test server trusts local users, so any password connects
    with pf.connect(url) as store:
        with pytest.raises(pf.RunNotFound) as missing:
            store.get_run("no-such-run")
        assert "sekrit" not in str(missing.value) and "schema pgflow" in str(missing.value)
        assert "sekrit" not in repr(store)
    _backend("pgflow").drop_schema_and_close()


def test_a_schema_parameter_in_the_url_picks_the_schema(schema: str) -> None:
    assert POSTGRES_URL is not None
    url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}schema={schema}"
    with pf.connect(url) as store:
        run = store.start(pg_echo, {"n": 7})
        assert f"schema {schema}" in repr(store)
    with pf.Store(_backend(schema)) as same:
        assert same.get_run(run.id).input == {"n": 7}


def test_the_growing_tables_are_analyzed_without_waiting_for_autovacuum(schema: str) -> None:
    def analyzed(store: pf.Store) -> bool:
        (when,) = store.backend._conn.execute(  # type: ignore[attr-defined]
            "SELECT last_analyze FROM pg_stat_user_tables WHERE schemaname = ? AND relname = 'runs'",
            (schema,),
        ).fetchone()
        return when is not None

    with pf.Store(_backend(schema)) as store:
        store.start_many(pg_echo, [{"n": i} for i in range(999)])
        assert not analyzed(store)
        store.start(pg_echo, {"n": 999})  # the 1,000th run
        assert analyzed(store)


def test_a_role_that_may_only_use_an_existing_schema_can_serve_it(schema: str) -> None:
    import psycopg

    assert POSTGRES_URL is not None
    _backend(schema).close()  # created and migrated by the owner
    role = f"app_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} "
                      f"TO {role}")
        admin.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    try:
        url = POSTGRES_URL.replace("postgresql://postgres@", f"postgresql://{role}@")
        with pf.connect(f"{url}{'&' if '?' in url else '?'}schema={schema}") as store:
            run = store.start(pg_echo, {"n": 8})
            drain(store, pg_echo)
            assert store.get_run(run.id).output == {"n": 8}
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_a_writer_that_waited_for_the_lock_sees_the_writes_before_it(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even where transactions default to REPEATABLE READ (a snapshot from the first statement,
    # taken before the wait for the lock), the waiting writer must see what the holder wrote.
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_isolation=repeatable\\ read")
    a, b = _backend(schema), _backend(schema)
    try:
        assert a._db.execute("SHOW default_transaction_isolation").fetchone()[0] == (
            "repeatable read"
        )
        pf.Store(a).start_many(pg_echo, [{"n": i} for i in range(4)])
        got: dict[str, object] = {}

        def claim_in_b() -> None:
            try:
                got["b"] = b.claim("B", [pg_echo.slug], 10, 60)
            except Exception as exc:  # the failure this test is about
                got["b"] = exc

        with a._write():  # A holds the write lock ...
            waiting = threading.Thread(target=claim_in_b)
            waiting.start()
            time.sleep(0.3)  # ... while B has begun and waits for it
            got["a"] = a.claim("A", [pg_echo.slug], 10, 60)
        waiting.join()
        assert len(got["a"]) == 4  # type: ignore[arg-type]
        assert got["b"] == []  # nothing left, and no serialization failure
    finally:
        a.close()
        b.close()


def test_a_closed_store_does_not_reconnect(schema: str) -> None:
    store = pf.Store(_backend(schema))
    store.close()
    with pytest.raises(pf.StoreError, match="closed"):
        store.start(pg_echo, {"n": 9})
