"""``demo.sleep``: sleeps with progress reports, and can fail its first attempts. For demos and tests."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from shared.settings import get_settings
from worker_service.context import JobContext
from worker_service.errors import FatalJobError, JobCancelled

#: Sleep in short steps so a timeout or a cancel request interrupts promptly.
STEP_SECONDS = 0.1
PROGRESS_EVERY_SECONDS = 1.0


class DemoFailure(Exception):
    """The retryable failure demo.sleep raises on purpose."""


def handle(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    if payload.get("crash"):
        _crash()
    seconds: float = payload["seconds"]
    started = time.monotonic()
    next_report = 0.0
    while (elapsed := time.monotonic() - started) < seconds:
        if ctx.cancel_requested:
            raise JobCancelled(f"stopped after {elapsed:.1f} of {seconds:g} s, on request")
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


def _crash() -> None:
    if not get_settings().demo_crash_enabled:
        raise FatalJobError("crash: true needs the worker to run with CONVEYOR_DEMO_CRASH_ENABLED=true")
    os.kill(os.getpid(), signal.SIGKILL)
