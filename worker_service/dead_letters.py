"""Filing dead messages: the relay drains every Conveyor ``.XQ`` into Postgres.

What reaches a dead-letter queue, and what becomes of it:

- the message of a job that failed (the worker nacks it after recording ``failed``): the job's dead
  letter already exists (a trigger files it with the failure), so the message is simply acknowledged;
- a message that is not a Conveyor job (not JSON, not a dramatiq message, an unknown job type, an id
  that names no job): filed with the reason and its first MAX_KEPT_BYTES, visible in
  ``GET /v1/dead-letters``;
- the message of a job still waiting to run (a quorum queue's delivery limit or a TTL dead-lettered it
  before any worker claimed it): the job gets a new outbox row, so the relay publishes it again;
- anything else (say a delivery limit hit a job that is running): acknowledged, because the job's row
  in Postgres is the truth and its lease decides what happens next.

So RabbitMQ never holds a dead letter for long, none expires, and every one stays visible until an
operator replays or purges it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from dataclasses import dataclass

from dramatiq import Message
from dramatiq.errors import DecodeError

from shared.broker import DeadLetterReader, DeadMessage
from shared.job_types import REGISTRY
from shared.jobs import JobStatus
from shared.messages import all_queue_names
from shared.settings import Settings
from shared.store import Database
from shared.store import dead_letters as dead_letter_store
from shared.store import jobs as job_store
from worker_service.relay_metrics import DEAD_MESSAGES_FILED

logger = logging.getLogger(__name__)

#: Messages taken from one dead-letter queue per round.
BATCH = 100
#: Most of a dead message kept in Postgres (its sha256 covers all of it): enough to see what it was,
#: while nobody who can publish to RabbitMQ can fill the database with huge ones.
MAX_KEPT_BYTES = 16_384


@dataclass(frozen=True)
class Verdict:
    """What is wrong with a dead message; None fields mean it is a job message Postgres already tracks."""

    error_type: str
    reason: str


class DeadLetterFiler:
    def __init__(self, settings: Settings, db: Database, reader: DeadLetterReader) -> None:
        self._settings = settings
        self._db = db
        self._reader = reader

    def file_round(self) -> int:
        """Drain up to BATCH messages from each dead-letter queue; returns how many were filed."""
        filed = 0
        prefix = self._settings.queue_prefix
        for queue_name in all_queue_names(prefix):
            messages = self._reader.take(queue_name, BATCH)
            try:
                for message in messages:
                    filed += self._file(queue_name.removeprefix(prefix), message)
            except BaseException:
                # Postgres failed mid-round: every message of the round goes back to the queue (those
                # filed already are filed again next time, and the store keeps one of each).
                self._reader.release(messages)
                raise
            self._reader.ack(messages)  # only once Postgres has them
        return filed

    def _file(self, queue: str, message: DeadMessage) -> int:
        verdict = self._judge(message)
        if verdict is None:
            return 0
        text = _as_text(message.body[:MAX_KEPT_BYTES])
        if len(message.body) > MAX_KEPT_BYTES:
            text += f"... [{len(message.body) - MAX_KEPT_BYTES} more bytes not kept]"
        digest = hashlib.sha256(message.body).hexdigest()
        new = self._db.execute(
            lambda cur: dead_letter_store.file_message(
                cur, queue=queue, error_type=verdict.error_type, reason=verdict.reason,
                message=text, message_sha256=digest,
            )
        )  # fmt: skip
        if new:
            DEAD_MESSAGES_FILED.labels(verdict.error_type).inc()
            logger.warning("filed a dead message on %s: %s", queue, verdict.reason)
        return int(new)

    def _judge(self, dead: DeadMessage) -> Verdict | None:
        try:
            message = Message.decode(dead.body)
        except (DecodeError, ValueError, TypeError, KeyError) as exc:
            return Verdict("InvalidMessage", f"not a dramatiq message ({type(exc).__name__}: {exc})")
        if message.actor_name not in REGISTRY:
            return Verdict("UnknownJobType", f"unknown job type {message.actor_name!r}")
        try:
            job_id = uuid.UUID(str(message.message_id))
        except ValueError:
            return Verdict("InvalidJobId", f"message_id {message.message_id!r} is not a job id")
        job = self._db.execute(lambda cur: job_store.get_job(cur, job_id))
        if job is None:
            return Verdict("UnknownJob", f"no job has the id {job_id}")
        if job.status in (JobStatus.QUEUED, JobStatus.RETRYING):
            if self._db.execute(lambda cur: job_store.ensure_dispatch(cur, job_id)):
                logger.warning("job %s lost its message (%s) before it ran; publishing it again",
                               job_id, dead.death_reason)  # fmt: skip
        elif job.status is not JobStatus.FAILED:
            logger.info("dropping a dead copy of job %s (%s, %s)", job_id, job.status, dead.death_reason)
        return None


def _as_text(body: bytes) -> str:
    try:
        return body.decode("utf-8").replace("\x00", "\\u0000")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(body).decode()
