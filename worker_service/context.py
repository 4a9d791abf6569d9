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

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def report_progress(self, percent: float | None = None, message: str | None = None) -> None:
        """Record progress, shown by ``GET /v1/jobs/{id}``. Best effort: never raises for a database
        hiccup, so a handler does not fail because progress could not be saved."""
        if percent is not None and not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        self._report(percent, message)
