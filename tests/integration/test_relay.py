"""The relay's outbox round (``worker_service/relay.py``) against the real Postgres."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from support import pg, wal_flushes

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


def test_the_api_forgets_published_rows_without_waiting_for_the_disk(
    db: Database, settings: Settings, tenant: str
) -> None:
    """The API's deletion of the outbox rows RabbitMQ confirmed (every 50 ms in each process) commits
    without a WAL flush, as the relay's does: lost to a crash, the rows are only published again. And
    it leaves its pooled connection committing synchronously, as the submissions that come next on it
    must."""
    from shared.store import outbox as outbox_store

    rows = []
    for _ in range(20):
        _, dispatch = db.run(lambda cur: job_store.insert_job(
            cur, uuid.uuid4(), tenant, NewJob("noop", "default", {}, 5, 3, 60, None, None, {}),
            max_active_jobs=10**6, outbox_grace_seconds=60))  # fmt: skip
        assert dispatch is not None
        assert dispatch.outbox_id is not None
        rows.append(dispatch.outbox_id)
    single = Database(dataclasses.replace(settings, db_pool_size=1))
    try:

        def forget(cur: Any) -> None:
            for outbox_id in rows:
                outbox_store.delete_published(cur, [outbox_id])

        assert single.execute(lambda cur: wal_flushes(cur, lambda: forget(cur))) < 10, "20 deletions"
        assert single.execute(lambda cur: (cur.execute("SHOW synchronous_commit"), cur.fetchone())[1]) == (
            "on",
        )
    finally:
        single.close()
    with pg(settings.database_url) as cur:
        cur.execute("SELECT count(*) FROM outbox WHERE id = ANY(%s)", (rows,))
        assert cur.fetchone() == (0,), "every row is gone"
