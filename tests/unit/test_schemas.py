"""HTTP schemas: job submissions and list queries (api_service/schemas.py)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import marshmallow as ma
import pytest

from api_service.schemas import MAX_LABELS, JobCreateSchema, JobListQuerySchema, encode_cursor
from shared.jobs import JobStatus, NewJob


def submit(body: Any) -> NewJob:
    """Load a submission the way the API receives it: as JSON text."""
    loaded: NewJob = JobCreateSchema().loads(json.dumps(body))
    return loaded


def errors_of(body: Any) -> dict[str, Any]:
    with pytest.raises(ma.ValidationError) as caught:
        submit(body)
    messages: dict[str, Any] = caught.value.messages  # type: ignore[assignment]
    return messages


def cursor_of(raw: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")


# --- submissions ------------------------------------------------------------------------------------


def test_minimal_submission_gets_the_types_defaults() -> None:
    assert submit({"type": "demo.sleep"}) == NewJob(
        type="demo.sleep",
        queue="default",
        payload={"seconds": 1.0, "fail_attempts": 0, "fatal": False, "crash": False},
        priority=5,
        max_attempts=3,
        timeout_seconds=3600,
        run_at=None,
        delay_seconds=0.0,
        labels={},
    )


def test_given_options_override_the_types_defaults() -> None:
    job = submit(
        {
            "type": "noop",
            "priority": 9,
            "max_attempts": 1,
            "timeout_seconds": 5,
            "delay_seconds": 30,
            "labels": {"team": "billing"},
        }
    )
    assert (job.priority, job.max_attempts, job.timeout_seconds) == (9, 1, 5)
    assert job.delay_seconds == 30.0
    assert job.labels == {"team": "billing"}


def test_payload_is_validated_and_completed_by_its_type() -> None:
    assert submit({"type": "demo.sleep", "payload": {"seconds": 2}}).payload == {
        "seconds": 2.0,
        "fail_attempts": 0,
        "fatal": False,
        "crash": False,
    }


def test_payload_errors_are_nested_under_payload() -> None:
    messages = errors_of({"type": "demo.sleep", "payload": {"seconds": -1, "extra": True}})
    assert set(messages) == {"payload"}
    assert set(messages["payload"]) == {"seconds", "extra"}


def test_missing_type_is_an_error_on_type() -> None:
    assert set(errors_of({"payload": {}})) == {"type"}


def test_unknown_type_error_lists_the_known_types() -> None:
    messages = errors_of({"type": "demo.sleeep"})
    assert set(messages) == {"type"}
    assert messages["type"] == ["Unknown job type 'demo.sleeep'. Known types: demo.sleep, noop."]


def test_unknown_top_level_field_is_rejected() -> None:
    assert set(errors_of({"type": "noop", "prio": 3})) == {"prio"}


def test_payload_that_is_not_an_object_is_rejected() -> None:
    assert "payload" in errors_of({"type": "noop", "payload": [1]})


def test_run_at_with_a_timezone_is_kept() -> None:
    year = datetime.now(UTC).year + 1
    job = submit({"type": "noop", "run_at": f"{year}-01-02T03:04:05+02:00"})
    assert job.run_at == datetime(year, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert job.run_at is not None
    assert job.run_at.utcoffset() == timedelta(0), "normalised to UTC"


def test_offsets_postgres_cannot_store_are_normalised_to_utc() -> None:
    year = datetime.now(UTC).year + 1
    job = submit({"type": "noop", "run_at": f"{year}-01-02T03:04:05-23:31"})
    assert job.run_at == datetime(year, 1, 3, 2, 35, 5, tzinfo=UTC)


def test_run_at_more_than_a_year_ahead_is_rejected() -> None:
    too_far = (datetime.now(UTC) + timedelta(days=366)).isoformat()
    assert set(errors_of({"type": "noop", "run_at": too_far})) == {"run_at"}


def test_run_at_without_a_timezone_is_rejected() -> None:
    assert set(errors_of({"type": "noop", "run_at": "2030-01-02T03:04:05"})) == {"run_at"}


def test_delay_seconds_together_with_run_at_is_an_error() -> None:
    messages = errors_of({"type": "noop", "delay_seconds": 5, "run_at": "2030-01-01T00:00:00Z"})
    assert messages == {"delay_seconds": ["Give either delay_seconds or run_at, not both."]}


@pytest.mark.parametrize("priority", [0, 9])
def test_priority_bounds_are_accepted(priority: int) -> None:
    assert submit({"type": "noop", "priority": priority}).priority == priority


@pytest.mark.parametrize("priority", [-1, 10])
def test_priority_outside_zero_to_nine_is_rejected(priority: int) -> None:
    assert set(errors_of({"type": "noop", "priority": priority})) == {"priority"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("max_attempts", 101), ("timeout_seconds", 0), ("timeout_seconds", 86_401)],
)
def test_attempts_and_timeout_outside_their_ranges_are_rejected(field: str, value: int) -> None:
    assert set(errors_of({"type": "noop", field: value})) == {field}


def test_negative_delay_is_rejected() -> None:
    assert set(errors_of({"type": "noop", "delay_seconds": -1})) == {"delay_seconds"}


@pytest.mark.parametrize("key", ["team", "a", "app.example.com/name", "x-y_z", "9lives", "k" * 63])
def test_valid_label_keys_are_accepted(key: str) -> None:
    assert submit({"type": "noop", "labels": {key: "v"}}).labels == {key: "v"}


@pytest.mark.parametrize(
    "key",
    ["", "-team", ".team", "_team", "/team", "k" * 64, "te am", "tëam", "team:x", "team\n"],
)
def test_invalid_label_keys_are_rejected(key: str) -> None:
    messages = errors_of({"type": "noop", "labels": {key: "v"}})
    assert set(messages) == {"labels"}


def test_label_value_of_256_characters_is_accepted_and_257_rejected() -> None:
    assert submit({"type": "noop", "labels": {"k": "v" * 256}}).labels == {"k": "v" * 256}
    assert set(errors_of({"type": "noop", "labels": {"k": "v" * 257}})) == {"labels"}


def test_label_values_must_be_strings() -> None:
    assert set(errors_of({"type": "noop", "labels": {"k": 1}})) == {"labels"}


def test_too_many_labels_are_rejected() -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert submit({"type": "noop", "labels": labels}).labels == labels
    assert set(errors_of({"type": "noop", "labels": {**labels, "one-more": "v"}})) == {"labels"}


# --- list queries and cursors -----------------------------------------------------------------------


def test_cursor_round_trips_to_created_at_and_id() -> None:
    created_at = datetime(2025, 11, 29, 15, 7, 3, 123456, tzinfo=UTC)
    job_id = uuid.uuid4()
    query = JobListQuerySchema().load({"cursor": encode_cursor(created_at, job_id)})
    assert query["cursor"] == (created_at, job_id)
    assert query["cursor"][0].utcoffset() == timedelta(0)


def test_cursor_keeps_the_instant_of_a_non_utc_offset_in_utc() -> None:
    """Postgres refuses offsets beyond +-15:59; in UTC the same instant is always fine."""
    created_at = datetime(2025, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5)))
    job_id = uuid.uuid4()
    loaded = JobListQuerySchema().load({"cursor": encode_cursor(created_at, job_id)})["cursor"]
    assert loaded == (created_at, job_id)
    assert loaded[0].utcoffset() == timedelta(0)


def test_cursor_is_url_safe_without_padding() -> None:
    cursor = encode_cursor(datetime(2025, 1, 1, tzinfo=UTC), uuid.uuid4())
    assert "=" not in cursor
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!!",
        "x",
        "",
        cursor_of(None),
        cursor_of({"a": 1}),
        cursor_of(["yesterday", str(uuid.uuid4())]),
        cursor_of(["2025-01-01T00:00:00+00:00", "not-a-uuid"]),
        cursor_of(["2025-01-01T00:00:00+00:00", str(uuid.uuid4()), "extra"]),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    ],
)
def test_garbage_cursor_is_a_validation_error(cursor: str) -> None:
    with pytest.raises(ma.ValidationError) as caught:
        JobListQuerySchema().load({"cursor": cursor})
    assert caught.value.messages == {"cursor": ["Not a cursor returned by this API."]}


@pytest.mark.parametrize(
    "raw",
    [["2025-01-01T00:00:00+00:00", 5], ["2025-01-01T00:00:00+00:00", {"id": 1}], [5, 5]],
)
def test_crafted_cursor_with_a_non_string_id_is_a_validation_error(raw: list[object]) -> None:
    with pytest.raises(ma.ValidationError):
        JobListQuerySchema().load({"cursor": cursor_of(raw)})


def test_list_query_defaults_to_fifty_items() -> None:
    assert JobListQuerySchema().load({}) == {"limit": 50}


@pytest.mark.parametrize("limit", [0, 201])
def test_list_limit_outside_one_to_two_hundred_is_rejected(limit: int) -> None:
    with pytest.raises(ma.ValidationError) as caught:
        JobListQuerySchema().load({"limit": limit})
    assert set(caught.value.messages) == {"limit"}


def test_list_query_parses_statuses_and_labels() -> None:
    query = JobListQuerySchema().load({"status": ["queued", "failed"], "label": ["team:billing"]})
    assert query["status"] == [JobStatus.QUEUED, JobStatus.FAILED]
    assert query["label"] == ["team:billing"]


def test_list_query_rejects_unknown_status_and_label_without_colon() -> None:
    with pytest.raises(ma.ValidationError) as caught:
        JobListQuerySchema().load({"status": ["done"], "label": ["team"]})
    assert set(caught.value.messages) == {"status", "label"}


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-01T09:00:00Z",
        "2026-01-01t09:00:00z",
        "2026-01-01T09:00:00.5+01:00",
        "2026-01-01T09:00:00-15:59",
    ],
)
def test_times_are_rfc_3339_date_times(value: str) -> None:
    loaded = JobListQuerySchema().load({"created_after": value})["created_after"]
    assert loaded.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    ["2026-01-01 09:00:00Z", "2026-01-01T09:00Z", "20260101T090000Z", "2026-W01-1T09:00:00Z",
     "2026-01-01T09:00:00,5Z", "2026-01-01T09:00:00+0100", "2026-01-01T09:00:00", "2026-12-31T23:59:60Z",
     "٢٠٢٦-01-01T09:00:00Z"],
)  # fmt: skip
def test_other_iso_8601_forms_are_refused(value: str) -> None:
    """The document says `format: date-time` (RFC 3339); marshmallow's parser took these."""
    with pytest.raises(ma.ValidationError) as refused:
        JobListQuerySchema().load({"created_after": value})
    assert "created_after" in refused.value.messages
