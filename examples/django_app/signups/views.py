"""Views: a signup starts a run; a run's status is JSON."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import pgflow_py as pf

from .jobs import welcome_email
from .pgflow import get_store


@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    email = request.POST.get("email", "").strip()
    if "@" not in email:
        return JsonResponse({"error": "give an email address"}, status=400)
    # The key makes a double submit start one run, not two. Starting writes one transaction:
    # the request does not wait for the mail, the worker sends it.
    run = get_store().start(welcome_email, {"email": email}, key=f"welcome:{email}")
    return JsonResponse({"run_id": run.id, "status": run.status.value}, status=202)


@require_GET
def run_state(request: HttpRequest, run_id: str) -> JsonResponse:
    try:
        run = get_store().get_run(run_id)
    except pf.RunNotFound:
        return JsonResponse({"error": f"no run {run_id}"}, status=404)
    return JsonResponse(
        {"run_id": run.id, "status": run.status.value, "output": run.output, "error": run.error}
    )
