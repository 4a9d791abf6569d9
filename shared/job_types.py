"""The registry of job types: the part of the message contract that says what may be submitted.

Each entry names a type, the marshmallow fields of its payload and its defaults. The API validates
submissions against it; the worker runs each type with the handler module
``worker_service/handlers/<name with dots as underscores>.py`` and refuses to start if one is missing.

Adding a job type is one registry entry here plus that one handler module (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from shared.errors import UnknownJobType


class JsonNumber(fields.Float):
    """A JSON number; a string holding one (``"5"``) is refused, as the integer fields refuse it."""

    def _validated(self, value: Any) -> float:
        if isinstance(value, str | bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class JsonBoolean(fields.Boolean):
    """``true`` or ``false``; marshmallow's Boolean would also take ``1``, ``"yes"`` or ``"off"``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


#: Queue used when a type does not name one. The wire name gets ``CONVEYOR_QUEUE_PREFIX`` in front.
DEFAULT_QUEUE = "default"

#: Submission-time bounds shared by every type (the API enforces them, the types' defaults obey them).
PRIORITY_RANGE = (0, 9)
MAX_ATTEMPTS_RANGE = (1, 100)
TIMEOUT_SECONDS_RANGE = (1, 86_400)


@dataclass(frozen=True)
class JobType:
    name: str
    description: str
    payload_fields: Mapping[str, fields.Field[Any]] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    #: Attempts in all, the first included.
    max_attempts: int = 3
    timeout_seconds: int = 300
    #: 0-9, higher runs first when a queue has a backlog.
    priority: int = 5

    @property
    def handler_module(self) -> str:
        return "worker_service.handlers." + self.name.replace(".", "_")

    def payload_schema(self) -> ma.Schema:
        """A strict schema (unknown fields rejected) for this type's payload."""
        return _schema_class(self)()

    def load_payload(self, payload: Any) -> dict[str, Any]:
        """Validate ``payload`` and return it with defaults filled in; raises ValidationError."""
        schema = self.payload_schema()
        loaded: dict[str, Any] = schema.load(payload)
        dumped: dict[str, Any] = schema.dump(loaded)
        return dumped


_SCHEMA_CLASSES: dict[str, type[ma.Schema]] = {}


def _schema_class(job_type: JobType) -> type[ma.Schema]:
    cls = _SCHEMA_CLASSES.get(job_type.name)
    if cls is None:
        name = "".join(part.capitalize() for part in job_type.name.replace("_", ".").split(".")) + "Payload"
        cls = ma.Schema.from_dict(dict(job_type.payload_fields), name=name)
        _SCHEMA_CLASSES[job_type.name] = cls
    return cls


def _registry(*types: JobType) -> dict[str, JobType]:
    registry: dict[str, JobType] = {}
    for job_type in types:
        if job_type.name in registry:
            raise ValueError(f"job type {job_type.name!r} is registered twice")
        registry[job_type.name] = job_type
    return registry


REGISTRY: dict[str, JobType] = _registry(
    JobType(
        name="noop",
        description="Does nothing and succeeds. For smoke tests and benchmarks.",
        timeout_seconds=60,
    ),
    JobType(
        name="demo.sleep",
        description=(
            "Sleeps, reporting progress every second and stopping early if cancelled, then fails its "
            "first `fail_attempts` attempts (with a retryable error, or a fatal one if `fatal`) before "
            "succeeding. For demos and tests."
        ),
        payload_fields={
            "seconds": JsonNumber(
                load_default=1.0,
                validate=validate.Range(0, 3600),
                metadata={"description": "How long each attempt sleeps."},
            ),
            "fail_attempts": fields.Integer(
                strict=True,
                load_default=0,
                validate=validate.Range(0, 100),
                metadata={"description": "How many attempts fail before one succeeds."},
            ),
            "fatal": JsonBoolean(
                load_default=False,
                metadata={
                    "description": "Make the failing attempts fail with a non-retryable error, so the job "
                    "fails at the first of them (with `fail_attempts` of 1 or more)."
                },
            ),
            "crash": JsonBoolean(
                load_default=False,
                metadata={
                    "description": "Kill the worker process (SIGKILL) on every attempt, like a segfault or "
                    "an OOM kill would. Only when the worker runs with CONVEYOR_DEMO_CRASH_ENABLED=true; "
                    "otherwise the job fails at once."
                },
            ),
        },
        max_attempts=3,
        timeout_seconds=3600,
    ),
)


def get_job_type(name: str) -> JobType:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownJobType(name) from None
