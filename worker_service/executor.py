"""Running one job message: claim in Postgres, run the handler, record the outcome, ack or dead-letter.

Per message, in the common case, two writes reach Postgres: the claim and the outcome. Claims and
successes go through the process's ``GroupCommit``, which writes those of all its threads in one shared
statement and commit per round (``worker_service/group_commit.py``).

- The claim is a compare-and-set (queued/retrying and due → running, attempts + 1). Any other copy of
  the message (a redelivery, a duplicate publish) finds the job running or finished and is acked
  without running anything.
- A retryable failure writes ``retrying`` and the next attempt's outbox row in one statement; the relay
  publishes it when the backoff is over. Retries therefore never wait in RabbitMQ (no delay queue, no
  unacked message held past ``consumer_timeout``) and cannot be lost between ack and re-publish.
- A final failure writes ``failed`` first, then nacks the message so RabbitMQ dead-letters it to the
  queue's ``.XQ``.
- A success is handed to the group commit and the thread moves on: the job stays ``running`` under its
  lease until the success is written, so a death in between is recovered like a death in the handler.
- If Postgres is unreachable, a worker thread waits and tries again rather than acking: a claim, a
  failure or a cancellation is written before its message is acked (or the process dies and RabbitMQ
  redelivers it); the writer thread keeps pending successes until it can write them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from shared.errors import StoreUnavailable
from shared.job_types import JobType
from shared.jobs import Job, JobError, JobStatus, retry_delay_seconds, storable_text
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store.db import Cursor, jsonb_text
from worker_service import metrics
from worker_service.context import JobContext
from worker_service.deadlines import DeadlineMonitor
from worker_service.errors import FatalJobError, JobCancelled, JobTimeout
from worker_service.group_commit import GroupCommit
from worker_service.leases import LeaseKeeper

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Waits between attempts to reach an unavailable Postgres: quick at first, then every 5 s.
DB_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)

Handler = Callable[[dict[str, Any], JobContext], Any]


class Message(Protocol):
    """The part of dramatiq's MessageProxy the executor uses."""

    @property
    def message_id(self) -> str: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def options(self) -> dict[str, Any]: ...

    def fail(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """What an attempt came to; ``error`` is None on success."""

    #: The handler's result encoded as JSON (what is stored).
    result_json: str = "null"
    error: JobError | None = None
    retryable: bool = False
    cancelled: bool = False


class Executor:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        group: GroupCommit,
        leases: LeaseKeeper,
        deadlines: DeadlineMonitor,
    ) -> None:
        self._settings = settings
        self._db = db
        self._group = group
        self._leases = leases
        self._deadlines = deadlines

    def execute(self, job_type: JobType, handler: Handler, message: Message) -> None:
        """Run one message. Nothing escapes: dramatiq would ack the message of a job perhaps still
        waiting (Conveyor runs no Retries middleware). An unexpected error dead-letters the message
        instead, and the relay publishes the job again if it is still waiting (``dead_letters.py``);
        if it was claimed, its lease decides, as after a crash."""
        try:
            self._execute(job_type, handler, message)
        except Exception:
            logger.exception(
                "could not run message %s; dead-lettering it (the relay publishes its job again if it "
                "is still waiting)", message.message_id,
            )  # fmt: skip
            message.fail()

    def _execute(self, job_type: JobType, handler: Handler, message: Message) -> None:
        try:
            job_id = uuid.UUID(message.message_id)
        except ValueError:
            logger.error("dead-lettering message %r: its message_id is not a job id", message.message_id)
            message.fail()
            return
        log: dict[str, Any] = {"job_id": job_id, "job_type": job_type.name,
                               "request_id": message.options.get("request_id")}  # fmt: skip
        token = uuid.uuid4()  # this delivery's claim: asked again after a lost answer, it is still ours
        claim = self._until_stored(lambda: self._group.claim(job_id, token))
        if isinstance(claim, attempt_store.Missing):
            logger.error("dead-lettering message: no job has its id", extra=log)
            message.fail()
            return
        if isinstance(claim, attempt_store.NotClaimable):
            logger.info(
                "skipping message: job is %s%s", claim.status, " and not yet due" if claim.due_later else "",
                extra={**log, "redelivered": message.redelivered},
            )  # fmt: skip
            return
        job = claim.job
        log["attempt"] = job.attempts
        labels = (job.type, job.queue)
        if job.started_at is not None:
            waited = (job.started_at - job.run_at).total_seconds()
            metrics.job_wait(*labels, max(0.0, waited))
        logger.info("attempt started", extra=log)
        timer = metrics.AttemptTimer(*labels)
        outcome = self._run_handler(job, handler, log)
        timer.stop()
        if outcome.error is None and not outcome.cancelled:
            # Written in the process's next group-commit round; this thread moves on to its next message.
            self._group.record_success(
                job,
                token,
                outcome.result_json,
                lambda written: self._report(
                    job, outcome, JobStatus.SUCCEEDED if written else None, timer, log
                ),
            )
            return
        status = self._record(job, token, outcome)
        self._report(job, outcome, status, timer, log)
        if status is JobStatus.FAILED:
            message.fail()  # dead-letter the message to the queue's XQ

    def _report(
        self,
        job: Job,
        outcome: Outcome,
        status: JobStatus | None,
        timer: metrics.AttemptTimer,
        log: dict[str, Any],
    ) -> None:
        """Metrics and logs of an attempt: ``status`` is what its written outcome left the job in, or None
        if the outcome was discarded (the attempt was taken over)."""
        labels = (job.type, job.queue)
        error = outcome.error
        if status is None:
            timer.finish("discarded")
            logger.warning("outcome discarded: the attempt was taken over after its lease lapsed", extra=log)
            return
        timer.finish("succeeded" if error is None and not outcome.cancelled else
                     "cancelled" if outcome.cancelled else "failed")  # fmt: skip
        if error is not None:
            metrics.FAILED.labels(*labels, error.type).inc()
        if status is JobStatus.SUCCEEDED:
            metrics.job_succeeded(*labels)
            logger.info("job succeeded", extra=log)
        elif status is JobStatus.CANCELLED:
            metrics.CANCELLED.labels(*labels).inc()
            logger.info("job cancelled on request%s", f" after: {error.detail}" if error else "", extra=log)
        elif status is JobStatus.RETRYING:
            assert error is not None
            metrics.RETRIED.labels(*labels, error.type).inc()
            logger.warning("attempt failed, will retry: %s", error.detail, extra=log)
        else:
            assert error is not None
            metrics.DEAD_LETTERED.labels(*labels, error.type).inc()
            logger.error("job failed: %s", error.detail, extra=log)

    def _run_handler(self, job: Job, handler: Handler, log: dict[str, Any]) -> Outcome:
        deadline = time.monotonic() + job.timeout_seconds
        context = JobContext(
            job_id=job.id,
            job_type=job.type,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            labels=job.labels,
            deadline=deadline,
            _report=lambda percent, text: self._report_progress(job, percent, text),
            _cancel_requested=lambda: self._leases.cancel_requested(job.id),
        )
        self._leases.track(job, deadline)
        try:
            try:
                with self._deadlines.limit(deadline):
                    result = handler(dict(job.payload), context)
            except JobTimeout:
                return _failure(job, "JobTimeout", "The attempt exceeded its timeout",
                                f"Still running after {job.timeout_seconds} s.", retryable=True)  # fmt: skip
            except JobCancelled:
                return Outcome(cancelled=True)
            except FatalJobError as exc:
                return _failure(job, _error_type(exc), "The handler reported a permanent failure",
                                str(exc), retryable=False)  # fmt: skip
            except Exception as exc:
                logger.warning("handler raised", exc_info=True, extra=log)
                return _failure(
                    job, _error_type(exc), "The handler raised an error", str(exc), retryable=True
                )
        finally:
            self._leases.untrack(job.id)
        try:
            encoded = jsonb_text(result)  # what Postgres cannot store must not reach the round
        except (TypeError, ValueError) as exc:
            return _failure(job, "InvalidResult", "The handler returned a result that is not JSON",
                            str(exc), retryable=False)  # fmt: skip
        return Outcome(result_json=encoded)

    def _record(self, job: Job, token: uuid.UUID, outcome: Outcome) -> JobStatus | None:
        """Write a failed or cancelled attempt's outcome; the status it left the job in, or None if the
        attempt was taken over."""
        error = outcome.error
        write: Callable[[Cursor], JobStatus | None]
        if outcome.cancelled:
            expected = {JobStatus.CANCELLED}

            def write(cur: Cursor) -> JobStatus | None:
                return JobStatus.CANCELLED if attempt_store.record_cancelled(cur, job) else None

        elif error is not None and outcome.retryable and job.attempts < job.max_attempts:
            delay = retry_delay_seconds(
                job.attempts, base=self._settings.retry_base_seconds, cap=self._settings.retry_max_seconds
            )
            expected = {JobStatus.RETRYING, JobStatus.CANCELLED}

            def write(cur: Cursor) -> JobStatus | None:
                return attempt_store.record_retry(cur, job, error, delay)

        else:
            assert error is not None, "successes go through the group commit"
            expected = {JobStatus.FAILED}

            def write(cur: Cursor) -> JobStatus | None:
                return JobStatus.FAILED if attempt_store.record_failure(cur, job, error) else None

        in_doubt = False

        def once() -> JobStatus | None:
            nonlocal in_doubt
            try:
                return self._db.execute(write)
            except StoreUnavailable:
                in_doubt = True  # the write may have committed, its answer lost with the connection
                raise

        status = self._until_stored(once)
        if status is None and in_doubt:  # written by a try whose answer was lost, or taken over?
            found = self._with_db(lambda cur: attempt_store.outcome_of(cur, job, token))
            status = found if found in expected else None
        return status

    def _report_progress(self, job: Job, percent: float | None, text: str | None) -> None:
        # A NUL or an unpaired surrogate would make Postgres refuse the write, and the attempt fail.
        progress = {"percent": percent, "message": None if text is None else storable_text(text)}
        try:
            if self._db.execute(lambda cur: attempt_store.record_progress(cur, job, progress)):
                self._leases.note_cancel_requested(job.id)
        except StoreUnavailable as exc:
            logger.warning("could not record progress: %s", exc, extra={"job_id": job.id})

    def _with_db(self, work: Callable[[Cursor], T]) -> T:
        """Run one statement, waiting out a Postgres outage instead of giving up on the message."""
        return self._until_stored(lambda: self._db.execute(work))

    def _until_stored(self, write: Callable[[], T]) -> T:
        """Call ``write`` until Postgres takes it, rather than give up on the message."""
        for attempt in range(1_000_000):
            try:
                return write()
            except StoreUnavailable as exc:
                delay = DB_RETRY_DELAYS[min(attempt, len(DB_RETRY_DELAYS) - 1)]
                logger.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
        raise StoreUnavailable("gave up waiting for the database")  # pragma: no cover


def _failure(job: Job, error_type: str, title: str, detail: str, *, retryable: bool) -> Outcome:
    return Outcome(error=JobError(error_type, title, detail, job.attempts), retryable=retryable)


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
