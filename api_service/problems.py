"""RFC 9457 problem details: the one place where errors become HTTP responses.

Every error response is ``application/problem+json`` with ``type``, ``title``, ``status`` and
``detail``; validation problems add ``errors``, a list of ``{"pointer" | "parameter", "detail"}``.
Conveyor's own problem types are relative URIs (``/problems/<slug>``) that this API serves, so each
``type`` resolves to its description; plain HTTP errors (unknown route, wrong method) use
``about:blank`` as RFC 9457 recommends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, json
from werkzeug.exceptions import HTTPException

from api_service.rate_limit import rate_limit_headers
from shared import errors

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    slug: str
    title: str
    status: int
    description: str

    @property
    def uri(self) -> str:
        return f"/problems/{self.slug}"


def _catalog(*types: ProblemType) -> dict[str, ProblemType]:
    catalog: dict[str, ProblemType] = {}
    for problem_type in types:
        if problem_type.slug in catalog:
            raise ValueError(f"problem type {problem_type.slug!r} is defined twice")
        catalog[problem_type.slug] = problem_type
    return catalog


CATALOG = _catalog(
    ProblemType("validation-error", "Request validation failed", 422,
                "The request is well-formed JSON but a field is missing, unknown or invalid. `errors` "
                "lists each problem with a JSON pointer into the body or the name of the query parameter."),
    ProblemType("malformed-json", "Malformed JSON", 400,
                "The request body is not valid JSON, is not UTF-8 text, holds a number too long to read, "
                "or has an object that gives a member name more than once. `detail` says which."),
    ProblemType("json-too-deep", "JSON nested too deeply", 400,
                "The request body nests arrays and objects deeper than the server accepts "
                "(`CONVEYOR_MAX_JSON_DEPTH`)."),
    ProblemType("unauthorized", "Authentication required", 401,
                "Send a valid API key as `Authorization: Bearer <key>`. Keys are created with "
                "`conveyor keys create`; a revoked key stops working at once."),
    ProblemType("forbidden", "Scope missing", 403,
                "The API key is valid but lacks the scope this operation needs (`jobs:read`, "
                "`jobs:write` or `admin`)."),
    ProblemType("rate-limited", "Submission rate exceeded", 429,
                "The tenant submits jobs faster than its rate allows. Wait `Retry-After` seconds; the "
                "`RateLimit` headers show the quota. Nothing was stored, so retrying with the same "
                "Idempotency-Key is safe."),
    ProblemType("too-many-active-jobs", "Too many active jobs", 429,
                "The tenant already has as many jobs waiting or running as it may. Retry once some have "
                "finished. Nothing was stored."),
    ProblemType("unsupported-media-type", "Unsupported media type", 415,
                "Request bodies must be sent as `Content-Type: application/json`."),
    ProblemType("payload-too-large", "Request body too large", 413,
                "The request body is larger than the server accepts (`CONVEYOR_MAX_BODY_BYTES`)."),
    ProblemType("job-not-found", "Job not found", 404, "No job has this id."),
    ProblemType("idempotency-key-invalid", "Invalid Idempotency-Key", 400,
                "The `Idempotency-Key` header must be sent once, hold 1 to 255 visible ASCII characters "
                "other than space, comma, double quote and backslash, and may be quoted as a "
                "structured-field string."),
    ProblemType("idempotency-key-in-flight", "Request with this Idempotency-Key in progress", 409,
                "Another request with the same key is still being processed. Retry after the "
                "`Retry-After` delay to receive its response."),
    ProblemType("idempotency-key-reused", "Idempotency-Key reused with a different request", 422,
                "This key was already used for a request with a different body. Use a new key for a "
                "new request."),
    ProblemType("illegal-transition", "Job status does not allow this", 409,
                "The job's current status does not allow the requested change."),
    ProblemType("service-unavailable", "Service temporarily unavailable", 503,
                "A dependency (the database) is unreachable. Usually nothing was written, but a write "
                "whose answer was lost may have happened; retry after the `Retry-After` delay with the "
                "same `Idempotency-Key`."),
    ProblemType("not-ready", "Not ready", 503, "A dependency of this instance is unreachable."),
    ProblemType("internal-error", "Internal server error", 500,
                "An unexpected error. It has been logged; nothing was half-written."),
)  # fmt: skip


class Problem(Exception):
    """An error response. Raise it anywhere in a request; ``render`` turns it into the response."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.type = CATALOG[slug]
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type.uri,
            "title": self.type.title,
            "status": self.type.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body

    def response(self) -> Response:
        return problem_response(self.body(), self.type.status, self.headers)


def problem_response(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=MEDIA_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def invalid(**error: str) -> Problem:
    """A 422 validation problem with one error: ``invalid(pointer="/all", detail="...")``."""
    return Problem("validation-error", "The request is invalid; see `errors`.", errors=[error])


# --- translating exceptions -------------------------------------------------------------------------

#: Seconds a client should wait before retrying after a 503 or a 409 in-flight conflict.
RETRY_AFTER_UNAVAILABLE = 5
RETRY_AFTER_IN_FLIGHT = 1


#: Not "nothing was written": a write whose connection broke after its COMMIT did happen.
UNAVAILABLE_DETAIL = (
    "The database is unavailable; the request may or may not have taken effect. "
    "Retry it with the same Idempotency-Key."
)


def from_conveyor_error(exc: errors.ConveyorError) -> Problem:
    if isinstance(exc, errors.StoreUnavailable):
        logger.warning("database unavailable: %s", exc)
        return Problem("service-unavailable", UNAVAILABLE_DETAIL,
                       headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)})  # fmt: skip
    if isinstance(exc, errors.JobNotFound):
        return Problem("job-not-found", str(exc) or "No job has this id.")
    if isinstance(exc, errors.IdempotencyKeyInvalid):
        return Problem("idempotency-key-invalid", str(exc))
    if isinstance(exc, errors.IdempotencyKeyInFlight):
        return Problem("idempotency-key-in-flight", str(exc),
                       headers={"Retry-After": str(RETRY_AFTER_IN_FLIGHT)})  # fmt: skip
    if isinstance(exc, errors.IdempotencyKeyReused):
        return Problem("idempotency-key-reused", str(exc))
    if isinstance(exc, errors.UnknownJobType):
        return Problem("validation-error", "The request is invalid; see `errors`.",
                       errors=[{"pointer": "/type", "detail": f"Unknown job type {exc}."}])  # fmt: skip
    if isinstance(exc, errors.RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
        if exc.rate is not None and "tenant_limits" in g:
            headers.update(rate_limit_headers(exc.rate, g.tenant_limits))
        return Problem("rate-limited", str(exc), headers=headers)
    if isinstance(exc, errors.TooManyActiveJobs):
        return Problem("too-many-active-jobs", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, errors.IllegalTransition):
        return Problem("illegal-transition", str(exc))
    logger.error("unmapped Conveyor error", exc_info=exc)
    return Problem("internal-error", "An unexpected error occurred.")


def from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    if status == 422 and "messages" in data:
        return Problem("validation-error", "The request is invalid; see `errors`.",
                       errors=list(validation_errors(data["messages"]))).response()  # fmt: skip
    if status == 400 and "messages" in data:
        return Problem("malformed-json", "The request body is not valid JSON.").response()
    if status == 413:
        return Problem("payload-too-large", exc.description or "The request body is too large.").response()
    if status == 415:
        return Problem("unsupported-media-type", exc.description or "Send JSON.").response()
    if status >= 500:
        logger.error("HTTP %s", status, exc_info=exc)
        return Problem("internal-error", "An unexpected error occurred.").response()
    headers = {k: v for k, v in exc.get_headers() if k.lower() not in {"content-type", "content-length"}}
    body = {"type": "about:blank", "title": exc.name, "status": status, "detail": exc.description}
    return problem_response(body, status, headers)


def validation_errors(messages: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """Flatten webargs/marshmallow messages ({location: {field: [msg] | {...}}}) into RFC 9457 errors."""
    for location, tree in messages.items():
        for path, detail in _leaves(tree, ()):
            if location == "json":
                yield {"pointer": pointer(path), "detail": detail}
            else:
                yield {"parameter": str(path[0]) if path else location, "detail": detail}


def _leaves(tree: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(tree, Mapping):
        for key, sub in tree.items():
            yield from _leaves(sub, path if key == "_schema" else (*path, str(key)))
    elif isinstance(tree, list | tuple):
        for item in tree:
            yield from _leaves(item, path)
    else:
        yield path, str(tree)


def pointer(path: tuple[str, ...]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def register(app: Flask) -> None:
    """Problem handlers for Conveyor's errors and for anything unexpected (never a stack trace)."""
    app.register_error_handler(Problem, lambda exc: exc.response())
    app.register_error_handler(errors.ConveyorError, lambda exc: from_conveyor_error(exc).response())

    def unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return from_http_exception(exc)
        logger.exception("unhandled error")
        return Problem("internal-error", "An unexpected error occurred.").response()

    app.register_error_handler(Exception, unexpected)
