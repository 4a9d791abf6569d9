"""The job type registry and payload validation (shared/job_types.py)."""

from __future__ import annotations

import marshmallow as ma
import pytest

from shared.errors import UnknownJobType
from shared.job_types import (
    DEFAULT_QUEUE,
    MAX_ATTEMPTS_RANGE,
    PRIORITY_RANGE,
    REGISTRY,
    TIMEOUT_SECONDS_RANGE,
    JobType,
    _registry,
    get_job_type,
)

DEMO_SLEEP = REGISTRY["demo.sleep"]
NOOP = REGISTRY["noop"]


def test_registry_holds_noop_and_demo_sleep() -> None:
    assert set(REGISTRY) == {"noop", "demo.sleep"}


def test_registry_keys_are_the_types_own_names() -> None:
    assert all(name == job_type.name for name, job_type in REGISTRY.items())


@pytest.mark.parametrize("job_type", REGISTRY.values(), ids=list(REGISTRY))
def test_type_defaults_are_within_the_submission_bounds(job_type: JobType) -> None:
    assert PRIORITY_RANGE[0] <= job_type.priority <= PRIORITY_RANGE[1]
    assert MAX_ATTEMPTS_RANGE[0] <= job_type.max_attempts <= MAX_ATTEMPTS_RANGE[1]
    assert TIMEOUT_SECONDS_RANGE[0] <= job_type.timeout_seconds <= TIMEOUT_SECONDS_RANGE[1]
    assert job_type.description


def test_types_use_the_default_queue_unless_they_name_one() -> None:
    assert JobType(name="x", description="x").queue == DEFAULT_QUEUE == "default"


def test_demo_sleep_payload_gets_its_defaults() -> None:
    assert DEMO_SLEEP.load_payload({}) == {"seconds": 1.0, "fail_attempts": 0, "fatal": False, "crash": False}


def test_demo_sleep_payload_keeps_given_values_and_fills_the_rest() -> None:
    assert DEMO_SLEEP.load_payload({"seconds": 2, "fatal": True}) == {
        "seconds": 2.0,
        "fail_attempts": 0,
        "fatal": True,
        "crash": False,
    }


def test_loaded_seconds_is_a_float_even_when_given_as_an_integer() -> None:
    assert type(DEMO_SLEEP.load_payload({"seconds": 2})["seconds"]) is float


def test_loading_a_payload_leaves_the_input_untouched() -> None:
    given = {"seconds": 0.5}
    DEMO_SLEEP.load_payload(given)
    assert given == {"seconds": 0.5}


def test_unknown_payload_field_is_rejected() -> None:
    with pytest.raises(ma.ValidationError) as caught:
        DEMO_SLEEP.load_payload({"seconds": 1, "secnods": 2})
    assert set(caught.value.messages) == {"secnods"}


def test_noop_accepts_only_an_empty_payload() -> None:
    assert NOOP.load_payload({}) == {}
    with pytest.raises(ma.ValidationError):
        NOOP.load_payload({"anything": 1})


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"seconds": -0.1}, "seconds"),
        ({"seconds": 3600.5}, "seconds"),
        ({"seconds": "soon"}, "seconds"),
        ({"fail_attempts": -1}, "fail_attempts"),
        ({"fail_attempts": 101}, "fail_attempts"),
        ({"fail_attempts": "many"}, "fail_attempts"),
        ({"fatal": "maybe"}, "fatal"),
    ],
)
def test_out_of_range_or_mistyped_payload_field_is_rejected(payload: dict[str, object], field: str) -> None:
    with pytest.raises(ma.ValidationError) as caught:
        DEMO_SLEEP.load_payload(payload)
    assert set(caught.value.messages) == {field}


def test_payload_range_bounds_are_inclusive() -> None:
    loaded = DEMO_SLEEP.load_payload({"seconds": 3600, "fail_attempts": 100})
    assert (loaded["seconds"], loaded["fail_attempts"]) == (3600.0, 100)
    assert DEMO_SLEEP.load_payload({"seconds": 0})["seconds"] == 0.0


def test_payload_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(ma.ValidationError):
        DEMO_SLEEP.load_payload([1, 2])


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("noop", "worker_service.handlers.noop"),
        ("demo.sleep", "worker_service.handlers.demo_sleep"),
        ("reports.monthly.pdf", "worker_service.handlers.reports_monthly_pdf"),
    ],
)
def test_handler_module_is_named_after_the_type_with_dots_as_underscores(name: str, module: str) -> None:
    assert JobType(name=name, description="").handler_module == module


def test_get_job_type_returns_the_registered_type() -> None:
    assert get_job_type("demo.sleep") is DEMO_SLEEP


def test_get_job_type_of_an_unknown_name_raises_unknown_job_type() -> None:
    with pytest.raises(UnknownJobType, match=r"demo\.sleeep"):
        get_job_type("demo.sleeep")


def test_unknown_job_type_is_also_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        get_job_type("nope")


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'twice' is registered twice"):
        _registry(JobType(name="twice", description="a"), JobType(name="twice", description="b"))


def test_registry_of_distinct_names_keeps_every_type() -> None:
    one, two = JobType(name="one", description=""), JobType(name="two", description="")
    assert _registry(one, two) == {"one": one, "two": two}
