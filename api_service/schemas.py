"""HTTP schemas: what the API accepts and returns. Strict: unknown fields are rejected everywhere."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import marshmallow as ma
from marshmallow import fields, validate

from shared.api_keys import TENANT_NAME
from shared.job_types import (
    MAX_ATTEMPTS_RANGE,
    PRIORITY_RANGE,
    REGISTRY,
    TIMEOUT_SECONDS_RANGE,
    JsonNumber,
)
from shared.jobs import JobStatus, NewJob, text_path

#: One year: further ahead is almost certainly a unit mistake (ms for s).
MAX_DELAY_SECONDS = 365 * 86_400
MAX_LABELS = 32
LABEL_KEY = validate.Regexp(
    r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z",
    error="Label keys are 1-63 characters: letters, digits, '.', '_', '/', '-', starting alphanumeric.",
)
#: A tenant name, as ``conveyor keys create --tenant`` takes it.
TENANT = validate.Regexp(
    TENANT_NAME.pattern + r"\Z",
    error="Tenant names are 1-63 characters: lowercase letters, digits, '.', '_', '-', starting with a "
    "letter or digit.",
)
LABEL_VALUE = validate.Length(max=256)


NUL_MESSAGE = "Text may not contain the NUL character (\\u0000): Postgres cannot store it."
NO_NUL = validate.Regexp(r"[^\x00]*\Z", error=NUL_MESSAGE)


SURROGATE_MESSAGE = (
    "Text may not contain an unpaired UTF-16 surrogate (\\ud800-\\udfff): it is not Unicode, and "
    "Postgres cannot store it."
)


def nul_path(value: Any) -> tuple[str, ...] | None:
    """Where in a JSON value a string (or an object key) holds a NUL character; None if nowhere."""
    return text_path(value, lambda text: "\x00" in text)


def _nested(path: tuple[str, ...], message: str) -> Any:
    tree: Any = [message]
    for key in reversed(path):
        tree = {key: tree}
    return tree


class EntryErrorsDict(fields.Dict):
    """A Dict whose errors name the entry (``/labels/team``), as a JSON pointer into the body must:
    marshmallow files them under ``key`` or ``value`` below it (``/labels/team/key``), which are not
    members of the body. The message says whether the key or the value is wrong."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return super()._deserialize(value, attr, data, **kwargs)  # type: ignore[no-untyped-call]
        except ma.ValidationError as exc:
            if not isinstance(exc.messages, dict):
                raise
            flat = {
                entry: [m for part in ("key", "value") for m in problems.get(part, [])]
                if isinstance(problems, dict) and set(problems) <= {"key", "value"} else problems
                for entry, problems in exc.messages.items()
            }  # fmt: skip
            raise ma.ValidationError(flat, valid_data=exc.valid_data) from None


class StrictSchema(ma.Schema):
    """A request body or query: an unknown member is a 422 (a misspelt option must not be ignored)."""

    class Meta:
        unknown = ma.RAISE


#: What an unknown query parameter is called, the same on every operation (app.py refuses those of the
#: operations that take none).
UNKNOWN_PARAMETER = "Unknown parameter."


class QuerySchema(StrictSchema):
    """An operation's query parameters: an unknown one is refused as those of the operations that take
    none are (``app.py``)."""

    error_messages = {"unknown": UNKNOWN_PARAMETER}  # noqa: RUF012 - marshmallow's own class attribute


class ResponseSchema(ma.Schema):
    """A response body. Its document says ``additionalProperties: true``: fields may be added within /v1
    and clients must ignore those they do not know (api.md, Versioning). ``false``, as a request
    schema says, made generated clients refuse every response once a field was added (openapi-
    generator's Java client throws on an unknown field) and strict validators refuse it."""

    class Meta:
        unknown = ma.INCLUDE


#: RFC 3339's date-time (what the document's `format: date-time` means): T and Z in either case, seconds
#: required, an offset with a colon.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})\Z"
)  # ASCII digits: \d matches any script's
RFC3339_MESSAGE = (
    "Not an RFC 3339 date-time: write it like 2026-11-30T09:00:00Z or 2026-11-30T10:00:00+01:00 "
    "(in a query string, encode + as %2B)."
)


class UtcDateTime(fields.AwareDateTime):
    """An RFC 3339 time, converted to UTC (Postgres refuses offsets beyond ±15:59).

    marshmallow's ISO 8601 parser took forms the document's `format: date-time` does not promise
    (`2026-01-01 09:00Z`, `20260101T090000Z`, `+0100`) and refused lowercase `t` and `z`, which it does.
    A leap second (`:60`) is refused: Python's datetime has none.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str) or not _RFC3339.match(value):
            raise ma.ValidationError(RFC3339_MESSAGE)
        parsed = super()._deserialize(value.upper(), attr, data, **kwargs)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise ma.ValidationError("Not a valid time: out of range.") from None


class JobCreateSchema(StrictSchema):
    """A job to submit. Give at most one of `delay_seconds` and `run_at`."""

    #: Constraints across fields, for the OpenAPI document (``_check_type_and_payload`` enforces them).
    OPENAPI_KEYWORDS: ClassVar[dict[str, Any]] = {"not": {"required": ["delay_seconds", "run_at"]}}

    type = fields.String(
        required=True,
        validate=validate.Length(1, 100),
        metadata={"description": "A registered job type.", "example": "demo.sleep", "enum": sorted(REGISTRY)},
    )
    payload = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        metadata={"description": "Input of the job, validated by its type's payload schema (the "
                                 "`...Payload` schemas: `DemoSleepPayload` for `demo.sleep`, `NoopPayload` "
                                 "for `noop`). Unknown fields are refused; defaults are filled in.",
                  "example": {"seconds": 2}},
    )  # fmt: skip
    priority = fields.Integer(
        strict=True,
        validate=validate.Range(*PRIORITY_RANGE),
        metadata={"description": "0-9, higher runs first. Defaults to the type's priority."},
    )
    delay_seconds = JsonNumber(
        validate=validate.Range(0, MAX_DELAY_SECONDS),
        metadata={"description": "Run no earlier than this many seconds from now (at most one year). "
                                 "Excludes `run_at`.", "example": 60},
    )  # fmt: skip
    run_at = UtcDateTime(
        metadata={"description": "Run no earlier than this time (with a timezone; in the past means now; "
                                 "at most one year ahead). Excludes `delay_seconds`.",
                  "example": "2027-01-01T09:00:00Z"}
    )  # fmt: skip
    max_attempts = fields.Integer(
        strict=True,
        validate=validate.Range(*MAX_ATTEMPTS_RANGE),
        metadata={"description": "Attempts in all, the first included. Defaults to the type's."},
    )
    timeout_seconds = fields.Integer(
        strict=True,
        validate=validate.Range(*TIMEOUT_SECONDS_RANGE),
        metadata={"description": "Longest one attempt may run. Defaults to the type's."},
    )
    labels = EntryErrorsDict(
        keys=fields.String(validate=LABEL_KEY),
        values=fields.String(validate=LABEL_VALUE, metadata={"pattern": NO_NUL.regex.pattern}),
        load_default=dict,
        validate=validate.Length(max=MAX_LABELS),
        metadata={
            "description": "Free-form string labels to filter jobs by. Keys are 1-63 characters of "
            "`A-Z a-z 0-9 . _ / -`, starting with a letter or digit.",
            "example": {"team": "billing"},
        },
    )

    @ma.validates_schema(skip_on_field_errors=False)
    def _check_type_and_payload(self, data: dict[str, Any], **_: Any) -> None:
        if "delay_seconds" in data and "run_at" in data:
            raise ma.ValidationError("Give either delay_seconds or run_at, not both.", "delay_seconds")
        run_at = data.get("run_at")
        if run_at is not None and run_at > datetime.now(UTC) + timedelta(seconds=MAX_DELAY_SECONDS):
            raise ma.ValidationError("run_at may be at most one year ahead.", "run_at")
        name = data.get("type")
        if name is None:
            return
        job_type = REGISTRY.get(name)
        if job_type is None:
            known = ", ".join(sorted(REGISTRY))
            raise ma.ValidationError(f"Unknown job type {name!r}. Known types: {known}.", "type")
        if "payload" in data:
            try:
                data["payload"] = job_type.load_payload(data["payload"])
            except ma.ValidationError as exc:
                raise ma.ValidationError({"payload": exc.messages}) from exc
        for name in ("payload", "labels"):
            path = nul_path(data.get(name))
            if path is not None:
                raise ma.ValidationError(_nested(path, NUL_MESSAGE), name)

    @ma.post_load
    def _to_new_job(self, data: dict[str, Any], **_: Any) -> NewJob:
        job_type = REGISTRY[data["type"]]
        return NewJob(
            type=job_type.name,
            queue=job_type.queue,
            payload=data["payload"],
            priority=data.get("priority", job_type.priority),
            max_attempts=data.get("max_attempts", job_type.max_attempts),
            timeout_seconds=data.get("timeout_seconds", job_type.timeout_seconds),
            run_at=data.get("run_at"),
            delay_seconds=data.get("delay_seconds", 0.0),
            labels=data["labels"],
        )


class JobErrorSchema(ResponseSchema):
    """Why the latest attempt failed."""

    type = fields.String(required=True, metadata={"description": "Error class, e.g. `WorkerLost`."})
    title = fields.String(required=True)
    detail = fields.String(required=True)
    attempt = fields.Integer(strict=True, required=True, metadata={"description": "The attempt that failed."})


class JobProgressSchema(ResponseSchema):
    """Progress reported by the current or latest attempt."""

    percent = fields.Float(allow_none=True, validate=validate.Range(0, 100), metadata={"example": 50.0})
    message = fields.String(allow_none=True, metadata={"example": "slept 1 of 2 seconds"})


class JobSchema(ResponseSchema):
    """A job: what was asked for, and where it stands."""

    id = fields.UUID(required=True)
    tenant = fields.String(required=True, metadata={"description": "The tenant that submitted the job."})
    type = fields.String(required=True, metadata={"description": "The job type.", "example": "demo.sleep"})
    queue = fields.String(
        required=True, metadata={"description": "The type's queue (no prefix).", "example": "default"}
    )
    status = fields.Enum(JobStatus, by_value=True, required=True)
    payload = fields.Dict(
        required=True, metadata={"description": "The validated payload, with defaults filled in."}
    )
    priority = fields.Integer(strict=True, required=True, metadata={"description": "0-9, higher runs first."})
    attempts = fields.Integer(
        strict=True, required=True, metadata={"description": "Attempts started so far."}
    )
    max_attempts = fields.Integer(strict=True, required=True)
    timeout_seconds = fields.Integer(strict=True, required=True)
    run_at = UtcDateTime(
        required=True, metadata={"description": "When the next (or current) attempt may start."}
    )
    labels = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    created_at = UtcDateTime(required=True)
    started_at = UtcDateTime(
        allow_none=True, required=True, metadata={"description": "When the latest attempt started."}
    )
    finished_at = UtcDateTime(
        allow_none=True, required=True, metadata={"description": "When the job became final."}
    )
    updated_at = UtcDateTime(required=True)
    result = fields.Raw(
        allow_none=True,
        required=True,
        metadata={"description": "The handler's JSON result, once the job has succeeded."},
    )
    error = fields.Nested(JobErrorSchema, allow_none=True, required=True)
    progress = fields.Nested(JobProgressSchema, allow_none=True, required=True)
    cancel_requested_at = UtcDateTime(
        allow_none=True,
        required=True,
        metadata={"description": "When cancellation of the running job was requested; null if never."},
    )


class JobPageSchema(ResponseSchema):
    """One page of a job listing."""

    items = fields.List(fields.Nested(JobSchema), required=True)
    next_cursor = fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Pass as `cursor` to get the next page; null on the last page."},
    )


class Cursor(fields.Field[tuple[datetime, uuid.UUID]]):
    """An opaque keyset position: base64url of ``[created_at, id]`` of the last job of a page."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else encode_cursor(*value)

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> tuple[datetime, uuid.UUID]:
        at, job_id = decode_cursor(str(value), str)
        try:
            return at, uuid.UUID(job_id)
        except ValueError:
            raise ma.ValidationError(CURSOR_ERROR) from None


CURSOR_ERROR = "Not a cursor returned by this API."
T = TypeVar("T")
CursorId = TypeVar("CursorId", str, int)


def encode_cursor(at: datetime, row_id: uuid.UUID | int) -> str:
    """A keyset position, ``[time, id]`` of the last row of a page, as base64url JSON."""
    raw = json.dumps(
        [at.isoformat(), row_id if isinstance(row_id, int) else str(row_id)], separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(raw: str, id_type: type[CursorId]) -> tuple[datetime, CursorId]:
    """The position ``encode_cursor`` wrote; ValidationError for anything else."""
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode((raw + "=" * (-len(raw) % 4)).encode()))
        if not isinstance(at, str) or type(row_id) is not id_type:
            raise ValueError("cursor fields have the wrong types")
        position = datetime.fromisoformat(at)
        if position.tzinfo is None:
            raise ValueError("cursor time must carry a timezone")
        # In UTC, as the API writes it: Postgres refuses offsets beyond ±15:59 (a tampered +16:00 was
        # a 500), and a time near year 1 or 9999 can leave the range in UTC (OverflowError).
        return position.astimezone(UTC), row_id
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ma.ValidationError(CURSOR_ERROR) from None


def page(
    rows: Sequence[T], limit: int, position: Callable[[T], tuple[datetime, uuid.UUID | int]]
) -> dict[str, Any]:
    """A listing's page from ``limit + 1`` rows: the first ``limit``, and the cursor after them if more."""
    next_cursor = encode_cursor(*position(rows[limit - 1])) if len(rows) > limit else None
    return {"items": list(rows[:limit]), "next_cursor": next_cursor}


class JobListQuerySchema(QuerySchema):
    status = fields.List(
        fields.Enum(JobStatus, by_value=True),
        metadata={"description": "Repeat to match any of several.", "example": ["failed", "retrying"]},
    )
    type = fields.List(
        fields.String(validate=[validate.Length(1, 100), NO_NUL]),
        metadata={"description": "A job type; repeat to match any of several.", "example": ["demo.sleep"]},
    )
    label = fields.List(
        fields.String(
            validate=[
                validate.Regexp(r"[^:\x00]+:[^\x00]*\Z", error="Use label=key:value (no NUL characters)."),
                lambda value: LABEL_KEY(value.split(":", 1)[0]) is not None,
            ],
            # What the two checks enforce, in the document (a key as in LABEL_KEY, then any value).
            metadata={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}:[^\x00]*$"},
        ),
        metadata={
            "description": "`key:value`; repeat to require several labels.",
            "example": ["team:billing"],
        },
    )
    created_after = UtcDateTime(
        metadata={"description": "Created at or after this time.", "example": "2026-11-29T00:00:00Z"}
    )
    created_before = UtcDateTime(metadata={"description": "Created before this time."})
    tenant = fields.String(
        validate=TENANT,
        metadata={"description": "Admin keys only: list this tenant's jobs (default: every tenant's)."},
    )
    limit = fields.Integer(
        load_default=50, validate=validate.Range(1, 200), metadata={"description": "Page size."}
    )
    cursor = Cursor(metadata={"description": "`next_cursor` of the previous page."})


def payload_size_error(payload: dict[str, Any], limit: int) -> str | None:
    """Why a payload is too large (as compact JSON) for ``CONVEYOR_MAX_PAYLOAD_BYTES``; None if it fits."""
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    return f"The payload is {size} bytes; at most {limit} are allowed." if size > limit else None
