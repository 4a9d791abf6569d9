"""Group commit: the claims and successes of a worker process's threads share one statement and one commit.

A no-op job costs two writes, its claim and its success. Written one by one, every write is its own
statement and its own commit, and the worker drains at a fraction of raw dramatiq's rate: Postgres
spends more on planning and committing each statement than on the rows (docs/performance.md).

Here one writer thread per process does all those writes. It takes everything that arrived since its
last round, writes all the claims and all the successes in one prepared statement
(``attempt_store.write_round``), so in one commit, and answers each request. Nothing waits for a batch to
fill: a lone job is written at once, and under load a round carries whatever queued up during the
previous one, as in Postgres' own group commit.

- **A claim blocks** its worker thread until its round has committed: the handler must not start
  before the job is ``running`` with a lease. A claim carries its delivery's token: if the round's
  answer is lost (StoreUnavailable), the thread asks again with the same token, and a claim that did
  commit is answered as claimed. Each thread gets the answer ``claim_job`` would have given
  it alone; of duplicate deliveries of one job in the same round, the first is claimed and the others
  see the job running. If the round fails, every claim in it gets the error and its thread retries.
- **A success does not block.** The worker thread hands it over and takes its next message, whose claim
  usually shares the round with that success. So RabbitMQ may get the ack a moment before the success
  is committed. That loses nothing: until then the job is ``running`` under a lease, and a redelivered
  copy of the message could not claim it anyway; if the process dies in that moment, the lease lapses
  and the relay retries the job, exactly as for a death during the handler. The writer keeps retrying a
  success while Postgres is unreachable, and ``stop`` writes what is pending before the process exits.
  Once written, ``on_written(True)`` runs on the writer thread; ``on_written(False)`` if the attempt was
  taken over meanwhile (its lease lapsed and the relay moved the job on).

Failures, retries and cancellations are rare and keep their own single statement (``executor.py``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from shared.errors import StoreUnavailable
from shared.jobs import Job, JobStatus
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store.attempts import ClaimResult, NotClaimable

logger = logging.getLogger(__name__)

#: Waits between attempts to write pending successes while Postgres is unreachable.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)


class _Claim:
    """A worker thread's claim, waiting for the round that carries it."""

    __slots__ = ("_done", "error", "job_id", "result", "token")

    def __init__(self, job_id: uuid.UUID, token: uuid.UUID) -> None:
        self.job_id = job_id
        self.token = token
        self.result: ClaimResult | None = None
        self.error: Exception | None = None
        # A held lock is the cheapest one-shot signal between two threads (an Event adds a Condition).
        self._done = threading.Lock()
        self._done.acquire()

    def resolve(self, result: ClaimResult | None = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self._done.release()

    def wait(self) -> ClaimResult:
        self._done.acquire()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _Success:
    __slots__ = ("in_doubt", "job", "on_written", "result_json", "token")

    def __init__(
        self, job: Job, token: uuid.UUID, result_json: str, on_written: Callable[[bool], None]
    ) -> None:
        self.job = job
        self.token = token
        self.result_json = result_json
        self.on_written = on_written
        #: It was in a round whose answer was lost: that round may have written it.
        self.in_doubt = False


class GroupCommit:
    """One writer thread per worker process for the claims and successes of all its worker threads."""

    def __init__(self, db: Database, lease_seconds: float, *, stop_timeout: float = 30.0) -> None:
        self._db = db
        self._lease = lease_seconds
        self._stop_timeout = stop_timeout
        self._claims: list[_Claim] = []
        self._successes: list[_Success] = []
        #: Tokens of claims whose round's answer was lost: they may hold their job already.
        self._in_doubt: set[uuid.UUID] = set()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Rounds committed and the claims and successes they carried (batching at a glance).
        self.rounds = 0
        self.writes = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="conveyor-group-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write the pending successes (trying for up to ``stop_timeout``), then stop the writer thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def claim(self, job_id: uuid.UUID, token: uuid.UUID) -> ClaimResult:
        """``attempt_store.claim_job`` in the next round. Raises StoreUnavailable if the round failed: the
        claim may have committed all the same, so ask again with the same ``token``."""
        request = _Claim(job_id, token)
        with self._wakeup:
            if self._thread is None:
                raise RuntimeError("GroupCommit is not started")
            self._claims.append(request)
            self._wakeup.notify()
        return request.wait()

    def record_success(
        self, job: Job, token: uuid.UUID, result_json: str, on_written: Callable[[bool], None]
    ) -> None:
        """Record the success of the attempt ``token`` claimed, in the next round, without waiting."""
        with self._wakeup:
            if self._thread is None:
                raise RuntimeError("GroupCommit is not started")
            self._successes.append(_Success(job, token, result_json, on_written))
            self._wakeup.notify()

    def _run(self) -> None:
        failures = 0
        deadline: float | None = None
        while True:
            with self._wakeup:
                while not (self._claims or self._successes or self._stopping):
                    self._wakeup.wait()
                claims, self._claims = self._claims, []
                successes, self._successes = self._successes, []
                if self._stopping and deadline is None:
                    deadline = time.monotonic() + self._stop_timeout
            if not claims and not successes:
                return  # stopping, nothing left
            if self._write(claims, successes):
                failures = 0
                continue
            # Postgres is unreachable: keep the successes, wait, try again (claims were answered).
            for success in successes:
                success.in_doubt = True
            with self._wakeup:
                self._successes[:0] = successes
                if deadline is not None and time.monotonic() >= deadline:
                    self._give_up()
                    return
                self._wakeup.wait(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
            failures += 1

    def _write(self, claims: Sequence[_Claim], successes: Sequence[_Success]) -> bool:
        """One round; False if Postgres was unreachable (the claims got the error)."""
        tokens: dict[uuid.UUID, uuid.UUID] = {}
        # Of duplicate deliveries of one job, the first claims it; but a claim asked again after a
        # round whose answer was lost may already hold the job, and only its own token gets it back.
        for claim in sorted(claims, key=lambda c: c.token not in self._in_doubt):
            tokens.setdefault(claim.job_id, claim.token)
        try:
            written = self._db.execute(
                lambda cur: attempt_store.write_round(
                    cur, list(tokens), self._lease, [(s.job, s.result_json) for s in successes],
                    list(tokens.values()),
                )
            )  # fmt: skip
        except StoreUnavailable as exc:
            logger.warning("database unavailable (%s); %d successes wait to be written", exc, len(successes))
            for claim in claims:
                self._in_doubt.add(claim.token)
                claim.resolve(error=exc)
            return False
        except Exception as exc:  # one bad item (or a bug): it must not take the round's other items along
            if len(claims) + len(successes) > 1:
                logger.exception("could not write a round of %d writes; writing them one by one",
                                 len(claims) + len(successes))  # fmt: skip
                self._write_each(claims, successes)
            else:
                self._failed(claims, successes, exc)
            return True
        self.rounds += 1
        self.writes += len(claims) + len(successes)
        for claim in claims:  # first: worker threads are waiting on these
            answer = written.claims[claim.job_id]
            self._in_doubt.discard(claim.token)
            if tokens[claim.job_id] != claim.token and isinstance(answer, attempt_store.Claimed):
                # Another delivery of the same job in this round got the claim: this one sees it running.
                answer = NotClaimable(JobStatus.RUNNING, due_later=False)
            claim.resolve(answer)
        for success in successes:
            try:
                success.on_written(success.job.id in written.succeeded or self._written_before(success))
            except Exception:
                logger.exception("on_written failed for job %s", success.job.id)
        return True

    def _written_before(self, success: _Success) -> bool:
        """Whether a success this round could not write was written by an earlier round whose answer was
        lost (rather than taken over): the job then holds this attempt, succeeded."""
        if not success.in_doubt:
            return False
        try:
            found = self._db.read(lambda cur: attempt_store.outcome_of(cur, success.job, success.token))
            return found is JobStatus.SUCCEEDED
        except StoreUnavailable:
            return False  # reported as discarded; the job's row is right either way

    def _write_each(self, claims: Sequence[_Claim], successes: Sequence[_Success]) -> None:
        """Write a failed round's items in rounds of one, so that each gets its own outcome."""
        for claim in claims:
            self._write([claim], [])
        for success in successes:
            if not self._write([], [success]):  # Postgres went away meanwhile: the next round retries it
                success.in_doubt = True
                with self._wakeup:
                    self._successes.append(success)

    @staticmethod
    def _failed(claims: Sequence[_Claim], successes: Sequence[_Success], exc: Exception) -> None:
        """A lone write that Postgres refused: the claim's thread gets the error; the success is left to
        lease recovery (the job stays running until its lease lapses, then the relay retries it)."""
        for claim in claims:
            logger.error("could not claim job %s: %s", claim.job_id, exc, exc_info=exc)
            claim.resolve(error=exc)
        for success in successes:
            logger.error(
                "could not record the success of job %s (the relay retries it once its lease lapses): %s",
                success.job.id, exc, exc_info=exc,
            )  # fmt: skip

    def _give_up(self) -> None:
        """Called with the lock held."""
        lost, self._successes = self._successes, []
        logger.error(
            "stopping with %d successes unwritten (database unavailable); the relay retries those jobs "
            "once their leases lapse: %s", len(lost), ", ".join(str(s.job.id) for s in lost),
        )  # fmt: skip
