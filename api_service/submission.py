"""Submitting a job: one transaction writes the job, its outbox row and its idempotency key; the message
is published only after COMMIT.

If the publish fails (RabbitMQ down) or the process dies right after COMMIT, the outbox row stays and
the relay publishes it, so a 202 always means the job will run.

Order of checks, so that no limit ever turns into a stored response:
1. a retried request whose key is already stored is answered from the store (no token, no cap check);
2. the tenant's rate bucket gives a token, or the request gets 429 ``rate-limited``. Steps 1 and 2
   are one statement, committed on its own, so the bucket's row is locked only while it runs;
3. in one transaction: the key's lock (409 if another request holds it), a last look for a stored
   response, then the insert, which refuses (429 ``too-many-active-jobs``) if the tenant is at its cap.
   A request refused here for its key (409, or a replay) gives its token back.
   A batch takes no lock per key; its insert waits for a key another request is writing
   (``submit_batch``).
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass

from api_service.context import Services
from shared.errors import (
    ConveyorError,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    RateLimited,
    StoreUnavailable,
)
from shared.jobs import RETRYABLE_BY_OPERATOR, Job, NewJob
from shared.messages import Dispatch
from shared.store import Database
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import tenants as tenant_store
from shared.store.db import Cursor
from shared.store.idempotency import StoredKey
from shared.store.tenants import RateDecision, TenantLimits

logger = logging.getLogger(__name__)

#: The status a successful submission answers with (and that a replay repeats).
ACCEPTED = 202

KEY_IN_FLIGHT = "A request with this Idempotency-Key is still in progress."
KEY_REUSED = "This Idempotency-Key was already used for a different request."


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
    svc: Services,
    tenant: str,
    limits: TenantLimits,
    new: NewJob,
    idempotent: IdempotentRequest | None = None,
    request_id: str | None = None,
) -> Submission:
    """Two self-committing statements: the token (``job_store.take_tokens``, which finds a stored key
    first), then the checks and the insert (``job_store.submit``); the message is published after
    them. A replay reads its job in a statement of its own instead of the insert.

    A request that then writes nothing because of its key (another request holds it: 409; or stored it
    meanwhile: a replay) gives its token back. One refused by the cap keeps it spent, as the insert's
    statement spent it before.
    """
    db, settings = svc.db, svc.settings
    record = None
    if idempotent is not None:
        record = job_store.IdempotencyRecord(
            idempotent.key, idempotent.fingerprint, settings.idempotency_ttl_seconds, ACCEPTED
        )

    def statement(job_id: uuid.UUID) -> job_store.SubmitResult:
        return db.execute(
            lambda cur: job_store.submit(
                cur, job_id, tenant, new, limits=limits, outbox_grace_seconds=settings.outbox_grace_seconds,
                idempotency=record, request_id=request_id,
            )
        )  # fmt: skip

    def replay(stored: StoredKey | None) -> Submission | None:
        assert idempotent is not None
        return db.read(
            functools.partial(_stored_response, tenant=tenant, idempotent=idempotent, stored=stored)
        )

    def give_back() -> None:
        db.execute(lambda cur: tenant_store.give_back_tokens(cur, tenant, limits, 1))

    for _ in range(2):  # a second time only if a replayed job was pruned meanwhile
        token = db.execute(
            lambda cur: job_store.take_tokens(cur, tenant, limits, 1, idempotent.key if idempotent else None)
        )
        if token.stored is not None:
            answer = replay(token.stored)
            if answer is None:
                continue
            return answer
        assert token.rate is not None, "a token was asked for"
        if not token.rate.allowed:
            raise _rate_limited(tenant, limits, token.rate, 1)
        result = statement(uuid.uuid4())
        if result.job is not None:
            if result.dispatch is not None:
                publish_after_commit(svc, [result.dispatch])
            return Submission(result.job, ACCEPTED, replayed=False, rate=token.rate)
        if idempotent is not None and (result.stored is not None or result.checks_passed):
            # Stored by another request since the token was taken, or just before this statement took
            # the key's lock.
            give_back()
            answer = replay(result.stored)
            if answer is None:
                continue
            return answer
        if not result.key_lock_held:
            give_back()
            raise IdempotencyKeyInFlight(KEY_IN_FLIGHT)
        raise job_store.too_many_active(limits.max_active_jobs)
    raise StoreUnavailable("the replayed job disappeared twice; try again")  # pragma: no cover


def retry_job(
    svc: Services, job_id: uuid.UUID, tenant: str | None, limits: TenantLimits
) -> tuple[bool, Job | None, RateDecision | None]:
    """Requeue a failed or cancelled job: (whether it moved, the job as it is now, the rate decision).

    A tenant's retry makes a job active again, as a submission does, and is limited like one: by the
    cap on active jobs and by a token from the submission rate (without it, retrying failed or
    cancelled jobs was a way around the rate). An admin (``tenant`` None) acts for the operator and is
    not limited. The tenant's rate bucket is locked first, then the job and the active-job count (the
    requeue's trigger): while a retry waits for the bucket, it holds nothing another request of the
    tenant needs. (The other order deadlocked against a single submission when that took its token
    inside its insert's statement.) A job that cannot move gives its token back (the transaction
    rolls back).
    """

    def requeue(cur: Cursor) -> tuple[bool, Job | None, RateDecision | None]:
        if tenant is None:
            moved, job = job_store.retry_job(cur, job_id, None, None)
            return moved, job, None
        job = job_store.get_job(cur, job_id, tenant)
        if job is None or job.status not in RETRYABLE_BY_OPERATOR:
            return False, job, None  # 404 or 409, whatever the tenant's rate
        rate = tenant_store.take_submission_token(cur, tenant, limits, 1)
        if not rate.allowed:
            raise _rate_limited(tenant, limits, rate, 1)
        moved, job = job_store.retry_job(cur, job_id, tenant, limits.max_active_jobs)
        if not moved:
            raise _NotMoved(job)  # at the cap, or retried meanwhile: the token goes back
        return moved, job, rate

    try:
        return svc.db.run(requeue)
    except _NotMoved as refused:
        return False, refused.job, None


class _NotMoved(Exception):
    """Rolls a tenant's retry back, its token with it."""

    def __init__(self, job: Job | None) -> None:
        super().__init__("the job did not move")
        self.job = job


def _rate_limited(tenant: str, limits: TenantLimits, rate: RateDecision, jobs: int) -> RateLimited:
    return RateLimited(
        f"Tenant {tenant!r} may submit (or retry) {limits.submit_rate_per_second:g} jobs per second "
        f"(bursts of {limits.submit_burst})" + (f"; this batch has {jobs} new jobs." if jobs > 1 else "."),
        retry_after=rate.retry_after,
        rate=rate,
    )


def _take_tokens(db: Database, tenant: str, limits: TenantLimits, jobs: int) -> RateDecision:
    """One token per new job from the tenant's bucket, or RateLimited (429) for the whole request."""
    rate = db.execute(lambda cur: job_store.take_tokens(cur, tenant, limits, jobs)).rate
    assert rate is not None, "no key: the tokens were asked for"
    if not rate.allowed:
        raise _rate_limited(tenant, limits, rate, jobs)
    return rate


def _stored_response(
    cur: Cursor, tenant: str, idempotent: IdempotentRequest, stored: StoredKey | None = None
) -> Submission | None:
    """The stored response of the request's key (read unless given), or None if there is none."""
    stored = stored or key_store.find_live(cur, tenant, idempotent.key)
    if stored is None:
        return None
    return _replay(stored, idempotent, job_store.get_job(cur, stored.job_id, tenant))


def _replay(stored: StoredKey, idempotent: IdempotentRequest, original: Job | None) -> Submission | None:
    """What a stored key answers: its job as it is now (None if that job was pruned, its key with it).
    Raises IdempotencyKeyReused if the key was stored for a different request."""
    if stored.fingerprint != idempotent.fingerprint:
        raise IdempotencyKeyReused(KEY_REUSED)
    return Submission(original, stored.response_status, replayed=True) if original else None


def publish_after_commit(svc: Services, dispatches: list[Dispatch]) -> None:
    """Publish committed jobs' messages, all at once; the outbox rows of those RabbitMQ confirmed are
    deleted later, in a batch. The others stay for the relay."""
    confirmed = svc.publisher.try_publish_all(dispatches)
    svc.published.add([d.outbox_id for d in confirmed if d.outbox_id is not None])


# --- batches -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One valid job of a batch, with its optional idempotency key."""

    index: int
    new: NewJob
    idempotent: IdempotentRequest | None


#: A batch item to insert, with its row.
Row = tuple[BatchItem, job_store.NewRow]


@dataclass
class ItemResult:
    index: int
    submission: Submission | None = None
    #: A refused item: the exception that says why (translated to a problem by the caller).
    refusal: ConveyorError | None = None


def submit_batch(
    svc: Services,
    tenant: str,
    limits: TenantLimits,
    items: list[BatchItem],
    request_id: str | None = None,
) -> tuple[list[ItemResult], RateDecision | None]:
    """Submit valid items in one transaction (rarely two, below); each gets its own outcome.

    Like single submissions: items whose key is already stored are replayed first and cost no token;
    the rest take one token each, all or none (a 429 for the whole batch); then one transaction
    inserts them, items beyond the tenant's cap getting a 429 each. A key repeated in the batch
    replays the job of its first item. Messages are published after COMMIT. Each step is one
    statement for the whole batch, except when another request stored some of its keys meanwhile
    (below): then the transaction reads those keys to replay them; and as each of them took a place
    under the cap, the items the cap left out try once more, in a transaction of their own, so that
    it holds no key while it waits for another request's (two such waits deadlocked).

    Unlike a single submission, a batch takes no advisory lock per key: 1,000 of them, in a few
    concurrent batches, would fill Postgres' shared lock table, and every session of the server would
    then fail to take a lock ("out of shared memory"). The key's unique index serializes instead: an
    item whose key another request is writing waits for that request, then replays its job (or is
    refused as reused), never a 409. An item beyond the tenant's cap is refused without waiting.
    """
    db, settings = svc.db, svc.settings
    results = {item.index: ItemResult(item.index) for item in items}

    def replay_stored(cur: Cursor, candidates: list[BatchItem]) -> int:
        """Replay (or refuse as reused) the candidates whose key is stored; how many keys were."""
        keys = [i.idempotent.key for i in candidates if i.idempotent is not None]
        live = key_store.find_live_many(cur, tenant, keys)
        jobs = job_store.get_jobs(cur, [stored.job_id for stored in live.values()], tenant)
        for item in candidates:
            stored = live.get(item.idempotent.key) if item.idempotent is not None else None
            if stored is None or item.idempotent is None:
                continue
            try:
                results[item.index].submission = _replay(stored, item.idempotent, jobs.get(stored.job_id))
            except IdempotencyKeyReused as exc:
                results[item.index].refusal = exc
        return len(live)

    def is_open(item: BatchItem) -> bool:
        return results[item.index].submission is None and results[item.index].refusal is None

    db.read(lambda cur: replay_stored(cur, items))
    fresh = [item for item in items if is_open(item)]
    rate = _take_tokens(db, tenant, limits, len(fresh)) if fresh else None

    rows: list[Row] = []
    repeats: list[tuple[BatchItem, BatchItem]] = []
    first_with_key: dict[str, BatchItem] = {}
    for item in fresh:
        record = None
        if item.idempotent is not None:
            first = first_with_key.setdefault(item.idempotent.key, item)
            if first is not item:
                repeats.append((item, first))
                continue
            record = job_store.IdempotencyRecord(
                item.idempotent.key, item.idempotent.fingerprint, settings.idempotency_ttl_seconds, ACCEPTED
            )
        rows.append((item, job_store.NewRow(uuid.uuid4(), item.new, record)))

    def insert(cur: Cursor, rows: list[Row]) -> tuple[list[Dispatch], list[Row], bool]:
        """Insert ``rows``: what to publish, the rows left out and still open, and whether a key was
        found stored by another request meanwhile."""
        for item, _ in rows:  # from scratch if the pool retries this on a fresh connection
            results[item.index] = ItemResult(item.index)
        inserted = job_store.insert_jobs(
            cur, tenant, [row for _, row in rows], max_active_jobs=limits.max_active_jobs,
            outbox_grace_seconds=settings.outbox_grace_seconds, request_id=request_id,
        )  # fmt: skip
        dispatches, left_out = [], []
        for (item, row), outcome in zip(rows, inserted, strict=True):
            if outcome is None:
                left_out.append((item, row))
                continue
            job, dispatch = outcome
            results[item.index].submission = Submission(job, ACCEPTED, replayed=False, rate=rate)
            if dispatch is not None:
                dispatches.append(dispatch)
        # Left out: beyond the tenant's cap, or its key stored by another request meanwhile (the
        # insert waited for that request's COMMIT). Such a key replays, and so does a repeat of it
        # (whose body may be the one stored).
        waited = [item for item, _ in left_out if item.idempotent is not None]
        indexes = {item.index for item in waited}
        candidates = [*waited, *(item for item, first in repeats if first.index in indexes)]
        found = replay_stored(cur, candidates) if candidates else 0
        return dispatches, [(item, row) for item, row in left_out if is_open(item)], found > 0

    left: list[Row] = []
    if rows:
        dispatches, left, found = db.run(lambda cur: insert(cur, rows))
        publish_after_commit(svc, dispatches)
        if left and found:
            # A replayed key took a place under the cap: the items the cap left out try once more, in a
            # transaction of their own, which holds no key while it waits for another request's.
            dispatches, left, _ = db.run(lambda cur: insert(cur, left))
            publish_after_commit(svc, dispatches)
    for item, _ in left:
        results[item.index].refusal = job_store.too_many_active(limits.max_active_jobs)
    for item, first in repeats:
        if not is_open(item):
            continue  # replayed above: the key was stored with its body
        assert item.idempotent is not None
        assert first.idempotent is not None
        original = results[first.index]
        if item.idempotent.fingerprint != first.idempotent.fingerprint:
            results[item.index].refusal = IdempotencyKeyReused(KEY_REUSED)
        elif original.submission is not None:
            results[item.index].submission = Submission(original.submission.job, ACCEPTED, True)
        else:
            results[item.index].refusal = original.refusal
    return [results[i.index] for i in items], rate
