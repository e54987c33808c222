"""URLs: the signup view and a run's status. The dashboard is mounted in asgi.py."""

from __future__ import annotations

from django.urls import path
from signups import views

urlpatterns = [
    path("signups/", views.signup, name="signup"),
    path("runs/<str:run_id>/", views.run_state, name="run-state"),
]
