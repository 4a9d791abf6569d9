"""Conveyor's errors: one tree, translated to problem+json once, at the HTTP edge (api_service/problems.py).

ConveyorError
├── StoreUnavailable          Postgres could not be reached or timed out          → 503
├── BrokerUnavailable         RabbitMQ could not be reached or did not confirm    → relay retries
├── JobNotFound               no job has this id                                  → 404
├── UnknownJobType            no job type has this name                           → 422
├── IllegalTransition         a status change that shared.jobs.TRANSITIONS forbids → 409
└── IdempotencyError
    ├── IdempotencyKeyInvalid   malformed, duplicated or too long                 → 400
    ├── IdempotencyKeyInFlight  the first request with this key is still running  → 409
    └── IdempotencyKeyReused    the key was used for a different request          → 422
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""


class StoreUnavailable(ConveyorError):
    """Postgres could not be reached, dropped the connection, or a statement timed out."""


class BrokerUnavailable(ConveyorError):
    """RabbitMQ could not be reached or did not confirm a publish."""


class JobNotFound(ConveyorError):
    """No job has this id."""


class UnknownJobType(ConveyorError, LookupError):
    """No job type has this name."""


class IllegalTransition(ConveyorError):
    """A status change that the job state machine does not allow."""


class IdempotencyError(ConveyorError):
    """A problem with the Idempotency-Key of a request."""


class IdempotencyKeyInvalid(IdempotencyError):
    """The key is malformed, sent more than once, or longer than allowed."""


class IdempotencyKeyInFlight(IdempotencyError):
    """A request with this key is still being processed."""


class IdempotencyKeyReused(IdempotencyError):
    """The key was already used with a different request."""
