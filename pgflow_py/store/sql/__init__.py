"""The store's logic in SQL, shared by the backends: :class:`SqlBackend`.

It is built in layers, a module each, every layer extending the one below:

- ``connection``: one connection, transactions, errors (a backend fills in its hooks);
- ``definitions``: flow definitions stored, checked against the code, cached;
- ``steps``: a run advancing one step at a time (steps start, complete, fail; runs finish);
- ``batches``: results applied set-wise, falling back to ``steps`` for anything unusual;
- ``starting``: new runs and their root tasks;
- ``claims``: the workers' side (claims, results, leases, throughput tallies, waiting for work);
- ``control``: cancel, retry, prune;
- ``reading``: runs read back as models;
- ``operations``: counts, stats, throughput, workers, bulk retry and deleting a flow.

The SQL is SQLite's dialect; :mod:`pgflow_py.store.postgres` translates it.
"""

from __future__ import annotations

from .operations import _Operations

__all__ = ("SqlBackend",)


class SqlBackend(_Operations):
    """The layers, complete but for a connection: see :class:`~.connection._Connection`."""
