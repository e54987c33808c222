"""The dashboard: an ASGI app (Starlette) with a JSON API over a store, served by
``pgflow dashboard`` or mounted in an existing app::

    from pgflow_py.dashboard import create_app
    app.mount("/pgflow", create_app(store))          # FastAPI / Starlette

It needs the ``dashboard`` extra (``pip install 'pgflow_py[dashboard]'``); importing this package
without it raises :class:`ImportError` saying so. See :mod:`pgflow_py.dashboard.app` for the
endpoints and the rules that protect the POST ones.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'pgflow_py[dashboard]'"

try:
    import starlette  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"pgflow_py.dashboard needs the dashboard extra: {INSTALL_HINT}"
    ) from exc

from .app import create_app  # noqa: E402  (after the check above)

__all__ = ("INSTALL_HINT", "create_app")
