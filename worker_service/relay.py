"""The relay: publishes the outbox to RabbitMQ and keeps the job table honest.

Each round it
1. takes due outbox rows (new jobs the API could not publish, scheduled jobs whose time came, retries
   whose backoff is over), publishes them with publisher confirms, deletes the confirmed ones and
   writes on each of the others why it was not published (its ``last_error``);
2. retries or fails running jobs whose lease lapsed (their worker is gone), but only once Postgres has
   been reachable for a whole lease period: after an outage (or at the relay's start) the workers first
   get the chance to renew the leases they could not renew meanwhile;
3. files what the queues' dead-letter queues hold in Postgres (``worker_service.dead_letters``);
4. every minute, purges expired idempotency keys and prunes finished jobs past
   ``CONVEYOR_RETENTION_SECONDS``, in batches of a few hundred rows, at most a few batches a round.

Several relays may run at once: a relay locks the rows it publishes with ``FOR UPDATE SKIP LOCKED``
for the length of one transaction. A duplicate publish (a relay dying between publish and commit,
which leaves its rows due at once) is harmless, because the worker's claim runs a job once.

Run it with ``conveyor relay`` (``python -m worker_service.relay``); SIGTERM or Ctrl-C stops it after
the current round.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from shared import heartbeat
from shared.broker import DeadLetterReader, Publisher, create_broker
from shared.errors import BrokerUnavailable, StoreUnavailable
from shared.logs import configure_logging
from shared.settings import Settings, get_settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store.db import Cursor
from worker_service import relay_metrics
from worker_service.dead_letters import DeadLetterFiler

logger = logging.getLogger(__name__)

#: Pruning runs once a minute, in batches small enough that each DELETE holds its row locks for
#: milliseconds, and stops after a few batches so publishing is never delayed for long.
PRUNE_INTERVAL_SECONDS = 60.0
PRUNE_BATCH = 500
PRUNE_BATCHES_PER_ROUND = 20
LAPSED_LEASE_BATCH = 100


@dataclass
class RoundReport:
    published: int = 0
    failed_publishes: int = 0
    recovered: int = 0
    purged_keys: int = 0
    pruned_jobs: int = 0
    dead_letters_filed: int = 0


class Relay:
    def __init__(
        self, settings: Settings, db: Database, publisher: Publisher, filer: DeadLetterFiler | None = None
    ) -> None:
        self._settings = settings
        self._db = db
        self._publisher = publisher
        self._filer = filer
        self._next_purge = 0.0
        #: time.monotonic() since when Postgres has answered every round (None: it just failed).
        self._reachable_since: float | None = None

    def run_round(self) -> RoundReport:
        report = RoundReport()
        try:
            self._publish_due(report)
        except StoreUnavailable:
            self._reachable_since = None
            raise
        now = time.monotonic()
        if self._reachable_since is None:
            self._reachable_since = now
        if now - self._reachable_since >= self._settings.job_lease_seconds:
            self._recover_lapsed(report)
        if self._filer is not None:
            try:
                report.dead_letters_filed = self._filer.file_round()
            except BrokerUnavailable as exc:
                logger.warning("could not read the dead-letter queues: %s", exc)
        if time.monotonic() >= self._next_purge:
            self._prune(report)
            self._next_purge = time.monotonic() + PRUNE_INTERVAL_SECONDS
        return report

    def _prune(self, report: RoundReport) -> None:
        """Expired keys and old finished jobs, batch by batch, until done or the round's budget is spent."""
        retention = self._settings.retention_seconds
        for _ in range(PRUNE_BATCHES_PER_ROUND):
            keys = self._db.execute(lambda cur: key_store.purge_expired(cur, PRUNE_BATCH))
            jobs = self._db.execute(
                lambda cur: job_store.prune_finished(cur, older_than_seconds=retention, limit=PRUNE_BATCH)
            )
            report.purged_keys += keys
            report.pruned_jobs += jobs
            if keys < PRUNE_BATCH and jobs < PRUNE_BATCH:
                break

    def _publish_due(self, report: RoundReport) -> None:
        """Take, publish and delete one batch of due rows in one transaction: the rows stay locked
        while their messages are published, and a relay that dies meanwhile leaves them due at once."""
        batch = self._settings.relay_batch_size
        retry_in = self._settings.publish_backoff_seconds

        def work(cur: Cursor) -> tuple[int, int]:
            due = outbox_store.take_due(cur, limit=batch)
            if not due:
                return 0, 0
            published = self._publisher.publish_all(due)
            confirmed = [d.outbox_id for d in published.confirmed if d.outbox_id is not None]
            outbox_store.delete_published(cur, confirmed)
            unpublished: dict[str, list[int]] = {}  # the rows RabbitMQ did not confirm, by the reason
            for dispatch, reason in published.failed:
                if dispatch.outbox_id is not None:
                    unpublished.setdefault(reason, []).append(dispatch.outbox_id)
            for reason, outbox_ids in unpublished.items():
                outbox_store.record_publish_error(cur, outbox_ids, reason, retry_in)
            return len(published.confirmed), len(published.failed)

        report.published, report.failed_publishes = self._db.run(work)
        if not report.published and not report.failed_publishes:
            return
        relay_metrics.OUTBOX_PUBLISHED.inc(report.published)
        logger.info(
            "published %d outbox message(s), %d left for later", report.published, report.failed_publishes
        )

    def _beat(self) -> None:
        """Touch the heartbeat file (a round came round, even if Postgres was down in the last one)."""
        if self._settings.relay_heartbeat_file:
            try:
                heartbeat.beat(self._settings.relay_heartbeat_file)
            except OSError as exc:
                logger.warning("cannot write the heartbeat file: %s", exc)

    def _recover_lapsed(self, report: RoundReport) -> None:
        recovered = self._db.execute(
            lambda cur: attempt_store.recover_lapsed_leases(
                cur,
                limit=LAPSED_LEASE_BATCH,
                retry_base=self._settings.retry_base_seconds,
                retry_cap=self._settings.retry_max_seconds,
            )
        )
        for job in recovered:
            relay_metrics.JOBS_LOST.labels(job.type, job.queue, job.status.value).inc()
            logger.warning(
                "job's lease lapsed (worker lost); now %s", job.status,
                extra={"job_id": job.id, "job_type": job.type, "attempt": job.attempts},
            )  # fmt: skip
        report.recovered = len(recovered)

    def run_forever(self, stop: threading.Event) -> None:
        logger.info("relay started")
        while not stop.is_set():
            self._beat()
            try:
                report = self.run_round()
            except StoreUnavailable as exc:
                logger.warning("database unavailable: %s", exc)
                self._reachable_since = None
                stop.wait(self._settings.publish_backoff_seconds)
                continue
            if report.published < self._settings.relay_batch_size:  # a full batch: more may be due
                stop.wait(self._settings.relay_poll_seconds)
        logger.info("relay stopped")


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    db = Database(settings, application_name="conveyor-relay")
    broker = create_broker(settings)
    publisher = Publisher(broker, settings.queue_prefix, settings.publish_backoff_seconds)
    filer = DeadLetterFiler(settings, db, DeadLetterReader(broker))
    stop = threading.Event()
    stats = relay_metrics.serve(settings, db)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %s received, stopping after this round", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        Relay(settings, db, publisher, filer).run_forever(stop)
    finally:
        if settings.relay_heartbeat_file:
            heartbeat.remove(settings.relay_heartbeat_file)
        if stats is not None:
            stats.stop()
        publisher.close()
        db.close()


if __name__ == "__main__":
    main()
