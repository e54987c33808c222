"""Behaviour that once passed unchecked: each test here fails on a wrong change the rest of the
suite let through (see the commit that added it for the change it was checked against)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pgflow_py as pf


def test_start_on_a_closed_store_raises_store_error(tmp_path: Path) -> None:
    # Any exception is not enough: callers catch pf.StoreError (pf.PgflowError) for database
    # trouble, and a bare sqlite3 error escapes that.
    @pf.job(queue="after_close")
    def after_close(input, ctx):
        return input

    store = pf.connect(tmp_path / "closed.db", clock=pf.testing.FakeClock())
    run = store.start(after_close, 1)
    store.close()
    with pytest.raises(pf.StoreError):
        store.start(after_close, 2)
    with pytest.raises(pf.StoreError):
        store.start("after_close", 3)
    with pytest.raises(pf.StoreError):
        store.get_run(run.id)
