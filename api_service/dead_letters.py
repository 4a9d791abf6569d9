"""The dead-letter resource: failed jobs and undeliverable messages, kept until an operator acts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import fields, validate

from api_service.auth import requires, visible_tenant
from api_service.context import services
from api_service.json_body import Blueprint
from api_service.openapi_docs import AUTHENTICATED, BODY, documents_problems
from api_service.openapi_examples import DEAD_LETTER_EXAMPLE, SELECTION_EXAMPLES
from api_service.problems import invalid
from api_service.schemas import (
    CURSOR_ERROR,
    NO_NUL,
    TENANT,
    QuerySchema,
    ResponseSchema,
    StrictSchema,
    UtcDateTime,
    decode_cursor,
    page,
)
from shared.api_keys import Scope
from shared.job_types import JsonBoolean
from shared.store import dead_letters as dead_letter_store
from shared.store.dead_letters import Selection

blp = Blueprint(
    "dead-letters",
    __name__,
    url_prefix="/v1/dead-letters",
    description="Failed jobs and undeliverable messages: inspect, replay, purge. Nothing expires on its own.",
)

_NAME = [validate.Length(1, 100), NO_NUL]


class DeadLetterSchema(ResponseSchema):
    """A failed job, or a message on a Conveyor queue that names no job."""

    id = fields.Integer(required=True)
    job_id = fields.UUID(
        allow_none=True, required=True, metadata={"description": "Null for a message that names no job."}
    )
    tenant = fields.String(allow_none=True, required=True)
    queue = fields.String(required=True)
    job_type = fields.String(allow_none=True, required=True)
    error_type = fields.String(
        required=True, metadata={"example": "worker_service.handlers.demo_sleep.DemoFailure"}
    )
    reason = fields.String(required=True)
    attempts = fields.Integer(allow_none=True, required=True)
    error = fields.Dict(allow_none=True, required=True, metadata={"description": "The job's last error."})
    message = fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "For a message that names no job: its first 16 KiB (`base64:...` if they "
            "are not UTF-8), followed by `... [N more bytes not kept]` if it was longer."
        },
    )
    dead_at = UtcDateTime(required=True)


class DeadLetterPageSchema(ResponseSchema):
    """One page of a dead-letter listing."""

    items = fields.List(fields.Nested(DeadLetterSchema), required=True)
    next_cursor = fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Pass as `cursor` to get the next page; null on the last page."},
    )


class _Filters(StrictSchema):
    type = fields.List(fields.String(validate=_NAME), metadata={"description": "Job types."})
    queue = fields.List(fields.String(validate=_NAME))
    error_type = fields.List(fields.String(validate=_NAME))
    tenant = fields.String(validate=TENANT, metadata={"description": "Admin keys only."})
    dead_after = UtcDateTime()
    dead_before = UtcDateTime()


class DeadLetterQuerySchema(QuerySchema, _Filters):
    limit = fields.Integer(
        load_default=50, validate=validate.Range(1, 200), metadata={"description": "Page size."}
    )
    cursor = fields.String(
        validate=validate.Length(1, 200), metadata={"description": "`next_cursor` of the previous page."}
    )


class DeadLetterSelectionSchema(_Filters):
    """The dead letters to act on: every filter given must match, or `all: true` for every one."""

    all = JsonBoolean(
        load_default=False, metadata={"description": "Required (true) to act on every dead letter."}
    )


class ReplayResultSchema(ResponseSchema):
    """The outcome of a replay."""

    replayed = fields.Integer(required=True, metadata={"description": "Jobs queued again."})


class PurgeResultSchema(ResponseSchema):
    """The outcome of a purge."""

    purged = fields.Integer(required=True, metadata={"description": "Dead letters deleted."})


def _selection(
    data: dict[str, Any], *, tenant: str | None, after: tuple[datetime, int] | None = None
) -> Selection:
    return Selection(
        tenant=tenant,
        after=after,
        types=tuple(data.get("type", ())),
        queues=tuple(data.get("queue", ())),
        error_types=tuple(data.get("error_type", ())),
        dead_after=data.get("dead_after"),
        dead_before=data.get("dead_before"),
    )


@blp.route("")
class DeadLetters(MethodView):
    @requires(Scope.JOBS_READ)
    @blp.doc(operationId="listDeadLetters")
    @blp.arguments(DeadLetterQuerySchema, location="query", unknown="raise")
    @blp.response(
        200,
        DeadLetterPageSchema,
        description="A page of dead letters, newest first.",
        example={"items": [DEAD_LETTER_EXAMPLE], "next_cursor": None},
    )
    @documents_problems(*AUTHENTICATED, "validation-error")
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List dead letters

        Newest first, filtered by job type, queue, error type and time; paginated like `GET /v1/jobs`.
        A tenant sees its own failed jobs; an admin also sees messages that name no job.
        """
        limit = query["limit"]
        after = None
        if "cursor" in query:
            try:
                after = decode_cursor(query["cursor"], int)
            except ma.ValidationError:
                raise invalid(parameter="cursor", detail=CURSOR_ERROR) from None
        tenant = visible_tenant(query.get("tenant"), "dead letters")
        selection = _selection(query, tenant=tenant, after=after)
        rows = services().db.read(lambda cur: dead_letter_store.list_dead_letters(cur, selection, limit + 1))
        return page(rows, limit, lambda row: (row.dead_at, row.id))


def _checked_selection(data: dict[str, Any]) -> Selection:
    selection = _selection(data, tenant=data.get("tenant"))
    if selection.is_everything and not data["all"]:
        raise invalid(pointer="/all", detail="Give a filter, or all: true to act on every dead letter.")
    return selection


@blp.route("/replay")
class ReplayDeadLetters(MethodView):
    @requires(Scope.ADMIN)
    @blp.doc(operationId="replayDeadLetters")
    @blp.arguments(DeadLetterSelectionSchema, examples=SELECTION_EXAMPLES)
    @blp.response(200, ReplayResultSchema, description="How many jobs were queued again.")
    @documents_problems(*AUTHENTICATED, *BODY, "validation-error")
    def post(self, data: dict[str, Any]) -> dict[str, int]:
        """Replay dead letters

        Queues the failed jobs of every matching dead letter again, with fresh attempts. Replaying the
        same selection twice runs nothing twice: the second call finds those jobs no longer failed.
        """
        selection = _checked_selection(data)
        moved = services().db.run(lambda cur: dead_letter_store.replay(cur, selection))
        return {"replayed": len(moved)}


@blp.route("/purge")
class PurgeDeadLetters(MethodView):
    @requires(Scope.ADMIN)
    @blp.doc(operationId="purgeDeadLetters")
    @blp.arguments(DeadLetterSelectionSchema, examples=SELECTION_EXAMPLES)
    @blp.response(200, PurgeResultSchema, description="How many dead letters were deleted.")
    @documents_problems(*AUTHENTICATED, *BODY, "validation-error")
    def post(self, data: dict[str, Any]) -> dict[str, int]:
        """Purge dead letters

        Deletes every matching dead letter (needs a filter, or `all: true`). Purged failed jobs stay in
        the job list as `failed`.
        """
        selection = _checked_selection(data)
        return {"purged": services().db.run(lambda cur: dead_letter_store.purge(cur, selection))}
