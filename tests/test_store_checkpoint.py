"""WAL checkpoints happen in the background, not inside a writer's COMMIT."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pgflow_py as pf


@pf.job(queue="checkpointed")
def checkpointed(input, ctx):
    return input


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgflow-wal-checkpoint"]


def test_writes_reach_the_database_file_without_the_writer_checkpointing(db_path: Path) -> None:
    before = len(_checkpoint_threads())
    with pf.connect(db_path) as store:
        (autocheckpoint,) = store.backend._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert autocheckpoint > 5_000  # the writer alone would leave 5,000 runs in the WAL
        empty = db_path.stat().st_size
        for chunk in range(5):
            store.start_many(checkpointed, [{"i": i} for i in range(chunk * 1000, chunk * 1000 + 1000)])
        deadline = time.monotonic() + 10
        # A checkpoint that ran between the batches copied part of them: wait for the next.
        while db_path.stat().st_size <= empty + 100_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert db_path.stat().st_size > empty + 100_000, "the WAL was not checkpointed"
        assert len(_checkpoint_threads()) == before + 1
        assert store.runs(flow=checkpointed, limit=10_000)[0].input == {"i": 4999}
    assert len(_checkpoint_threads()) == before  # close() stops the thread


def test_an_in_memory_store_has_no_checkpoint_thread() -> None:
    before = len(_checkpoint_threads())
    with pf.connect(":memory:") as store:
        store.start(checkpointed, {"i": 1})
        assert len(_checkpoint_threads()) == before


def test_close_landing_as_a_checkpoint_is_about_to_run_still_stops_the_thread(
    db_path: Path,
) -> None:
    from pgflow_py.store.sqlite.checkpoint import Checkpointer

    with pf.connect(db_path) as store:
        store.start(checkpointed, {"n": 1})
    checkpointer = Checkpointer(str(db_path), 1.0, delay=0.01)
    wanted = checkpointer._wanted
    clear = wanted.clear

    def close_lands_first() -> None:
        # close() between the end of the post-write delay and the clearing of the wake-up:
        # the moment at which the stop signal used to be lost.
        checkpointer._stop.set()
        wanted.set()
        clear()

    wanted.clear = close_lands_first  # type: ignore[method-assign]
    checkpointer.wrote()
    checkpointer._thread.join(5)
    assert not checkpointer._thread.is_alive()
