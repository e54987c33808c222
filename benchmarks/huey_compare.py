"""huey's SqliteHuey consumer on the same no-op workload, for a side-by-side figure.

huey's ``SqliteStorage(fsync=...)`` (3.5.4, as installed here) sets ``PRAGMA synchronous = 2``
(FULL) for True and ``0`` (OFF) for False, and leaves SQLite's compiled-in default for None, its
default (FULL on the usual builds: ``SQLITE_DEFAULT_WAL_SYNCHRONOUS=2``); its journal is WAL.
pgflow_py's SQLite store runs WAL with ``synchronous = NORMAL``, between the two: a commit
survives the process crashing, but not the machine losing power before the next checkpoint
syncs the WAL (the file stays consistent; with OFF it may not). So neither of huey's settings
is pgflow_py's durability, and a third huey setting, ``synchronous = NORMAL`` through a storage
subclass, gives the comparison at equal durability. Each figure reads the pragmas back from the
connection that drains.

Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pgflow_py as pf

from . import fresh_db

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

# name, SqliteHuey's keyword arguments (``storage_class`` filled in by drain for "NORMAL")
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("fsync=False", {"fsync": False}),
    ("synchronous=NORMAL", {"synchronous": "NORMAL"}),
]


def _normal_storage() -> type:
    """huey's SqliteStorage with ``PRAGMA synchronous = NORMAL`` (fsync= offers FULL or OFF)."""
    from huey.storage import SqliteStorage

    class NormalSqliteStorage(SqliteStorage):  # type: ignore[misc]
        def _create_connection(self) -> sqlite3.Connection:
            conn: sqlite3.Connection = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    return NormalSqliteStorage


def durability(conn: sqlite3.Connection) -> str:
    """``journal_mode/synchronous`` of a connection, e.g. ``wal/NORMAL``."""
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return f"{journal}/{SYNCHRONOUS.get(synchronous, synchronous)}"


def pgflow_durability(directory: Path) -> str:
    """pgflow_py's SQLite store's ``journal_mode/synchronous``, read from its connection (a
    private attribute, read only; "unknown" should it move)."""
    with pf.connect(fresh_db(directory, "durability")) as store:
        conn = getattr(store.backend, "_db", None)
        return durability(conn) if isinstance(conn, sqlite3.Connection) else "unknown"


def drain(directory: Path, n: int, workers: int, setting: str = "default") -> tuple[float, str]:
    """Jobs per second for huey's consumer draining ``n`` queued no-op tasks with ``workers``
    threads and durability ``setting`` (a name of SETTINGS), and its ``journal/synchronous``."""
    from huey import SqliteHuey

    kwargs = dict(dict(SETTINGS)[setting])
    if kwargs.pop("synchronous", None) == "NORMAL":
        kwargs["storage_class"] = _normal_storage()
    db = fresh_db(directory, f"huey_{workers}")
    huey = SqliteHuey(filename=str(db), results=False, **kwargs)
    pragmas = durability(huey.storage.conn)
    done = 0
    lock = threading.Lock()
    finished = threading.Event()

    @huey.task()
    def noop(i: int) -> None:
        nonlocal done
        with lock:
            done += 1
            if done >= n:
                finished.set()

    for i in range(n):
        noop(i)
    consumer = huey.create_consumer(
        workers=workers, worker_type="thread", periodic=False, initial_delay=0.001,
        max_delay=0.01, check_worker_health=False,
    )
    began = time.perf_counter()
    consumer.start()  # its worker threads take tasks; run() would only add health checks
    finished.wait()
    elapsed = time.perf_counter() - began
    consumer.stop(graceful=True)
    huey.storage.close()
    return n / elapsed, pragmas


def best(directory: Path, n: int, setting: str = "default") -> tuple[float, int]:
    """huey's better figure of 1 and 4 worker threads at ``setting``, and which it was."""
    figures = {workers: drain(directory, n, workers, setting)[0] for workers in (1, 4)}
    workers = max(figures, key=lambda w: figures[w])
    return figures[workers], workers
