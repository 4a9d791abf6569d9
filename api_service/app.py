"""The HTTP edge: ``create_app()`` builds the Flask application."""

from __future__ import annotations

import functools
import logging

import marshmallow as ma
from flask import Flask, Response, request
from flask_smorest import Api
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, UnsupportedMediaType

from api_service import (
    auth,
    batch,
    dead_letters,
    health,
    jobs,
    json_body,
    metrics,
    openapi_docs,
    problems,
    queues,
    request_ids,
    swagger_ui,
)
from api_service.context import EXTENSION, Services, services
from api_service.problems import Problem, invalid, pointer
from api_service.published_rows import PublishedRows
from api_service.schemas import SURROGATE_MESSAGE, UNKNOWN_PARAMETER, Cursor
from shared.broker import Publisher, create_broker
from shared.logs import configure_logging
from shared.settings import Settings, get_settings
from shared.store import Database

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
#: OpenAPI 3.0.3 rather than 3.1: every mainstream client generator reads it.
OPENAPI_VERSION = "3.0.3"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: JSON responses are data, never a page: nothing may load, frame or sniff them. The Swagger UI page
#: sets its own (``swagger_ui.CSP``).
_API_CSP = "default-src 'none'; frame-ancestors 'none'"


class ConveyorApi(Api):  # type: ignore[misc]
    """flask-smorest's Api, with every HTTP error rendered as problem+json.

    Its document lists each operation's own problem responses (``openapi_docs``), so flask-smorest's
    generic ones (a ``default`` error response, ETag and pagination components) are left out.
    """

    DEFAULT_ERROR_RESPONSE_NAME = None

    def handle_http_exception(self, error: HTTPException):  # type: ignore[no-untyped-def]
        return problems.from_http_exception(error)

    def _register_responses(self) -> None:
        pass

    def _register_etag_headers(self) -> None:
        pass

    def _register_pagination_header(self) -> None:
        pass


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask("conveyor")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="Conveyor",
        API_VERSION=API_VERSION,
        OPENAPI_VERSION=OPENAPI_VERSION,
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": openapi_docs.INFO,
            "security": [{"bearerAuth": []}],
        },
    )
    db = Database(settings, application_name="conveyor-api")
    app.extensions[EXTENSION] = Services(
        settings=settings,
        db=db,
        published=PublishedRows(db),
        publisher=Publisher(
            create_broker(settings),
            settings.queue_prefix,
            settings.publish_backoff_seconds,
        ),
    )
    api = ConveyorApi(app, spec_kwargs={"extra_plugins": [openapi_docs.ConveyorDocs()]})
    api.spec.components.security_scheme("bearerAuth", auth.SECURITY_SCHEME)
    api.register_field(Cursor, "string", None)
    api.register_blueprint(jobs.blp)
    api.register_blueprint(batch.blp)
    api.register_blueprint(dead_letters.blp)
    api.register_blueprint(queues.blp)
    api.register_blueprint(health.blp)
    api.spec.tag(health.PROBLEMS_TAG)
    swagger_ui.register(app, enabled=settings.api_docs)
    request_ids.register(app)  # first: every later hook and log line has the request's id
    problems.register(app)
    metrics.register(app)
    # Authentication first: a caller without a valid key learns nothing, not even about its body.
    app.before_request(auth.authenticate_request)
    app.before_request(_check_request_body)
    app.before_request(_check_query_parameters)
    app.after_request(_security_headers)
    with app.app_context():
        auth.warn_if_unauthenticated()
    return app


def _check_request_body() -> None:
    """Before the body is parsed: 415 for a body that is not JSON, 413 for a chunked body over the size
    limit, 400 for JSON nested too deeply, 422 for a string holding an unpaired surrogate."""
    if request.method not in _BODY_METHODS or request.endpoint is None:
        return  # no operation (404, 405): its body is never read
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")
    if not has_body:
        if "json" in _declared_arguments():  # an empty body is not JSON (it was a 422 for its fields)
            raise Problem("malformed-json", "The request body is empty; send a JSON object.")
        return
    if not request.is_json:
        raise UnsupportedMediaType(
            f"Send the request body as application/json, not {request.mimetype or 'an untyped body'}."
        )
    body = request.get_data(cache=True)
    # werkzeug stops reading a chunked body at the size limit, silently: 413 if any of it is left.
    cut = request.content_length is None and len(body) == request.max_content_length
    if cut and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    limit = services().settings.max_json_depth
    if json_body.depth(body, limit) > limit:
        raise Problem(
            "json-too-deep", f"The request body nests arrays and objects deeper than {limit} levels."
        )
    if b"\\ud" in body or b"\\uD" in body:  # only then can a JSON string hold a lone surrogate
        path = json_body.unpaired_surrogate_path()
        if path is not None:
            raise invalid(pointer=pointer(path), detail=SURROGATE_MESSAGE)


def _check_query_parameters() -> None:
    """422 for a query parameter on a /v1 operation that declares none (those that declare some refuse
    unknown ones in their own schema), and for one that takes a single value given more than once
    (webargs kept the first). A misspelt or repeated option must not be silently ignored."""
    if not request.args or not request.path.startswith("/v1/") or request.endpoint is None:
        return  # no operation (404, 405): nothing to check its parameters against
    schemas = _declared_arguments().get("query")
    if schemas is None:
        errors = [{"parameter": name, "detail": UNKNOWN_PARAMETER} for name in sorted(set(request.args))]
    else:
        single = frozenset().union(*map(_single_valued, schemas))
        errors = [
            {"parameter": name, "detail": "Give this parameter once; it takes one value."}
            for name in sorted(single) if len(request.args.getlist(name)) > 1
        ]  # fmt: skip
    if errors:
        raise Problem("validation-error", "The request is invalid; see `errors`.", errors=errors)


@functools.cache
def _single_valued(schema: ma.Schema | type[ma.Schema]) -> frozenset[str]:
    """The query parameters of ``schema`` that take one value (worked out once per schema, not on
    every request)."""
    fields = (schema() if isinstance(schema, type) else schema).fields
    return frozenset(f.data_key or name for name, f in fields.items() if not isinstance(f, ma.fields.List))


def _declared_arguments() -> dict[str, list[ma.Schema | type[ma.Schema]]]:
    """Where the operation of this request takes arguments from (flask-smorest's ``in``: ``query``,
    ``json``), with their schemas, as its ``@blp.arguments`` declare them."""
    declared = getattr(auth.request_operation(), "_apidoc", {}).get("arguments", {}).get("parameters", [])
    where: dict[str, list[ma.Schema | type[ma.Schema]]] = {}
    for argument in declared:
        where.setdefault(argument.get("in"), []).append(argument.get("schema"))
    return where


def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cache-Control", "no-store")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    headers.setdefault("Content-Security-Policy", _API_CSP)
    hsts = services().settings.hsts_seconds
    if hsts:
        headers.setdefault("Strict-Transport-Security", f"max-age={hsts}; includeSubDomains")
    return response
