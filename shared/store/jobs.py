"""SQL for the jobs table. Every function takes a cursor and runs a fixed number of statements.

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
from shared.jobs import INITIAL_STATUS, WORKER_LOST, Job, JobError, JobStatus, NewJob, sources_of
from shared.messages import Dispatch
from shared.store.db import Cursor, json_param

_JOB_COLUMNS = (
    "id, tenant, type, queue, status, payload, priority, attempts, max_attempts, timeout_seconds, run_at, "
    "labels, result, error, progress, created_at, started_at, finished_at, updated_at"
)

#: Retry-After for a tenant at its cap: no telling when its jobs finish, so a short, steady poll.
TOO_MANY_ACTIVE_RETRY_AFTER = 5

_WIDTH = len(_JOB_COLUMNS.split(", "))
_CLAIMABLE = [s.value for s in sources_of(JobStatus.RUNNING)]


def job_from_row(row: Sequence[Any]) -> Job:
    (id_, tenant, type_, queue, status, payload, priority, attempts, max_attempts, timeout, run_at, labels,
     result, error, progress, created_at, started_at, finished_at, updated_at) = row[:_WIDTH]  # fmt: skip
    return Job(
        id=id_,
        tenant=tenant,
        type=type_,
        queue=queue,
        status=JobStatus(status),
        payload=payload,
        priority=priority,
        attempts=attempts,
        max_attempts=max_attempts,
        timeout_seconds=timeout,
        run_at=run_at,
        labels=labels,
        result=result,
        error=error,
        progress=progress,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        updated_at=updated_at,
    )


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    fingerprint: str
    ttl_seconds: int
    response_status: int


def insert_job(
    cur: Cursor,
    job_id: uuid.UUID,
    tenant: str,
    new: NewJob,
    *,
    max_active_jobs: int,
    outbox_grace_seconds: float,
    idempotency: IdempotencyRecord | None = None,
) -> tuple[Job, Dispatch | None]:
    """Insert a job, its outbox row and (optionally) its idempotency key in one statement.

    Returns the job and, if it is due now, the dispatch the caller should publish after COMMIT. The
    outbox row of a due job is held for ``outbox_grace_seconds`` so that the relay leaves it to the
    caller; a job scheduled for later is left entirely to the relay. Raises TooManyActiveJobs, and
    inserts nothing, if the tenant already has ``max_active_jobs`` jobs waiting or running.
    """
    cur.execute(
        f"""
        WITH job AS (
            INSERT INTO jobs (id, tenant, type, queue, status, payload, priority, max_attempts,
                              timeout_seconds, run_at, labels)
            SELECT %(id)s, %(tenant)s, %(type)s, %(queue)s, %(status)s, %(payload)s, %(priority)s,
                   %(max_attempts)s, %(timeout)s,
                   COALESCE(%(run_at)s, now() + %(delay)s * interval '1 second'), %(labels)s
            WHERE (SELECT COALESCE(sum(jobs), 0) FROM tenant_active_jobs WHERE tenant = %(tenant)s)
                  < %(max_active)s
            RETURNING {_JOB_COLUMNS}
        ), outbox_row AS (
            INSERT INTO outbox (job_id, available_at, locked_until)
            SELECT id, run_at,
                   CASE WHEN run_at <= now() THEN now() + %(grace)s * interval '1 second' END
            FROM job
            RETURNING id
        ), key_row AS (
            INSERT INTO idempotency_keys (tenant, key, fingerprint, job_id, response_status, expires_at)
            SELECT tenant, %(key)s, %(fingerprint)s, id, %(response_status)s,
                   now() + %(key_ttl)s * interval '1 second'
            FROM job WHERE %(key)s::text IS NOT NULL
            ON CONFLICT (tenant, key) DO UPDATE
                SET fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id,
                    response_status = EXCLUDED.response_status, created_at = now(),
                    expires_at = EXCLUDED.expires_at
                WHERE idempotency_keys.expires_at <= now()
        )
        SELECT job.*, outbox_row.id, job.run_at <= now() FROM job, outbox_row
        """,  # noqa: S608 - only the fixed column list is interpolated
        {
            "id": job_id,
            "tenant": tenant,
            "max_active": max_active_jobs,
            "type": new.type,
            "queue": new.queue,
            "status": INITIAL_STATUS.value,
            "payload": json_param(new.payload),
            "priority": new.priority,
            "max_attempts": new.max_attempts,
            "timeout": new.timeout_seconds,
            "run_at": new.run_at,
            "delay": new.delay_seconds,
            "labels": json_param(new.labels),
            "grace": outbox_grace_seconds,
            "key": idempotency.key if idempotency else None,
            "fingerprint": idempotency.fingerprint if idempotency else None,
            "response_status": idempotency.response_status if idempotency else None,
            "key_ttl": idempotency.ttl_seconds if idempotency else 0,
        },
    )
    row = cur.fetchone()
    if row is None:
        raise TooManyActiveJobs(
            f"The tenant already has {max_active_jobs} jobs waiting or running; wait for some to finish.",
            retry_after=TOO_MANY_ACTIVE_RETRY_AFTER,
        )
    job = job_from_row(row)
    outbox_id, due_now = row[_WIDTH], row[_WIDTH + 1]
    dispatch = Dispatch(job.id, job.type, job.queue, job.priority, outbox_id) if due_now else None
    return job, dispatch


def get_job(cur: Cursor, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """The job, if it exists and (unless ``tenant`` is None) belongs to ``tenant``."""
    cur.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %(id)s"  # noqa: S608
        " AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)",
        {"id": job_id, "tenant": tenant},
    )
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
    """Newest first, ``limit`` at most, strictly after the keyset position ``filters.after``."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if filters.tenant is not None:
        clauses.append("tenant = %(tenant)s")
        params["tenant"] = filters.tenant
    if filters.statuses:
        clauses.append("status = ANY(%(statuses)s)")
        params["statuses"] = [s.value for s in filters.statuses]
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
    cur.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT %(limit)s",  # noqa: S608 - fixed fragments only
        params,
    )
    return [job_from_row(row) for row in cur.fetchall()]


# --- the worker's side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    job: Job


@dataclass(frozen=True)
class NotClaimable:
    """The job exists but may not start now: it is finished, running elsewhere, or not yet due."""

    status: JobStatus
    due_later: bool


@dataclass(frozen=True)
class Missing:
    """No job has the message's id."""


ClaimResult = Claimed | NotClaimable | Missing


def claim_job(cur: Cursor, job_id: uuid.UUID, lease_seconds: float) -> ClaimResult:
    """Compare-and-set a due job from queued/retrying to running, counting the attempt.

    One statement in the common case; a second one only to explain a refusal.
    """
    cur.execute(
        f"""
        UPDATE jobs
        SET status = %(running)s, attempts = attempts + 1, started_at = now(), updated_at = now(),
            progress = NULL, lease_expires_at = now() + %(lease)s * interval '1 second'
        WHERE id = %(id)s AND status = ANY(%(claimable)s) AND run_at <= now()
        RETURNING {_JOB_COLUMNS}
        """,  # noqa: S608
        {"id": job_id, "running": JobStatus.RUNNING.value, "claimable": _CLAIMABLE, "lease": lease_seconds},
    )
    row = cur.fetchone()
    if row:
        return Claimed(job_from_row(row))
    cur.execute("SELECT status, run_at > now() FROM jobs WHERE id = %s", (job_id,))
    found = cur.fetchone()
    if found is None:
        return Missing()
    return NotClaimable(JobStatus(found[0]), bool(found[1]))


def _fence() -> str:
    return "id = %(id)s AND status = %(running)s AND attempts = %(attempt)s"


def record_success(cur: Cursor, job: Job, result: Any) -> bool:
    """Running → succeeded for this attempt. False if the attempt was taken over meanwhile."""
    cur.execute(
        f"""
        UPDATE jobs SET status = %(succeeded)s, result = %(result)s, error = NULL, finished_at = now(),
                        updated_at = now(), lease_expires_at = NULL
        WHERE {_fence()}
        """,  # noqa: S608
        {
            "id": job.id,
            "running": JobStatus.RUNNING.value,
            "attempt": job.attempts,
            "succeeded": JobStatus.SUCCEEDED.value,
            "result": json_param(result),
        },
    )
    return bool(cur.rowcount == 1)


def record_retry(cur: Cursor, job: Job, error: JobError, delay_seconds: float) -> bool:
    """Running → retrying, with the next attempt's outbox row due after ``delay_seconds``."""
    cur.execute(
        f"""
        WITH retried AS (
            UPDATE jobs SET status = %(retrying)s, error = %(error)s, updated_at = now(),
                            run_at = now() + %(delay)s * interval '1 second', lease_expires_at = NULL
            WHERE {_fence()}
            RETURNING id, run_at
        )
        INSERT INTO outbox (job_id, available_at) SELECT id, run_at FROM retried
        """,  # noqa: S608
        {
            "id": job.id,
            "running": JobStatus.RUNNING.value,
            "attempt": job.attempts,
            "retrying": JobStatus.RETRYING.value,
            "error": json_param(error.as_dict()),
            "delay": delay_seconds,
        },
    )
    return bool(cur.rowcount == 1)


def record_failure(cur: Cursor, job: Job, error: JobError) -> bool:
    """Running → failed (fatal error or attempts exhausted)."""
    cur.execute(
        f"""
        UPDATE jobs SET status = %(failed)s, error = %(error)s, finished_at = now(),
                        updated_at = now(), lease_expires_at = NULL
        WHERE {_fence()}
        """,  # noqa: S608
        {
            "id": job.id,
            "running": JobStatus.RUNNING.value,
            "attempt": job.attempts,
            "failed": JobStatus.FAILED.value,
            "error": json_param(error.as_dict()),
        },
    )
    return bool(cur.rowcount == 1)


def record_progress(cur: Cursor, job: Job, progress: dict[str, Any]) -> bool:
    cur.execute(
        f"UPDATE jobs SET progress = %(progress)s, updated_at = now() WHERE {_fence()}",  # noqa: S608
        {
            "id": job.id,
            "running": JobStatus.RUNNING.value,
            "attempt": job.attempts,
            "progress": json_param(progress),
        },
    )
    return bool(cur.rowcount == 1)


def renew_leases(cur: Cursor, running: Sequence[tuple[uuid.UUID, int]], lease_seconds: float) -> int:
    """Extend the lease of each (job id, attempt) still running; returns how many were extended."""
    if not running:
        return 0
    cur.execute(
        """
        UPDATE jobs SET lease_expires_at = now() + %(lease)s * interval '1 second'
        FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS mine(id, attempts)
        WHERE jobs.id = mine.id AND jobs.attempts = mine.attempts AND jobs.status = %(running)s
        """,
        {
            "lease": lease_seconds,
            "ids": [job_id for job_id, _ in running],
            "attempts": [attempt for _, attempt in running],
            "running": JobStatus.RUNNING.value,
        },
    )
    return int(cur.rowcount)


def recover_lapsed_leases(cur: Cursor, *, limit: int, retry_base: float, retry_cap: float) -> list[Job]:
    """Running jobs whose lease lapsed: retry them (with backoff) or fail them if out of attempts.

    The attempt that was lost counts, so a job that kills its worker every time ends up ``failed``
    after ``max_attempts`` instead of looping forever.
    """
    cur.execute(
        f"""
        WITH lapsed AS (
            SELECT id FROM jobs
            WHERE status = %(running)s AND lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE jobs SET
                status = CASE WHEN jobs.attempts < jobs.max_attempts
                              THEN %(retrying)s ELSE %(failed)s END,
                error = jsonb_build_object('type', %(type)s::text, 'title', %(title)s::text,
                                           'detail', %(detail)s::text, 'attempt', jobs.attempts),
                run_at = now() + least(%(cap)s, %(base)s * 2 ^ least(jobs.attempts - 1, 60))
                                 * interval '1 second',
                finished_at = CASE WHEN jobs.attempts < jobs.max_attempts THEN NULL ELSE now() END,
                lease_expires_at = NULL,
                updated_at = now()
            FROM lapsed WHERE jobs.id = lapsed.id
            RETURNING {", ".join("jobs." + c for c in _JOB_COLUMNS.split(", "))}
        ), outbox_rows AS (
            INSERT INTO outbox (job_id, available_at)
            SELECT id, run_at FROM moved WHERE status = %(retrying)s
        )
        SELECT * FROM moved
        """,  # noqa: S608
        {
            "running": JobStatus.RUNNING.value,
            "retrying": JobStatus.RETRYING.value,
            "failed": JobStatus.FAILED.value,
            "limit": limit,
            "type": WORKER_LOST.type,
            "title": WORKER_LOST.title,
            "detail": WORKER_LOST.detail,
            "base": retry_base,
            "cap": retry_cap,
        },
    )
    return [job_from_row(row) for row in cur.fetchall()]
