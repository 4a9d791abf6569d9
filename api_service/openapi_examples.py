"""Examples of requests and responses for the OpenAPI document (a job, a page, a dead letter...)."""

from __future__ import annotations

from typing import Any

JOB_EXAMPLE: dict[str, Any] = {
    "id": "2d7b52cc-f075-46b7-b01e-22a8f8c214e4",
    "tenant": "acme",
    "type": "demo.sleep",
    "queue": "default",
    "status": "succeeded",
    "payload": {"seconds": 2.0, "fail_attempts": 0, "fatal": False, "crash": False},
    "priority": 7,
    "attempts": 1,
    "max_attempts": 3,
    "timeout_seconds": 3600,
    "run_at": "2026-11-29T15:22:31.478194+00:00",
    "labels": {"team": "billing"},
    "created_at": "2026-11-29T15:22:31.478194+00:00",
    "started_at": "2026-11-29T15:22:31.512003+00:00",
    "finished_at": "2026-11-29T15:22:33.530871+00:00",
    "updated_at": "2026-11-29T15:22:33.530871+00:00",
    "result": {"slept_seconds": 2.0},
    "error": None,
    "progress": {"percent": 100.0, "message": "done"},
    "cancel_requested_at": None,
}
QUEUED_JOB_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE,
    "status": "queued",
    "attempts": 0,
    "started_at": None,
    "finished_at": None,
    "updated_at": JOB_EXAMPLE["created_at"],
    "result": None,
    "progress": None,
}
#: An opaque page position, as ``next_cursor`` gives it.
CURSOR_EXAMPLE = (
    "WyIyMDI2LTExLTI5VDE1OjIxOjU5LjI1MTUzMiswMDowMCIsIjg1ZGY4ZWM1LWNiOTYtNDVjYi1iM2M3LWVjMTc0ZjUzNmQwZSJd"
)
SUBMIT_EXAMPLES = {
    "demo-sleep": {
        "summary": "A demo job that sleeps 2 seconds",
        "value": {
            "type": "demo.sleep",
            "payload": {"seconds": 2},
            "priority": 7,
            "labels": {"team": "billing"},
        },
    },
    "noop-delayed": {
        "summary": "A job that does nothing, in a minute",
        "value": {"type": "noop", "delay_seconds": 60},
    },
    "scheduled": {
        "summary": "A job at a fixed time, with its own retry policy",
        "value": {"type": "noop", "run_at": "2027-01-01T09:00:00Z", "max_attempts": 5, "timeout_seconds": 30},
    },
}
DEAD_LETTER_EXAMPLE: dict[str, Any] = {
    "id": 5,
    "job_id": "eaaafd81-c66e-411d-9bd7-0ebbf18a17d9",
    "tenant": "acme",
    "queue": "default",
    "job_type": "demo.sleep",
    "error_type": "worker_service.handlers.demo_sleep.DemoFailure",
    "reason": "The handler raised an error: failing attempt 3 of the first 5 on purpose",
    "attempts": 3,
    "error": {
        "type": "worker_service.handlers.demo_sleep.DemoFailure",
        "title": "The handler raised an error",
        "detail": "failing attempt 3 of the first 5 on purpose",
        "attempt": 3,
    },
    "message": None,
    "dead_at": "2026-11-29T15:56:10.334635+00:00",
}
SELECTION_EXAMPLES = {
    "by-type": {
        "summary": "One job type's dead letters since a date",
        "value": {"type": ["demo.sleep"], "dead_after": "2026-11-29T00:00:00Z"},
    },
    "by-error": {"summary": "Dead letters with one error type", "value": {"error_type": ["WorkerLost"]}},
    "all": {"summary": "Every dead letter", "value": {"all": True}},
}
