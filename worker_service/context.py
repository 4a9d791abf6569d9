"""What a handler receives besides its payload."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobContext:
    job_id: uuid.UUID
    job_type: str
    #: 1 for the first attempt.
    attempt: int
    max_attempts: int
    labels: dict[str, str]
    #: time.monotonic() value at which the attempt is interrupted with JobTimeout.
    deadline: float
    _report: Callable[[float | None, str | None], None] = field(repr=False)
    _cancel_requested: Callable[[], bool] = field(repr=False, default=lambda: False)

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def cancel_requested(self) -> bool:
        """True once someone asked to cancel this job (POST /v1/jobs/{id}/cancel).

        Learnt at each lease renewal and each ``report_progress`` call, so it may lag by up to a third
        of ``CONVEYOR_JOB_LEASE_SECONDS``. A handler that honours it raises ``JobCancelled``; one that
        ignores it simply finishes, and the job gets its normal outcome.
        """
        return self._cancel_requested()

    def report_progress(self, percent: float | None = None, message: str | None = None) -> None:
        """Record progress, shown by ``GET /v1/jobs/{id}``. Best effort: never raises for a database
        hiccup, so a handler does not fail because progress could not be saved."""
        if percent is not None and not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        self._report(percent, message)
