"""Logging for every Conveyor process: one JSON object per line on stderr.

Fields: ``ts``, ``level``, ``logger``, ``message``, plus ``job_id``, ``job_type`` and ``attempt`` when
the log call passes them in ``extra``, and ``exc`` for exceptions.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from shared.settings import Settings

#: Attributes that a log call may pass in ``extra`` and that end up as top-level fields.
CONTEXT_FIELDS = ("request_id", "job_id", "job_type", "attempt", "queue", "outbox_id", "redelivered")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value if isinstance(value, int | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Idempotent: replaces the root handlers with one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # pika logs every connection attempt at INFO; its warnings are what matter.
    logging.getLogger("pika").setLevel(logging.WARNING)
