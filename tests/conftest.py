"""Shared fixtures. The package's own ``pgflow_store`` / ``pgflow_clock`` fixtures come from the
``pgflow_py.pytest_plugin`` pytest11 entry point; these add a store whose file path tests can see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import pgflow_py as pf

T0 = 1_800_000_000
"""Where the ``clock`` fixture starts: whole seconds (exact datetime math), on a cron boundary."""


@pytest.fixture
def clock() -> pf.testing.FakeClock:
    """A fake clock for the ``store`` fixture."""
    return pf.testing.FakeClock(T0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Path of the SQLite file behind the ``store`` fixture."""
    return tmp_path / "app.db"


@pytest.fixture
def store(db_path: Path, clock: pf.testing.FakeClock) -> Iterator[pf.Store]:
    """A store in ``db_path`` on the fake ``clock``."""
    with pf.connect(db_path, clock=clock) as s:
        yield s
