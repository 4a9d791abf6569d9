"""The relay's outbox round (``worker_service/relay.py``) against the real Postgres."""

from __future__ import annotations

import dataclasses
import uuid

from support import pg

from shared.broker import Publisher, create_broker
from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store
from worker_service.relay import Relay


def test_a_publish_that_failed_leaves_its_reason_on_the_outbox_row(db: Database, settings: Settings) -> None:
    """The row said "broker unavailable" whatever happened; an operator needs RabbitMQ's answer (here
    a refused connection), without the password of the broker URL."""
    job_id = uuid.uuid4()
    new = NewJob(type="noop", queue="default", payload={}, priority=5, max_attempts=1, timeout_seconds=60,
                 run_at=None, delay_seconds=0.0, labels={})  # fmt: skip
    db.run(lambda cur: job_store.insert_job(cur, job_id, "default", new, max_active_jobs=10**6,
                                            outbox_grace_seconds=0))  # fmt: skip
    # Every due row in one round, so this test's row is among them whatever earlier tests left.
    unreachable = dataclasses.replace(
        settings, broker_url="amqp://guest:s3cret@127.0.0.1:1/%2F", relay_batch_size=100_000
    )
    publisher = Publisher(create_broker(unreachable), unreachable.queue_prefix, backoff_seconds=0)
    try:
        report = Relay(unreachable, db, publisher).run_round()
    finally:
        publisher.close()
    assert report.published == 0
    assert report.failed_publishes >= 1

    with pg(settings.database_url) as cur:
        cur.execute("SELECT last_error, publish_attempts FROM outbox WHERE job_id = %s", (str(job_id),))
        [(last_error, attempts)] = cur.fetchall()
    assert last_error.startswith("cannot declare queues: ConnectionClosed: AMQPConnectionError"), last_error
    assert "Connection refused" in last_error
    assert "s3cret" not in last_error
    assert attempts == 1
