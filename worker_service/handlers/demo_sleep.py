"""``demo.sleep``: sleeps with progress reports, and can fail its first attempts. For demos and tests."""

from __future__ import annotations

import time
from typing import Any

from worker_service.context import JobContext
from worker_service.errors import FatalJobError

#: Sleep in short steps so a timeout interrupts promptly (it cannot interrupt one long sleep).
STEP_SECONDS = 0.1
PROGRESS_EVERY_SECONDS = 1.0


class DemoFailure(Exception):
    """The retryable failure demo.sleep raises on purpose."""


def handle(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    seconds: float = payload["seconds"]
    started = time.monotonic()
    next_report = 0.0
    while (elapsed := time.monotonic() - started) < seconds:
        if elapsed >= next_report:
            ctx.report_progress(100 * elapsed / seconds, f"slept {elapsed:.0f} of {seconds:g} s")
            next_report += PROGRESS_EVERY_SECONDS
        time.sleep(min(STEP_SECONDS, seconds - elapsed))
    if ctx.attempt <= payload["fail_attempts"]:
        message = f"failing attempt {ctx.attempt} of the first {payload['fail_attempts']} on purpose"
        if payload["fatal"]:
            raise FatalJobError(message)
        raise DemoFailure(message)
    ctx.report_progress(100, "done")
    return {"slept_seconds": seconds, "attempt": ctx.attempt}
