"""Queue statistics for operators: what waits, runs, is delayed or dead, per queue."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from marshmallow import fields, validate

from api_service.auth import requires
from api_service.context import services
from api_service.json_body import Blueprint
from api_service.openapi_docs import AUTHENTICATED, documents_problems
from api_service.schemas import ResponseSchema
from shared import queue_stats
from shared.api_keys import Scope

blp = Blueprint(
    "queues", __name__, url_prefix="/v1/queues", description="Queue depth and backlog, for operators."
)


class QueueStatsSchema(ResponseSchema):
    """One queue: RabbitMQ's view and Postgres's."""

    name = fields.String(required=True, metadata={"example": "default"})
    rabbitmq_queue = fields.String(required=True, metadata={"example": "conveyor.default"})
    ready = fields.Integer(
        allow_none=True, required=True, metadata={"description": "Messages ready in RabbitMQ."}
    )
    unacknowledged = fields.Integer(
        allow_none=True,
        required=True,
        metadata={"description": "Delivered, not yet acknowledged (null without the management API)."},
    )
    consumers = fields.Integer(allow_none=True, required=True)
    waiting = fields.Integer(required=True, metadata={"description": "Jobs due and not started."})
    delayed = fields.Integer(
        required=True, metadata={"description": "Scheduled jobs and retries not due yet."}
    )
    running = fields.Integer(required=True)
    dead = fields.Integer(required=True, metadata={"description": "Dead letters."})
    oldest_waiting_seconds = fields.Float(
        required=True, metadata={"description": "Age of the oldest due job."}
    )
    source = fields.String(
        required=True,
        validate=validate.OneOf(["management", "amqp", "unavailable"]),
        metadata={"description": "Where `ready`, `unacknowledged` and `consumers` come from."},
    )


class OutboxStatsSchema(ResponseSchema):
    """Submitted jobs whose message is not published yet."""

    backlog = fields.Integer(required=True, metadata={"description": "Due messages not yet published."})
    oldest_seconds = fields.Float(required=True)


class QueuesSchema(ResponseSchema):
    """Queue statistics."""

    queues = fields.List(fields.Nested(QueueStatsSchema), required=True)
    outbox = fields.Nested(OutboxStatsSchema, required=True)


@blp.route("")
class Queues(MethodView):
    @requires(Scope.ADMIN)
    @blp.doc(operationId="getQueueStats")
    @blp.response(
        200,
        QueuesSchema,
        description="Every queue's statistics, and the outbox's.",
        example={
            "queues": [
                {"name": "default", "rabbitmq_queue": "conveyor.default", "ready": 0, "unacknowledged": 0,
                 "consumers": 2, "waiting": 0, "delayed": 1, "running": 0, "dead": 2,
                 "oldest_waiting_seconds": 0.0, "source": "management"}
            ],
            "outbox": {"backlog": 0, "oldest_seconds": 0.0},
        },
    )  # fmt: skip
    @documents_problems(*AUTHENTICATED, "validation-error")  # an unknown query parameter
    def get(self) -> dict[str, Any]:
        """Queue statistics

        For each queue: RabbitMQ's ready and unacknowledged messages and consumers, and from Postgres
        the jobs waiting, delayed (scheduled or backing off), running and dead, and the age of the
        oldest waiting job; plus the outbox backlog.
        """
        snapshot = queue_stats.collect(services().settings, services().db)
        return {
            "queues": [q.__dict__ for q in snapshot.queues],
            "outbox": {"backlog": snapshot.outbox_backlog, "oldest_seconds": snapshot.outbox_oldest_seconds},
        }
