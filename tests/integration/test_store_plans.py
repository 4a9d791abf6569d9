"""Lookups and updates by many keys or ids probe the primary key, whatever Postgres' statistics say.

A table that grows faster than autovacuum analyzes it (a new deployment, a burst of submissions) has
statistics that say it is nearly empty. Written as ``key = ANY(keys) AND tenant = ...``, such a lookup
was planned as a scan of all the tenant's rows, so a batch's idempotency check cost more the more keys
the tenant held (docs/performance.md); the worker's round read every running job to record a few
successes. These tests run the statements on tables that were never analyzed and read, from
``auto_explain``, how many rows each step of the executed plan produced. The statements run for every
request are prepared, so that Postgres plans them once per connection rather than on every request.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from support import pg, scratch_database

from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import api_keys as api_key_store
from shared.store import attempts as attempt_store
from shared.store import idempotency as key_store
from shared.store import jobs as job_store
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
    rows = [
        job_store.NewRow(
            uuid.uuid4(), NOOP, job_store.IdempotencyRecord(uuid.uuid4().hex, "f" * 64, 3600, 202)
        )
        for _ in range(count)
    ]
    db = Database(fresh)
    try:
        db.run(
            lambda cur: job_store.insert_jobs(
                cur, TENANT, rows, max_active_jobs=10**6, outbox_grace_seconds=0
            )
        )
    finally:
        db.close()
    with pg(fresh.database_url) as cur:
        cur.execute("SELECT reltuples FROM pg_class WHERE relname IN ('jobs', 'idempotency_keys')")
        assert {row[0] for row in cur.fetchall()} == {-1}, "the tables must never have been analyzed"
    keys = [row.idempotency.key for row in rows if row.idempotency is not None]
    return fresh.database_url, keys, [row.job_id for row in rows]


def largest_plan_step(dsn: str, lookup: object) -> int:
    """Run ``lookup(cursor)`` and return the most rows any step of its executed plan produced."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("LOAD 'auto_explain'")
            cur.execute("SET auto_explain.log_min_duration = 0")
            cur.execute("SET auto_explain.log_analyze = on")
            cur.execute("SET client_min_messages = log")  # the plans come back as notices
            del conn.notices[:]
            lookup(cur)  # type: ignore[operator]
            plans = "".join(conn.notices)
    finally:
        conn.close()
    produced = [int(n) for n in re.findall(r"\(actual time=[\d.]+\.\.[\d.]+ rows=(\d+)", plans)]
    assert produced, f"no plan was logged: {plans!r}"
    return max(produced)


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

    try:
        assert db.run(every_statement) == [], "nothing was prepared"
    finally:
        db.close()
