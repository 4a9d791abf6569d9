"""The HTTP edge: ``create_app()`` builds the Flask application."""

from __future__ import annotations

import logging

from flask import Flask, request
from flask_smorest import Api
from werkzeug.exceptions import HTTPException, UnsupportedMediaType

from api_service import health, jobs, problems
from api_service.context import EXTENSION, Services
from shared.broker import Publisher, create_broker
from shared.logs import configure_logging
from shared.settings import Settings, get_settings
from shared.store import Database

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
#: OpenAPI 3.0.3 rather than 3.1: every mainstream client generator reads it.
OPENAPI_VERSION = "3.0.3"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ConveyorApi(Api):  # type: ignore[misc]
    """flask-smorest's Api, with every HTTP error rendered as problem+json."""

    def handle_http_exception(self, error: HTTPException):  # type: ignore[no-untyped-def]
        return problems.from_http_exception(error)


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
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/",
        API_SPEC_OPTIONS={
            "info": {
                "description": "Submit background jobs over HTTP, then follow them to the end. "
                "Errors are RFC 9457 problem details (`application/problem+json`)."
            }
        },
    )
    app.extensions[EXTENSION] = Services(
        settings=settings,
        db=Database(settings, application_name="conveyor-api"),
        publisher=Publisher(create_broker(settings), settings.queue_prefix, settings.publish_backoff_seconds),
    )
    api = ConveyorApi(app)
    api.register_blueprint(jobs.blp)
    api.register_blueprint(health.blp)
    problems.register(app)
    app.before_request(_require_json_bodies)
    return app


def _require_json_bodies() -> None:
    """415 for a request body that is not JSON (before any parsing happens)."""
    if request.method not in _BODY_METHODS:
        return
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")
    if has_body and not request.is_json:
        raise UnsupportedMediaType(
            f"Send the request body as application/json, not {request.mimetype or 'an untyped body'}."
        )
