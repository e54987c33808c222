"""One pgflow store per process, for the database named by ``settings.PGFLOW_DATABASE``."""

from __future__ import annotations

import threading

from django.conf import settings

import pgflow_py as pf

_stores: dict[str, pf.Store] = {}
_lock = threading.Lock()


def get_store() -> pf.Store:
    """The store for ``settings.PGFLOW_DATABASE``, connected on first use (safe across threads:
    one store serves every request of the process)."""
    url = str(settings.PGFLOW_DATABASE)
    with _lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = pf.connect(url)
        return store


def close_stores() -> None:
    """Close every store opened here (tests; a process exiting need not)."""
    with _lock:
        for store in _stores.values():
            store.close()
        _stores.clear()
