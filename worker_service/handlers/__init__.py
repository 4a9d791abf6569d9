"""Job handlers: one module per job type, named after it (``demo.sleep`` → ``demo_sleep.py``).

A handler module defines ``handle(payload, ctx)``. ``payload`` is the job's payload, already validated
by the type's schema in ``shared/job_types.py`` and with its defaults filled in; ``ctx`` is a
``worker_service.context.JobContext``. Return a JSON-serialisable result (or None). Raise
``FatalJobError`` for a failure that retrying cannot fix; any other exception is retried with backoff.
"""

from __future__ import annotations

import importlib
from typing import cast

from shared.job_types import JobType
from worker_service.executor import Handler


class MissingHandler(LookupError):
    """A registered job type has no handler module, or the module has no ``handle``."""


def load_handler(job_type: JobType) -> Handler:
    try:
        module = importlib.import_module(job_type.handler_module)
    except ModuleNotFoundError as exc:
        if exc.name != job_type.handler_module:
            raise
        path = job_type.handler_module.replace(".", "/") + ".py"
        raise MissingHandler(f"job type {job_type.name!r} has no handler: create {path}") from None
    handle = getattr(module, "handle", None)
    if not callable(handle):
        raise MissingHandler(f"{job_type.handler_module} must define handle(payload, ctx)")
    return cast(Handler, handle)
