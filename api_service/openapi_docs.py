"""OpenAPI documentation helpers: the shared problem schema and the error responses of each operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import marshmallow as ma
from flask_smorest import Blueprint
from marshmallow import fields

from api_service.problems import MEDIA_TYPE

F = TypeVar("F", bound=Callable[..., Any])


class ProblemErrorSchema(ma.Schema):
    pointer = fields.String(metadata={"description": "JSON pointer into the request body."})
    parameter = fields.String(metadata={"description": "Name of the query parameter."})
    detail = fields.String(required=True)


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details."""

    type = fields.String(required=True, metadata={"example": "/problems/validation-error"})
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    errors = fields.List(fields.Nested(ProblemErrorSchema), metadata={"description": "Validation problems."})


_DESCRIPTIONS = {
    400: "Malformed or too deeply nested JSON, or an invalid Idempotency-Key.",
    401: "No API key, or an unknown, revoked or malformed one (see `WWW-Authenticate`).",
    403: "The API key lacks the scope this operation needs.",
    429: "A tenant limit (submission rate or active jobs) was reached; see `Retry-After` and `RateLimit`.",
    404: "No such job.",
    409: "A request with the same Idempotency-Key is still in progress (see `Retry-After`).",
    413: "Request body too large.",
    415: "Request body is not `application/json`.",
    422: "Validation failed (see `errors`), or an Idempotency-Key reused with a different request.",
    503: "The database is unavailable; nothing was written (see `Retry-After`).",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}


def documents_problems(*statuses: int, descriptions: dict[int, str] | None = None) -> Callable[[F], F]:
    """Document the problem+json responses an operation can give (``descriptions`` overrides the usual)."""
    texts = {**_DESCRIPTIONS, **(descriptions or {})}

    def decorate(view: F) -> F:
        for status in statuses:
            view = Blueprint.alt_response(
                _BLUEPRINT,
                status,
                schema=ProblemSchema,
                content_type=MEDIA_TYPE,
                description=texts[status],
                headers=_RETRY_AFTER if status in (409, 429, 503) else None,
            )(view)
        return view

    return decorate


#: alt_response only needs a Blueprint instance for its bookkeeping, not a registered one.
_BLUEPRINT = Blueprint("problems-doc", __name__)
