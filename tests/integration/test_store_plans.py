"""Lookups and updates by many keys or ids probe the primary key, whatever Postgres' statistics say.

A table that grows faster than autovacuum analyzes it (a new deployment, a burst of submissions) has
statistics that say it is nearly empty. Written as ``key = ANY(keys) AND tenant = ...``, such a lookup
was planned as a scan of all the tenant's rows, so a batch's idempotency check cost more the more keys
the tenant held (docs/performance.md); the worker's round read every running job to record a few
successes. These tests run the statements on tables that were never analyzed (or analyzed while no job
was active, then given a backlog) and read, from ``auto_explain``, how many rows each step of the
executed plan produced or read and discarded. The statements run for every
request are prepared, so that Postgres plans them once per connection rather than on every request.
The relay's outbox poll reads the rows it can take, not those backing off ahead of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from support import executed_plans, insert_noops, largest_step, pg, scratch_database

from shared.jobs import JobError, JobStatus, NewJob
from shared.messages import Dispatch
from shared.settings import Settings
from shared.store import Database
from shared.store import api_keys as api_key_store
from shared.store import attempts as attempt_store
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
from shared.store import outbox as outbox_store
from shared.store import tenants as tenant_store

TENANT = "default"
ROWS = 2_000
NOOP = NewJob(
    type="noop", queue="default", payload={}, priority=5, max_attempts=1, timeout_seconds=60,
    run_at=None, delay_seconds=0.0, labels={},
)  # fmt: skip


@pytest.fixture(scope="module")
def unanalyzed(settings: Settings, database: str) -> Iterator[tuple[str, list[str], list[uuid.UUID]]]:
    """A fresh database whose ``jobs`` and ``idempotency_keys`` hold ROWS rows of one tenant and were
    never analyzed (autovacuum is off for them); its DSN, the keys and the job ids."""
    with scratch_database(settings, "unanalyzed") as fresh:
        yield fill(fresh)


def fill(fresh: Settings, count: int = ROWS) -> tuple[str, list[str], list[uuid.UUID]]:
    with pg(fresh.database_url) as cur:
        for table in ("jobs", "idempotency_keys", "outbox"):
            cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    rows = insert_noops(fresh, count, keyed=True)
    with pg(fresh.database_url) as cur:
        cur.execute("SELECT reltuples FROM pg_class WHERE relname IN ('jobs', 'idempotency_keys')")
        assert {row[0] for row in cur.fetchall()} == {-1}, "the tables must never have been analyzed"
    keys = [row.idempotency.key for row in rows if row.idempotency is not None]
    return fresh.database_url, keys, [row.job_id for row in rows]


def largest_plan_step(dsn: str, lookup: Callable[[Any], object]) -> int:
    """Run ``lookup(cursor)``; the most rows any step of its executed plans produced or discarded."""
    return largest_step(executed_plans(dsn, lookup))


def test_finding_keys_probes_each_key_not_the_tenants_keys(
    unanalyzed: tuple[str, list[str], list[uuid.UUID]],
) -> None:
    dsn, keys, _ = unanalyzed
    wanted = [*keys[:99], "never-used"]  # a batch of 100
    found: dict[str, key_store.StoredKey] = {}
    steps = largest_plan_step(dsn, lambda cur: found.update(key_store.find_live_many(cur, TENANT, wanted)))
    assert set(found) == set(keys[:99])
    assert steps <= len(wanted), f"a step produced {steps} rows for {len(wanted)} keys"


def test_getting_jobs_probes_each_id_not_the_tenants_jobs(
    unanalyzed: tuple[str, list[str], list[uuid.UUID]],
) -> None:
    dsn, _, job_ids = unanalyzed
    wanted = [*job_ids[:99], uuid.uuid4()]
    with pg(dsn) as cur:
        assert job_store.get_jobs(cur, wanted, "another-tenant") == {}, "only the tenant's own jobs"
    found: dict[uuid.UUID, object] = {}
    steps = largest_plan_step(dsn, lambda cur: found.update(job_store.get_jobs(cur, wanted, TENANT)))
    assert set(found) == set(job_ids[:99])
    assert steps <= len(wanted), f"a step produced {steps} rows for {len(wanted)} ids"


def test_a_round_probes_its_jobs_not_every_running_job(settings: Settings, database: str) -> None:
    """A worker's round records 8 successes among 10,000 running jobs and claims 8 queued ones. (On a
    small table, reading all of it can be the cheaper plan, and Postgres may rightly choose it.)"""
    with scratch_database(settings, "unanalyzed_round") as fresh:
        dsn, _, job_ids = fill(fresh, 20_000)
        running, queued = job_ids[:10_000], job_ids[10_000:]
        with pg(dsn) as cur:  # earlier rounds claimed half of the jobs
            attempt_store.write_round(cur, running, 300, [])
            finished = list(job_store.get_jobs(cur, running[:8], TENANT).values())
            cur.execute("SELECT reltuples FROM pg_class WHERE relname = 'jobs'")
            assert cur.fetchone() == (-1,), "jobs must never have been analyzed"
        written: list[attempt_store.Round] = []
        steps = largest_plan_step(
            dsn,
            lambda cur: written.append(
                attempt_store.write_round(cur, queued[:8], 300, [(job, "null") for job in finished])
            ),
        )
        assert written[0].succeeded == {job.id for job in finished}
        assert all(isinstance(answer, attempt_store.Claimed) for answer in written[0].claims.values())
        assert steps <= 16, f"a step produced {steps} rows for a round of 8 claims and 8 successes"


def test_a_round_probes_its_jobs_when_statistics_say_none_is_active(
    settings: Settings, database: str
) -> None:
    """The usual state in production: ``jobs`` was analyzed while it held finished jobs and hardly any
    waiting or running one, then a backlog was queued. Postgres then took the partial index of active
    jobs for the cheapest way to find a few running ones, and each round read the whole backlog's
    entries in it, to record its successes and again to check its retried claims (the 1M-row drain:
    1.2-1.5 ms of a 3 ms round, with 20,000 jobs queued)."""
    with scratch_database(settings, "analyzed_round") as fresh:
        dsn, _, finished = fill(fresh, 4_000)
        with pg(dsn) as cur:
            attempt_store.write_round(cur, finished, 300, [])
            done = job_store.get_jobs(cur, finished, TENANT).values()
            attempt_store.write_round(cur, [], 300, [(job, "null") for job in done])
            cur.execute("VACUUM (ANALYZE) jobs")  # statistics: every job finished
        backlog = [row.job_id for row in insert_noops(fresh, 2_000, keyed=True)]
        with pg(dsn) as cur:
            attempt_store.write_round(cur, backlog[:8], 300, [])
            running = list(job_store.get_jobs(cur, backlog[:8], TENANT).values())
            stray = uuid.uuid4()  # a claim asked again after a lost answer, for a job it never got
        written: list[attempt_store.Round] = []
        steps = largest_plan_step(
            dsn,
            lambda cur: written.append(
                attempt_store.write_round(
                    cur, [*backlog[8:16], running[0].id, stray], 300, [(job, "null") for job in running]
                )
            ),
        )
        assert written[0].succeeded == {job.id for job in running}
        assert all(isinstance(written[0].claims[job_id], attempt_store.Claimed) for job_id in backlog[8:16])
        assert steps <= 16, f"a step produced {steps} rows for a round of 10 claims and 8 successes"
        with pg(dsn) as cur:
            claimed = list(job_store.get_jobs(cur, backlog[8:16], TENANT).values())
        leases = [(job.id, job.attempts, job.started_at) for job in claimed]
        steps = largest_plan_step(dsn, lambda cur: attempt_store.renew_leases(cur, leases, 300))
        assert steps <= 8, f"renewing 8 leases: a step produced {steps} rows"
        steps = largest_plan_step(dsn, lambda cur: job_store.cancel_job(cur, backlog[-1], TENANT))
        assert steps <= 16, f"cancelling one job: a step produced {steps} rows"  # triggers: a few rows
        # The relay's statistics, every refresh: the active jobs only, not the 4,000 finished ones.
        for count in (job_store.queue_counts, lambda cur: job_store.count_by_status(cur, finished=False)):
            steps = largest_plan_step(dsn, count)
            assert steps <= len(backlog), f"counting {len(backlog)} active jobs: a step produced {steps} rows"


def test_retries_listings_and_pruning_read_what_they_touch(settings: Settings, database: str) -> None:
    """On a table analyzed while its jobs were waiting, then finished, retrying a failed job probed
    every finished job (the pruning index's status predicate). Whatever the statistics: pruning read
    the whole keys table for each job it deleted (no index behind the foreign key's cascade), and a
    listing by several statuses read and sorted every job of those statuses for one page."""
    with scratch_database(settings, "pruning") as fresh:
        dsn, _, finished = fill(fresh, 3_000)
        with pg(dsn) as cur:
            cur.execute("VACUUM (ANALYZE) jobs")  # statistics: every job queued
            attempt_store.write_round(cur, finished, 300, [])
            done = list(job_store.get_jobs(cur, finished, TENANT).values())
            attempt_store.write_round(cur, [], 300, [(job, "null") for job in done[1:]])
            error = JobError("Boom", "The handler raised an error", "boom", 1)
            assert attempt_store.record_failure(cur, done[0], error)
        steps = largest_plan_step(dsn, lambda cur: job_store.retry_job(cur, done[0].id, TENANT))
        assert steps <= 2, f"retrying one job: a step produced or discarded {steps} rows"
        with pg(dsn) as cur:  # statistics: every job finished; then a burst
            cur.execute("VACUUM (ANALYZE) jobs")
        insert_noops(fresh, 1_500, keyed=True)
        one = job_store.JobFilter(TENANT, statuses=(JobStatus.QUEUED,))
        two = job_store.JobFilter(TENANT, statuses=(JobStatus.QUEUED, JobStatus.RETRYING))
        for wanted in (one, two):
            page: list[object] = []

            def list_page(cur: Any, page: list[object] = page, wanted: job_store.JobFilter = wanted) -> None:
                page.extend(job_store.list_jobs(cur, wanted, 51))

            steps = largest_plan_step(dsn, list_page)
            assert len(page) == 51
            assert steps <= 2 * 51, f"a page of 51 by status: a step produced or discarded {steps} rows"
        pruned: list[int] = []
        steps = largest_plan_step(
            dsn, lambda cur: pruned.append(job_store.prune_finished(cur, older_than_seconds=0, limit=100))
        )
        assert pruned == [100]
        assert steps <= 100, f"pruning 100 jobs: a step produced or discarded {steps} rows"


def test_the_relays_poll_reads_its_due_rows_not_the_rows_backing_off(
    settings: Settings, database: str
) -> None:
    """RabbitMQ down: the relay backs off every row it could not publish (``locked_until`` a while
    ahead), and the API holds the rows it is publishing itself for the grace period. Those rows came
    due before the ones submitted since, and each poll of the relay (every 0.5 s) read past all of
    them to find the few it could take, or read all of them to find none (migration 0013)."""
    with scratch_database(settings, "outbox_backing_off") as fresh:
        dsn, _, failed = fill(fresh, 5_000)
        with pg(dsn) as cur:  # a round that RabbitMQ did not confirm
            unconfirmed = [d.outbox_id for d in outbox_store.take_due(cur, limit=len(failed))]
            assert len(unconfirmed) == len(failed)
            outbox_store.record_publish_error(cur, unconfirmed, "broker unavailable", 3600)
        insert_noops(fresh, 1_000, keyed=True, grace=3600)  # the API publishing them itself

        def poll(due: list[job_store.NewRow]) -> None:
            taken: list[Dispatch] = []
            steps = largest_plan_step(dsn, lambda cur: taken.extend(outbox_store.take_due(cur, limit=200)))
            assert {d.job_id for d in taken} == {row.job_id for row in due}, "the due rows, and only they"
            assert steps <= len(due), f"{len(due)} rows due: a step read {steps} rows"

        poll([])  # everything backing off or held: nothing to read
        due = insert_noops(fresh, 10, keyed=True)
        poll(due)
        with pg(dsn) as cur:  # statistics taken during the outage
            cur.execute("VACUUM (ANALYZE) outbox, jobs")
        poll(due)


def test_the_statements_of_every_request_are_planned_once_per_connection(dsn: str, database: str) -> None:
    """Authenticating a request and reading a job (every poll) run prepared statements with one generic
    plan per connection: planning the key lookup cost Postgres more than running it."""
    with pg(dsn) as cur:
        for _ in range(3):
            assert api_key_store.lookup_active(cur, "cvk_nosuchkey") is None
            assert job_store.get_job(cur, uuid.uuid4(), TENANT) is None
            assert tenant_store.get_tenant(cur, "no-such-tenant") is None
        cur.execute("SELECT name, generic_plans, custom_plans FROM pg_prepared_statements")
        plans = {name: (generic, custom) for name, generic, custom in cur.fetchall()}
    for name in ("conveyor_lookup_active_key", "conveyor_get_job", "conveyor_get_tenant"):
        assert name in plans, f"{name} is not prepared: {sorted(plans)}"
        assert plans[name] == (3, 0), f"{name}: (generic, custom) plans = {plans[name]}"


def test_without_prepared_statements_the_same_statements_run_as_plain_sql(
    settings: Settings, database: str
) -> None:
    """CONVEYOR_DB_PREPARED_STATEMENTS=false, for a pooler in transaction mode: there the next statement
    may reach a server session that never saw the PREPARE. Every prepared statement runs, and leaves
    nothing prepared in the session."""
    import dataclasses

    db = Database(dataclasses.replace(settings, db_prepared_statements=False))
    limits = tenant_store.TenantLimits(
        max_active_jobs=10**6, submit_rate_per_second=10**6, submit_burst=10**6
    )
    job_id = uuid.uuid4()

    def every_statement(cur: psycopg2.extensions.cursor) -> list[tuple[str]]:
        assert api_key_store.lookup_active(cur, "cvk_nosuchkey") is None
        assert tenant_store.get_tenant(cur, "no-such-tenant") is None
        submitted = job_store.submit(
            cur, job_id, TENANT, NOOP, limits=limits, outbox_grace_seconds=0,
            idempotency=job_store.IdempotencyRecord(uuid.uuid4().hex, "f" * 64, 3600, 202), request_id=None,
        )  # fmt: skip
        assert submitted.job is not None
        row = job_store.NewRow(uuid.uuid4(), NOOP, None)
        job_store.insert_jobs(cur, TENANT, [row], max_active_jobs=10**6, outbox_grace_seconds=0)
        written = attempt_store.write_round(cur, [job_id, row.job_id], 30, [])
        assert all(isinstance(answer, attempt_store.Claimed) for answer in written.claims.values())
        assert attempt_store.write_round(cur, [], 30, []).claims == {}  # empty arrays keep their types
        job = job_store.get_job(cur, job_id, TENANT)
        assert job is not None
        assert job.status.value == "running"
        cur.execute("SELECT name FROM pg_prepared_statements")
        return cur.fetchall()

    def every_self_committing_statement(cur: psycopg2.extensions.cursor) -> list[tuple[str]]:
        assert job_store.take_tokens(cur, TENANT, limits, 1, uuid.uuid4().hex).rate is not None
        tenant_store.give_back_tokens(cur, TENANT, limits, 3)
        cur.execute("SELECT name FROM pg_prepared_statements")
        return cur.fetchall()

    try:
        assert db.run(every_statement) == [], "nothing was prepared"
        assert db.execute(every_self_committing_statement) == [], "nothing was prepared"
    finally:
        db.close()
