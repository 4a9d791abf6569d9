"""SQL for the jobs table: submitting, reading, listing, operator actions, statistics and retention.
The worker's statements (claims, outcomes, leases) are in ``shared/store/attempts.py``.

Every function takes a cursor and runs a fixed number of statements.

Status guards in the WHERE clauses come from ``shared.jobs`` (``sources_of``), and the database
trigger re-checks every status change, so these statements cannot write an illegal transition.
Outcome writes are fenced on ``attempts``: a worker whose attempt was taken over (its lease lapsed)
can no longer write a result.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.errors import TooManyActiveJobs
from shared.jobs import (
    CANCELLABLE_AT_ONCE,
    INITIAL_STATUS,
    RETRYABLE_BY_OPERATOR,
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    NewJob,
    sources_of,
)
from shared.messages import Dispatch
from shared.store.db import ASYNC_COMMIT, Cursor, Prepared, json_param, outside_transactions
from shared.store.idempotency import StoredKey, job_unfinished, lock_id
from shared.store.tenants import BUCKET_UPSERT, RateDecision, TenantLimits, bucket_params, rate_decision

JOB_COLUMNS = (
    "id, tenant, type, queue, status, payload, priority, attempts, max_attempts, timeout_seconds, run_at, "
    "labels, result, error, progress, created_at, started_at, finished_at, updated_at, cancel_requested_at"
)

#: Retry-After for a tenant at its cap: no telling when its jobs finish, so a short, steady poll.
TOO_MANY_ACTIVE_RETRY_AFTER = 5

_COLUMN_NAMES = JOB_COLUMNS.split(", ")
_WIDTH = len(_COLUMN_NAMES)
_CLAIMABLE = [s.value for s in sources_of(JobStatus.RUNNING)]


def job_from_row(row: Sequence[Any]) -> Job:
    """A Job from a row that starts with ``JOB_COLUMNS`` (whose names are the Job's field names)."""
    fields = dict(zip(_COLUMN_NAMES, row[:_WIDTH], strict=True))
    fields["status"] = JobStatus(fields["status"])
    return Job(**fields)


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    fingerprint: str
    ttl_seconds: int
    response_status: int


@dataclass(frozen=True)
class NewRow:
    """One job to insert (``insert_jobs``, ``submit``), with its idempotency key if it has one."""

    job_id: uuid.UUID
    new: NewJob
    idempotency: IdempotencyRecord | None


# The inserts of a submission, as CTEs of one statement, for the rows of ``item`` that ``{admit}`` lets
# in (a condition that may use ``n``, a row's position): each row's idempotency key first (replacing an
# expired one), then the job, only together with its key, then its outbox row. A key lives for its TTL
# from the job's start (``run_at``, at the earliest now): a scheduled job keeps its key until then. A
# job due now has its outbox row held for the grace period, so that the relay leaves it to the API,
# which publishes it right after COMMIT. The key row names a job inserted later in the same statement:
# the foreign key is checked when the statement ends. A key that another transaction is writing makes
# the insert wait for that transaction: if it commits, the key is live, so the job is not inserted
# (the caller reads the key and replays it); if it rolls back, the insert goes ahead. The unique index
# is the key's lock, and it takes no room in Postgres' lock table, whatever the number of keys.
_INSERTS = f"""
    item AS (
        -- starts_at: when the job may first run (its run_at, or now plus its delay; never in the past)
        SELECT *, greatest(COALESCE(run_at, now() + delay * interval '1 second'), now()) AS starts_at
        FROM unnest(%(ids)s, %(types)s, %(queues)s, %(payloads)s, %(priorities)s,
                    %(max_attempts)s, %(timeouts)s, %(run_ats)s, %(delays)s, %(labels)s,
                    %(keys)s, %(fingerprints)s, %(key_ttls)s, %(key_statuses)s)
            WITH ORDINALITY AS i(id, type, queue, payload, priority, max_attempts, timeout, run_at,
                                 delay, labels, key, fingerprint, key_ttl, key_status, n)
    ), key_row AS (
        INSERT INTO idempotency_keys (tenant, key, fingerprint, job_id, response_status, expires_at)
        SELECT %(tenant)s, key, fingerprint, id, key_status, starts_at + key_ttl * interval '1 second'
        FROM item
        WHERE key IS NOT NULL AND {{admit}}
        ORDER BY key  -- concurrent inserts wait for each other's keys in one order, never in a cycle
        ON CONFLICT (tenant, key) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id,
                response_status = EXCLUDED.response_status, created_at = now(),
                expires_at = EXCLUDED.expires_at
            WHERE idempotency_keys.expires_at <= now() AND NOT {job_unfinished("idempotency_keys")}
        RETURNING job_id
    ), job AS (
        INSERT INTO jobs (id, tenant, type, queue, status, payload, priority, max_attempts,
                          timeout_seconds, run_at, labels, request_id)
        SELECT id, %(tenant)s, type, queue, %(status)s, payload, priority, max_attempts, timeout,
               starts_at, labels, %(request_id)s
        FROM item
        WHERE {{admit}} AND (key IS NULL OR id IN (SELECT job_id FROM key_row))
        ORDER BY n
        RETURNING {JOB_COLUMNS}
    ), outbox_row AS (
        INSERT INTO outbox (job_id, available_at, locked_until)
        SELECT id, run_at, CASE WHEN run_at <= now() THEN now() + %(grace)s * interval '1 second' END
        FROM job
        RETURNING id, job_id
    )"""  # noqa: S608 - only the fixed column list is interpolated

_INSERT_TYPES = {
    "ids": "uuid[]", "types": "text[]", "queues": "text[]", "payloads": "jsonb[]", "priorities": "int[]",
    "max_attempts": "int[]", "timeouts": "int[]", "run_ats": "timestamptz[]",
    "delays": "double precision[]", "labels": "jsonb[]", "keys": "text[]", "fingerprints": "text[]",
    "key_ttls": "double precision[]", "key_statuses": "int[]", "tenant": "text", "status": "text",
    "request_id": "text", "max_active": "bigint", "grace": "double precision",
}  # fmt: skip

#: How many more jobs the tenant may have waiting or running.
_ROOM = "%(max_active)s - (SELECT COALESCE(sum(jobs), 0) FROM tenant_active_jobs WHERE tenant = %(tenant)s)"


def _insert_params(
    tenant: str,
    rows: Sequence[NewRow],
    max_active_jobs: int,
    outbox_grace_seconds: float,
    request_id: str | None,
) -> dict[str, Any]:
    keys = [r.idempotency for r in rows]
    return {
        "ids": [r.job_id for r in rows],
        "types": [r.new.type for r in rows],
        "queues": [r.new.queue for r in rows],
        "payloads": [json_param(r.new.payload) for r in rows],
        "priorities": [r.new.priority for r in rows],
        "max_attempts": [r.new.max_attempts for r in rows],
        "timeouts": [r.new.timeout_seconds for r in rows],
        "run_ats": [r.new.run_at for r in rows],
        "delays": [r.new.delay_seconds for r in rows],
        "labels": [json_param(r.new.labels) for r in rows],
        "keys": [k.key if k else None for k in keys],
        "fingerprints": [k.fingerprint if k else None for k in keys],
        "key_ttls": [k.ttl_seconds if k else None for k in keys],
        "key_statuses": [k.response_status if k else None for k in keys],
        "tenant": tenant,
        "status": INITIAL_STATUS.value,
        "request_id": request_id,
        "max_active": max_active_jobs,
        "grace": outbox_grace_seconds,
    }  # fmt: skip


def _dispatch_of(job: Job, outbox_id: int | None, due_now: bool, request_id: str | None) -> Dispatch | None:
    if outbox_id is None or not due_now:
        return None
    return Dispatch(job.id, job.type, job.queue, job.priority, outbox_id, request_id)


def too_many_active(max_active_jobs: int) -> TooManyActiveJobs:
    return TooManyActiveJobs(
        f"The tenant may have at most {max_active_jobs} jobs waiting or running, and has reached that; "
        "retry once some have finished.",
        retry_after=TOO_MANY_ACTIVE_RETRY_AFTER,
    )


#: A batch's jobs, outbox rows and keys in one statement: the first of them, as many as the tenant's cap
#: leaves room for.
_INSERT_MANY = Prepared(
    "conveyor_insert_jobs",
    f"""
    WITH{_INSERTS.format(admit=f"n <= {_ROOM}")}
    SELECT job.*, outbox_row.id, job.run_at <= now() FROM job JOIN outbox_row ON outbox_row.job_id = job.id
    """,  # noqa: S608 - fixed fragments only
    _INSERT_TYPES,
)


def insert_jobs(
    cur: Cursor,
    tenant: str,
    rows: Sequence[NewRow],
    *,
    max_active_jobs: int,
    outbox_grace_seconds: float,
    request_id: str | None = None,
) -> list[tuple[Job, Dispatch | None] | None]:
    """Insert a batch's jobs with their outbox rows and keys in one statement, inside the caller's
    transaction (keys are distinct; the caller found none of them stored).

    Returns, in order, each job and its dispatch (if due now), or None for a job not inserted: beyond
    the tenant's cap of active jobs, or its key stored by another request meanwhile (this statement
    waited for that request's COMMIT; see ``_INSERTS``).
    """
    if not rows:
        return []
    _INSERT_MANY.execute(cur, _insert_params(tenant, rows, max_active_jobs, outbox_grace_seconds, request_id))
    inserted = {}
    for row in cur.fetchall():
        job = job_from_row(row)
        inserted[job.id] = (job, _dispatch_of(job, row[_WIDTH], row[_WIDTH + 1], request_id))
    return [inserted.get(r.job_id) for r in rows]


def insert_job(
    cur: Cursor,
    job_id: uuid.UUID,
    tenant: str,
    new: NewJob,
    *,
    max_active_jobs: int,
    outbox_grace_seconds: float,
    idempotency: IdempotencyRecord | None = None,
    request_id: str | None = None,
) -> tuple[Job, Dispatch | None]:
    """``insert_jobs`` for one job; raises TooManyActiveJobs, and inserts nothing, at the tenant's cap."""
    [inserted] = insert_jobs(
        cur, tenant, [NewRow(job_id, new, idempotency)], max_active_jobs=max_active_jobs,
        outbox_grace_seconds=outbox_grace_seconds, request_id=request_id,
    )  # fmt: skip
    if inserted is None:
        raise too_many_active(max_active_jobs)
    return inserted


#: SQL: the live record of ``%(key)s`` for ``%(tenant)s``, if the request has a key and it is stored.
_STORED_KEY = f"""
    SELECT fingerprint, job_id, response_status FROM idempotency_keys
    WHERE %(key)s IS NOT NULL AND tenant = %(tenant)s AND key = %(key)s
      AND (expires_at > now() OR {job_unfinished("idempotency_keys")})"""  # noqa: S608


@dataclass(frozen=True)
class TokenResult:
    """What the statement that takes a submission's tokens found (``take_tokens``)."""

    #: The live record of the request's key: it is replayed, and no token was taken.
    stored: StoredKey | None
    #: The token bucket's answer; None if the key was stored (no token was asked for).
    rate: RateDecision | None


#: A submission's tokens, in a statement and transaction of its own (``take_tokens``).
_TAKE_TOKENS = Prepared(
    "conveyor_take_tokens",
    f"""
    WITH stored AS ({_STORED_KEY}
    ), bucket AS (
        {BUCKET_UPSERT.format(guard="NOT EXISTS (SELECT 1 FROM stored)")}
    )
    SELECT stored.fingerprint, stored.job_id, stored.response_status, bucket.tokens, bucket.allowed,
           {ASYNC_COMMIT}
    FROM (SELECT 1) AS one LEFT JOIN stored ON true LEFT JOIN bucket ON true
    """,  # noqa: S608 - fixed fragments only
    {"key": "text", "tenant": "text", "burst": "double precision", "rate": "double precision",
     "cost": "double precision", "need": "double precision"},
)  # fmt: skip


def take_tokens(
    cur: Cursor, tenant: str, limits: TenantLimits, cost: int, key: str | None = None
) -> TokenResult:
    """``cost`` tokens (one per job) from the tenant's bucket, before the submission's insert (a single
    submission's ``submit``, a batch's ``insert_jobs``); with ``key``, that key's stored record
    instead if it has one (a replay costs no token). A batch looks its keys up before, all at once.

    Self-committing, so that the bucket's row is locked only while the tokens are counted. Taken
    inside the insert's statement, the row stayed locked until that statement's COMMIT had reached
    the disk, and the tenant's submissions went through one at a time, however many API processes
    took them: half the time a submission spent in Postgres under load was spent waiting for that row
    (docs/performance.md, session 10). The commit does not wait for the disk either
    (``ASYNC_COMMIT``): the bucket's row is then held for the statement's own few microseconds, not
    for a disk flush.
    """
    outside_transactions(cur, "take_tokens")
    _TAKE_TOKENS.execute(cur, {"key": key, **bucket_params(tenant, limits, cost)})
    row = cur.fetchone()
    assert row is not None, "the statement always returns one row"
    fingerprint, stored_job, status, tokens, allowed = row[:5]
    return TokenResult(
        stored=StoredKey(fingerprint, stored_job, status) if fingerprint is not None else None,
        rate=rate_decision(float(tokens), bool(allowed), limits, cost) if tokens is not None else None,
    )


@dataclass(frozen=True)
class SubmitResult:
    """What the insert statement of a single submission did (``submit``)."""

    #: False: another request holds the idempotency key right now (nothing was written).
    key_lock_held: bool
    #: The live record of the key, if the statement found one (nothing was written).
    stored: StoredKey | None
    #: Every check passed (lock, no stored response, cap): the job is inserted unless its key turned
    #: out to be stored meanwhile.
    checks_passed: bool
    #: The new job and what to publish; None if it was not inserted.
    job: Job | None
    dispatch: Dispatch | None


_SUBMIT = Prepared(
    "conveyor_submit",
    f"""
    WITH lock AS (
        SELECT %(key)s IS NULL OR pg_try_advisory_xact_lock(%(lock_id)s) AS held
    ), stored AS ({_STORED_KEY}
    ), go AS (
        SELECT (SELECT held FROM lock) AND NOT EXISTS (SELECT 1 FROM stored) AND 1 <= {_ROOM} AS ok
    ),{_INSERTS.format(admit="(SELECT ok FROM go)")}
    SELECT lock.held, stored.fingerprint, stored.job_id, stored.response_status, go.ok, outbox_row.id,
           job.run_at <= now(), job.*
    FROM lock CROSS JOIN go LEFT JOIN stored ON true LEFT JOIN job ON true LEFT JOIN outbox_row ON true
    """,  # noqa: S608 - fixed fragments only
    {**_INSERT_TYPES, "key": "text", "lock_id": "bigint"},
)  # fmt: skip


def submit(
    cur: Cursor,
    job_id: uuid.UUID,
    tenant: str,
    new: NewJob,
    *,
    limits: TenantLimits,
    outbox_grace_seconds: float,
    idempotency: IdempotencyRecord | None,
    request_id: str | None,
) -> SubmitResult:
    """A single submission's insert, in one self-committing statement, once ``take_tokens`` gave it a
    token: take the key's lock, look for the key's stored response again, check the active-job cap,
    and insert the job, its outbox row and its key.

    Each step runs only if the ones before let it. The job is inserted only with its key row, so a
    request that took the lock just after another one stored the key (its snapshot predates that
    COMMIT) inserts nothing and finds ``job`` None with ``checks_passed``: the caller reads the key
    again.
    """
    _SUBMIT.execute(
        cur,
        {
            **_insert_params(
                tenant,
                [NewRow(job_id, new, idempotency)],
                limits.max_active_jobs,
                outbox_grace_seconds,
                request_id,
            ),
            "key": idempotency.key if idempotency else None,
            "lock_id": lock_id(tenant, idempotency.key) if idempotency else None,
        },
    )
    row = cur.fetchone()
    assert row is not None, "the statement always returns one row"
    held, fingerprint, stored_job, status, checks_passed, outbox_id, due_now = row[:7]
    job = job_from_row(row[7:]) if row[7] is not None else None
    return SubmitResult(
        key_lock_held=bool(held),
        stored=StoredKey(fingerprint, stored_job, status) if fingerprint is not None else None,
        checks_passed=bool(checks_passed),
        job=job,
        dispatch=_dispatch_of(job, outbox_id, due_now, request_id) if job else None,
    )


def get_jobs(cur: Cursor, job_ids: Sequence[uuid.UUID], tenant: str) -> dict[uuid.UUID, Job]:
    """The tenant's jobs among ``job_ids``, by id (missing ones are left out)."""
    if not job_ids:
        return {}
    # One primary-key probe per id (see ``idempotency.find_live_many``): as `id = ANY(ids) AND tenant
    # = ...`, a planner that underestimates the tenant's jobs may read all of them through
    # jobs_by_tenant instead.
    cur.execute(
        f"""
        SELECT {", ".join("j." + c for c in JOB_COLUMNS.split(", "))}
        FROM unnest(%s::uuid[]) AS wanted(id)
        CROSS JOIN LATERAL (SELECT * FROM jobs WHERE jobs.id = wanted.id LIMIT 1) AS j
        WHERE j.tenant = %s
        """,  # noqa: S608 - fixed column list only
        (list(job_ids), tenant),
    )
    return {job.id: job for job in map(job_from_row, cur.fetchall())}


#: What every poll of a job runs (``GET /v1/jobs/{id}``), so prepared: planned once per connection.
_GET_JOB = Prepared(
    "conveyor_get_job",
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %(id)s"  # noqa: S608 - fixed fragments only
    " AND (%(tenant)s IS NULL OR tenant = %(tenant)s)",
    {"id": "uuid", "tenant": "text"},
)


def get_job(cur: Cursor, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """The job, if it exists and (unless ``tenant`` is None) belongs to ``tenant``."""
    _GET_JOB.execute(cur, {"id": job_id, "tenant": tenant})
    row = cur.fetchone()
    return job_from_row(row) if row else None


@dataclass(frozen=True)
class JobFilter:
    #: None lists every tenant's jobs (admin).
    tenant: str | None
    statuses: Sequence[JobStatus] = ()
    types: Sequence[str] = ()
    labels: dict[str, str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: Keyset position: jobs strictly older than (created_at, id).
    after: tuple[datetime, uuid.UUID] | None = None


def list_jobs(cur: Cursor, filters: JobFilter, limit: int) -> list[Job]:
    """Newest first, ``limit`` at most, strictly after the keyset position ``filters.after``.

    A tenant's jobs of one status are read in order from ``jobs_by_tenant_status``, a page at a time.
    Of several statuses, each is read that way, a page each, and the pages merged: as
    ``status = ANY(...)`` Postgres can take that index only unordered, and read and sorted every job of
    those statuses for each page (a million succeeded jobs for 50 rows).
    """
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    statuses = list(dict.fromkeys(s.value for s in filters.statuses))  # a status named twice: one page
    by_status = filters.tenant is not None and bool(statuses)
    per_status = by_status and len(statuses) > 1
    if filters.tenant is not None:
        clauses.append("tenant = %(tenant)s")
        params["tenant"] = filters.tenant
    if per_status:
        clauses.append("status = wanted.status")
        params["statuses"] = statuses
    elif len(statuses) == 1:
        clauses.append("status = %(status)s")
        params["status"] = statuses[0]
    elif statuses:
        clauses.append("status = ANY(%(statuses)s)")
        params["statuses"] = statuses
    if filters.types:
        clauses.append("type = ANY(%(types)s)")
        params["types"] = list(filters.types)
    if filters.labels:
        clauses.append("labels @> %(labels)s")
        params["labels"] = json_param(filters.labels)
    if filters.created_after:
        clauses.append("created_at >= %(created_after)s")
        params["created_after"] = filters.created_after
    if filters.created_before:
        clauses.append("created_at < %(created_before)s")
        params["created_before"] = filters.created_before
    if filters.after:
        clauses.append("(created_at, id) < (%(after_ts)s, %(after_id)s)")
        params["after_ts"], params["after_id"] = filters.after
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    # With the tenant and the status fixed, ordering by them as well changes nothing but leaves one index
    # that gives the order: Postgres otherwise could read jobs_by_creation and filter, when its
    # statistics made the status look common.
    order = "tenant, status, created_at DESC, id DESC" if by_status else "created_at DESC, id DESC"
    page = f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY {order} LIMIT %(limit)s"  # noqa: S608 - fixed fragments only
    if per_status:
        page = (
            f"SELECT page.* FROM unnest(%(statuses)s::text[]) AS wanted(status) CROSS JOIN LATERAL ({page})"  # noqa: S608
            " AS page ORDER BY page.created_at DESC, page.id DESC LIMIT %(limit)s"
        )
    cur.execute(page, params)
    return [job_from_row(row) for row in cur.fetchall()]


# --- operator actions ------------------------------------------------------------------------------


def cancel_job(cur: Cursor, job_id: uuid.UUID, tenant: str | None) -> Job | None:
    """Cancel a waiting job at once, or mark a running one cancel-requested; None if no such job.

    A finished job is returned unchanged (the caller reports the conflict). Its pending outbox rows go
    too, so a cancelled job's message is never published again (a copy already in RabbitMQ finds the
    job cancelled and is dropped by the worker's claim).
    """
    cur.execute(
        f"""
        WITH changed AS (
            UPDATE jobs SET
                status = CASE WHEN status = ANY(%(at_once)s) THEN %(cancelled)s ELSE status END,
                finished_at = CASE WHEN status = ANY(%(at_once)s) THEN now() ELSE finished_at END,
                cancel_requested_at = CASE WHEN status = %(running)s
                                           THEN COALESCE(cancel_requested_at, now())
                                           ELSE cancel_requested_at END,
                updated_at = now()
            WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
              AND status IN (%(running)s, %(queued)s, %(retrying)s)
            RETURNING {JOB_COLUMNS}
        ), dropped AS (
            DELETE FROM outbox WHERE job_id IN (SELECT id FROM changed WHERE status = %(cancelled)s)
        )
        SELECT * FROM changed
        """,  # noqa: S608
        {
            "id": job_id,
            "tenant": tenant,
            "at_once": [s.value for s in CANCELLABLE_AT_ONCE],
            "cancelled": JobStatus.CANCELLED.value,
            "running": JobStatus.RUNNING.value,
            "queued": JobStatus.QUEUED.value,
            "retrying": JobStatus.RETRYING.value,
        },
    )
    row = cur.fetchone()
    return job_from_row(row) if row else get_job(cur, job_id, tenant)


def requeue_jobs(
    cur: Cursor, where: str, params: dict[str, Any], *, skip_locked: bool = True
) -> list[uuid.UUID]:
    """Send failed or cancelled jobs round again: a fresh attempt cycle, a new outbox row.

    ``where`` selects candidate job ids (a fixed SQL fragment over ``jobs``; values in ``params``). Only
    jobs still failed or cancelled move, each once, whatever runs concurrently: running the same replay
    twice requeues nothing the second time. Leaving ``failed`` removes the job's dead letter (trigger).
    A job another transaction holds is left out, unless ``skip_locked`` is false: then the statement
    waits for it and moves it if it is still failed or cancelled.
    """
    lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
    cur.execute(
        f"""
        WITH chosen AS (
            SELECT id FROM jobs WHERE status = ANY(%(retryable)s) AND ({where})
            {lock}
        ), requeued AS (
            UPDATE jobs SET status = %(queued)s, attempts = 0, run_at = now(), result = NULL,
                            started_at = NULL, finished_at = NULL, cancel_requested_at = NULL,
                            progress = NULL, updated_at = now()
            FROM chosen WHERE jobs.id = chosen.id
            RETURNING jobs.id, jobs.run_at
        ), outbox_rows AS (
            INSERT INTO outbox (job_id, available_at) SELECT id, run_at FROM requeued
        )
        SELECT id FROM requeued
        """,  # noqa: S608 - `where` is one of the store's fixed fragments
        {**params, "retryable": [s.value for s in RETRYABLE_BY_OPERATOR], "queued": JobStatus.QUEUED.value},
    )
    return [row[0] for row in cur.fetchall()]


def retry_job(
    cur: Cursor, job_id: uuid.UUID, tenant: str | None, max_active_jobs: int | None = None
) -> tuple[bool, Job | None]:
    """Requeue one failed or cancelled job; (whether it moved, the job as it is now). With
    ``max_active_jobs``, only while its tenant has fewer jobs waiting or running than that: a retry
    makes a job active again, as a submission does. A job another transaction holds (a concurrent retry
    of it) is waited for, not skipped: skipped, it looked like a job refused by the tenant's cap."""
    moved = requeue_jobs(
        cur,
        "id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)"
        f" AND (%(max_active)s::bigint IS NULL OR {_ROOM} > 0)",
        {"id": job_id, "tenant": tenant, "max_active": max_active_jobs},
        skip_locked=False,
    )
    return bool(moved), get_job(cur, job_id, tenant)


def ensure_dispatch(cur: Cursor, job_id: uuid.UUID) -> bool:
    """Give a waiting job (queued or retrying) a new outbox row unless one is still to be published;
    True if one was added.

    For a job whose only message RabbitMQ dead-lettered before any worker claimed it (a quorum queue's
    delivery limit, a message TTL): without this the job would wait forever. A row some publisher holds
    does not count: ``locked_until`` ahead (the API in its grace period) or locked by a relay's round
    (``FOR UPDATE``, skipped here). Its message may be the very one that was dead-lettered, published
    and confirmed, its row about to be deleted. A second message is harmless (the claim runs the job
    once); none would strand the job.
    """
    cur.execute(
        """
        INSERT INTO outbox (job_id, available_at)
        SELECT id, run_at FROM jobs
        WHERE id = %(id)s AND status IN (%(queued)s, %(retrying)s)
          AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.job_id = jobs.id
                          AND (outbox.locked_until IS NULL OR outbox.locked_until <= now())
                          FOR KEY SHARE SKIP LOCKED)
        """,
        {"id": job_id, "queued": JobStatus.QUEUED.value, "retrying": JobStatus.RETRYING.value},
    )
    return bool(cur.rowcount == 1)


@dataclass(frozen=True)
class QueueCounts:
    #: Due and not yet started (queued or retrying, run_at passed).
    waiting: int = 0
    #: Not due yet: scheduled jobs and retries in their backoff (kept in Postgres, not RabbitMQ).
    delayed: int = 0
    running: int = 0
    #: Seconds since the oldest waiting job became due (0 when none waits).
    oldest_waiting_seconds: float = 0.0


def queue_counts(cur: Cursor) -> dict[str, QueueCounts]:
    """Per queue, what waits, what is delayed and what runs (from the active-jobs index, whose predicate
    is ``finished_at IS NULL``: migration 0010)."""
    cur.execute(
        """
        SELECT queue,
               count(*) FILTER (WHERE status <> %(running)s AND run_at <= now()),
               count(*) FILTER (WHERE status <> %(running)s AND run_at > now()),
               count(*) FILTER (WHERE status = %(running)s),
               COALESCE(EXTRACT(EPOCH FROM now() - min(run_at)
                                FILTER (WHERE status <> %(running)s AND run_at <= now())), 0)
        FROM jobs
        WHERE finished_at IS NULL AND status IN (%(queued)s, %(retrying)s, %(running)s)
        GROUP BY queue
        """,
        {
            "queued": JobStatus.QUEUED.value,
            "retrying": JobStatus.RETRYING.value,
            "running": JobStatus.RUNNING.value,
        },
    )
    return {
        row[0]: QueueCounts(int(row[1]), int(row[2]), int(row[3]), float(row[4])) for row in cur.fetchall()
    }


_COUNT_BY_STATUS = (
    "SELECT status, count(*) FROM jobs WHERE finished_at IS {} AND status = ANY(%(statuses)s) GROUP BY status"
)


def count_by_status(cur: Cursor, *, finished: bool) -> dict[str, int]:
    """Jobs per status: the active statuses (queued, retrying, running) or the finished ones.

    The active jobs are counted from their partial index, at the cost of the backlog. The finished ones
    are every job retention keeps, a read of millions of rows on a busy deployment: the relay counts
    them far less often (``worker_service/relay_metrics.py``). Each count names its statuses as well:
    a row whose ``finished_at`` disagreed with its status would be missed, never counted twice.
    """
    statuses = [status.value for status in JobStatus if (status in TERMINAL_STATUSES) == finished]
    cur.execute(_COUNT_BY_STATUS.format("NOT NULL" if finished else "NULL"), {"statuses": statuses})
    counts = dict.fromkeys(statuses, 0)
    counts.update({status: int(n) for status, n in cur.fetchall()})
    return counts


def prune_finished(cur: Cursor, *, older_than_seconds: int, limit: int) -> int:
    """Delete up to ``limit`` jobs finished longer ago than ``older_than_seconds``; how many.

    Dead letters are never pruned (a failed job with a dead letter stays until an operator acts). Rows
    are taken with SKIP LOCKED in one short statement, so pruning never waits on, or blocks, live work;
    a job's outbox rows and idempotency key go with it (ON DELETE CASCADE). The one exception: the
    cascade waits for an expired key that a batch is taking over at that moment (and two such keys,
    taken in the other order, deadlock: Postgres undoes the batch or this round, and ``Database.run``
    runs it again).
    ``id = ANY(ARRAY(...))`` deletes by primary key: as ``id IN (...)`` Postgres planned a hash join
    over a read of the whole table until it held some 100,000 rows.
    """
    cur.execute(
        """
        DELETE FROM jobs WHERE id = ANY(ARRAY(
            SELECT j.id FROM jobs j
            WHERE j.finished_at < now() - %(age)s * interval '1 second'
              AND j.status = ANY(%(terminal)s)
              AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.job_id = j.id)
            ORDER BY j.finished_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ))
        """,
        {"terminal": [s.value for s in TERMINAL_STATUSES], "age": older_than_seconds, "limit": limit},
    )
    return int(cur.rowcount)
