"""The executor against the real Postgres: what it does with results Postgres cannot store, and with
errors it did not expect."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import AnswerLostDatabase, pg, wait_for

from shared.job_types import REGISTRY
from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store
from worker_service.context import JobContext
from worker_service.deadlines import DeadlineMonitor
from worker_service.errors import FatalJobError
from worker_service.executor import Executor
from worker_service.group_commit import GroupCommit
from worker_service.leases import LeaseKeeper

NOOP = NewJob("noop", "default", {}, 5, 3, 60, None, 0.0, {})


class FakeMessage:
    """The part of dramatiq's MessageProxy the executor uses, recording whether it was failed."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.message_id = str(job_id)
        self.redelivered = False
        self.options: dict[str, Any] = {}
        self.failed = False

    def fail(self) -> None:
        self.failed = True


@pytest.fixture
def executor(settings: Settings, db: Database) -> Iterator[Executor]:
    group, deadlines = GroupCommit(db, lease_seconds=30), DeadlineMonitor()
    group.start()
    deadlines.start()
    yield Executor(settings, db, group, LeaseKeeper(db, 30), deadlines)
    deadlines.stop()
    group.stop()


def insert(db: Database) -> uuid.UUID:
    job_id = uuid.uuid4()
    db.run(
        lambda cur: job_store.insert_job(
            cur, job_id, "default", NOOP, max_active_jobs=10**6, outbox_grace_seconds=0
        )
    )
    return job_id


def job_row(dsn: str, job_id: uuid.UUID) -> tuple[Any, ...]:
    with pg(dsn) as cur:
        cur.execute("SELECT status, error->>'type', error->>'detail' FROM jobs WHERE id = %s", (str(job_id),))
        row = cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize(
    "result",
    [{"text": "a\x00b"}, {"key\x00": 1}, ["\udc80"], float("nan")],
    ids=["nul-in-value", "nul-in-key", "lone-surrogate", "nan"],
)
def test_a_result_postgres_cannot_store_fails_the_job_and_nothing_else(
    executor: Executor, db: Database, dsn: str, result: Any
) -> None:
    job_id, next_job = insert(db), insert(db)
    message = FakeMessage(job_id)
    executor.execute(REGISTRY["noop"], lambda payload, ctx: result, message)
    assert message.failed, "a final failure dead-letters the message"
    status, error_type, _ = job_row(dsn, job_id)
    assert (status, error_type) == ("failed", "InvalidResult")
    # The same thread's next job is claimed and recorded as usual.
    executor.execute(REGISTRY["noop"], lambda payload, ctx: {"ok": True}, FakeMessage(next_job))
    wait_for(lambda: job_row(dsn, next_job)[0] == "succeeded", timeout=5, what="the next job to succeed")


def test_an_error_message_with_a_nul_character_is_recorded_readably(
    executor: Executor, db: Database, dsn: str
) -> None:
    job_id = insert(db)

    def handler(payload: dict[str, Any], ctx: JobContext) -> None:
        raise ValueError("bad byte \x00 here")

    executor.execute(REGISTRY["noop"], handler, FakeMessage(job_id))
    status, error_type, detail = job_row(dsn, job_id)
    assert (status, error_type, detail) == ("retrying", "ValueError", "bad byte \\u0000 here")


def test_an_unexpected_error_dead_letters_the_message_instead_of_acking_it(
    settings: Settings, db: Database, dsn: str
) -> None:
    """dramatiq would ack a message whose actor raised (Conveyor runs no Retries middleware), and the
    job would wait forever without one. The message is dead-lettered instead, for the relay to file."""

    class BrokenGroup(GroupCommit):
        def claim(self, job_id: uuid.UUID, token: uuid.UUID) -> Any:
            raise RuntimeError("a bug in the claim")

    job_id = insert(db)
    message = FakeMessage(job_id)
    deadlines = DeadlineMonitor()
    executor = Executor(settings, db, BrokenGroup(db, 30), LeaseKeeper(db, 30), deadlines)
    executor.execute(REGISTRY["noop"], lambda payload, ctx: None, message)
    assert message.failed
    assert job_row(dsn, job_id)[0] == "queued"


def test_progress_text_postgres_cannot_store_is_kept_readably(
    executor: Executor, db: Database, dsn: str
) -> None:
    """Progress is best effort: a NUL or an unpaired surrogate in its text failed the attempt."""
    job_id = insert(db)

    def handler(payload: dict[str, Any], ctx: JobContext) -> str:
        ctx.report_progress(10, "bad\x00name \udc80")
        return "done"

    executor.execute(REGISTRY["noop"], handler, FakeMessage(job_id))
    wait_for(lambda: job_row(dsn, job_id)[0] == "succeeded", timeout=5, what="the job to succeed")
    with pg(dsn) as cur:
        cur.execute("SELECT progress->>'message' FROM jobs WHERE id = %s", (str(job_id),))
        assert cur.fetchone() == ("bad\\u0000name \\udc80",)


def test_a_claim_whose_answer_was_lost_still_runs_its_job_once(
    settings: Settings, db: Database, dsn: str
) -> None:
    """The claim committed, the worker got an error and asked again: it must run the job it claimed,
    not skip it as running elsewhere (the job then sat out its lease and lost an attempt; with one
    attempt it failed without ever running)."""
    job_id = insert(db)
    group, deadlines = GroupCommit(AnswerLostDatabase(db, lose=1), lease_seconds=30), DeadlineMonitor()  # type: ignore[arg-type]
    group.start()
    deadlines.start()
    runs: list[int] = []
    try:
        executor = Executor(settings, db, group, LeaseKeeper(db, 30), deadlines)
        executor.execute(REGISTRY["noop"], lambda payload, ctx: runs.append(ctx.attempt), FakeMessage(job_id))
        wait_for(lambda: job_row(dsn, job_id)[0] == "succeeded", timeout=10, what="the job to succeed")
    finally:
        deadlines.stop()
        group.stop()
    assert runs == [1], "the handler ran once, as attempt 1"
    with pg(dsn) as cur:
        cur.execute("SELECT attempts FROM jobs WHERE id = %s", (str(job_id),))
        assert cur.fetchone() == (1,)


def test_a_final_failure_whose_answer_was_lost_still_dead_letters_its_message(
    settings: Settings, db: Database, dsn: str
) -> None:
    """Written again, the failure's fence no longer matched: the attempt was reported as taken over,
    and its message was acked instead of dead-lettered."""
    job_id = insert(db)
    group, deadlines = GroupCommit(db, lease_seconds=30), DeadlineMonitor()
    group.start()
    deadlines.start()
    message = FakeMessage(job_id)

    def fatal(payload: dict[str, Any], ctx: JobContext) -> None:
        raise FatalJobError("no")

    try:
        executor = Executor(settings, AnswerLostDatabase(db, lose=1), group, LeaseKeeper(db, 30), deadlines)  # type: ignore[arg-type]
        executor.execute(REGISTRY["noop"], fatal, message)
    finally:
        deadlines.stop()
        group.stop()
    assert message.failed, "the message is dead-lettered"
    assert job_row(dsn, job_id)[0] == "failed"
