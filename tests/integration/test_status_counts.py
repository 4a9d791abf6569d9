"""``conveyor_jobs``: the relay counts the active statuses at every refresh, from their small index, and the
finished ones (every job retention keeps) only every few minutes."""

from __future__ import annotations

import uuid

import pytest
from support import insert_noops, pg, scratch_database

from shared.errors import StoreUnavailable
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import jobs as job_store
from shared.store.db import Cursor
from worker_service.relay_metrics import QueueStatsCollector

TENANT = "default"


def queued(fresh: Settings, count: int) -> list[uuid.UUID]:
    return [row.job_id for row in insert_noops(fresh, count)]


def counts(dsn: str) -> tuple[dict[str, int], dict[str, int]]:
    """(the active statuses' counts, the finished ones')."""
    with pg(dsn) as cur:
        return job_store.count_by_status(cur, finished=False), job_store.count_by_status(cur, finished=True)


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
            ids = queued(fresh, 5)
            run(db, ids[:3], [])
            run(db, [], ids[:1])
        finally:
            db.close()
        active, finished = counts(fresh.database_url)
    assert active == {"queued": 2, "retrying": 0, "running": 2}
    assert finished == {"succeeded": 1, "failed": 0, "cancelled": 0}


def test_a_row_whose_finish_time_disagrees_with_its_status_is_never_counted_under_another(
    settings: Settings, database: str
) -> None:
    """Conveyor keeps ``finished_at`` set exactly on finished jobs; a row changed by hand may not be.
    Such a row is left out of both counts: merged, the finished count's ``queued`` had replaced the
    active count's."""
    with scratch_database(settings, "status_counts_odd") as fresh:
        ids = queued(fresh, 3)
        with pg(fresh.database_url) as cur:
            cur.execute("UPDATE jobs SET finished_at = now() WHERE id = %s", (str(ids[0]),))
        active, finished = counts(fresh.database_url)
    assert active == {"queued": 2, "retrying": 0, "running": 0}
    assert finished == {"succeeded": 0, "failed": 0, "cancelled": 0}


def test_the_relay_counts_finished_jobs_less_often_than_active_ones(
    settings: Settings, database: str
) -> None:
    with scratch_database(settings, "finished_counts") as fresh:
        db = Database(fresh)
        try:
            ids = queued(fresh, 2)
            run(db, ids, [])
            run(db, [], ids[:1])
            collector = QueueStatsCollector(fresh, db, finished_counts_seconds=3600)
            collector.refresh()
            assert jobs_gauge(collector) == {
                "queued": 0, "retrying": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0
            }  # fmt: skip
            run(db, [], ids[1:])
            queued(fresh, 1)
            collector.refresh()
            counted = jobs_gauge(collector)
            assert (counted["queued"], counted["running"]) == (1, 0), "active statuses: every refresh"
            assert counted["succeeded"] == 1, "finished statuses: not recounted within the hour"
            eager = QueueStatsCollector(fresh, db, finished_counts_seconds=0)
            eager.refresh()
            assert jobs_gauge(eager)["succeeded"] == 2
        finally:
            db.close()


def test_a_finished_count_that_fails_leaves_the_queue_figures_and_waits_its_turn(
    settings: Settings, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finished count can run into the statement timeout on a big table: the queue figures and the
    active counts of the same refresh are exported all the same, and the count is not tried again at the
    next refresh."""
    counts = job_store.count_by_status
    tries: list[bool] = []

    def timing_out(cur: Cursor, *, finished: bool) -> dict[str, int]:
        if finished:
            tries.append(finished)
            raise StoreUnavailable("canceling statement due to statement timeout")
        return counts(cur, finished=finished)

    with scratch_database(settings, "finished_timeout") as fresh:
        db = Database(fresh)
        try:
            queued(fresh, 3)
            monkeypatch.setattr(job_store, "count_by_status", timing_out)
            collector = QueueStatsCollector(fresh, db, finished_counts_seconds=3600)
            collector.refresh()
            collector.refresh()
            assert jobs_gauge(collector) == {"queued": 3, "retrying": 0, "running": 0}
            [waiting] = [m for m in collector.collect() if m.name == "conveyor_queue_waiting_jobs"]
            assert {s.labels["queue"]: s.value for s in waiting.samples}["default"] == 3
            assert tries == [True], "tried once in the hour"
        finally:
            db.close()
