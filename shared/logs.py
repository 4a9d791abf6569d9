"""Logging for every Conveyor process: one JSON object per line on stderr.

Fields: ``ts``, ``level``, ``logger``, ``message``, plus ``job_id``, ``job_type`` and ``attempt`` when
the log call passes them in ``extra``, and ``exc`` for exceptions.

Each line is written to file descriptor 2 with one ``write``. dramatiq replaces a worker process's
``sys.stderr`` with a pipe to its main process, which reads every line and writes it out again, so
that the processes' lines cannot mix; that forwarding cost a worker about a third of what its two
lines per job cost (docs/performance.md). A line of at most ``PIPE_BUF`` bytes written with one
``write`` cannot mix with another process's lines either (on a pipe, and on a file opened for
appending), so such lines skip the forwarding. A longer one (a traceback) still goes through
``sys.stderr``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
from datetime import UTC, datetime
from typing import TextIO

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


class LineHandler(logging.Handler):
    """Writes each formatted record as one line: to ``fd`` in one ``write`` if it fits in ``PIPE_BUF``
    bytes, else to ``long_lines`` (``sys.stderr`` as it is when the record is written)."""

    def __init__(self, fd: int = 2, long_lines: TextIO | None = None) -> None:
        super().__init__()
        self._fd = fd
        self._long_lines = long_lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            data = line.encode("utf-8", "backslashreplace")
            if len(data) <= select.PIPE_BUF:
                os.write(self._fd, data)
                return
            stream = self._long_lines or sys.stderr
            stream.write(line)
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(settings: Settings) -> None:
    """Idempotent: replaces the root handlers with one JSON handler on stderr."""
    handler = LineHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # pika logs every connection attempt at INFO; its warnings are what matter.
    logging.getLogger("pika").setLevel(logging.WARNING)
