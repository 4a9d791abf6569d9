"""The jobs resource: submit, read and list jobs."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Response, request, url_for
from flask.views import MethodView

from api_service import json_body
from api_service.auth import current_limits, current_principal, requires, visible_tenant
from api_service.context import services
from api_service.idempotency import HEADER as IDEMPOTENCY_HEADER
from api_service.idempotency import REPLAYED_HEADER, fingerprint, parse_key
from api_service.json_body import Blueprint
from api_service.metrics import count_submission, counting_submission_refusals
from api_service.openapi_docs import (
    AUTHENTICATED,
    BODY,
    IDEMPOTENCY_KEY_PARAMETER,
    NOT_FOUND,
    documents_problems,
    header,
)
from api_service.openapi_examples import CURSOR_EXAMPLE, JOB_EXAMPLE, QUEUED_JOB_EXAMPLE, SUBMIT_EXAMPLES
from api_service.problems import Problem, invalid
from api_service.rate_limit import rate_limit_headers
from api_service.request_ids import current_request_id
from api_service.schemas import (
    JobCreateSchema,
    JobListQuerySchema,
    JobPageSchema,
    JobSchema,
    page,
    payload_size_error,
)
from api_service.submission import IdempotentRequest, retry_job, submit_job
from shared.api_keys import Scope
from shared.errors import JobNotFound
from shared.jobs import RETRYABLE_BY_OPERATOR, Job, JobStatus, NewJob
from shared.store import jobs as job_store

blp = Blueprint(
    "jobs", __name__, url_prefix="/v1/jobs", description="Submit jobs and follow them to the end."
)

#: Poll hint for unfinished jobs; capped so a far-future job is still re-checked now and then.
MAX_POLL_HINT_SECONDS = 60

#: The problems every operation on one job can give.
#: A validation-error: an unknown or repeated query parameter (``app._check_query_parameters``).
_ONE_JOB_PROBLEMS = (*AUTHENTICATED, "job-not-found", NOT_FOUND, "validation-error")


@blp.route("")
class Jobs(MethodView):
    @requires(Scope.JOBS_WRITE)
    @blp.doc(operationId="submitJob", parameters=[IDEMPOTENCY_KEY_PARAMETER])
    @blp.arguments(JobCreateSchema(), examples=SUBMIT_EXAMPLES)
    @blp.response(
        202,
        JobSchema,
        description="Accepted: the job is stored durably and will run. A replay (same "
        "`Idempotency-Key`, same request) answers the same, with the job as it is now.",
        headers={
            "Location": header("Location", required=True),
            REPLAYED_HEADER: header(REPLAYED_HEADER),
            "RateLimit-Policy": header("RateLimit-Policy"),
            "RateLimit": header("RateLimit"),
        },
        example=QUEUED_JOB_EXAMPLE,
    )
    @documents_problems(
        *AUTHENTICATED, *BODY, "idempotency-key-invalid", "idempotency-key-in-flight", "validation-error",
        "idempotency-key-reused", "rate-limited", "too-many-active-jobs",
    )  # fmt: skip
    def post(self, new_job: NewJob) -> tuple[Job, int, dict[str, str]]:
        """Submit a job

        Stores the job and answers at once; the job runs in the background. With an
        `Idempotency-Key`, retries of the same request return the original job.
        """
        key = parse_key(request.headers.getlist(IDEMPOTENCY_HEADER))
        svc = services()
        too_large = payload_size_error(new_job.payload, svc.settings.max_payload_bytes)
        if too_large:
            raise invalid(pointer="/payload", detail=too_large)
        idempotent = None
        if key is not None:
            idempotent = IdempotentRequest(
                key, fingerprint(request.method, request.path, json_body.request_json())
            )
        principal, limits = current_principal(), current_limits()
        with counting_submission_refusals():
            submission = submit_job(
                svc, principal.tenant, limits, new_job, idempotent, request_id=current_request_id()
            )
        count_submission(new_job.type, submission.replayed)
        headers = {"Location": url_for("jobs.get_job", job_id=submission.job.id)}
        if submission.replayed:
            headers[REPLAYED_HEADER] = "true"
        if submission.rate is not None:
            headers.update(rate_limit_headers(submission.rate, limits))
        return submission.job, submission.status_code, headers

    @requires(Scope.JOBS_READ)
    @blp.doc(operationId="listJobs")
    @blp.arguments(JobListQuerySchema, location="query", unknown="raise")
    @blp.response(
        200,
        JobPageSchema,
        description="A page of jobs, newest first.",
        example={"items": [JOB_EXAMPLE], "next_cursor": CURSOR_EXAMPLE},
    )
    @documents_problems(*AUTHENTICATED, "validation-error")
    def get(self, query: dict[str, Any]) -> Response | dict[str, Any]:
        """List jobs

        Newest first, filtered by status, type, labels and creation time. Pages are stable while new
        jobs arrive: follow `next_cursor` until it is null.
        """
        limit = query["limit"]
        labels = dict(item.split(":", 1) for item in query.get("label", []))
        filters = job_store.JobFilter(
            tenant=visible_tenant(query.get("tenant"), "jobs"),
            statuses=query.get("status", []),
            types=query.get("type", []),
            labels=labels or None,
            created_after=query.get("created_after"),
            created_before=query.get("created_before"),
            after=query.get("cursor"),
        )
        jobs = services().db.read(lambda cur: job_store.list_jobs(cur, filters, limit + 1))
        return page(jobs, limit, lambda job: (job.created_at, job.id))


@blp.route("/<uuid:job_id>", endpoint="get_job")
class JobById(MethodView):
    @requires(Scope.JOBS_READ)
    @blp.doc(operationId="getJob")
    @blp.response(
        200,
        JobSchema,
        description="The job.",
        headers={
            "Retry-After": {
                **header("Retry-After"),
                "description": "Seconds until polling again is useful (1-60); only while the job is "
                "unfinished.",
            }
        },
        example=JOB_EXAMPLE,
    )
    @documents_problems(*_ONE_JOB_PROBLEMS)
    def get(self, job_id: uuid.UUID) -> Job | tuple[Job, int, dict[str, str]]:
        """Get a job

        The job's status, attempts, progress, and once finished its result or error. Another
        tenant's job is reported as not found.
        """
        tenant = _own_tenant()
        job = services().db.read(lambda cur: job_store.get_job(cur, job_id, tenant))
        if job is None:
            raise JobNotFound(f"No job has the id {job_id}.")
        if job.is_finished:
            return job
        return job, 200, {"Retry-After": str(poll_hint_seconds(job))}


@blp.route("/<uuid:job_id>/cancel", endpoint="cancel_job")
class CancelJob(MethodView):
    @requires(Scope.JOBS_WRITE)
    @blp.doc(operationId="cancelJob")
    @blp.response(
        200,
        JobSchema,
        description="The job is cancelled (now or earlier); it will not run.",
        example={**QUEUED_JOB_EXAMPLE, "status": "cancelled", "finished_at": "2026-11-29T15:22:32.01+00:00"},
    )
    @blp.alt_response(
        202,
        schema=JobSchema,
        success=True,
        description="The job is running: cancellation is requested (`cancel_requested_at`). Its handler "
        "sees the request and may stop, and it will not be retried.",
    )
    @documents_problems(
        *_ONE_JOB_PROBLEMS, *BODY, "illegal-transition",
        descriptions={409: "The job already succeeded or failed (`/problems/illegal-transition`)."},
    )  # fmt: skip
    def post(self, job_id: uuid.UUID) -> tuple[Job, int]:
        """Cancel a job

        A queued, scheduled or retrying job becomes `cancelled` and never runs. A running job is marked
        cancel-requested. Cancelling twice is harmless; cancelling a finished job is a conflict.
        """
        tenant = _own_tenant()
        job = services().db.run(lambda cur: job_store.cancel_job(cur, job_id, tenant))
        if job is None:
            raise JobNotFound(f"No job has the id {job_id}.")
        if job.status is JobStatus.CANCELLED:
            return job, 200
        if job.status is JobStatus.RUNNING:
            return job, 202
        raise Problem(
            "illegal-transition", f"The job already {job.status}; a finished job cannot be cancelled."
        )


@blp.route("/<uuid:job_id>/retry", endpoint="retry_job")
class RetryJob(MethodView):
    @requires(Scope.JOBS_WRITE)
    @blp.doc(operationId="retryJob")
    @blp.response(
        202,
        JobSchema,
        description="The job is queued again for a new cycle of attempts. A tenant's retry counts as a "
        "submission: against its cap on active jobs and its submission rate (an admin's is not limited).",
        headers={
            "Location": header("Location", required=True),
            "RateLimit-Policy": header("RateLimit-Policy"),
            "RateLimit": header("RateLimit"),
        },
        example=QUEUED_JOB_EXAMPLE,
    )
    @documents_problems(
        *_ONE_JOB_PROBLEMS, *BODY, "illegal-transition", "too-many-active-jobs", "rate-limited",
        descriptions={409: "The job is not failed or cancelled (`/problems/illegal-transition`)."},
    )  # fmt: skip
    def post(self, job_id: uuid.UUID) -> tuple[Job, int, dict[str, str]]:
        """Retry a failed or cancelled job

        Resets its attempts and queues it again; its dead letter goes away. The job runs once, even if
        the old message is still somewhere: the worker only runs a job it can claim.
        """
        tenant, limits = _own_tenant(), current_limits()
        with counting_submission_refusals():  # limited like a submission, so counted like one
            moved, job, rate = retry_job(services(), job_id, tenant, limits)
            if not moved and job is not None and tenant is not None and job.status in RETRYABLE_BY_OPERATOR:
                raise job_store.too_many_active(limits.max_active_jobs)
        if job is None:
            raise JobNotFound(f"No job has the id {job_id}.")
        if not moved:
            raise Problem(
                "illegal-transition",
                f"The job is {job.status}; only failed or cancelled jobs can be retried.",
            )
        headers = {"Location": url_for("jobs.get_job", job_id=job.id)}
        if rate is not None:
            headers.update(rate_limit_headers(rate, limits))
        return job, 202, headers


def _own_tenant() -> str | None:
    """The tenant whose jobs the caller may act on; None (any) for an admin."""
    principal = current_principal()
    return None if principal.is_admin else principal.tenant


def poll_hint_seconds(job: Job, now: datetime | None = None) -> int:
    """1 s for queued or running jobs; the wait until ``run_at`` for scheduled or retrying ones."""
    now = now or datetime.now(UTC)
    if job.status in (JobStatus.QUEUED, JobStatus.RETRYING) and job.run_at > now:
        return max(1, min(MAX_POLL_HINT_SECONDS, math.ceil((job.run_at - now).total_seconds())))
    return 1
