"""A tenant's rate bucket under concurrent submissions, against the real Postgres: a single submission
takes its token in a statement and transaction of its own (``job_store.take_tokens``), so the bucket's
row is not locked while the submission inserts and commits its job."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import psycopg2
import pytest
from support import one_value, pg, wait_for, wal_flushes

from api_service.context import Services
from api_service.published_rows import PublishedRows
from api_service.submission import IdempotentRequest, Submission, submit_job
from shared.broker import Publisher
from shared.errors import IdempotencyKeyInFlight
from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store
from shared.store import tenants as tenant_store
from shared.store.idempotency import lock_id
from shared.store.tenants import TenantLimits

#: Due in an hour: nothing is published, and nothing runs.
LATER = NewJob("noop", "default", {}, 5, 3, 60, None, 3600.0, {})
#: Hardly any refill while a test runs: the tokens left tell what each request took.
LIMITS = TenantLimits(max_active_jobs=10**6, submit_rate_per_second=0.001, submit_burst=50)


@pytest.fixture
def svc(settings: Settings, db: Database, publisher: Publisher) -> Services:
    return Services(settings=settings, db=db, publisher=publisher, published=PublishedRows(db))


def tokens(dsn: str, tenant: str) -> float:
    return float(one_value(dsn, "SELECT tokens FROM rate_buckets WHERE tenant = %s", tenant))


def test_a_submission_leaves_its_tenants_bucket_unlocked_while_it_inserts(
    svc: Services, tenant: str, dsn: str
) -> None:
    """The submission's insert is held up (another transaction holds the tenant's active-job counters,
    which its trigger updates). Meanwhile the tenant's bucket must be free for its other submissions:
    when the insert's statement took the token itself, the row stayed locked until that statement had
    committed, and every submission of the tenant waited (half of a submission's time in Postgres at
    200 submissions/s, docs/performance.md)."""
    with pg(dsn) as cur:  # the bucket's row and all 16 counters exist, so that both can be locked
        cur.execute(
            "INSERT INTO rate_buckets (tenant, tokens, refilled_at, allowed) VALUES (%s, 50, now(), true)",
            (tenant,),
        )
        cur.execute(
            "INSERT INTO tenant_active_jobs (tenant, shard, jobs)"
            " SELECT %s, s, 0 FROM generate_series(0, 15) AS s",
            (tenant,),
        )
    holder, probe = psycopg2.connect(dsn), psycopg2.connect(dsn)
    outcome: list[Submission] = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT jobs FROM tenant_active_jobs WHERE tenant = %s FOR UPDATE", (tenant,))
        submission = threading.Thread(target=lambda: outcome.append(submit_job(svc, tenant, LIMITS, LATER)))
        submission.start()

        def insert_waits() -> bool:
            with pg(dsn) as cur:
                cur.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                return cur.fetchone() is not None

        wait_for(insert_waits, timeout=10, what="the submission's insert waiting for the counters")
        with probe.cursor() as cur:
            cur.execute("SELECT tokens FROM rate_buckets WHERE tenant = %s FOR UPDATE NOWAIT", (tenant,))
            assert cur.fetchone() == (49,), "the token was taken, and its row is free"
        probe.rollback()
        holder.rollback()
        submission.join(10)
    finally:
        holder.close()
        probe.close()
    [submitted] = outcome
    assert submitted.rate is not None
    assert submitted.rate.remaining == 49


def test_a_request_refused_for_its_key_gives_its_token_back(svc: Services, tenant: str, dsn: str) -> None:
    """Another request holds the key: 409, and the token taken before the insert found that out is given
    back, as no token was taken when one statement did both. A replay takes none at all."""
    first = submit_job(svc, tenant, LIMITS, LATER, IdempotentRequest("first", "f" * 64))
    assert tokens(dsn, tenant) == pytest.approx(49, abs=0.01)
    with pg(dsn) as holder:  # a request with key "busy" is in flight
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(tenant, "busy"),))
        with pytest.raises(IdempotencyKeyInFlight):
            submit_job(svc, tenant, LIMITS, LATER, IdempotentRequest("busy", "f" * 64))
        holder.execute("ROLLBACK")
    assert tokens(dsn, tenant) == pytest.approx(49, abs=0.01)
    replay = submit_job(svc, tenant, LIMITS, LATER, IdempotentRequest("first", "f" * 64))
    assert replay.replayed
    assert replay.job.id == first.job.id
    assert tokens(dsn, tenant) == pytest.approx(49, abs=0.01)


def test_a_token_is_committed_on_its_own_and_without_waiting_for_the_disk(
    settings: Settings, tenant: str, dsn: str
) -> None:
    """Inside a transaction, the statements that take or give back tokens would make the whole
    transaction commit without waiting for the disk, a job with it: they refuse. Committed on their
    own, they flush nothing (the WAL writer flushes them a moment later), and leave the connection
    committing synchronously, as the job inserts that come next on it must."""
    db = Database(dataclasses.replace(settings, db_pool_size=1))
    try:
        with pytest.raises(RuntimeError, match="outside a transaction"):
            db.run(lambda cur: job_store.take_tokens(cur, tenant, LIMITS, 1))
        with pytest.raises(RuntimeError, match="outside a transaction"):
            db.run(lambda cur: job_store.take_tokens(cur, tenant, LIMITS, 2, "key"))

        def synchronous(cur: Any) -> None:
            for _ in range(40):
                cur.execute("UPDATE tenants SET created_at = created_at WHERE name = %s", (tenant,))

        def tokens_only(cur: Any) -> None:
            for _ in range(20):
                job_store.take_tokens(cur, tenant, LIMITS, 1)
                tenant_store.give_back_tokens(cur, tenant, LIMITS, 1)

        assert db.execute(lambda cur: wal_flushes(cur, lambda: synchronous(cur))) >= 40, (
            "each commit of a plain write waits for its flush"
        )
        assert db.execute(lambda cur: wal_flushes(cur, lambda: tokens_only(cur))) < 10, (
            "40 token statements, and hardly a flush"
        )
        assert db.execute(lambda cur: (cur.execute("SHOW synchronous_commit"), cur.fetchone())[1]) == ("on",)
    finally:
        db.close()
    assert tokens(dsn, tenant) == pytest.approx(50, abs=0.01), "each token taken was given back"
