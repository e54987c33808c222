"""The ASGI entry: Django, with pgflow's dashboard mounted at /pgflow/.

Run it with ``uvicorn signups_site.asgi:application`` (from examples/django_app/). The dashboard
has no login: put it behind your own authentication before exposing it; here it is read-only.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application
from starlette.applications import Starlette
from starlette.routing import Mount

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signups_site.settings")
django_app = get_asgi_application()  # sets Django up: import the app's modules after this

from signups.pgflow import get_store  # noqa: E402

import pgflow_py as pf  # noqa: E402
from pgflow_py.dashboard import create_app  # noqa: E402


def build_application(store: pf.Store) -> Starlette:
    """Django at /, the dashboard over ``store`` at /pgflow/."""
    return Starlette(routes=[
        Mount("/pgflow", app=create_app(store, read_only=True)),
        # django-stubs types the handler's scope and callables more narrowly than ASGI's.
        Mount("/", app=django_app),  # type: ignore[arg-type]
    ])


application = build_application(get_store())
