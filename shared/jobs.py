"""The job domain: statuses, the transitions between them, and retry timing. Pure: no I/O.

Status model::

    queued ──► running ──► succeeded
      ▲  │       │  ▲
      │  │       │  └──── retrying ◄──┐
      │  │       ├────────────────────┘   (a retryable error, or a lost worker, with attempts left)
      │  │       ├──► failed              (fatal error, or attempts exhausted) ──┐
      │  │       └──► cancelled           (the handler honoured a cancel request) │
      │  └─────────► cancelled            (cancelled while queued or retrying)    │
      └──────────────────────────────────── retry / dead-letter replay ◄─────────┘ (from failed or cancelled)

``TRANSITIONS`` is the only definition of what may follow what. The store derives its SQL guards from
it, and ``conveyor migrate`` copies it into the ``job_status_transitions`` table that a trigger checks
on every write, so an illegal transition cannot be written by any code path.
"""

from __future__ import annotations

import enum
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.errors import IllegalTransition


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The status every new job starts in.
INITIAL_STATUS = JobStatus.QUEUED

#: (from, to) pairs that may be written. Anything else is rejected by the database trigger.
TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (JobStatus.QUEUED, JobStatus.RUNNING),
        (JobStatus.RUNNING, JobStatus.SUCCEEDED),
        (JobStatus.RUNNING, JobStatus.RETRYING),
        (JobStatus.RUNNING, JobStatus.FAILED),
        (JobStatus.RETRYING, JobStatus.RUNNING),
        (JobStatus.QUEUED, JobStatus.CANCELLED),
        (JobStatus.RETRYING, JobStatus.CANCELLED),
        (JobStatus.RUNNING, JobStatus.CANCELLED),
        (JobStatus.FAILED, JobStatus.QUEUED),
        (JobStatus.CANCELLED, JobStatus.QUEUED),
    }
)

TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)

#: Cancelled at once by the API. A running job only gets a cancel *request*, which its handler may honour.
CANCELLABLE_AT_ONCE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RETRYING)

#: What an operator may send round again (POST /v1/jobs/{id}/retry, dead-letter replay).
RETRYABLE_BY_OPERATOR: tuple[JobStatus, ...] = (JobStatus.FAILED, JobStatus.CANCELLED)


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return (current, new) in TRANSITIONS


def check_transition(current: JobStatus, new: JobStatus) -> None:
    if not can_transition(current, new):
        raise IllegalTransition(f"a job cannot go from {current} to {new}")


def sources_of(target: JobStatus) -> tuple[JobStatus, ...]:
    """Statuses from which ``target`` may be reached, in a stable order (for SQL guards)."""
    return tuple(sorted((src for src, dst in TRANSITIONS if dst is target), key=list(JobStatus).index))


def is_terminal(status: JobStatus) -> bool:
    return status in TERMINAL_STATUSES


def status_rows() -> list[tuple[str, bool]]:
    """(status, is_active) for the table the per-tenant active-job counter reads.

    Active means waiting or running: everything that is not terminal counts against a tenant's cap.
    """
    return [(status.value, not is_terminal(status)) for status in JobStatus]


def retry_delay_seconds(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before the attempt after ``attempt`` (1-based): exponential, capped, with jitter.

    ``base * 2**(attempt-1)`` capped at ``cap``, then scaled by a uniform factor in [0.5, 1.0]
    ("equal jitter"), so retries of many jobs that failed together spread out but none waits longer
    than the cap.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    exponential = min(cap, base * 2.0 ** min(attempt - 1, 62))
    jitter: float = (rng or random).uniform(0.5, 1.0)
    return exponential * jitter


@dataclass(frozen=True)
class JobError:
    """Why an attempt failed, as recorded on the job and shown by the API."""

    type: str
    title: str
    detail: str
    attempt: int

    #: Longest detail kept; tracebacks and huge messages go to the logs, not into every job row.
    MAX_DETAIL = 2000

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": storable_text(self.type),
            "title": storable_text(self.title),
            "detail": storable_text(self.detail[: self.MAX_DETAIL]),
            "attempt": self.attempt,
        }


def text_path(value: Any, bad: Callable[[str], bool]) -> tuple[str, ...] | None:
    """Where in a JSON value (its keys and indexes) a string or an object key is ``bad``; None if
    nowhere. Depth-first, in document order, without recursion (a value may nest deeply)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if bad(item):
                return path
            continue
        children: list[tuple[Any, tuple[str, ...]]] = []
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and bad(key):
                    return (*path, key)
                children.append((child, (*path, str(key))))
        elif isinstance(item, list | tuple):
            children = [(child, (*path, str(index))) for index, child in enumerate(item)]
        stack.extend(reversed(children))
    return None


def has_unpaired_surrogate(text: str) -> bool:
    """Whether ``text`` holds half of a UTF-16 surrogate pair: not Unicode, so not storable in Postgres."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def storable_text(text: str) -> str:
    """``text`` as Postgres can store it: a NUL character (no Postgres text can hold one) becomes the
    six characters ``\\u0000`` and an unpaired surrogate its ``\\udxxx`` escape, so that an exception
    message holding either is still recorded, and readable, rather than failing the write."""
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def transition_rows() -> Iterable[tuple[str, str]]:
    """TRANSITIONS as plain strings, for the table the database trigger reads.

    The empty ``from`` status stands for "no row yet": it names the status a new job may start in.
    """
    return sorted([("", INITIAL_STATUS.value), *((src.value, dst.value) for src, dst in TRANSITIONS)])


@dataclass(frozen=True)
class Job:
    """A job as stored: what was asked for, and where it stands."""

    id: uuid.UUID
    tenant: str
    type: str
    queue: str
    status: JobStatus
    payload: dict[str, Any]
    priority: int
    attempts: int
    max_attempts: int
    timeout_seconds: int
    run_at: datetime
    labels: dict[str, str]
    result: Any
    error: dict[str, Any] | None
    progress: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    cancel_requested_at: datetime | None = None

    @property
    def is_finished(self) -> bool:
        return is_terminal(self.status)


@dataclass(frozen=True)
class NewJob:
    """A validated submission, with the job type's defaults applied."""

    type: str
    queue: str
    payload: dict[str, Any]
    priority: int
    max_attempts: int
    timeout_seconds: int
    #: An absolute start, or None to start ``delay_seconds`` after the database's "now".
    run_at: datetime | None
    delay_seconds: float
    labels: dict[str, str]


#: Error recorded when a worker stopped renewing a running job's lease (killed, OOM, host lost).
WORKER_LOST = JobError(
    type="WorkerLost",
    title="The worker running this attempt stopped responding",
    detail="The job's lease expired before its worker reported an outcome.",
    attempt=0,
)
