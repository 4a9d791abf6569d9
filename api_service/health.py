"""Liveness, readiness and the problem-type descriptions."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from marshmallow import fields, validate
from werkzeug.exceptions import NotFound

from api_service.context import services
from api_service.openapi_docs import NOT_FOUND, documents_problems
from api_service.problems import CATALOG, Problem
from api_service.schemas import ResponseSchema
from shared.broker import check_broker
from shared.errors import BrokerUnavailable, StoreUnavailable

blp = Blueprint("health", __name__, description="Probes for load balancers and Kubernetes.")
#: The OpenAPI tag of the problem-type descriptions.
PROBLEMS_TAG = {"name": "problems", "description": "What each problem `type` of an error response means."}


class HealthSchema(ResponseSchema):
    """The process serves requests."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))


class ReadinessSchema(ResponseSchema):
    """Every dependency is reachable."""

    status = fields.String(required=True, validate=validate.OneOf(["ready"]))
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        required=True,
        metadata={
            "description": "Each dependency and its state.",
            "example": {"postgres": "ok", "rabbitmq": "ok"},
        },
    )


class ProblemTypeSchema(ResponseSchema):
    """What a problem type means."""

    type = fields.String(
        required=True, metadata={"format": "uri-reference", "example": "/problems/job-not-found"}
    )
    title = fields.String(required=True, metadata={"example": "Job not found"})
    status = fields.Integer(
        required=True, metadata={"description": "The HTTP status it comes with.", "example": 404}
    )
    description = fields.String(required=True, metadata={"example": "No job has this id."})


@blp.route("/healthz")
@blp.doc(operationId="getHealth", security=[])
@blp.response(200, HealthSchema, description="The process is alive.")
def healthz() -> dict[str, Any]:
    """Liveness

    Answers as long as the process serves requests; checks no dependency.
    """
    return {"status": "ok"}


@blp.route("/readyz")
@blp.doc(operationId="getReadiness", security=[])
@blp.response(200, ReadinessSchema, description="Postgres and RabbitMQ are reachable.")
@documents_problems("not-ready")
def readyz() -> dict[str, Any]:
    """Readiness

    Checks that Postgres and RabbitMQ are reachable; 503 with the failing checks otherwise.
    """
    svc = services()
    checks: dict[str, str] = {}
    try:
        svc.db.read(lambda cur: cur.execute("SELECT 1"))
        checks["postgres"] = "ok"
    except StoreUnavailable as exc:
        checks["postgres"] = str(exc)
    try:
        check_broker(svc.settings)
        checks["rabbitmq"] = "ok"
    except BrokerUnavailable as exc:
        checks["rabbitmq"] = str(exc)
    if any(state != "ok" for state in checks.values()):
        failing = ", ".join(name for name, state in checks.items() if state != "ok")
        raise Problem("not-ready", f"Unreachable: {failing}.", extra={"checks": checks},
                      headers={"Retry-After": "5"})  # fmt: skip
    return {"status": "ready", "checks": checks}


@blp.route("/problems/<slug>", tags=["problems"])
@blp.doc(operationId="getProblemType", security=[])
@blp.response(200, ProblemTypeSchema, description="What a problem type means.")
@documents_problems(NOT_FOUND)
def problem_type(slug: str) -> dict[str, Any]:
    """Describe a problem type

    Every `type` in Conveyor's problem responses resolves here.
    """
    problem = CATALOG.get(slug)
    if problem is None:
        raise NotFound(f"No problem type is called {slug!r}.")
    return {"type": problem.uri, "title": problem.title, "status": problem.status,
            "description": problem.description}  # fmt: skip
