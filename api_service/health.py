"""Liveness, readiness and the problem-type descriptions."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from werkzeug.exceptions import NotFound

from api_service.context import services
from api_service.openapi_docs import documents_problems
from api_service.problems import CATALOG, Problem
from shared.broker import check_broker
from shared.errors import BrokerUnavailable, StoreUnavailable

blp = Blueprint("health", __name__, description="Probes for load balancers and Kubernetes.")


@blp.route("/healthz")
@blp.doc(security=[])
@blp.response(200, description="The process is alive.")
def healthz() -> dict[str, Any]:
    """Liveness

    Answers as long as the process serves requests; checks no dependency.
    """
    return {"status": "ok"}


@blp.route("/readyz")
@blp.doc(security=[])
@blp.response(200, description="Postgres and RabbitMQ are reachable.")
@documents_problems(503)
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


@blp.route("/problems/<slug>")
@blp.doc(security=[])
@blp.response(200, description="What a problem type means.")
@documents_problems(404)
def problem_type(slug: str) -> dict[str, Any]:
    """Describe a problem type

    Every `type` in Conveyor's problem responses resolves here.
    """
    problem = CATALOG.get(slug)
    if problem is None:
        raise NotFound(f"No problem type is called {slug!r}.")
    return {"type": problem.uri, "title": problem.title, "status": problem.status,
            "description": problem.description}  # fmt: skip
