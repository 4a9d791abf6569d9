"""Queue statistics for operators: what waits, runs, is delayed or dead, per queue."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields

from api_service.auth import requires
from api_service.context import services
from api_service.openapi_docs import documents_problems
from api_service.schemas import StrictSchema
from shared.api_keys import Scope
from shared.broker import queue_depth
from shared.errors import BrokerUnavailable
from shared.job_types import REGISTRY
from shared.messages import queue_name
from shared.store import dead_letters as dead_letter_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store.db import Cursor

blp = Blueprint(
    "queues", __name__, url_prefix="/v1/queues", description="Queue depth and backlog, for operators."
)


class QueueStatsSchema(StrictSchema):
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
    source = fields.String(required=True, metadata={"description": "management, amqp or unavailable."})


class OutboxStatsSchema(StrictSchema):
    backlog = fields.Integer(required=True, metadata={"description": "Due messages not yet published."})
    oldest_seconds = fields.Float(required=True)


class QueuesSchema(StrictSchema):
    queues = fields.List(fields.Nested(QueueStatsSchema), required=True)
    outbox = fields.Nested(OutboxStatsSchema, required=True)


@blp.route("")
class Queues(MethodView):
    @requires(Scope.ADMIN)
    @blp.response(200, QueuesSchema)
    @documents_problems(401, 403, 503)
    def get(self) -> dict[str, Any]:
        """Queue statistics

        For each queue: RabbitMQ's ready and unacknowledged messages and consumers, and from Postgres
        the jobs waiting, delayed (scheduled or backing off), running and dead, and the age of the
        oldest waiting job; plus the outbox backlog.
        """
        svc = services()

        def read(cur: Cursor) -> tuple[Any, Any, Any]:
            return (
                job_store.queue_counts(cur),
                dead_letter_store.count_by_queue(cur),
                outbox_store.backlog(cur),
            )

        counts, dead, (backlog, oldest) = svc.db.run(read)
        names = sorted({t.queue for t in REGISTRY.values()} | set(counts) | set(dead))
        queues = []
        for name in names:
            wire_name = queue_name(svc.settings.queue_prefix, name)
            try:
                depth = queue_depth(svc.settings, wire_name)
                broker = {"ready": depth.ready, "unacknowledged": depth.unacknowledged,
                          "consumers": depth.consumers, "source": depth.source}  # fmt: skip
            except BrokerUnavailable:
                broker = {"ready": None, "unacknowledged": None, "consumers": None, "source": "unavailable"}
            c = counts.get(name, job_store.QueueCounts())
            queues.append({"name": name, "rabbitmq_queue": wire_name, **broker, "waiting": c.waiting,
                           "delayed": c.delayed, "running": c.running, "dead": dead.get(name, 0),
                           "oldest_waiting_seconds": round(c.oldest_waiting_seconds, 3)})  # fmt: skip
        return {"queues": queues, "outbox": {"backlog": backlog, "oldest_seconds": round(oldest, 3)}}
