"""Batch submission: up to 1,000 jobs in one request, one transaction, one result per job."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import request
from flask.views import MethodView
from marshmallow import fields, validate

from api_service import json_body
from api_service.auth import current_limits, current_principal, requires
from api_service.context import services
from api_service.idempotency import HEADER, KEY_PATTERN, MAX_KEY_LENGTH, fingerprint, parse_key
from api_service.json_body import Blueprint
from api_service.metrics import count_refusal, count_submission, counting_submission_refusals
from api_service.openapi_docs import AUTHENTICATED, BODY, ProblemSchema, documents_problems, header
from api_service.problems import Problem, from_conveyor_error, invalid, validation_errors
from api_service.rate_limit import rate_limit_headers
from api_service.request_ids import current_request_id
from api_service.schemas import JobCreateSchema, JobSchema, ResponseSchema, StrictSchema, payload_size_error
from api_service.submission import BatchItem, IdempotentRequest, submit_batch
from shared.api_keys import Scope
from shared.errors import ConveyorError, IdempotencyKeyInvalid

blp = Blueprint(
    "jobs-batch", __name__, url_prefix="/v1/jobs", description="Submit jobs and follow them to the end."
)

#: Most jobs one batch may carry (the body must also stay within CONVEYOR_MAX_BODY_BYTES).
MAX_BATCH = 1000
#: One schema instance for every item (building one per item costs more than loading it).
_ITEM_SCHEMA = JobCreateSchema()
#: The path a batch item is equivalent to: the same key and body replay across both endpoints.
SINGLE_SUBMIT_PATH = "/v1/jobs"


class JobBatchItemSchema(JobCreateSchema):
    """One job of a batch: a job as `POST /v1/jobs` takes it, with its own optional idempotency key."""

    # Documentation only: the view takes the key out before the job is loaded, and checks it as the
    # Idempotency-Key header is checked (so the same pattern, quoted form included).
    idempotency_key = fields.String(
        metadata={
            "description": "This job's Idempotency-Key: the same key and job replay the original. Leave "
            "it out for none (`null` is refused).",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH + 2,
            "pattern": KEY_PATTERN,
        },
    )


class JobBatchSchema(StrictSchema):
    """Up to 1,000 jobs, each validated and answered on its own."""

    jobs = fields.List(
        fields.Nested(JobBatchItemSchema), required=True, validate=validate.Length(1, MAX_BATCH)
    )


class JobBatchItemResultSchema(ResponseSchema):
    """What became of one job of the batch: created (202), replayed, or refused with its problem."""

    index = fields.Integer(required=True, metadata={"description": "Position of the job in the request."})
    status = fields.Integer(required=True, metadata={"description": "202, or the status of `problem`."})
    replayed = fields.Boolean(
        required=True, metadata={"description": "The stored result of an earlier request."}
    )
    job = fields.Nested(JobSchema, allow_none=True, required=True)
    problem = fields.Nested(ProblemSchema, allow_none=True, required=True)


class JobBatchResultSchema(ResponseSchema):
    """One result per job, in the request's order, and the counts of each outcome."""

    results = fields.List(fields.Nested(JobBatchItemResultSchema), required=True)
    created = fields.Integer(required=True)
    replayed = fields.Integer(required=True)
    refused = fields.Integer(required=True)


@blp.route("/batch")
class JobBatch(MethodView):
    @requires(Scope.JOBS_WRITE)
    @blp.doc(
        operationId="submitJobBatch",
        requestBody={"required": True, "content": {"application/json": {"schema": JobBatchSchema}}},
    )
    @blp.response(
        200,
        JobBatchResultSchema,
        description="One result per job, in order: created (202), replayed, or refused with a problem.",
        headers={"RateLimit-Policy": header("RateLimit-Policy"), "RateLimit": header("RateLimit")},
    )
    @documents_problems(*AUTHENTICATED, *BODY, "idempotency-key-invalid", "validation-error", "rate-limited")
    def post(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Submit jobs in a batch

        Up to 1,000 jobs, each validated on its own and with its own optional `idempotency_key`. The
        valid ones are stored in one transaction; every job gets its own result. The batch as a whole
        is refused only when the tenant's rate cannot cover its new jobs (429) or the body is not a
        list of jobs (422).
        """
        if request.headers.getlist(HEADER):
            raise IdempotencyKeyInvalid(
                "A batch takes no Idempotency-Key header: give each job its own idempotency_key."
            )
        raw_items = _items(json_body.request_json())
        svc = services()
        results: dict[int, dict[str, Any]] = {}
        valid: list[BatchItem] = []
        for index, raw in enumerate(raw_items):
            item_or_problem = _validate(index, raw, svc.settings.max_payload_bytes)
            if isinstance(item_or_problem, Problem):
                results[index] = _refused(index, item_or_problem)
            else:
                valid.append(item_or_problem)
        principal, limits = current_principal(), current_limits()
        with counting_submission_refusals():
            outcomes, rate = submit_batch(
                svc, principal.tenant, limits, valid, request_id=current_request_id()
            )
        for outcome in outcomes:
            if outcome.submission is not None:
                count_submission(outcome.submission.job.type, outcome.submission.replayed)
                results[outcome.index] = {"index": outcome.index, "status": outcome.submission.status_code,
                                          "replayed": outcome.submission.replayed,
                                          "job": outcome.submission.job, "problem": None}  # fmt: skip
            else:
                assert outcome.refusal is not None
                count_refusal(outcome.refusal)
                results[outcome.index] = _refused(outcome.index, from_conveyor_error(outcome.refusal))
        ordered = [results[i] for i in range(len(raw_items))]
        body = {
            "results": ordered,
            "created": sum(1 for r in ordered if r["job"] is not None and not r["replayed"]),
            "replayed": sum(1 for r in ordered if r["replayed"]),
            "refused": sum(1 for r in ordered if r["problem"] is not None),
        }
        return body, 200, rate_limit_headers(rate, limits) if rate is not None else {}


def _items(body: Any) -> list[Any]:
    if not isinstance(body, dict) or set(body) - {"jobs"}:
        raise invalid(pointer="", detail='Send an object with one member, "jobs": a list of jobs.')
    jobs = body.get("jobs")
    if not isinstance(jobs, list) or not 1 <= len(jobs) <= MAX_BATCH:
        raise invalid(pointer="/jobs", detail=f"Send a list of 1 to {MAX_BATCH} jobs.")
    return jobs


#: A job without an ``idempotency_key`` member (``null`` is not "no key": the schema says string).
_NO_KEY = object()


def _validate(index: int, raw: Any, max_payload_bytes: int) -> BatchItem | Problem:
    """One job of the batch, checked like a single submission; its problems point into the batch."""
    if not isinstance(raw, dict):
        return invalid(pointer=f"/jobs/{index}", detail="Each job must be an object.")
    job = dict(raw)
    key_value = job.pop("idempotency_key", _NO_KEY)
    try:
        new = _ITEM_SCHEMA.load(job)
    except ma.ValidationError as exc:
        errors = [{"pointer": f"/jobs/{index}{e['pointer']}", "detail": e["detail"]}
                  for e in validation_errors({"json": exc.messages})]  # fmt: skip
        return Problem("validation-error", "The job is invalid; see `errors`.", errors=errors)
    too_large = payload_size_error(new.payload, max_payload_bytes)
    if too_large:
        return invalid(pointer=f"/jobs/{index}/payload", detail=too_large)
    idempotent = None
    if key_value is None:
        return invalid(
            pointer=f"/jobs/{index}/idempotency_key", detail="Must be a string; leave it out for no key."
        )
    if key_value is not _NO_KEY:
        try:
            key = parse_key([key_value], "This job's idempotency_key") if isinstance(key_value, str) else None
        except ConveyorError as exc:
            return from_conveyor_error(exc)
        if key is None:
            return invalid(pointer=f"/jobs/{index}/idempotency_key", detail="Must be a string.")
        idempotent = IdempotentRequest(key, fingerprint("POST", SINGLE_SUBMIT_PATH, job))
    return BatchItem(index, new, idempotent)


def _refused(index: int, problem: Problem) -> dict[str, Any]:
    return {
        "index": index,
        "status": problem.type.status,
        "replayed": False,
        "job": None,
        "problem": problem.body(),
    }
