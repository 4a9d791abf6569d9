"""Job handlers: one per registered type, and demo.sleep's behaviour (worker_service/handlers)."""

from __future__ import annotations

import sys
import time
import types
import uuid
from typing import Any

import pytest

from shared.job_types import REGISTRY, JobType
from worker_service.context import JobContext
from worker_service.errors import FatalJobError
from worker_service.handlers import MissingHandler, load_handler
from worker_service.handlers.demo_sleep import DemoFailure
from worker_service.handlers.demo_sleep import handle as demo_sleep

Progress = list[tuple[float | None, str | None]]


def context(attempt: int = 1, max_attempts: int = 3) -> tuple[JobContext, Progress]:
    reported: Progress = []
    ctx = JobContext(
        job_id=uuid.uuid4(),
        job_type="demo.sleep",
        attempt=attempt,
        max_attempts=max_attempts,
        labels={},
        deadline=time.monotonic() + 60,
        _report=lambda percent, message: reported.append((percent, message)),
    )
    return ctx, reported


def payload(**given: Any) -> dict[str, Any]:
    """A demo.sleep payload as the worker gets it: validated, with defaults filled in."""
    return REGISTRY["demo.sleep"].load_payload(given)


# --- loading handlers -------------------------------------------------------------------------------


@pytest.mark.parametrize("job_type", REGISTRY.values(), ids=list(REGISTRY))
def test_every_registered_type_has_a_handler(job_type: JobType) -> None:
    assert callable(load_handler(job_type))


def test_demo_sleep_handler_is_the_demo_sleep_module() -> None:
    assert load_handler(REGISTRY["demo.sleep"]) is demo_sleep


def test_type_without_a_handler_module_raises_missing_handler_naming_the_file() -> None:
    with pytest.raises(MissingHandler, match=r"create worker_service/handlers/no_such_type\.py"):
        load_handler(JobType(name="no.such.type", description=""))


def test_handler_module_without_handle_raises_missing_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("worker_service.handlers.handleless")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(MissingHandler, match="must define handle"):
        load_handler(JobType(name="handleless", description=""))


def test_broken_import_inside_a_handler_is_not_reported_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'reportlab'", name="reportlab")

    monkeypatch.setattr("worker_service.handlers.importlib.import_module", import_module)
    with pytest.raises(ModuleNotFoundError) as caught:
        load_handler(REGISTRY["noop"])
    assert not isinstance(caught.value, MissingHandler)
    assert caught.value.name == "reportlab"


def test_noop_returns_nothing() -> None:
    ctx, reported = context()
    assert load_handler(REGISTRY["noop"])({}, ctx) is None
    assert reported == []


# --- demo.sleep -------------------------------------------------------------------------------------


def test_demo_sleep_sleeps_then_returns_what_it_did() -> None:
    ctx, _ = context(attempt=2)
    started = time.monotonic()
    result = demo_sleep(payload(seconds=0.2), ctx)
    assert time.monotonic() - started >= 0.2
    assert result == {"slept_seconds": 0.2, "attempt": 2}


def test_demo_sleep_reports_progress_from_start_to_done() -> None:
    ctx, reported = context()
    demo_sleep(payload(seconds=0.2), ctx)
    assert reported[0][0] is not None
    assert reported[0][0] < 50
    assert reported[0][1] == "slept 0 of 0.2 s"
    assert reported[-1] == (100, "done")
    assert all(0 <= percent <= 100 for percent, _ in reported if percent is not None)


def test_demo_sleep_of_zero_seconds_succeeds_at_once() -> None:
    ctx, reported = context()
    assert demo_sleep(payload(seconds=0), ctx) == {"slept_seconds": 0.0, "attempt": 1}
    assert reported == [(100, "done")]


@pytest.mark.parametrize("attempt", [1, 2])
def test_demo_sleep_fails_its_first_attempts_with_a_retryable_error(attempt: int) -> None:
    ctx, reported = context(attempt=attempt)
    with pytest.raises(DemoFailure, match=f"failing attempt {attempt} of the first 2") as caught:
        demo_sleep(payload(seconds=0, fail_attempts=2), ctx)
    assert not isinstance(caught.value, FatalJobError)
    assert (100, "done") not in reported


def test_demo_sleep_succeeds_once_its_failing_attempts_are_used_up() -> None:
    ctx, _ = context(attempt=3)
    assert demo_sleep(payload(seconds=0, fail_attempts=2), ctx) == {"slept_seconds": 0.0, "attempt": 3}


def test_demo_sleep_fails_fatally_when_asked() -> None:
    ctx, _ = context(attempt=1)
    with pytest.raises(FatalJobError, match="failing attempt 1"):
        demo_sleep(payload(seconds=0, fail_attempts=1, fatal=True), ctx)


def test_fatal_demo_sleep_without_failing_attempts_succeeds() -> None:
    ctx, _ = context(attempt=1)
    assert demo_sleep(payload(seconds=0, fatal=True), ctx) == {"slept_seconds": 0.0, "attempt": 1}
