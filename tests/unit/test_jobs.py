"""The job state machine, retry timing and recorded errors (shared/jobs.py)."""

from __future__ import annotations

import itertools
import random

import pytest

from shared.errors import IllegalTransition
from shared.jobs import (
    CANCELLABLE_AT_ONCE,
    INITIAL_STATUS,
    RETRYABLE_BY_OPERATOR,
    TRANSITIONS,
    JobError,
    JobStatus,
    can_transition,
    check_transition,
    is_terminal,
    retry_delay_seconds,
    sources_of,
    transition_rows,
)

Q, RUN, RETRY, OK, FAIL, CANCEL = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.RETRYING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)

#: The status model drawn in shared/jobs.py's docstring, written out independently of TRANSITIONS.
DOCUMENTED = {
    (Q, RUN), (RUN, OK), (RUN, RETRY), (RUN, FAIL), (RETRY, RUN),  # running a job
    (Q, CANCEL), (RETRY, CANCEL), (RUN, CANCEL),  # cancelling it
    (FAIL, Q), (CANCEL, Q),  # an operator's retry or dead-letter replay
}  # fmt: skip
ALL_PAIRS = list(itertools.product(JobStatus, repeat=2))


class MaxJitter(random.Random):
    """Always draws the top of the jitter range, so the undiscounted delay can be checked exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


class MinJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


# --- transitions ------------------------------------------------------------------------------------


def test_transitions_are_exactly_the_documented_status_model() -> None:
    assert set(TRANSITIONS) == DOCUMENTED


@pytest.mark.parametrize(("current", "new"), sorted(DOCUMENTED))
def test_documented_transition_is_allowed(current: JobStatus, new: JobStatus) -> None:
    assert can_transition(current, new)
    check_transition(current, new)  # does not raise


@pytest.mark.parametrize(("current", "new"), [p for p in ALL_PAIRS if p not in DOCUMENTED])
def test_undocumented_transition_is_rejected(current: JobStatus, new: JobStatus) -> None:
    assert not can_transition(current, new)
    with pytest.raises(IllegalTransition, match=f"from {current} to {new}"):
        check_transition(current, new)


def test_new_jobs_start_queued() -> None:
    assert INITIAL_STATUS is JobStatus.QUEUED


@pytest.mark.parametrize("status", [OK, FAIL, CANCEL])
def test_finished_job_only_moves_again_when_an_operator_requeues_it(status: JobStatus) -> None:
    assert is_terminal(status)
    assert [new for new in JobStatus if can_transition(status, new)] == ([] if status is OK else [Q])


def test_operator_actions_follow_the_transitions() -> None:
    assert set(RETRYABLE_BY_OPERATOR) == set(sources_of(Q))
    assert set(CANCELLABLE_AT_ONCE) | {RUN} == set(sources_of(CANCEL))


@pytest.mark.parametrize("status", [Q, RUN, RETRY])
def test_unfinished_statuses_are_not_terminal(status: JobStatus) -> None:
    assert not is_terminal(status)


def test_running_is_reached_from_queued_and_retrying_in_declaration_order() -> None:
    assert sources_of(RUN) == (Q, RETRY)


def test_outcomes_are_reached_only_from_running() -> None:
    assert sources_of(OK) == (RUN,)
    assert sources_of(RETRY) == (RUN,)
    assert sources_of(FAIL) == (RUN,)


def test_only_failed_and_cancelled_jobs_lead_back_to_queued() -> None:
    assert sources_of(Q) == (FAIL, CANCEL)


def test_transition_rows_include_the_initial_status_as_a_row_from_nothing() -> None:
    rows = list(transition_rows())
    assert ("", "queued") in rows
    assert set(rows) == {("", "queued")} | {(src.value, dst.value) for src, dst in TRANSITIONS}
    assert len(rows) == len(TRANSITIONS) + 1


def test_transition_rows_are_sorted_plain_strings() -> None:
    rows = list(transition_rows())
    assert rows == sorted(rows)
    # Plain str, not JobStatus: they are written to the database as they are.
    assert all(type(value) is str for row in rows for value in row)


# --- retry timing -----------------------------------------------------------------------------------


def test_retry_delay_doubles_with_each_attempt() -> None:
    delays = [retry_delay_seconds(n, base=2.0, cap=1000.0, rng=MaxJitter()) for n in range(1, 6)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0]


def test_retry_delay_never_exceeds_the_cap() -> None:
    delays = [retry_delay_seconds(n, base=2.0, cap=10.0, rng=MaxJitter()) for n in range(1, 10)]
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]


def test_retry_delay_jitter_takes_off_at_most_half() -> None:
    assert retry_delay_seconds(3, base=2.0, cap=1000.0, rng=MinJitter()) == 4.0
    rng = random.Random(1234)
    for attempt in range(1, 20):
        undiscounted = min(60.0, 0.5 * 2 ** (attempt - 1))
        delay = retry_delay_seconds(attempt, base=0.5, cap=60.0, rng=rng)
        assert 0.5 * undiscounted <= delay <= undiscounted


def test_retry_delays_spread_out_jobs_that_failed_together() -> None:
    rng = random.Random(42)
    delays = {retry_delay_seconds(1, base=1.0, cap=10.0, rng=rng) for _ in range(50)}
    assert len(delays) > 40
    assert min(delays) < 0.6
    assert max(delays) > 0.9


def test_retry_delay_is_reproducible_with_a_seeded_rng() -> None:
    first = [retry_delay_seconds(n, base=1.0, cap=30.0, rng=random.Random(7)) for n in range(1, 8)]
    second = [retry_delay_seconds(n, base=1.0, cap=30.0, rng=random.Random(7)) for n in range(1, 8)]
    assert first == second


def test_retry_delay_of_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    assert retry_delay_seconds(10_000, base=2.0, cap=600.0, rng=MaxJitter()) == 600.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_retry_delay_rejects_attempts_below_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="1-based"):
        retry_delay_seconds(attempt, base=1.0, cap=10.0, rng=random.Random(0))


# --- recorded errors --------------------------------------------------------------------------------


def test_job_error_as_dict_holds_every_field() -> None:
    error = JobError(type="ValueError", title="The handler raised an error", detail="bad", attempt=2)
    assert error.as_dict() == {
        "type": "ValueError",
        "title": "The handler raised an error",
        "detail": "bad",
        "attempt": 2,
    }


def test_job_error_detail_is_truncated_to_max_detail() -> None:
    long_detail = "x" * (JobError.MAX_DETAIL - 1) + "yz" + "tail" * 1000
    as_dict = JobError(type="E", title="t", detail=long_detail, attempt=1).as_dict()
    assert len(as_dict["detail"]) == JobError.MAX_DETAIL
    assert as_dict["detail"].endswith("xy")


def test_job_error_detail_of_exactly_max_detail_is_kept_whole() -> None:
    detail = "d" * JobError.MAX_DETAIL
    assert JobError(type="E", title="t", detail=detail, attempt=1).as_dict()["detail"] == detail
