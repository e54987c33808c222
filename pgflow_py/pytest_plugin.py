"""pytest fixtures for projects that use pgflow_py (loaded through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .store import Store, connect
from .testing import FakeClock


@pytest.fixture
def pgflow_clock() -> FakeClock:
    """A :class:`~pgflow_py.testing.FakeClock` for the ``pgflow_store`` fixture."""
    return FakeClock()


@pytest.fixture
def pgflow_store(tmp_path: Path, pgflow_clock: FakeClock) -> Iterator[Store]:
    """A store in a temporary SQLite file, on the ``pgflow_clock`` fake clock."""
    with connect(tmp_path / "pgflow.db", clock=pgflow_clock) as store:
        yield store
