"""The child side of ``isolation="process"``: run one attempt of a sync handler, report as JSON.

The parent writes ``{"handler", "input", "ctx"}`` to stdin and reads one JSON object from
stdout: ``{"ok": true, "output_json": "<the output, encoded>"}`` or ``{"ok": false, "type",
"message", "kind", "delay"}`` (``kind`` ``"unstorable"``: the output cannot be stored).
The handler's own prints go to stderr, so they cannot corrupt the result.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import datetime
from typing import Any


def _outcome(payload: dict[str, Any]) -> dict[str, Any]:
    from .. import _json
    from ..context import Context
    from ..dsl import Flow, Step
    from ..errors import InputError, PermanentFailure, Retry
    from ..payloads import payloads_of
    from .loader import resolve_import_path

    try:
        target = resolve_import_path(payload["handler"])
        step_slug = payload["ctx"]["step_slug"]
        if isinstance(target, Flow):
            payloads = target.payloads(step_slug)
            target = target.handler(step_slug)
        elif isinstance(target, Step):
            payloads = target.flow.payloads(target.slug)
            target = target.fn
        else:
            payloads = payloads_of(target, f"flow {payload['ctx']['flow_slug']!r}, step {step_slug!r}")
        fields = dict(payload["ctx"])
        if fields.get("deadline"):
            fields["deadline"] = datetime.fromisoformat(fields["deadline"])
        value = payload["input"]
        if payloads is not None:
            try:
                value = payloads.structure(value)
            except InputError as exc:
                return {"ok": False, "type": "InputError", "message": str(exc), "kind": "input",
                        "delay": None, "traceback": "".join(traceback.format_exception(exc))}
        output = target(value, Context(**fields))
        if payloads is not None:
            output = payloads.unstructure(output)
    except BaseException as exc:
        kind = "permanent" if isinstance(exc, PermanentFailure) else (
            "retry" if isinstance(exc, Retry) else "error"
        )
        return {
            "ok": False,
            "type": type(exc).__name__,
            "message": str(exc),
            "kind": kind,
            "delay": exc.delay if isinstance(exc, Retry) else None,
            "traceback": "".join(traceback.format_exception(exc)),
        }
    try:
        # Encoded here, by the rules of the parent's store: decoded there, colliding keys or
        # nesting would be lost before anything could check them.
        return {"ok": True, "output_json": _json.dumps(output)}
    except Exception as exc:
        return {"ok": False, "kind": "unstorable", "message": f"{_json.UNSTORABLE_OUTPUT}: {exc}"}


def main() -> None:
    payload = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    text = json.dumps(_outcome(payload), allow_nan=False)
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        out.write(text)


if __name__ == "__main__":
    main()
