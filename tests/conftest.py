"""Shared fixtures. The package's own ``pgflow_store`` / ``pgflow_clock`` fixtures come from the
``pgflow_py.pytest_plugin`` pytest11 entry point; these add a store whose file path tests can see."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import POSTGRES_URL, fresh_store

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
    """A store in ``db_path`` on the fake ``clock`` (on PostgreSQL: see ``fresh_store``)."""
    with fresh_store(db_path, clock) as s:
        yield s


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``$PGFLOW_TEST_POSTGRES`` set, skip the tests that look at the SQLite file itself."""
    if POSTGRES_URL is None:
        return
    skip = pytest.mark.skip(reason="looks at the SQLite file (db_path)")
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and "db_path" in inspect.signature(function).parameters:
            item.add_marker(skip)
