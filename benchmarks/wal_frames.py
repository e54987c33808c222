"""WAL frames (pages) written per ``store.start`` on SQLite, and the tables and indexes they
belong to.

    python -m benchmarks.wal_frames [--runs 2000] [--batch 100] [--drop runs_flow ...]

Each case starts runs into a fresh file with the background checkpointer stopped and
``wal_autocheckpoint = 0``, so the WAL only grows: frames per start is its growth divided by
(page size + 24-byte frame header), over ``--runs`` starts after a warm-up of as many. The
attribution reads the frame headers of the WAL (each names its page) and maps the pages to
their b-trees through the ``dbstat`` virtual table. A page written by several commits counts
once per commit, as in the WAL. The default ``cache_size``, ``synchronous`` and page size
(4096) are the store's own. ``--drop`` removes indexes from the fresh file before starting
(a what-if: what each costs a start; queries that need them fail), and ``--rate`` also times
the starts with the store as it runs (background checkpoints on).
"""

from __future__ import annotations

import argparse
import collections
import os
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pgflow_py as pf

from . import fresh_db


@pf.job(queue="wal_job")
def wal_job(input: Any, ctx: pf.Context) -> None:
    return None


three = pf.flow("wal_three_steps")


@three.step()
def root(input: Any, ctx: pf.Context) -> Any:
    return input


@three.step(depends_on=[root])
def left(deps: Any, ctx: pf.Context) -> None:
    return None


@three.step(depends_on=[root])
def right(deps: Any, ctx: pf.Context) -> None:
    return None


_WAL_HEADER = 32
_FRAME_HEADER = 24


def _frames(wal: Path, page_size: int, since: int) -> list[tuple[int, bool]]:
    """(page number, is a commit frame) of the WAL's frames from frame ``since`` on."""
    out: list[tuple[int, bool]] = []
    with open(wal, "rb") as f:
        f.seek(_WAL_HEADER + since * (page_size + _FRAME_HEADER))
        while True:
            header = f.read(_FRAME_HEADER)
            if len(header) < _FRAME_HEADER:
                return out
            page, db_size = struct.unpack(">II", header[:8])
            out.append((page, db_size != 0))
            f.seek(page_size, os.SEEK_CUR)


def _owners(path: Path) -> dict[int, str]:
    """Page number -> the table or index it belongs to (freelist pages are absent)."""
    with sqlite3.connect(path) as db:
        return {int(p): str(n) for n, p in db.execute("SELECT name, pageno FROM dbstat")}


def _frame_count(wal: Path, page_size: int) -> int:
    size = wal.stat().st_size if wal.exists() else 0
    return max(0, (size - _WAL_HEADER) // (page_size + _FRAME_HEADER))


def _drop(store: pf.Store, indexes: Sequence[str]) -> None:
    for index in indexes:
        store.backend._conn.execute(f"DROP INDEX {index}")  # type: ignore[attr-defined]


def measure(
    directory: Path, name: str, start: Callable[[pf.Store, int], int], runs: int,
    drop: Sequence[str] = (),
) -> tuple[float, float, collections.Counter[str]]:
    """Frames and commits per run of ``start(store, i) -> runs started``, and frames per b-tree."""
    path = fresh_db(directory, name)
    wal = Path(f"{path}-wal")
    with pf.connect(path) as store:
        _drop(store, drop)
        backend = store.backend
        checkpointer = getattr(backend, "_checkpointer", None)
        if checkpointer is not None:  # the WAL must only grow while measuring
            checkpointer.close()
            backend._checkpointer = None  # type: ignore[attr-defined]
        backend._conn.execute("PRAGMA wal_autocheckpoint = 0")  # type: ignore[attr-defined]
        page_size = int(backend._conn.execute("PRAGMA page_size").fetchone()[0])  # type: ignore[attr-defined]
        started = 0
        i = 0
        while started < runs:  # warm-up: the tables reach a few levels, as in use
            started += start(store, i)
            i += 1
        before = _frame_count(wal, page_size)
        started = 0
        while started < runs:
            started += start(store, i)
            i += 1
        frames = _frames(wal, page_size, before)
        owners = _owners(path)
    per_tree: collections.Counter[str] = collections.Counter(
        owners.get(page, "(freelist or new)") for page, _ in frames
    )
    commits = sum(1 for _, commit in frames if commit)
    return len(frames) / started, commits / started, per_tree


def rate(
    directory: Path, name: str, start: Callable[[pf.Store, int], int], runs: int,
    drop: Sequence[str] = (),
) -> float:
    """Runs started per second by ``start``, over ``runs`` after a warm-up of as many."""
    with pf.connect(fresh_db(directory, name)) as store:
        _drop(store, drop)
        started = i = 0
        while started < runs:
            started += start(store, i)
            i += 1
        began = time.perf_counter()
        started = 0
        while started < runs:
            started += start(store, i)
            i += 1
        return started / (time.perf_counter() - began)


def _one_job(store: pf.Store, i: int) -> int:
    store.start(wal_job, {"i": i})
    return 1


def _one_flow(store: pf.Store, i: int) -> int:
    store.start(three, {"i": i})
    return 1


def _many(definition: pf.Flow, size: int) -> Callable[[pf.Store, int], int]:
    def start(store: pf.Store, i: int) -> int:
        store.start_many(definition, [{"i": i * size + j} for j in range(size)])
        return size

    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs measured per case")
    parser.add_argument("--batch", type=int, default=100, help="runs per start_many call")
    parser.add_argument("--drop", nargs="*", default=[], help="indexes to drop first (what-if)")
    parser.add_argument("--rate", action="store_true", help="also time the starts (runs/s)")
    parser.add_argument("--path", help="directory for the files (default: a temporary one)")
    args = parser.parse_args()
    cases: list[tuple[str, Callable[[pf.Store, int], int]]] = [
        ("start, a job", _one_job),
        ("start, a 3-step flow", _one_flow),
        (f"start_many of {args.batch}, a job", _many(wal_job, args.batch)),
        (f"start_many of {args.batch}, a 3-step flow", _many(three, args.batch)),
    ]
    with tempfile.TemporaryDirectory(dir=args.path) as tmp:
        for label, start in cases:
            frames, commits, per_tree = measure(
                Path(tmp), "wal_frames", start, args.runs, args.drop
            )
            total = sum(per_tree.values())
            trees = ", ".join(
                f"{tree} {count / total * frames:.2f}" for tree, count in per_tree.most_common()
            )
            timed = (f", {rate(Path(tmp), 'wal_rate', start, args.runs, args.drop):,.0f} runs/s"
                     if args.rate else "")
            print(f"{label}: {frames:.2f} frames per run ({commits:.3f} commits per run){timed}")
            print(f"    {trees}")


if __name__ == "__main__":
    main()
