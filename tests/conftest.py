"""Shared fixtures. The package's own ``pgflow_store`` / ``pgflow_clock`` fixtures come from the
``pgflow_py.pytest_plugin`` pytest11 entry point; these add a store whose file path tests can see."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

import pgflow_py as pf


@pytest.fixture
def clock() -> pf.testing.FakeClock:
    """A fake clock for the ``store`` fixture, starting at a round time (exact datetime math)."""
    return pf.testing.FakeClock(datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Path of the SQLite file behind the ``store`` fixture."""
    return tmp_path / "app.db"


@pytest.fixture
def store(db_path: Path, clock: pf.testing.FakeClock) -> Iterator[pf.Store]:
    """A store in ``db_path`` on the fake ``clock``."""
    with pf.connect(db_path, clock=clock) as s:
        yield s
