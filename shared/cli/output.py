"""How ``conveyor jobs|dlq|queues`` show the API's answers on a terminal: tables, a job, a progress bar.

Times are shown in UTC, as the API gives them; ``--json`` bypasses all of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.jobs import JobStatus

Json = dict[str, Any]

BAR_WIDTH = 30
#: Longest dead-letter reason shown in a table; `dlq list --json` has it whole.
REASON_WIDTH = 80


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned columns two spaces apart; None shows as ``-``."""
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def when(value: str | None) -> str:
    return "-" if value is None else datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def percent(job: Json) -> float | None:
    """The job's progress; a succeeded job is at 100 % even if its handler never said so."""
    if job["status"] == JobStatus.SUCCEEDED:
        return 100.0
    value = (job.get("progress") or {}).get("percent")
    return None if value is None else float(value)


def error_text(job: Json) -> str:
    error = job.get("error")
    return f"{error['type']}: {error['detail']} (attempt {error['attempt']})" if error else ""


def _labels(job: Json) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(job["labels"].items()))


def print_job(job: Json) -> None:
    share, message = percent(job), (job.get("progress") or {}).get("message")
    progress = " ".join(filter(None, [None if share is None else f"{share:.0f}%", message]))
    result = job.get("result")
    rows = [
        ("id", job["id"]),
        ("type", f"{job['type']} (queue {job['queue']}, priority {job['priority']})"),
        ("tenant", job["tenant"]),
        ("status", job["status"]),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}, {job['timeout_seconds']} s each at most"),
        ("progress", progress),
        ("labels", _labels(job)),
        ("run at", when(job["run_at"])),
        ("created", when(job["created_at"])),
        ("started", when(job["started_at"])),
        ("finished", when(job["finished_at"])),
        ("cancel requested", when(job.get("cancel_requested_at"))),
        ("error", error_text(job)),
        ("result", "" if result is None else json.dumps(result, sort_keys=True)),
        ("payload", json.dumps(job["payload"], sort_keys=True)),
    ]
    for name, value in rows:
        if value and value != "-":
            print(f"{name + ':':<18}{value}")


def progress_line(job: Json) -> str:
    """``[######........] 20%  running    attempt 1/3  message``, for ``jobs watch``."""
    share = percent(job)
    filled = round(BAR_WIDTH * (share or 0) / 100)
    shown = "  -%" if share is None else f"{share:3.0f}%"
    message = (job.get("progress") or {}).get("message") or ""
    if job["status"] == JobStatus.RETRYING:
        message = f"next attempt at {when(job['run_at'])}; {error_text(job)}"
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    attempt = f"attempt {job['attempts']}/{job['max_attempts']}"
    return f"[{bar}] {shown}  {job['status']:<9}  {attempt}  {message}".rstrip()


def jobs_table(jobs: list[Json]) -> None:
    rows = []
    for job in jobs:
        share = None if (value := percent(job)) is None else f"{value:.0f}%"
        attempts = f"{job['attempts']}/{job['max_attempts']}"
        rows.append(
            (job["id"], job["type"], job["status"], attempts, share, when(job["created_at"]), _labels(job))
        )
    table(["ID", "TYPE", "STATUS", "ATTEMPTS", "PROGRESS", "CREATED (UTC)", "LABELS"], rows)


def dead_letters_table(letters: list[Json]) -> None:
    rows = [(when(d["dead_at"]), d["job_id"], d["tenant"], d["job_type"], d["queue"], d["error_type"],
             d["attempts"], d["reason"][:REASON_WIDTH]) for d in letters]  # fmt: skip
    table(["DEAD AT (UTC)", "JOB", "TENANT", "TYPE", "QUEUE", "ERROR TYPE", "ATTEMPTS", "REASON"], rows)


def queues_table(stats: Json) -> None:
    rows = [(q["name"], q["rabbitmq_queue"], q["ready"], q["unacknowledged"], q["consumers"], q["waiting"],
             q["delayed"], q["running"], q["dead"], f"{q['oldest_waiting_seconds']:.0f}s", q["source"])
            for q in stats["queues"]]  # fmt: skip
    table(["QUEUE", "RABBITMQ QUEUE", "READY", "UNACKED", "CONSUMERS", "WAITING", "DELAYED", "RUNNING",
           "DEAD", "OLDEST WAITING", "SOURCE"], rows)  # fmt: skip
    outbox = stats["outbox"]
    print(f"outbox: {outbox['backlog']} due message(s) not yet published, "
          f"the oldest for {outbox['oldest_seconds']:.0f}s")  # fmt: skip
