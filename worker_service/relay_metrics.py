"""Prometheus metrics of the relay, served on ``CONVEYOR_RELAY_METRICS_BIND`` (default port 9192).

The relay is where queue depth and backlog are exported, once for the whole system: a background thread
refreshes them every ``CONVEYOR_QUEUE_STATS_REFRESH_SECONDS`` from RabbitMQ (management API, else AMQP)
and Postgres, and a scrape only reads the last refresh, so it is cheap and never waits on a slow broker.
RabbitMQ's gauges are left out while RabbitMQ cannot be asked (``conveyor_rabbitmq_up`` is 0), and
``conveyor_queue_stats_age_seconds`` shows how old the figures are. With several relays, each exports the
same figures: aggregate with ``max by (queue)``, never ``sum``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import queue_stats
from shared.errors import StoreUnavailable
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store

logger = logging.getLogger(__name__)

OUTBOX_PUBLISHED = Counter("conveyor_outbox_published_total", "Outbox messages published and confirmed.")
JOBS_LOST = Counter(
    "conveyor_jobs_lost_total",
    "Running jobs whose lease lapsed (worker killed or lost), by what became of them.",
    ["type", "queue", "outcome"],
)
DEAD_MESSAGES_FILED = Counter(
    "conveyor_dead_messages_filed_total", "Dead messages that name no job, filed in Postgres.", ["error_type"]
)


#: How often the relay counts the finished jobs for ``conveyor_jobs``: every job retention keeps, a
#: read of tens of millions of rows on a busy deployment, which every refresh (10 s) would repeat
#: without pause. The active statuses are counted at every refresh, from their small index.
FINISHED_COUNTS_SECONDS = 300.0


class QueueStatsCollector(Collector):
    """Exports the last snapshot of queue statistics; a thread refreshes it."""

    def __init__(
        self, settings: Settings, db: Database, *, finished_counts_seconds: float = FINISHED_COUNTS_SECONDS
    ) -> None:
        self._settings = settings
        self._db = db
        self._snapshot: queue_stats.Snapshot | None = None
        self._taken_at = 0.0
        self._finished_every = finished_counts_seconds
        self._finished: dict[str, int] = {}
        self._finished_at: float | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._refresh_forever, name="conveyor-queue-stats", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        now = time.monotonic()
        snapshot = queue_stats.collect(self._settings, self._db, with_status_counts=True)
        if self._finished_at is None or now - self._finished_at >= self._finished_every:
            self._finished_at = now  # a count that failed waits its turn too: it is the costly read
            try:  # on its own: a count that times out must not take the queue figures with it
                self._finished = self._db.read(lambda cur: job_store.count_by_status(cur, finished=True))
            except StoreUnavailable as exc:
                logger.warning("finished jobs not counted, the last count stays: %s", exc)
        counted = snapshot.jobs_by_status | self._finished
        self._snapshot = dataclasses.replace(snapshot, jobs_by_status=counted)
        self._taken_at = now

    def _refresh_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except StoreUnavailable as exc:
                logger.warning("queue statistics not refreshed: %s", exc)
            except Exception:  # pragma: no cover - the gauges go stale, the relay goes on
                logger.exception("queue statistics not refreshed")
            self._stop.wait(self._settings.queue_stats_refresh_seconds)

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot
        if snapshot is None:
            return
        age = GaugeMetricFamily("conveyor_queue_stats_age_seconds", "Age of the queue figures below.")
        age.add_metric([], time.monotonic() - self._taken_at)
        yield age
        up = GaugeMetricFamily(
            "conveyor_rabbitmq_up", "Whether RabbitMQ answered the last refresh (1) or not (0)."
        )
        up.add_metric([], float(any(q.source != "unavailable" for q in snapshot.queues)))
        yield up
        yield from self._queue_gauges(snapshot)
        backlog = GaugeMetricFamily(
            "conveyor_outbox_backlog_messages", "Due outbox messages not yet published."
        )
        backlog.add_metric([], snapshot.outbox_backlog)
        yield backlog
        oldest = GaugeMetricFamily(
            "conveyor_outbox_oldest_age_seconds", "Age of the oldest due outbox message."
        )
        oldest.add_metric([], snapshot.outbox_oldest_seconds)
        yield oldest
        jobs = GaugeMetricFamily(
            "conveyor_jobs",
            "Jobs by status; the finished statuses are counted every 5 minutes, the others every refresh.",
            labels=["status"],
        )
        for status, count in sorted(snapshot.jobs_by_status.items()):
            jobs.add_metric([status], count)
        yield jobs

    def _queue_gauges(self, snapshot: queue_stats.Snapshot) -> Iterator[Metric]:
        broker = {
            "ready": ("conveyor_queue_ready_messages", "Messages ready in RabbitMQ."),
            "unacknowledged": (
                "conveyor_queue_unacknowledged_messages",
                "Messages delivered, not yet acked.",
            ),
            "consumers": ("conveyor_queue_consumers", "Consumers of the queue."),
        }
        store = {
            "waiting": ("conveyor_queue_waiting_jobs", "Jobs due and not started."),
            "delayed": ("conveyor_queue_delayed_jobs", "Jobs scheduled or backing off, not due yet."),
            "running": ("conveyor_queue_running_jobs", "Jobs running."),
            "dead": ("conveyor_queue_dead_letters", "Dead letters of the queue."),
            "oldest_waiting_seconds": (
                "conveyor_queue_oldest_waiting_job_age_seconds",
                "Age of the oldest due job.",
            ),
        }
        for field, (name, doc) in {**broker, **store}.items():
            family = GaugeMetricFamily(name, doc, labels=["queue"])
            for queue in snapshot.queues:
                value = getattr(queue, field)
                if value is not None:
                    family.add_metric([queue.name], value)
            yield family


def serve(settings: Settings, db: Database) -> QueueStatsCollector | None:
    """Start the metrics server and queue-stats refresher; None (and a clear log) if the port is taken."""
    if not settings.relay_metrics_bind:
        return None
    host, _, port = settings.relay_metrics_bind.rpartition(":")
    collector = QueueStatsCollector(settings, db)
    REGISTRY.register(collector)
    try:
        start_http_server(int(port), host or "0.0.0.0")  # noqa: S104
    except OSError as exc:
        logger.error("relay metrics disabled: cannot listen on %s (%s); set CONVEYOR_RELAY_METRICS_BIND",
                     settings.relay_metrics_bind, exc)  # fmt: skip
        REGISTRY.unregister(collector)
        return None
    collector.start()
    logger.info("relay metrics on http://%s/metrics", settings.relay_metrics_bind)
    return collector
