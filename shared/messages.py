"""The message contract between the API, the relay and the worker.

A job travels as a plain dramatiq message::

    {"queue_name": "conveyor.default", "actor_name": "demo.sleep", "args": [], "kwargs": {},
     "options": {"broker_priority": 5, "request_id": "<X-Request-ID>"}, "message_id": "<job id>",
     "message_timestamp": 1764430000000}

- ``message_id`` is the job id, so every copy of a job's message (republished by the relay, redelivered
  by RabbitMQ) names the same job, and the worker's claim in Postgres makes all but one of them no-ops.
- ``actor_name`` is the job type; ``queue_name`` is the type's queue with ``CONVEYOR_QUEUE_PREFIX``.
- The payload is not in the message: Postgres is the source of truth, and the worker reads the payload
  in the same statement that claims the job.

Building a message needs nothing from the worker, so the API and the relay publish without importing
any handler code.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from dramatiq import Message

from shared.job_types import REGISTRY

#: dramatiq's own rule for queue names; checked here so a bad prefix fails at start, not at publish.
_QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")


@dataclass(frozen=True)
class Dispatch:
    """One job message to publish, and the outbox row that guarantees it (None once delivered)."""

    job_id: uuid.UUID
    job_type: str
    queue: str
    priority: int
    outbox_id: int | None = None
    #: The X-Request-ID of the submission, for the worker's logs.
    request_id: str | None = None


def queue_name(prefix: str, queue: str) -> str:
    """The RabbitMQ queue a Conveyor queue is declared as."""
    name = prefix + queue
    if not _QUEUE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid queue name (check CONVEYOR_QUEUE_PREFIX)")
    return name


def all_queue_names(prefix: str) -> list[str]:
    """Every queue that some registered job type uses."""
    return sorted({queue_name(prefix, t.queue) for t in REGISTRY.values()})


def build_message(dispatch: Dispatch, prefix: str) -> Message[None]:
    return Message(
        queue_name=queue_name(prefix, dispatch.queue),
        actor_name=dispatch.job_type,
        args=(),
        kwargs={},
        options={"broker_priority": dispatch.priority, "request_id": dispatch.request_id},
        message_id=str(dispatch.job_id),
    )
