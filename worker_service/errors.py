"""What a handler may raise, and how the worker treats it.

    BaseException
    ├── JobTimeout          raised into the handler's thread at its deadline; retried like an error
    └── Exception           any other error: retried with backoff until max_attempts, then failed
        ├── FatalJobError   permanent: the job fails at once, without retries
        └── JobCancelled    the handler stops because ``ctx.cancel_requested``: the job ends cancelled

JobTimeout derives from BaseException so that a handler's ``except Exception`` cannot swallow it.
"""

from __future__ import annotations


class FatalJobError(Exception):
    """Raise from a handler when retrying cannot help (bad input, a 4xx from a remote service)."""


class JobCancelled(Exception):
    """Raise from a handler that saw ``ctx.cancel_requested`` and stopped: the job ends ``cancelled``."""


class JobTimeout(BaseException):
    """The attempt ran past the job's timeout_seconds."""
