"""A log formatter for log shippers: one JSON object per line (``pgflow worker --log-format json``)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

__all__ = ("JsonFormatter",)

# The ids a runner's and a handler's lines carry as record attributes.
_IDS = ("run_id", "flow_slug", "step_slug", "task_index", "attempt", "max_attempts")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", the attempt's ids…, "exception"}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _IDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
