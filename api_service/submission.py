"""Submitting a job: one transaction writes the job, its outbox row and its idempotency key; the message
is published only after COMMIT.

If the publish fails (RabbitMQ down) or the process dies right after COMMIT, the outbox row stays and
the relay publishes it, so a 202 always means the job will run.

Order of checks, so that no limit ever turns into a stored response:
1. a retried request whose key is already stored is answered from the store (no token, no cap check);
2. the tenant's rate bucket gives a token, or the request gets 429 ``rate-limited``;
3. in one transaction: the key's lock (409 if another request holds it), a last look for a stored
   response, then the insert, which refuses (429 ``too-many-active-jobs``) if the tenant is at its cap.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from shared.broker import Publisher
from shared.errors import (
    ConveyorError,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    RateLimited,
    StoreUnavailable,
    TooManyActiveJobs,
)
from shared.jobs import Job, NewJob
from shared.messages import Dispatch
from shared.settings import Settings
from shared.store import Database
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store import tenants as tenant_store
from shared.store.db import Cursor
from shared.store.tenants import RateDecision, TenantLimits

logger = logging.getLogger(__name__)

#: The status a successful submission answers with (and that a replay repeats).
ACCEPTED = 202


@dataclass(frozen=True)
class Submission:
    job: Job
    status_code: int
    replayed: bool
    #: The rate decision that let the request through (None for a replay, which costs no token).
    rate: RateDecision | None = None


@dataclass(frozen=True)
class IdempotentRequest:
    key: str
    fingerprint: str


def submit_job(
    db: Database,
    publisher: Publisher,
    settings: Settings,
    tenant: str,
    limits: TenantLimits,
    new: NewJob,
    idempotent: IdempotentRequest | None = None,
    request_id: str | None = None,
) -> Submission:
    if idempotent is not None:
        replay = db.read(lambda cur: _stored_response(cur, tenant, idempotent))
        if replay is not None:
            return replay
    rate = _take_tokens(db, tenant, limits, 1)
    job_id = uuid.uuid4()

    def write(cur: Cursor) -> tuple[Submission, Dispatch | None]:
        record = None
        if idempotent is not None:
            replay = _lock_key(cur, tenant, idempotent)
            if replay is not None:
                return replay, None
            record = job_store.IdempotencyRecord(
                idempotent.key, idempotent.fingerprint, settings.idempotency_ttl_seconds, ACCEPTED
            )
        job, dispatch = job_store.insert_job(
            cur,
            job_id,
            tenant,
            new,
            max_active_jobs=limits.max_active_jobs,
            outbox_grace_seconds=settings.outbox_grace_seconds,
            idempotency=record,
            request_id=request_id,
        )
        return Submission(job, ACCEPTED, replayed=False, rate=rate), dispatch

    # Without a key the insert is one self-committing statement; with one, the lock needs a transaction.
    submission, dispatch = db.run(write, transaction=idempotent is not None)
    if dispatch is not None:
        publish_after_commit(db, publisher, dispatch)
    return submission


def _take_tokens(db: Database, tenant: str, limits: TenantLimits, jobs: int) -> RateDecision:
    """One token per new job from the tenant's bucket, or RateLimited (429) for the whole request."""
    rate = db.execute(lambda cur: tenant_store.take_submission_token(cur, tenant, limits, jobs))
    if not rate.allowed:
        raise RateLimited(
            f"Tenant {tenant!r} may submit {limits.submit_rate_per_second:g} jobs per second "
            f"(bursts of {limits.submit_burst})"
            + (f"; this batch has {jobs} new jobs." if jobs > 1 else "."),
            retry_after=rate.retry_after,
            rate=rate,
        )
    return rate


def _lock_key(cur: Cursor, tenant: str, idempotent: IdempotentRequest) -> Submission | None:
    """Take the key's lock for this transaction and return its stored response, if any.

    Raises IdempotencyKeyInFlight when another request holds the key, IdempotencyKeyReused when it
    was stored for a different request.
    """
    if not key_store.try_lock(cur, tenant, idempotent.key):
        raise IdempotencyKeyInFlight("A request with this Idempotency-Key is still in progress.")
    return _stored_response(cur, tenant, idempotent)


def _stored_response(cur: Cursor, tenant: str, idempotent: IdempotentRequest) -> Submission | None:
    stored = key_store.find_live(cur, tenant, idempotent.key)
    if stored is None:
        return None
    if stored.fingerprint != idempotent.fingerprint:
        raise IdempotencyKeyReused("This Idempotency-Key was already used for a different request.")
    original = job_store.get_job(cur, stored.job_id, tenant)
    if original is None:  # pruned job; its key goes with it
        return None
    return Submission(original, stored.response_status, replayed=True)


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


# --- batches -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One valid job of a batch, with its optional idempotency key."""

    index: int
    new: NewJob
    idempotent: IdempotentRequest | None


@dataclass
class ItemResult:
    index: int
    submission: Submission | None = None
    #: A refused item: the exception that says why (translated to a problem by the caller).
    refusal: ConveyorError | None = None


def submit_batch(
    db: Database,
    publisher: Publisher,
    settings: Settings,
    tenant: str,
    limits: TenantLimits,
    items: list[BatchItem],
    request_id: str | None = None,
) -> tuple[list[ItemResult], RateDecision | None]:
    """Submit valid items in one transaction; each gets its own outcome.

    Like single submissions: items whose key is already stored are replayed first and cost no token;
    the rest take one token each, all or none (a 429 for the whole batch); then one transaction
    inserts them, an item whose key another request holds getting a 409, and items beyond the
    tenant's cap a 429 each. Messages are published after COMMIT.
    """
    results = {item.index: ItemResult(item.index) for item in items}

    def stored(cur: Cursor) -> dict[int, Submission]:
        found = {}
        for item in items:
            if item.idempotent is not None:
                try:
                    replay = _stored_response(cur, tenant, item.idempotent)
                except IdempotencyKeyReused as exc:
                    results[item.index].refusal = exc
                    continue
                if replay is not None:
                    found[item.index] = replay
        return found

    for index, replay in db.read(stored).items():
        results[index].submission = replay
    fresh = [i for i in items if results[i.index].submission is None and results[i.index].refusal is None]
    rate = _take_tokens(db, tenant, limits, len(fresh)) if fresh else None

    def write(cur: Cursor) -> list[Dispatch]:
        dispatches = []
        for item in fresh:
            result = results[item.index]
            record = None
            if item.idempotent is not None:
                try:
                    # Re-entrant within this transaction: a key repeated in the batch replays its first job.
                    replay = _lock_key(cur, tenant, item.idempotent)
                except (IdempotencyKeyInFlight, IdempotencyKeyReused) as exc:
                    result.refusal = exc
                    continue
                if replay is not None:
                    result.submission = replay
                    continue
                record = job_store.IdempotencyRecord(
                    item.idempotent.key,
                    item.idempotent.fingerprint,
                    settings.idempotency_ttl_seconds,
                    ACCEPTED,
                )
            try:
                job, dispatch = job_store.insert_job(
                    cur, uuid.uuid4(), tenant, item.new, max_active_jobs=limits.max_active_jobs,
                    outbox_grace_seconds=settings.outbox_grace_seconds, idempotency=record,
                    request_id=request_id,
                )  # fmt: skip
            except TooManyActiveJobs as exc:
                result.refusal = exc
                continue
            result.submission = Submission(job, ACCEPTED, replayed=False, rate=rate)
            if dispatch is not None:
                dispatches.append(dispatch)
        return dispatches

    dispatches = db.run(write) if fresh else []
    published = [d.outbox_id for d in dispatches if d.outbox_id is not None and publisher.try_publish(d)]
    if published:
        try:
            db.execute(lambda cur: outbox_store.delete_published(cur, published))
        except StoreUnavailable as exc:
            logger.warning("could not delete %d outbox rows after publishing: %s", len(published), exc)
    return [results[i.index] for i in items], rate
