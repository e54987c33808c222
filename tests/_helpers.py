"""Helpers shared by the test modules (importable because pytest puts this directory on sys.path)."""

from __future__ import annotations

from typing import Any

import pgflow_py as pf


def drain(store: pf.Store, *flows: pf.Flow, **options: Any) -> pf.RunnerStats:
    """Serve ``flows`` until nothing is queued, running or scheduled for them."""
    return pf.run_flows(list(flows), store=store, until_idle=True, **options)
