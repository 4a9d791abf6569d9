"""SQL for attempts: the worker's claim, its outcome, lease renewals, and the relay's recovery of
attempts whose worker was lost. One statement each in the common case.

Outcome writes are fenced on ``attempts``: a worker whose attempt was taken over (its lease lapsed)
can no longer write a result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.jobs import WORKER_LOST, Job, JobError, JobStatus, sources_of
from shared.store.db import Cursor, Prepared, json_param
from shared.store.jobs import JOB_COLUMNS, job_from_row

_CLAIMABLE = [s.value for s in sources_of(JobStatus.RUNNING)]


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


def claim_job(
    cur: Cursor, job_id: uuid.UUID, lease_seconds: float, token: uuid.UUID | None = None
) -> ClaimResult:
    """Compare-and-set a due job from queued/retrying to running, counting the attempt.

    ``token`` names this claim: called again with the same token (its first answer was lost with its
    connection), it answers Claimed with the attempt it already made. One statement.
    """
    return write_round(cur, [job_id], lease_seconds, [], [token or uuid.uuid4()]).claims[job_id]


def record_success(cur: Cursor, job: Job, result: Any) -> bool:
    """Running → succeeded for this attempt; False if it was taken over meanwhile."""
    return job.id in write_round(cur, [], 0, [(job, json.dumps(result))]).succeeded


@dataclass(frozen=True)
class Round:
    claims: dict[uuid.UUID, ClaimResult]
    #: Ids of the jobs whose success was written (an attempt taken over is not).
    succeeded: set[uuid.UUID]


_CLAIMED_COLUMNS = ", ".join("claimed." + c for c in JOB_COLUMNS.split(", "))
_RECLAIMED_COLUMNS = ", ".join("jobs." + c for c in JOB_COLUMNS.split(", "))
#: A refused claim's row has no job columns (UNION ALL gives these NULLs the claimed rows' types).
_NO_JOB = ", ".join("NULL" for _ in JOB_COLUMNS.split(", "))
#: Where a row's refused-claim columns start: after the succeeded ids and the job columns.
_REFUSED_AT = 1 + len(JOB_COLUMNS.split(", "))

#: The worker's common case in one statement: claim some jobs and record the success of others (their
#: ids, attempts and results as JSON text). Claimed rows are locked in id order, so two workers claiming
#: overlapping sets cannot deadlock. It returns one row per claimed job, then one per refused claim with
#: the job's status and whether it is due later (NULLs if no job has the id), or one row of NULLs if
#: there is neither. The first row also carries the ids that succeeded. Only the first: repeated on every
#: row, that array cost the worker more to parse than the rest of the result. The successes are joined
#: to ``jobs`` by id alone, so each is one primary-key probe: with ``jobs.id = ANY(done)`` as well,
#: Postgres read every running job's entry in ``jobs_running_by_lease`` whenever its statistics counted
#: few running jobs. Nor may a partial index of ``jobs`` have a status predicate (migration 0010): the
#: ``status`` conditions here then led Postgres into reading the whole backlog's entries in the index of
#: active jobs (tests/integration/test_store_plans.py).
#:
#: Refused claims are explained by the same statement, never by a second one: the claims commit with
#: it, and a second statement that failed (a dropped connection) would have reported claims that did
#: commit as failed, so that their threads, retrying, found the jobs running and skipped them. The
#: explanation reads the jobs as the statement found them: a job another worker claimed at the same
#: moment may show its earlier status.
#:
#: Each claim carries a token, stored with the claim. A claim whose statement committed but whose answer
#: was lost (the connection broke after COMMIT) is asked again with the same token; the job is then
#: ``running`` under that token, and the statement answers it as claimed (``reclaimed``, its lease
#: renewed) rather than refused. Without it, the thread skipped the job it had claimed: the job sat out
#: its lease, lost an attempt, and failed unrun if that was its last.
_WRITE_ROUND = Prepared(
    "conveyor_write_round",
    f"""
    WITH succeeded AS (
        UPDATE jobs SET status = '{JobStatus.SUCCEEDED.value}', result = mine.result::jsonb, error = NULL,
                        finished_at = now(), updated_at = now(), lease_expires_at = NULL
        FROM unnest(%(done)s, %(attempts)s, %(started)s, %(results)s) AS mine(id, attempt, started_at, result)
        WHERE jobs.id = mine.id AND jobs.status = '{JobStatus.RUNNING.value}' AND jobs.attempts = mine.attempt
              AND jobs.started_at = mine.started_at
        RETURNING jobs.id
    ), claimed AS (
        UPDATE jobs
        SET status = '{JobStatus.RUNNING.value}', attempts = attempts + 1, started_at = now(),
            updated_at = now(), progress = NULL, lease_expires_at = now() + %(lease)s * interval '1 second',
            claim_token = (%(tokens)s)[array_position(%(claims)s, id)]
        WHERE id = ANY(%(claims)s) AND status = ANY(%(claimable)s) AND run_at <= now()
        RETURNING {JOB_COLUMNS}
    ), refused AS (
        SELECT wanted.id, wanted.token, job.status, job.run_at > now() AS due_later,
               job.status = '{JobStatus.RUNNING.value}' AND job.claim_token = wanted.token AS mine
        FROM unnest(%(claims)s, %(tokens)s) AS wanted(id, token)
        LEFT JOIN LATERAL (SELECT status, run_at, claim_token FROM jobs WHERE jobs.id = wanted.id) AS job
            ON true
        WHERE wanted.id NOT IN (SELECT id FROM claimed)
    ), reclaimed AS (
        UPDATE jobs SET lease_expires_at = now() + %(lease)s * interval '1 second'
        FROM refused
        -- Checked again on the row itself: if the row changed while this statement waited for its
        -- lock (the relay took the attempt over, another worker claimed it), it is no longer ours.
        WHERE refused.mine AND jobs.id = refused.id AND jobs.status = '{JobStatus.RUNNING.value}'
              AND jobs.claim_token = refused.token
        RETURNING {_RECLAIMED_COLUMNS}
    ), answers AS (
        SELECT row_number() OVER () AS n, * FROM (
            SELECT claimed.*, NULL::uuid AS refused_id, NULL::text AS refused_status,
                   NULL::boolean AS refused_due_later
            FROM claimed
            UNION ALL
            SELECT reclaimed.*, NULL, NULL, NULL
            FROM reclaimed
            UNION ALL
            SELECT {_NO_JOB}, refused.id, refused.status, refused.due_later
            FROM refused
            WHERE refused.id NOT IN (SELECT id FROM reclaimed)
        ) AS both_kinds
    )
    SELECT CASE WHEN coalesce(claimed.n, 1) = 1 THEN (SELECT array_agg(id) FROM succeeded) END,
           {_CLAIMED_COLUMNS}, claimed.refused_id, claimed.refused_status, claimed.refused_due_later
    FROM (SELECT 1) AS one
    LEFT JOIN answers AS claimed ON true
    ORDER BY claimed.n
    """,  # noqa: S608 - fixed fragments only
    {"claims": "uuid[]", "tokens": "uuid[]", "lease": "double precision", "claimable": "text[]",
     "done": "uuid[]", "attempts": "int[]", "started": "timestamptz[]", "results": "text[]"},
)  # fmt: skip


def write_round(
    cur: Cursor,
    claims: Sequence[uuid.UUID],
    lease_seconds: float,
    successes: Sequence[tuple[Job, str]],
    tokens: Sequence[uuid.UUID] | None = None,
) -> Round:
    """Claim ``claims`` (distinct ids; ``tokens[i]`` names the claim of ``claims[i]``, fresh ones if not
    given) and record ``successes`` (claimed jobs with their result encoded as JSON) in one prepared
    statement, so in one commit: the worker's group commit (``worker_service/group_commit.py``).
    """
    if tokens is None:
        tokens = [uuid.uuid4() for _ in claims]
    if len(tokens) != len(claims):
        raise ValueError("one token per claim")
    ordered = sorted(zip(claims, tokens, strict=True))  # rows are locked in id order
    _WRITE_ROUND.execute(
        cur,
        {
            "claims": [job_id for job_id, _ in ordered],
            "tokens": [token for _, token in ordered],
            "lease": lease_seconds,
            "claimable": _CLAIMABLE,
            "done": [job.id for job, _ in successes],
            "attempts": [job.attempts for job, _ in successes],
            "started": [job.started_at for job, _ in successes],
            "results": [result for _, result in successes],
        },
    )
    rows = cur.fetchall()
    succeeded = set(rows[0][0] or ())
    results: dict[uuid.UUID, ClaimResult] = {}
    for row in rows:
        if row[1] is not None:
            job = job_from_row(row[1:_REFUSED_AT])
            results[job.id] = Claimed(job)
        elif row[_REFUSED_AT] is not None:
            refused_id, status, due_later = row[_REFUSED_AT:]
            if status is not None:  # else no job has the id: Missing, below
                results[refused_id] = NotClaimable(JobStatus(status), bool(due_later))
    return Round({job_id: results.get(job_id, Missing()) for job_id in claims}, succeeded)


def _fence() -> str:
    """The attempt a worker claimed: its number and its claim's time. The number alone could match a
    later attempt: a replay starts the count again from zero."""
    return "id = %(id)s AND status = %(running)s AND attempts = %(attempt)s AND started_at = %(started_at)s"


def _attempt(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "running": JobStatus.RUNNING.value,
        "attempt": job.attempts,
        "started_at": job.started_at,
    }


def record_retry(cur: Cursor, job: Job, error: JobError, delay_seconds: float) -> JobStatus | None:
    """Running → retrying, with the next attempt's outbox row due after ``delay_seconds``; returns the
    status written (None if the attempt was taken over meanwhile).

    A job whose cancellation was requested meanwhile goes to ``cancelled`` instead: no new attempt.
    """
    cur.execute(
        f"""
        WITH retried AS (
            UPDATE jobs SET
                status = CASE WHEN cancel_requested_at IS NULL THEN %(retrying)s ELSE %(cancelled)s END,
                finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END,
                error = %(error)s, updated_at = now(),
                run_at = now() + %(delay)s * interval '1 second', lease_expires_at = NULL
            WHERE {_fence()}
            RETURNING id, run_at, status
        ), outbox_row AS (
            INSERT INTO outbox (job_id, available_at)
            SELECT id, run_at FROM retried WHERE status = %(retrying)s
        )
        SELECT status FROM retried
        """,  # noqa: S608
        {
            **_attempt(job),
            "retrying": JobStatus.RETRYING.value,
            "cancelled": JobStatus.CANCELLED.value,
            "error": json_param(error.as_dict()),
            "delay": delay_seconds,
        },
    )
    row = cur.fetchone()
    return JobStatus(row[0]) if row else None


def record_cancelled(cur: Cursor, job: Job) -> bool:
    """Running → cancelled: the handler stopped because cancellation was requested."""
    cur.execute(
        f"""
        UPDATE jobs SET status = %(cancelled)s, finished_at = now(), updated_at = now(),
                        lease_expires_at = NULL
        WHERE {_fence()}
        """,  # noqa: S608
        {
            **_attempt(job),
            "cancelled": JobStatus.CANCELLED.value,
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
            **_attempt(job),
            "failed": JobStatus.FAILED.value,
            "error": json_param(error.as_dict()),
        },
    )
    return bool(cur.rowcount == 1)


def outcome_of(cur: Cursor, job: Job, token: uuid.UUID) -> JobStatus | None:
    """The job's status if it still is at this attempt (its number, its claim's time and its claim's
    ``token``), else None.

    For an outcome write whose answer was lost with its connection: asked again, its fence no longer
    matches (the first try committed and moved the job on), and this tells "written by that first try"
    from "taken over by the relay", whose recovery clears the token (it keeps the number and the time).
    """
    cur.execute(
        "SELECT status FROM jobs WHERE id = %(id)s AND attempts = %(attempt)s"
        " AND started_at = %(started_at)s AND claim_token = %(token)s",
        {**_attempt(job), "token": token},
    )
    row = cur.fetchone()
    return None if row is None else JobStatus(row[0])


def record_progress(cur: Cursor, job: Job, progress: dict[str, Any]) -> bool:
    """Store progress; returns whether cancellation of the job has been requested."""
    cur.execute(
        f"UPDATE jobs SET progress = %(progress)s, updated_at = now() WHERE {_fence()}"  # noqa: S608
        " RETURNING cancel_requested_at IS NOT NULL",
        {
            **_attempt(job),
            "progress": json_param(progress),
        },
    )
    row = cur.fetchone()
    return bool(row and row[0])


def renew_leases(
    cur: Cursor, running: Sequence[tuple[uuid.UUID, int, datetime]], lease_seconds: float
) -> set[uuid.UUID]:
    """Extend the lease of each attempt (job id, attempt number, claim time) still running; returns the
    jobs asked to cancel."""
    if not running:
        return set()
    cur.execute(
        """
        UPDATE jobs SET lease_expires_at = now() + %(lease)s * interval '1 second'
        FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(started)s::timestamptz[])
             AS mine(id, attempts, started_at)
        WHERE jobs.id = mine.id AND jobs.attempts = mine.attempts AND jobs.started_at = mine.started_at
              AND jobs.status = %(running)s
        RETURNING jobs.id, jobs.cancel_requested_at IS NOT NULL
        """,
        {
            "lease": lease_seconds,
            "ids": [job_id for job_id, _, _ in running],
            "attempts": [attempt for _, attempt, _ in running],
            "started": [started_at for _, _, started_at in running],
            "running": JobStatus.RUNNING.value,
        },
    )
    return {job_id for job_id, cancel in cur.fetchall() if cancel}


def recover_lapsed_leases(cur: Cursor, *, limit: int, retry_base: float, retry_cap: float) -> list[Job]:
    """Running jobs whose lease lapsed: retry them (with backoff) or fail them if out of attempts.

    The attempt that was lost counts, so a job that kills its worker every time ends up ``failed``
    after ``max_attempts`` instead of looping forever.
    """
    cur.execute(
        f"""
        WITH lapsed AS (
            SELECT id FROM jobs
            WHERE lease_expires_at < now() AND status = %(running)s  -- jobs_running_by_lease
            ORDER BY lease_expires_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE jobs SET
                status = CASE WHEN jobs.cancel_requested_at IS NOT NULL THEN %(cancelled)s
                              WHEN jobs.attempts < jobs.max_attempts THEN %(retrying)s
                              ELSE %(failed)s END,
                error = jsonb_build_object('type', %(type)s::text, 'title', %(title)s::text,
                                           'detail', %(detail)s::text, 'attempt', jobs.attempts),
                run_at = now() + least(%(cap)s, %(base)s * 2 ^ least(jobs.attempts - 1, 60))
                                 * interval '1 second',
                finished_at = CASE WHEN jobs.attempts < jobs.max_attempts
                                        AND jobs.cancel_requested_at IS NULL THEN NULL ELSE now() END,
                lease_expires_at = NULL, claim_token = NULL,
                updated_at = now()
            FROM lapsed WHERE jobs.id = lapsed.id
            RETURNING {", ".join("jobs." + c for c in JOB_COLUMNS.split(", "))}
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
            "cancelled": JobStatus.CANCELLED.value,
            "limit": limit,
            "type": WORKER_LOST.type,
            "title": WORKER_LOST.title,
            "detail": WORKER_LOST.detail,
            "base": retry_base,
            "cap": retry_cap,
        },
    )
    return [job_from_row(row) for row in cur.fetchall()]
