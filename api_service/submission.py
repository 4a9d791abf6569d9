"""Submitting a job: one transaction writes the job, its outbox row and its idempotency key; the message
is published only after COMMIT.

If the publish fails (RabbitMQ down) or the process dies right after COMMIT, the outbox row stays and
the relay publishes it, so a 202 always means the job will run.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from shared.broker import Publisher
from shared.errors import IdempotencyKeyInFlight, IdempotencyKeyReused, StoreUnavailable
from shared.jobs import Job, NewJob
from shared.messages import Dispatch
from shared.settings import Settings
from shared.store import Database
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store.db import Cursor

logger = logging.getLogger(__name__)

#: The status a successful submission answers with (and that a replay repeats).
ACCEPTED = 202


@dataclass(frozen=True)
class Submission:
    job: Job
    status_code: int
    replayed: bool


def submit_job(
    db: Database,
    publisher: Publisher,
    settings: Settings,
    new: NewJob,
    *,
    key: str | None = None,
    fingerprint: str | None = None,
) -> Submission:
    job_id = uuid.uuid4()

    def write(cur: Cursor) -> tuple[Submission, Dispatch | None]:
        record = None
        if key is not None:
            assert fingerprint is not None
            if not key_store.try_lock(cur, key):
                raise IdempotencyKeyInFlight("A request with this Idempotency-Key is still in progress.")
            stored = key_store.find_live(cur, key)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    raise IdempotencyKeyReused(
                        "This Idempotency-Key was already used for a different request."
                    )
                original = job_store.get_job(cur, stored.job_id)
                if original is not None:
                    return Submission(original, stored.response_status, replayed=True), None
            record = job_store.IdempotencyRecord(key, fingerprint, settings.idempotency_ttl_seconds, ACCEPTED)
        job, dispatch = job_store.insert_job(
            cur, job_id, new, outbox_grace_seconds=settings.outbox_grace_seconds, idempotency=record
        )
        return Submission(job, ACCEPTED, replayed=False), dispatch

    submission, dispatch = db.run(write)
    if dispatch is not None:
        publish_after_commit(db, publisher, dispatch)
    return submission


def publish_after_commit(db: Database, publisher: Publisher, dispatch: Dispatch) -> None:
    """Publish a committed job's message and drop its outbox row; on any failure leave it to the relay."""
    if not publisher.try_publish(dispatch):
        return
    assert dispatch.outbox_id is not None
    outbox_id = dispatch.outbox_id
    try:
        db.execute(lambda cur: outbox_store.delete_published(cur, [outbox_id]))
    except StoreUnavailable as exc:
        # The message is out; the relay will publish a duplicate, which the worker's claim ignores.
        logger.warning("could not delete outbox row %s after publishing: %s", outbox_id, exc)
