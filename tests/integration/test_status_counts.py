"""``conveyor_jobs``: the relay counts the active statuses at every refresh, from their small index, and the
finished ones (every job retention keeps) only every few minutes."""

from __future__ import annotations

import uuid

from support import pg, scratch_database

from shared.jobs import NewJob
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import jobs as job_store
from shared.store.db import Cursor
from worker_service.relay_metrics import QueueStatsCollector

TENANT = "default"
NOOP = NewJob(
    type="noop", queue="default", payload={}, priority=5, max_attempts=1, timeout_seconds=60,
    run_at=None, delay_seconds=0.0, labels={},
)  # fmt: skip


def queued(db: Database, count: int) -> list[uuid.UUID]:
    rows = [job_store.NewRow(uuid.uuid4(), NOOP, None) for _ in range(count)]
    db.run(
        lambda cur: job_store.insert_jobs(cur, TENANT, rows, max_active_jobs=10**6, outbox_grace_seconds=0)
    )
    return [row.job_id for row in rows]


def run(db: Database, claims: list[uuid.UUID], successes: list[uuid.UUID]) -> None:
    """Claim ``claims`` and record the success of ``successes`` (claimed before)."""

    def write(cur: Cursor) -> None:
        done = job_store.get_jobs(cur, successes, TENANT).values() if successes else []
        attempt_store.write_round(cur, claims, 300, [(job, "null") for job in done])

    db.run(write)


def jobs_gauge(collector: QueueStatsCollector) -> dict[str, float]:
    [family] = [m for m in collector.collect() if m.name == "conveyor_jobs"]
    return {sample.labels["status"]: sample.value for sample in family.samples}


def test_counts_by_status_are_split_into_active_and_finished(settings: Settings, database: str) -> None:
    with scratch_database(settings, "status_counts") as fresh:
        db = Database(fresh)
        try:
            ids = queued(db, 5)
            run(db, ids[:3], [])
            run(db, [], ids[:1])
            with pg(fresh.database_url) as cur:
                active = job_store.count_by_status(cur, finished=False)
                finished = job_store.count_by_status(cur, finished=True)
        finally:
            db.close()
    assert active == {"queued": 2, "retrying": 0, "running": 2}
    assert finished == {"succeeded": 1, "failed": 0, "cancelled": 0}


def test_the_relay_counts_finished_jobs_less_often_than_active_ones(
    settings: Settings, database: str
) -> None:
    with scratch_database(settings, "finished_counts") as fresh:
        db = Database(fresh)
        try:
            ids = queued(db, 2)
            run(db, ids, [])
            run(db, [], ids[:1])
            collector = QueueStatsCollector(fresh, db, finished_counts_seconds=3600)
            collector.refresh()
            assert jobs_gauge(collector) == {
                "queued": 0, "retrying": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0
            }  # fmt: skip
            run(db, [], ids[1:])
            queued(db, 1)
            collector.refresh()
            counted = jobs_gauge(collector)
            assert (counted["queued"], counted["running"]) == (1, 0), "active statuses: every refresh"
            assert counted["succeeded"] == 1, "finished statuses: not recounted within the hour"
            eager = QueueStatsCollector(fresh, db, finished_counts_seconds=0)
            eager.refresh()
            assert jobs_gauge(eager)["succeeded"] == 2
        finally:
            db.close()
