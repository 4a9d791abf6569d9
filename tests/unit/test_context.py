"""What a handler receives besides its payload (worker_service/context.py)."""

from __future__ import annotations

import time
import uuid

import pytest

from worker_service.context import JobContext

Progress = list[tuple[float | None, str | None]]


def context(attempt: int = 1, max_attempts: int = 3, deadline_in: float = 60) -> tuple[JobContext, Progress]:
    reported: Progress = []
    ctx = JobContext(
        job_id=uuid.uuid4(),
        job_type="noop",
        attempt=attempt,
        max_attempts=max_attempts,
        labels={"team": "billing"},
        deadline=time.monotonic() + deadline_in,
        _report=lambda percent, message: reported.append((percent, message)),
    )
    return ctx, reported


@pytest.mark.parametrize(("attempt", "last"), [(1, False), (2, False), (3, True)])
def test_last_attempt_is_the_one_that_uses_up_max_attempts(attempt: int, last: bool) -> None:
    assert context(attempt=attempt, max_attempts=3)[0].is_last_attempt is last


def test_seconds_left_counts_down_to_the_deadline() -> None:
    ctx, _ = context(deadline_in=30)
    assert 29 < ctx.seconds_left() <= 30


def test_seconds_left_is_zero_past_the_deadline() -> None:
    ctx, _ = context(deadline_in=-5)
    assert ctx.seconds_left() == 0.0


def test_progress_is_passed_to_the_reporter() -> None:
    ctx, reported = context()
    ctx.report_progress(40, "downloading")
    ctx.report_progress(message="still going")
    ctx.report_progress(0)
    ctx.report_progress(100)
    assert reported == [(40, "downloading"), (None, "still going"), (0, None), (100, None)]


@pytest.mark.parametrize("percent", [-1, 100.5])
def test_progress_outside_zero_to_hundred_percent_is_refused(percent: float) -> None:
    ctx, reported = context()
    with pytest.raises(ValueError, match="between 0 and 100"):
        ctx.report_progress(percent)
    assert reported == []


def test_context_repr_does_not_show_the_reporter() -> None:
    ctx, _ = context()
    assert "_report" not in repr(ctx)
