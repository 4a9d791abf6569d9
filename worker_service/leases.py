"""Leases on running jobs: how the relay tells a slow job from a lost one.

A claim gives the job a lease of ``CONVEYOR_JOB_LEASE_SECONDS``. The keeper thread of each worker
process renews the leases of all its running jobs in one statement every third of that. If the process
dies (SIGKILL, OOM, host lost), renewals stop, the lease lapses and the relay retries or fails the job.
A job that overruns its timeout by more than a lease (a handler stuck in C code that JobTimeout cannot
interrupt) stops being renewed too, so it cannot hold its slot forever.

The keeper thread also touches the process's heartbeat file, if one is configured, on every round
(``shared/heartbeat.py``): a liveness probe then sees a frozen process, or a keeper that stopped, as a
stale file.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from shared import heartbeat
from shared.errors import StoreUnavailable
from shared.jobs import Job
from shared.store import Database
from shared.store import attempts as attempt_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningAttempt:
    job_id: uuid.UUID
    attempt: int
    #: When the attempt was claimed: with the number, what fences it (``attempts._fence``).
    started_at: datetime
    #: time.monotonic() after which the lease is no longer renewed.
    renew_until: float


class LeaseKeeper:
    def __init__(self, db: Database, lease_seconds: float, *, heartbeat_file: str = "") -> None:
        self._db = db
        self._lease = lease_seconds
        self._heartbeat_file = heartbeat_file
        self._lock = threading.Lock()
        self._running: dict[uuid.UUID, RunningAttempt] = {}
        #: Running jobs whose cancellation was requested (learnt at each renewal).
        self._cancel_requested: set[uuid.UUID] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, job: Job, deadline: float) -> None:
        """Renew ``job``'s lease (the attempt it was claimed for) until ``deadline`` plus a lease."""
        assert job.started_at is not None, "a claimed job has started"
        with self._lock:
            self._running[job.id] = RunningAttempt(
                job.id, job.attempts, job.started_at, deadline + self._lease
            )

    def untrack(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            self._cancel_requested.discard(job_id)

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        with self._lock:
            return job_id in self._cancel_requested

    def note_cancel_requested(self, job_id: uuid.UUID) -> None:
        with self._lock:
            if job_id in self._running:
                self._cancel_requested.add(job_id)

    def start(self) -> None:
        if self._thread is None:
            self._beat()
            self._thread = threading.Thread(target=self._renew_forever, name="conveyor-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._heartbeat_file:
            heartbeat.remove(self._heartbeat_file)

    def _beat(self) -> None:
        if not self._heartbeat_file or self._stop.is_set():
            return
        try:
            heartbeat.beat(self._heartbeat_file)
        except OSError as exc:  # the probe will notice; renewing leases matters more
            logger.warning("could not touch the heartbeat file: %s", exc)

    def renew_now(self) -> int:
        """Renew the leases of this process's running jobs and learn of cancel requests; how many."""
        now = time.monotonic()
        with self._lock:
            due = [(a.job_id, a.attempt, a.started_at) for a in self._running.values() if a.renew_until > now]
        if not due:
            return 0
        cancelled = self._db.execute(lambda cur: attempt_store.renew_leases(cur, due, self._lease))
        for job_id in cancelled:
            self.note_cancel_requested(job_id)
        return len(due)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self._lease / 3):
            self._beat()  # first: a slow Postgres delays the next beat by one renewal at most
            try:
                self.renew_now()
            except StoreUnavailable as exc:
                logger.warning("could not renew job leases: %s", exc)
            except Exception:  # pragma: no cover - keep renewing whatever happens
                logger.exception("lease renewal failed")
