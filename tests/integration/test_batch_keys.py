"""A batch's idempotency keys when another request stores some of them while the batch runs, against the
real Postgres: ``submit_batch`` with a database that lets "another request" commit a key right after
the batch's first lookup, so the race is the same every time."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
from support import pg, wait_for

from api_service.context import Services
from api_service.published_rows import PublishedRows
from api_service.submission import BatchItem, IdempotentRequest, ItemResult, submit_batch
from shared.broker import Publisher
from shared.errors import IdempotencyKeyReused, TooManyActiveJobs
from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store
from shared.store.tenants import TenantLimits

T = TypeVar("T")

#: Due in an hour: nothing is published, and nothing runs.
LATER = NewJob("noop", "default", {}, 5, 3, 60, None, 3600.0, {})
CAP = 5


class StoredAfterFirstLookup:
    """A real ``Database``; right after the batch's first lookup of its keys (its first ``read``),
    another request commits ``key`` with ``fingerprint`` for a job of its own."""

    def __init__(self, db: Database, tenant: str, key: str, fingerprint: str) -> None:
        self.db, self.tenant = db, tenant
        self.record = job_store.IdempotencyRecord(key, fingerprint, 3600, 202)
        self.stored_job: uuid.UUID | None = None

    def read(self, work: Callable[[Any], T]) -> T:
        result = self.db.read(work)
        if self.stored_job is None:
            self.stored_job = uuid.uuid4()
            row = job_store.NewRow(self.stored_job, LATER, self.record)
            self.db.run(lambda cur: job_store.insert_jobs(
                cur, self.tenant, [row], max_active_jobs=CAP, outbox_grace_seconds=0))  # fmt: skip
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def run_batch(
    settings: Settings, db: Any, publisher: Publisher, tenant: str, items: list[BatchItem], cap: int = CAP
) -> list[ItemResult]:
    real = getattr(db, "db", db)
    svc = Services(settings=settings, db=db, publisher=publisher, published=PublishedRows(real))
    limits = TenantLimits(max_active_jobs=cap, submit_rate_per_second=1000, submit_burst=1000)
    results, _ = submit_batch(svc, tenant, limits, items)
    return results


def item(index: int, key: str | None = None, fingerprint: str = "f" * 64) -> BatchItem:
    return BatchItem(index, LATER, IdempotentRequest(key, fingerprint) if key else None)


def test_a_key_stored_meanwhile_replays_and_leaves_its_place_under_the_cap_to_the_others(
    settings: Settings, db: Database, publisher: Publisher, tenant: str
) -> None:
    """Room for 5 active jobs. Another request stores K (one active job: room for 4) between the batch's
    first lookup and its insert. K replays that job, and 4 of the 5 others are created: K's place in
    the count must not cost one of them a false 429."""
    key = f"k-{uuid.uuid4()}"
    racing = StoredAfterFirstLookup(db, tenant, key, "f" * 64)
    results = run_batch(settings, racing, publisher, tenant, [item(0, key), *(item(i) for i in range(1, 6))])
    assert results[0].submission is not None
    assert results[0].submission.replayed
    assert results[0].submission.job.id == racing.stored_job
    created = [r for r in results[1:] if r.submission is not None]
    refused = [r for r in results[1:] if r.refusal is not None]
    assert (len(created), len(refused)) == (4, 1), [r.refusal for r in refused]
    assert isinstance(refused[0].refusal, TooManyActiveJobs)


def test_a_repeated_key_stored_meanwhile_with_the_second_body_replays_the_second_item(
    settings: Settings, db: Database, publisher: Publisher, tenant: str
) -> None:
    """The batch names K twice, with two bodies; another request stores K with the second body before
    the batch's insert. The first item is refused as reused; the second replays the stored job."""
    key = f"k-{uuid.uuid4()}"
    racing = StoredAfterFirstLookup(db, tenant, key, "2" * 64)
    results = run_batch(settings, racing, publisher, tenant, [item(0, key, "1" * 64), item(1, key, "2" * 64)])
    assert isinstance(results[0].refusal, IdempotencyKeyReused)
    assert results[1].submission is not None
    assert results[1].submission.replayed
    assert results[1].submission.job.id == racing.stored_job


def test_items_the_cap_left_out_try_again_without_holding_the_keys_of_the_first_try(
    settings: Settings, db: Database, publisher: Publisher, tenant: str
) -> None:
    """Room for 3 jobs; another request (T2) is writing key a. The batch [m, z, a] looks its keys up,
    then a third request stores m: room for 2. The first insert replays m, inserts z and leaves a out
    for the cap; a then tries again and waits for T2, which goes on to write z as well. Tried again in
    the same transaction, the batch held z while it waited for T2's a, and T2 waited for the batch's
    z: a deadlock, and a 503 for the whole batch."""
    db.run(lambda cur: job_store.insert_jobs(
        cur, tenant, [job_store.NewRow(uuid.uuid4(), LATER, None)], max_active_jobs=CAP,
        outbox_grace_seconds=0))  # fmt: skip
    keys = {name: f"{name}-{uuid.uuid4()}" for name in "amz"}  # sorted: a < m < z
    fingerprint = "f" * 64
    racing = StoredAfterFirstLookup(db, tenant, keys["m"], fingerprint)
    t2 = psycopg2.connect(settings.database_url)

    def write(name: str) -> uuid.UUID:
        job_id = uuid.uuid4()
        record = job_store.IdempotencyRecord(keys[name], fingerprint, 3600, 202)
        with t2.cursor() as cur:
            job_store.insert_jobs(cur, tenant, [job_store.NewRow(job_id, LATER, record)],
                                  max_active_jobs=10**6, outbox_grace_seconds=0)  # fmt: skip
        return job_id

    def batch_waits_for_t2() -> bool:
        with pg(settings.database_url) as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                        (t2.get_backend_pid(),))  # fmt: skip
            row = cur.fetchone()
        return bool(row and row[0])

    outcome: list[Any] = []

    def send() -> None:
        try:
            items = [item(n, keys[name], fingerprint) for n, name in enumerate("mza")]
            outcome.append(run_batch(settings, racing, publisher, tenant, items, cap=4))
        except Exception as exc:
            outcome.append(exc)

    try:
        a_job = write("a")
        sender = threading.Thread(target=send)
        sender.start()
        wait_for(batch_waits_for_t2, timeout=10, what="the batch's second try to wait for T2's a")
        write("z")  # before: waited for the batch's z, which waited for T2's a
        t2.commit()
        sender.join(timeout=30)
    finally:
        t2.close()
    [results] = outcome
    assert not isinstance(results, Exception), results
    m, z, a = results
    assert m.submission is not None
    assert (m.submission.replayed, m.submission.job.id) == (True, racing.stored_job)
    assert z.submission is not None
    assert not z.submission.replayed
    assert a.submission is not None
    assert (a.submission.replayed, a.submission.job.id) == (True, a_job)
