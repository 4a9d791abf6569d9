"""``X-Request-ID``: taken from the request when it is well-formed, generated otherwise, echoed on the
response, written on every log line of the request, stored with a submitted job and carried in its
message into the worker's logs."""

from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, Response, g, has_request_context, request

HEADER = "X-Request-ID"
#: What a client's id may look like; anything else (too long, odd characters, a header-injection
#: attempt) is replaced by a fresh id rather than echoed.
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def current_request_id() -> str | None:
    if not has_request_context():
        return None
    request_id: str | None = g.get("request_id")
    return request_id


def _take() -> None:
    given = request.headers.get(HEADER, "")
    g.request_id = given if _VALID.fullmatch(given) else uuid.uuid4().hex


def _echo(response: Response) -> Response:
    request_id = current_request_id()
    if request_id:
        response.headers[HEADER] = request_id
    return response


class RequestIdLogFilter(logging.Filter):
    """Adds the current request's id to log records made while handling it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


def register(app: Flask) -> None:
    app.before_request(_take)
    app.after_request(_echo)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
