"""Conveyor's errors: one tree, translated to problem+json once, at the HTTP edge (api_service/problems.py).

ConveyorError
├── StoreUnavailable          Postgres could not be reached or timed out          → 503
├── BrokerUnavailable         RabbitMQ could not be reached or did not confirm    → relay retries
├── JobNotFound               no job has this id                                  → 404
├── UnknownJobType            no job type has this name                           → 422
├── IllegalTransition         a status change that shared.jobs.TRANSITIONS forbids → 409
├── MigrationBlocked          a migration could not lock its tables in time       → migrate exits 1
├── LimitExceeded
│   ├── RateLimited             the tenant submits faster than its rate           → 429
│   └── TooManyActiveJobs       the tenant has too many jobs waiting or running   → 429
└── IdempotencyError
    ├── IdempotencyKeyInvalid   malformed, duplicated or too long                 → 400
    ├── IdempotencyKeyInFlight  the first request with this key is still running  → 409
    └── IdempotencyKeyReused    the key was used for a different request          → 422
"""

from __future__ import annotations

from typing import Any


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


class MigrationBlocked(ConveyorError):
    """A migration gave up waiting for its tables' locks: a long transaction holds them."""


class LimitExceeded(ConveyorError):
    """A tenant limit refused the request; ``retry_after`` says when to try again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(LimitExceeded):
    """The tenant's submission rate is exhausted."""

    def __init__(self, message: str, retry_after: int, rate: Any = None) -> None:
        super().__init__(message, retry_after)
        #: The bucket's state (shared.store.tenants.RateDecision), for RateLimit headers.
        self.rate = rate


class TooManyActiveJobs(LimitExceeded):
    """The tenant has as many jobs waiting or running as it may."""


class IdempotencyError(ConveyorError):
    """A problem with the Idempotency-Key of a request."""


class IdempotencyKeyInvalid(IdempotencyError):
    """The key is malformed, sent more than once, or longer than allowed."""


class IdempotencyKeyInFlight(IdempotencyError):
    """A request with this key is still being processed."""


class IdempotencyKeyReused(IdempotencyError):
    """The key was already used with a different request."""
