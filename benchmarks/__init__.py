"""Benchmarks for pgflow_py (not part of the test suite): ``python -m benchmarks``."""

from pathlib import Path


def fresh_db(directory: Path, name: str) -> Path:
    """The path of a database file in ``directory`` with no leftovers of an earlier repetition."""
    path = directory / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path
