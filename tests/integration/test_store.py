"""The Postgres store against the real database: state machine, claims, fences, leases, outbox, keys."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg2
import pytest
from support import active_counts, pg

from shared.errors import IllegalTransition, StoreUnavailable
from shared.jobs import TRANSITIONS, JobError, JobStatus, NewJob, transition_rows
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import db as db_module
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store import tenants as tenant_store
from shared.store.db import Cursor
from shared.store.migrate import migrate

ERROR = JobError("Boom", "It broke", "details", 1)
TENANT = "default"


def new_job(**overrides: object) -> NewJob:
    fields: dict[str, object] = {
        "type": "noop", "queue": "default", "payload": {}, "priority": 5, "max_attempts": 2,
        "timeout_seconds": 60, "run_at": None, "delay_seconds": 0.0, "labels": {},
    }  # fmt: skip
    fields.update(overrides)
    return NewJob(**fields)  # type: ignore[arg-type]


def insert_job(cur: Cursor, job_id: uuid.UUID, new: NewJob, **kwargs: Any) -> Any:
    return job_store.insert_job(cur, job_id, TENANT, new, max_active_jobs=10**6, **kwargs)


def insert(db: Database, **overrides: object) -> uuid.UUID:
    job_id = uuid.uuid4()
    db.run(lambda cur: insert_job(cur, job_id, new_job(**overrides), outbox_grace_seconds=0))
    return job_id


def claim(db: Database, job_id: uuid.UUID, lease: float = 30) -> attempt_store.ClaimResult:
    return db.execute(lambda cur: attempt_store.claim_job(cur, job_id, lease))


def status_of(dsn: str, job_id: uuid.UUID) -> str:
    with pg(dsn) as cur:
        cur.execute("SELECT status FROM jobs WHERE id = %s", (str(job_id),))
        row = cur.fetchone()
        assert row is not None
        return str(row[0])


def test_migrate_twice_is_a_no_op(settings: Settings, database: str) -> None:
    assert migrate(settings) == []


def test_transition_table_mirrors_the_code(dsn: str, database: str) -> None:
    with pg(dsn) as cur:
        cur.execute("SELECT from_status, to_status FROM job_status_transitions ORDER BY 1, 2")
        assert cur.fetchall() == list(transition_rows())


def legal_path(start: JobStatus, end: JobStatus) -> list[JobStatus]:
    """The shortest walk from ``start`` to ``end`` along legal transitions, both included."""
    paths = {start: [start]}
    frontier = [start]
    while end not in paths and frontier:
        reached = []
        for here in frontier:
            for there in JobStatus:
                if (here, there) in TRANSITIONS and there not in paths:
                    paths[there] = [*paths[here], there]
                    reached.append(there)
        frontier = reached
    assert end in paths, f"{end} cannot be reached from {start}"
    return paths[end]


@pytest.mark.parametrize(
    ("start", "target"),
    [(s, t) for s in JobStatus for t in JobStatus if s != t and (s, t) not in TRANSITIONS],
)
def test_database_rejects_every_illegal_transition(
    db: Database, dsn: str, start: JobStatus, target: JobStatus
) -> None:
    job_id = insert(db)
    with pg(dsn) as cur:  # put the row in `start` by legal steps, the triggers keeping count
        for status in legal_path(JobStatus.QUEUED, start)[1:]:
            cur.execute("UPDATE jobs SET status = %s WHERE id = %s", (status.value, str(job_id)))
    with pytest.raises(IllegalTransition, match=f"{start.value} -> {target.value}"):
        db.execute(
            lambda cur: cur.execute("UPDATE jobs SET status = %s WHERE id = %s", (target.value, job_id))
        )
    assert status_of(dsn, job_id) == start.value


def test_a_job_cannot_be_inserted_already_finished(dsn: str, database: str) -> None:
    with pg(dsn) as cur, pytest.raises(psycopg2.errors.CheckViolation, match="illegal job status transition"):
        cur.execute(
            "INSERT INTO jobs (id, tenant, type, queue, status, payload, priority, max_attempts,"
            " timeout_seconds, run_at)"
            " VALUES (gen_random_uuid(), %s, 'noop', 'q', 'succeeded', '{}', 1, 1, 1, now())",
            (TENANT,),
        )


def test_claim_is_compare_and_set(db: Database) -> None:
    job_id = insert(db)
    first = claim(db, job_id)
    assert isinstance(first, attempt_store.Claimed)
    assert first.job.attempts == 1
    assert first.job.status is JobStatus.RUNNING
    second = claim(db, job_id)
    assert second == attempt_store.NotClaimable(JobStatus.RUNNING, due_later=False)


def test_claim_refuses_a_job_that_is_not_due(db: Database) -> None:
    job_id = insert(db, delay_seconds=60.0)
    assert claim(db, job_id) == attempt_store.NotClaimable(JobStatus.QUEUED, due_later=True)


def test_claim_of_unknown_job_reports_missing(db: Database) -> None:
    assert isinstance(claim(db, uuid.uuid4()), attempt_store.Missing)


def test_finished_job_is_never_claimed_again(db: Database) -> None:
    job_id = insert(db)
    claimed = claim(db, job_id)
    assert isinstance(claimed, attempt_store.Claimed)
    assert db.execute(lambda cur: attempt_store.record_success(cur, claimed.job, {"ok": True}))
    assert claim(db, job_id) == attempt_store.NotClaimable(JobStatus.SUCCEEDED, due_later=False)


def test_outcome_of_a_taken_over_attempt_is_discarded(db: Database, dsn: str) -> None:
    job_id = insert(db, max_attempts=3)
    stale = claim(db, job_id)
    assert isinstance(stale, attempt_store.Claimed)
    with pg(dsn) as cur:  # the lease lapses and the relay re-queues the job
        cur.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (str(job_id),)
        )
    recovered = db.execute(
        lambda cur: attempt_store.recover_lapsed_leases(cur, limit=1000, retry_base=0, retry_cap=0)
    )
    assert job_id in {j.id for j in recovered}
    fresh = claim(db, job_id)
    assert isinstance(fresh, attempt_store.Claimed)
    assert fresh.job.attempts == 2
    assert not db.execute(lambda cur: attempt_store.record_success(cur, stale.job, "stale"))
    assert db.execute(lambda cur: attempt_store.record_success(cur, fresh.job, "fresh"))
    job = db.execute(lambda cur: job_store.get_job(cur, job_id))
    assert job is not None
    assert (job.status, job.result, job.attempts) == (JobStatus.SUCCEEDED, "fresh", 2)


def test_an_attempt_from_before_a_replay_cannot_write_over_the_new_one(db: Database, dsn: str) -> None:
    """A replay starts the attempt count again, so the new cycle's first attempt has the number of the
    stale one (a worker cut off from Postgres while its lease lapsed, the job failed and was replayed).
    The claim's time tells them apart: the stale attempt can neither renew, report nor finish."""
    job_id = insert(db, max_attempts=1)
    stale = claim(db, job_id)
    assert isinstance(stale, attempt_store.Claimed)
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (str(job_id),)
        )
    db.execute(lambda cur: attempt_store.recover_lapsed_leases(cur, limit=1000, retry_base=0, retry_cap=0))
    moved, _ = db.run(lambda cur: job_store.retry_job(cur, job_id, None))
    assert moved
    fresh = claim(db, job_id)
    assert isinstance(fresh, attempt_store.Claimed)
    assert fresh.job.attempts == stale.job.attempts == 1
    assert stale.job.started_at is not None
    old = (job_id, 1, stale.job.started_at)
    assert db.execute(lambda cur: attempt_store.renew_leases(cur, [old], 30)) == set()
    db.execute(lambda cur: attempt_store.record_progress(cur, stale.job, {"percent": 1}))
    stale_error = JobError("Stale", "stale", "stale", 1)
    assert not db.execute(lambda cur: attempt_store.record_failure(cur, stale.job, stale_error))
    assert not db.execute(lambda cur: attempt_store.record_success(cur, stale.job, "stale"))
    assert db.execute(lambda cur: attempt_store.record_success(cur, fresh.job, "fresh"))
    job = db.execute(lambda cur: job_store.get_job(cur, job_id))
    assert job is not None
    assert (job.status, job.result, job.progress) == (JobStatus.SUCCEEDED, "fresh", None)


def test_lapsed_lease_fails_the_job_when_attempts_are_used_up(db: Database, dsn: str) -> None:
    job_id = insert(db, max_attempts=1)
    assert isinstance(claim(db, job_id, lease=0.01), attempt_store.Claimed)
    time.sleep(0.05)
    db.execute(lambda cur: attempt_store.recover_lapsed_leases(cur, limit=1000, retry_base=0, retry_cap=0))
    job = db.execute(lambda cur: job_store.get_job(cur, job_id))
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert job.error["type"] == "WorkerLost"


def lease_left(dsn: str, job_id: uuid.UUID) -> float:
    with pg(dsn) as cur:
        cur.execute(
            "SELECT EXTRACT(EPOCH FROM lease_expires_at - now()) FROM jobs WHERE id = %s", (str(job_id),)
        )
        row = cur.fetchone()
        assert row is not None
        return float(row[0])


def test_renewal_reports_a_cancel_request(db: Database, dsn: str) -> None:
    job_id = insert(db)
    claimed = claim(db, job_id)
    assert isinstance(claimed, attempt_store.Claimed)
    assert claimed.job.started_at is not None
    assert db.run(lambda cur: job_store.cancel_job(cur, job_id, None)).cancel_requested_at is not None  # type: ignore[union-attr]
    attempt = (job_id, 1, claimed.job.started_at)
    assert db.execute(lambda cur: attempt_store.renew_leases(cur, [attempt], 30)) == {job_id}


def test_renewed_lease_keeps_the_job_running(db: Database, dsn: str) -> None:
    job_id = insert(db)
    claimed = claim(db, job_id, lease=0.5)
    assert isinstance(claimed, attempt_store.Claimed)
    assert claimed.job.started_at is not None
    started_at = claimed.job.started_at
    for other in [(job_id, 2, started_at), (job_id, 1, started_at - timedelta(seconds=1))]:
        assert db.execute(lambda cur: attempt_store.renew_leases(cur, [other], 3600)) == set()  # noqa: B023
    assert lease_left(dsn, job_id) < 1, "another attempt's renewal changed nothing"
    assert db.execute(lambda cur: attempt_store.renew_leases(cur, [(job_id, 1, started_at)], 30)) == set()
    assert 25 < lease_left(dsn, job_id) <= 30
    time.sleep(0.6)
    recovered = db.execute(
        lambda cur: attempt_store.recover_lapsed_leases(cur, limit=1000, retry_base=0, retry_cap=0)
    )
    assert job_id not in {j.id for j in recovered}


def test_retry_writes_the_next_attempts_outbox_row(db: Database, dsn: str) -> None:
    job_id = insert(db)
    claimed = claim(db, job_id)
    assert isinstance(claimed, attempt_store.Claimed)
    with pg(dsn) as cur:
        cur.execute("DELETE FROM outbox WHERE job_id = %s", (str(job_id),))
    assert (
        db.execute(lambda cur: attempt_store.record_retry(cur, claimed.job, ERROR, 30.0))
        is JobStatus.RETRYING
    )
    with pg(dsn) as cur:
        cur.execute(
            "SELECT j.status, j.error->>'type', o.available_at - now() > interval '25 seconds' "
            "FROM jobs j JOIN outbox o ON o.job_id = j.id WHERE j.id = %s",
            (str(job_id),),
        )
        assert cur.fetchall() == [("retrying", "Boom", True)]
    assert claim(db, job_id) == attempt_store.NotClaimable(JobStatus.RETRYING, due_later=True)


def test_a_retry_waits_for_a_job_another_transaction_holds(db: Database, dsn: str) -> None:
    """Skipped, a job held for a moment (a concurrent retry of it, an operator's replay) was answered as
    refused by the tenant's cap: a false 429."""
    job_id = insert(db)
    assert db.run(lambda cur: job_store.cancel_job(cur, job_id, TENANT)) is not None
    holder = psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (str(job_id),))
            release = threading.Timer(0.3, holder.rollback)
            release.start()
            moved, job = db.run(lambda c: job_store.retry_job(c, job_id, TENANT, max_active_jobs=10**6))
            release.join()
    finally:
        holder.close()
    assert moved
    assert job is not None
    assert job.status is JobStatus.QUEUED


def due_ids(db: Database) -> set[uuid.UUID]:
    return {d.job_id for d in db.run(lambda cur: outbox_store.take_due(cur, limit=1000))}


def test_outbox_leaves_fresh_rows_to_their_writer_then_takes_them(db: Database) -> None:
    job_id = uuid.uuid4()
    db.run(lambda cur: insert_job(cur, job_id, new_job(), outbox_grace_seconds=0.5))
    assert job_id not in due_ids(db)
    time.sleep(0.6)
    assert job_id in due_ids(db)


def test_a_taken_outbox_row_is_skipped_by_others_until_its_transaction_ends(
    db: Database, settings: Settings
) -> None:
    job_id = uuid.uuid4()
    db.run(lambda cur: insert_job(cur, job_id, new_job(), outbox_grace_seconds=0))
    other = Database(settings)
    try:

        def take_while_held(cur: Cursor) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
            mine = {d.job_id for d in outbox_store.take_due(cur, limit=1000)}
            return mine, due_ids(other)

        mine, theirs = db.run(take_while_held)
        assert job_id in mine
        assert job_id not in theirs, "a row one relay holds is not handed to another"
        assert job_id in due_ids(other), "a relay that ended without a DELETE leaves its rows due at once"
    finally:
        other.close()


def test_a_row_whose_publish_failed_waits_for_the_backoff(db: Database) -> None:
    job_id = uuid.uuid4()
    db.run(lambda cur: insert_job(cur, job_id, new_job(), outbox_grace_seconds=0))

    def fail(cur: Cursor) -> None:
        [taken] = [d for d in outbox_store.take_due(cur, limit=1000) if d.job_id == job_id]
        outbox_store.record_publish_error(cur, [taken.outbox_id], "broker unavailable", 0.5)

    db.run(fail)
    assert job_id not in due_ids(db)
    time.sleep(0.6)
    assert job_id in due_ids(db)


def test_expired_keys_of_finished_jobs_are_purged_and_the_others_kept(db: Database, dsn: str) -> None:
    live, expired, unfinished = (f"{name}-{uuid.uuid4()}" for name in ("live", "expired", "unfinished"))
    for key in (live, expired, unfinished):
        record = job_store.IdempotencyRecord(key, "fp", 3600, 202)
        db.run(lambda cur, r=record: insert_job(  # type: ignore[misc]
            cur, uuid.uuid4(), new_job(), outbox_grace_seconds=0, idempotency=r))  # fmt: skip
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key IN (%s, %s)",
            (expired, unfinished),
        )
        cur.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id ="
            " (SELECT job_id FROM idempotency_keys WHERE key = %s)",
            (expired,),
        )
    while db.execute(lambda cur: key_store.purge_expired(cur, 1000)):
        pass
    with pg(dsn) as cur:
        cur.execute("SELECT key FROM idempotency_keys WHERE key IN (%s, %s, %s) ORDER BY key",
                    (live, expired, unfinished))  # fmt: skip
        assert cur.fetchall() == [(live,), (unfinished,)], "a key stays while its job is unfinished"


def test_a_key_answers_for_its_unfinished_job_past_its_ttl(db: Database, dsn: str) -> None:
    """A job that still retries after the key's TTL: a client retrying its submission then must get that
    job back, not a second one. Once the job has finished, the TTL alone counts, and the key can be
    taken over by a new job."""
    key = f"long-{uuid.uuid4()}"
    first = uuid.uuid4()
    record = job_store.IdempotencyRecord(key, "fp", 3600, 202)
    db.run(lambda cur: insert_job(cur, first, new_job(), outbox_grace_seconds=0, idempotency=record))
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE key = %s", (key,)
        )
    found = db.read(lambda cur: key_store.find_live(cur, TENANT, key))
    assert found is not None
    assert found.job_id == first
    again = db.run(lambda cur: job_store.insert_jobs(
        cur, TENANT, [job_store.NewRow(uuid.uuid4(), new_job(), record)], max_active_jobs=10**6,
        outbox_grace_seconds=0))  # fmt: skip
    assert again == [None], "not inserted: the key still answers for the first job"
    with pg(dsn) as cur:
        cur.execute("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = %s", (first,))
    assert db.read(lambda cur: key_store.find_live(cur, TENANT, key)) is None
    second = uuid.uuid4()
    [taken] = db.run(lambda cur: job_store.insert_jobs(
        cur, TENANT, [job_store.NewRow(second, new_job(), record)], max_active_jobs=10**6,
        outbox_grace_seconds=0))  # fmt: skip
    assert taken is not None
    assert taken[0].id == second


def test_a_scheduled_jobs_key_lives_until_a_ttl_after_the_job_is_due(db: Database, dsn: str) -> None:
    """A job scheduled a week ahead must not lose its key after a day: a client retrying its
    submission then would create a second job."""
    week, day = 7 * 86_400.0, 86_400
    keys = {f"now-{uuid.uuid4()}": new_job(), f"later-{uuid.uuid4()}": new_job(delay_seconds=week)}
    for key, new in keys.items():
        record = job_store.IdempotencyRecord(key, "fp", day, 202)
        db.run(lambda cur, r=record, n=new: insert_job(  # type: ignore[misc]
            cur, uuid.uuid4(), n, outbox_grace_seconds=0, idempotency=r))  # fmt: skip
    with pg(dsn) as cur:
        cur.execute(
            "SELECT k.key, EXTRACT(EPOCH FROM k.expires_at - j.run_at),"
            " EXTRACT(EPOCH FROM k.expires_at - now())"
            " FROM idempotency_keys k JOIN jobs j ON j.id = k.job_id WHERE k.key = ANY(%s)",
            (list(keys),),
        )
        rows = cur.fetchall()
    lifetimes = {key.split("-")[0]: (float(after_due), float(left)) for key, after_due, left in rows}
    assert lifetimes["now"][1] == pytest.approx(day, abs=5)
    assert lifetimes["later"][0] == pytest.approx(day, abs=5)
    assert lifetimes["later"][1] == pytest.approx(week + day, abs=5)


def test_pruning_deletes_old_finished_jobs_but_never_dead_letters(db: Database, dsn: str) -> None:
    def finished(outcome: str) -> uuid.UUID:
        job_id = insert(db, max_attempts=1)
        claimed = claim(db, job_id)
        assert isinstance(claimed, attempt_store.Claimed)
        if outcome == "succeeded":
            db.execute(lambda cur: attempt_store.record_success(cur, claimed.job, None))
        else:
            db.execute(lambda cur: attempt_store.record_failure(cur, claimed.job, ERROR))
        return job_id

    old_success, old_dead, old_purged, fresh_success = (
        finished("succeeded"), finished("failed"), finished("failed"), finished("succeeded"),
    )  # fmt: skip
    waiting = insert(db)
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE jobs SET finished_at = now() - interval '2 days', created_at = now() - interval '2 days'"
            " WHERE id = ANY(%s::uuid[])",
            ([str(j) for j in (old_success, old_dead, old_purged, waiting)],),
        )
        cur.execute("DELETE FROM dead_letters WHERE job_id = %s", (str(old_purged),))
    while db.execute(lambda cur: job_store.prune_finished(cur, older_than_seconds=86_400, limit=2)):
        pass
    with pg(dsn) as cur:
        cur.execute(
            "SELECT id FROM jobs WHERE id = ANY(%s::uuid[])",
            ([str(j) for j in (old_success, old_dead, old_purged, fresh_success, waiting)],),
        )
        left = {row[0] for row in cur.fetchall()}
    assert left == {str(old_dead), str(fresh_success), str(waiting)} or left == {
        old_dead,
        fresh_success,
        waiting,
    }


def test_a_waiting_job_whose_message_died_gets_a_new_one(db: Database, dsn: str) -> None:
    job_id = insert(db)
    with pg(dsn) as cur:  # published long ago; then RabbitMQ dead-lettered its only message
        cur.execute("DELETE FROM outbox WHERE job_id = %s", (str(job_id),))
    assert db.execute(lambda cur: job_store.ensure_dispatch(cur, job_id))
    assert not db.execute(lambda cur: job_store.ensure_dispatch(cur, job_id)), "one new message, not two"
    claimed = claim(db, job_id)
    assert isinstance(claimed, attempt_store.Claimed)
    assert not db.execute(lambda cur: job_store.ensure_dispatch(cur, job_id)), "a running job needs none"


def test_a_row_a_publisher_holds_does_not_count_as_the_new_message(db: Database, dsn: str) -> None:
    """The held row may be the dead message's own, published and confirmed, about to be deleted by the
    API (or another relay): counted as the job's next message, it left the job with none."""
    job_id = insert(db)
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE outbox SET locked_until = now() + interval '1 minute' WHERE job_id = %s", (str(job_id),)
        )
    assert db.execute(lambda cur: job_store.ensure_dispatch(cur, job_id))
    with pg(dsn) as cur:  # the publisher deletes its confirmed row
        cur.execute("DELETE FROM outbox WHERE job_id = %s AND locked_until > now()", (str(job_id),))
        cur.execute("SELECT count(*) FROM outbox WHERE job_id = %s", (str(job_id),))
        assert cur.fetchone() == (1,), "the job still has a message to come"


def test_a_row_a_relay_is_publishing_does_not_count_as_the_new_message(db: Database, dsn: str) -> None:
    """The relay holds the rows of its round with FOR UPDATE (no locked_until), publishes them and
    deletes them when RabbitMQ confirms: the row it holds may be the dead message's own."""
    job_id = insert(db)
    relay = psycopg2.connect(dsn)
    try:
        with relay.cursor() as cur:
            cur.execute("SELECT id FROM outbox WHERE job_id = %s FOR UPDATE", (str(job_id),))
            assert cur.fetchone() is not None
            assert db.execute(lambda c: job_store.ensure_dispatch(c, job_id))
            held = "SELECT min(id) FROM outbox WHERE job_id = %s"
            cur.execute(f"DELETE FROM outbox WHERE id = ({held})", (str(job_id),))  # confirmed
        relay.commit()
    finally:
        relay.close()
    with pg(dsn) as cur:
        cur.execute("SELECT count(*) FROM outbox WHERE job_id = %s", (str(job_id),))
        assert cur.fetchone() == (1,), "the job still has a message to come"


def dead_letter_jobs(dsn: str, job_ids: list[uuid.UUID]) -> set[str]:
    with pg(dsn) as cur:
        cur.execute(
            "SELECT job_id::text FROM dead_letters WHERE job_id = ANY(%s::uuid[])",
            ([str(j) for j in job_ids],),
        )
        return {row[0] for row in cur.fetchall()}


def test_statements_writing_many_jobs_keep_the_active_count_and_dead_letters(db: Database, dsn: str) -> None:
    """The triggers run once per statement: every row of a batch insert, of a worker's round (claims
    and successes in one statement), of a lease recovery, a replay and a prune must be counted."""
    kept, recount = active_counts(dsn)
    assert kept == recount
    base = recount
    rows = [job_store.NewRow(uuid.uuid4(), new_job(max_attempts=1), None) for _ in range(6)]
    ids = [row.job_id for row in rows]
    db.execute(
        lambda cur: job_store.insert_jobs(cur, TENANT, rows, max_active_jobs=10**6, outbox_grace_seconds=0)
    )
    assert active_counts(dsn) == (base + 6, base + 6)

    first = db.execute(lambda cur: attempt_store.write_round(cur, ids[:4], 30, []))
    claimed = [first.claims[i] for i in ids[:4]]
    assert all(isinstance(c, attempt_store.Claimed) for c in claimed)
    jobs = [c.job for c in claimed if isinstance(c, attempt_store.Claimed)]
    second = db.execute(
        lambda cur: attempt_store.write_round(cur, ids[4:], 30, [(job, "null") for job in jobs[:2]])
    )
    assert second.succeeded == set(ids[:2])
    assert active_counts(dsn) == (base + 4, base + 4)

    with pg(dsn) as cur:  # the four running jobs' worker is lost: all out of attempts, failed together
        cur.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = ANY(%s::uuid[])",
            ([str(i) for i in ids[2:]],),
        )
    failed = db.execute(
        lambda cur: attempt_store.recover_lapsed_leases(cur, limit=100, retry_base=1, retry_cap=1)
    )
    assert set(ids[2:]) <= {job.id for job in failed}
    assert active_counts(dsn) == (base, base)
    assert dead_letter_jobs(dsn, ids) == {str(i) for i in ids[2:]}

    replayed = db.execute(lambda cur: job_store.requeue_jobs(cur, "id = ANY(%(ids)s)", {"ids": ids[2:5]}))
    assert set(replayed) == set(ids[2:5])
    assert active_counts(dsn) == (base + 3, base + 3)
    assert dead_letter_jobs(dsn, ids) == {str(ids[5])}

    with pg(dsn) as cur:
        cur.execute(
            "UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id = ANY(%s::uuid[])",
            ([str(i) for i in ids[:2]],),
        )
    while db.execute(lambda cur: job_store.prune_finished(cur, older_than_seconds=86_400, limit=10)):
        pass
    assert active_counts(dsn) == (base + 3, base + 3)
    with pg(dsn) as cur:
        cur.execute("DELETE FROM jobs WHERE id = ANY(%s::uuid[])", ([str(i) for i in ids[2:5]],))
    assert active_counts(dsn) == (base, base)


def test_after_a_postgres_restart_the_pool_drops_every_dead_connection(
    settings: Settings, database: str, dsn: str
) -> None:
    """Each pooled connection dies with the server session behind it. The retry took the next idle
    connection, as dead as the first, and the request answered 503 with Postgres already back."""
    import contextlib
    import dataclasses

    name = f"conveyor-pool-{uuid.uuid4().hex[:8]}"
    db = Database(dataclasses.replace(settings, db_pool_size=3), application_name=name)
    try:
        with contextlib.ExitStack() as held:  # three connections, then all three idle in the pool
            for _ in range(3):
                held.enter_context(db._checkout())
        with pg(dsn) as cur:  # what a restart does to them
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                (name,),
            )
            assert cur.fetchone() == (3,)
        time.sleep(0.2)
        assert db.run(lambda cur: (cur.execute("SELECT 1"), cur.fetchone())[1]) == (1,)
    finally:
        db.close()


def test_an_attempt_the_relay_took_over_is_not_taken_for_the_workers_own_outcome(db: Database) -> None:
    """The relay's recovery keeps the attempt's number and time; the worker asking whether its lost
    write happened must not take the relay's 'failed' (WorkerLost) for its own."""
    job_id = insert(db, max_attempts=1)
    token = uuid.uuid4()
    claimed = db.execute(lambda cur: attempt_store.claim_job(cur, job_id, 30, token))
    assert isinstance(claimed, attempt_store.Claimed)
    assert db.execute(lambda cur: attempt_store.outcome_of(cur, claimed.job, token)) is JobStatus.RUNNING
    lapse = "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s"
    db.execute(lambda cur: cur.execute(lapse, (str(job_id),)))
    [recovered] = db.execute(
        lambda cur: attempt_store.recover_lapsed_leases(cur, limit=10, retry_base=1, retry_cap=1)
    )
    assert recovered.status is JobStatus.FAILED
    assert db.execute(lambda cur: attempt_store.outcome_of(cur, claimed.job, token)) is None


@contextmanager
def deadlock_once(db: Database, dsn: str) -> Iterator[Callable[[Cursor], int]]:
    """Work for ``db.run`` that deadlocks, on its first run only, with a transaction on another
    connection (in a thread, joined on leaving): each locks the row of one of two new tenants, then
    wants the other's. The work's side gives up first (a shorter ``deadlock_timeout``), so Postgres
    undoes it, and the other transaction commits. The work returns how many times it has run."""
    first, second = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name in (first, second):
        db.execute(lambda cur, name=name: tenant_store.create_tenant(cur, name))
    lock = "UPDATE tenants SET submit_burst = submit_burst WHERE name = %s"
    has_first, has_second = threading.Event(), threading.Event()
    runs: list[int] = []

    def work(cur: Cursor) -> int:
        runs.append(len(runs) + 1)
        cur.execute("SET LOCAL deadlock_timeout = '200ms'")
        cur.execute(lock, (first,))
        if len(runs) == 1:
            has_first.set()
            assert has_second.wait(10)
        cur.execute(lock, (second,))  # the first time: waits for the other, which waits for this one
        return len(runs)

    def other() -> None:
        conn = psycopg2.connect(dsn)
        try:
            with conn, conn.cursor() as cur:  # commits on leaving
                cur.execute("SET LOCAL deadlock_timeout = '10s'")
                assert has_first.wait(10)
                cur.execute(lock, (second,))
                has_second.set()
                cur.execute(lock, (first,))
        finally:
            conn.close()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        yield work
    finally:
        thread.join(15)
    assert not thread.is_alive()


def test_work_postgres_undid_to_break_a_deadlock_runs_again(db: Database, dsn: str) -> None:
    """A transaction Postgres chose to undo to break a deadlock is run again once the other has gone
    on, rather than failing its request (a batch taking over expired keys while pruning deleted their
    old jobs could meet it: docs/architecture.md)."""
    with deadlock_once(db, dsn) as work:
        assert db.run(work) == 2


def test_a_deadlock_that_keeps_coming_back_ends_as_store_unavailable(
    db: Database, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "DEADLOCK_RETRIES", 0)
    with deadlock_once(db, dsn) as work, pytest.raises(StoreUnavailable, match="DeadlockDetected"):
        db.run(work)
