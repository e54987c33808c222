"""Settings of the example project: the minimum Django needs, plus where pgflow's store is."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "signups",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "signups_site.urls"
ASGI_APPLICATION = "signups_site.asgi.application"

# This example keeps no models of its own; a real project has its database here as usual.
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "django.sqlite3"},
}
USE_TZ = True

# pgflow's store: a SQLite file (created on first use) or a postgresql:// URL. It may be the
# database Django uses, but pgflow keeps its own tables (on PostgreSQL, its own schema).
PGFLOW_DATABASE = os.environ.get("PGFLOW_DATABASE", str(BASE_DIR / "pgflow.db"))
