"""The SQLite backend: one file (or ``:memory:``), WAL, one connection per process.

Writes run in ``BEGIN IMMEDIATE`` transactions so concurrent processes queue on the busy timeout
instead of failing on lock upgrades. A claim is a single ``UPDATE ... RETURNING`` over the partial
index of queued tasks; results are applied in batches, one transaction per batch.

:class:`SqliteBackend` is built in layers, a module each, every layer extending the one below:

- ``connection``: the file, its pragmas and migrations, transactions, errors;
- ``definitions``: flow definitions stored, checked against the code, cached;
- ``steps``: a run advancing one step at a time (steps start, complete, fail; runs finish);
- ``batches``: results applied set-wise, falling back to ``steps`` for anything unusual;
- ``starting``: new runs and their root tasks;
- ``claims``: the workers' side (claims, results, leases, waiting for work);
- ``control``: cancel, retry, prune;
- ``reading``: runs read back as models.
"""

from __future__ import annotations

from .claims import LOST_WORKER
from .connection import SCHEMA_VERSION
from .reading import _Reading

__all__ = ("LOST_WORKER", "SCHEMA_VERSION", "SqliteBackend")


class SqliteBackend(_Reading):
    """:class:`~pgflow_py.store.base.Backend` on SQLite."""
