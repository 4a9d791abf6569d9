"""Queue statistics, read from RabbitMQ and Postgres: one computation for ``GET /v1/queues`` and for the
relay's queue-depth gauges."""

from __future__ import annotations

from dataclasses import dataclass

from shared.broker import queue_depth
from shared.errors import BrokerUnavailable
from shared.job_types import REGISTRY
from shared.messages import queue_name
from shared.settings import Settings
from shared.store import Database
from shared.store import dead_letters as dead_letter_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store.db import Cursor


@dataclass(frozen=True)
class QueueStats:
    name: str
    rabbitmq_queue: str
    #: From RabbitMQ; None when it could not be asked (``source`` says so) or does not say.
    ready: int | None
    unacknowledged: int | None
    consumers: int | None
    #: From Postgres.
    waiting: int
    delayed: int
    running: int
    dead: int
    oldest_waiting_seconds: float
    #: management, amqp or unavailable.
    source: str


@dataclass(frozen=True)
class Snapshot:
    queues: list[QueueStats]
    outbox_backlog: int
    outbox_oldest_seconds: float
    jobs_by_status: dict[str, int]


def collect(settings: Settings, db: Database, *, with_status_counts: bool = False) -> Snapshot:
    """The figures of every queue; ``jobs_by_status`` holds the active statuses' counts if
    ``with_status_counts`` (the finished ones, a read of every job retention keeps, are the relay's to
    count: ``worker_service/relay_metrics.py``)."""

    def read(
        cur: Cursor,
    ) -> tuple[dict[str, job_store.QueueCounts], dict[str, int], tuple[int, float], dict[str, int]]:
        statuses = job_store.count_by_status(cur, finished=False) if with_status_counts else {}
        return (
            job_store.queue_counts(cur),
            dead_letter_store.count_by_queue(cur),
            outbox_store.backlog(cur),
            statuses,
        )

    counts, dead, (backlog, oldest), statuses = db.read(read)
    names = sorted({t.queue for t in REGISTRY.values()} | set(counts) | set(dead))
    queues = []
    for name in names:
        wire_name = queue_name(settings.queue_prefix, name)
        try:
            depth = queue_depth(settings, wire_name)
            ready, unacked, consumers, source = (
                depth.ready,
                depth.unacknowledged,
                depth.consumers,
                depth.source,
            )
        except BrokerUnavailable:
            ready = unacked = consumers = None
            source = "unavailable"
        c = counts.get(name, job_store.QueueCounts())
        queues.append(QueueStats(name, wire_name, ready, unacked, consumers, c.waiting, c.delayed, c.running,
                                 dead.get(name, 0), round(c.oldest_waiting_seconds, 3), source))  # fmt: skip
    return Snapshot(queues, backlog, round(oldest, 3), statuses)
