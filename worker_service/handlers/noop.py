"""``noop``: does nothing. The cheapest possible job, for smoke tests and benchmarks."""

from __future__ import annotations

from typing import Any

from worker_service.context import JobContext


def handle(payload: dict[str, Any], ctx: JobContext) -> None:
    return None
