"""Listing a tenant's jobs by status, a page at a time: every job of the statuses asked for, newest first,
each once, whatever the page size (several statuses are read a page per status, then merged)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from support import insert_noops, pg, scratch_database

from shared.jobs import JobStatus
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import jobs as job_store

TENANT = "default"


@pytest.fixture(scope="module")
def listed(settings: Settings, database: str) -> Iterator[tuple[str, dict[str, list[uuid.UUID]]]]:
    """A database of its own holding 13 queued, 5 running and 6 succeeded jobs, created in 4 statements
    (so several share a creation time); yields its DSN and each status's job ids."""
    with scratch_database(settings, "listing") as fresh:
        db = Database(fresh)
        try:
            ids: list[uuid.UUID] = []
            for _ in range(4):
                ids += [row.job_id for row in insert_noops(fresh, 6)]
            running, succeeded = ids[1:12:2][:5], ids[12:18]
            db.run(lambda cur: attempt_store.write_round(cur, running + succeeded, 300, []))
            done = db.run(lambda cur: list(job_store.get_jobs(cur, succeeded, TENANT).values()))
            db.run(lambda cur: attempt_store.write_round(cur, [], 300, [(job, "null") for job in done]))
        finally:
            db.close()
        queued = [job_id for job_id in ids if job_id not in running + succeeded]
        yield fresh.database_url, {"queued": queued, "running": running, "succeeded": succeeded}


def every_page(dsn: str, filters: job_store.JobFilter, size: int) -> list[job_store.Job]:
    listed: list[job_store.Job] = []
    with pg(dsn) as cur:
        while True:
            page = job_store.list_jobs(cur, filters, size)
            listed += page
            if len(page) < size:
                return listed
            last = page[-1]
            filters = dataclasses.replace(filters, after=(last.created_at, last.id))


@pytest.mark.parametrize("size", [1, 4, 7, 50])
@pytest.mark.parametrize(
    "statuses",
    [
        (JobStatus.QUEUED,),
        (JobStatus.QUEUED, JobStatus.SUCCEEDED),
        (JobStatus.SUCCEEDED, JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.SUCCEEDED),
        (JobStatus.FAILED, JobStatus.RUNNING),
    ],
)
@pytest.mark.parametrize("tenant", [TENANT, None])
def test_every_job_of_the_statuses_once_newest_first(
    listed: tuple[str, dict[str, list[uuid.UUID]]],
    size: int,
    statuses: tuple[JobStatus, ...],
    tenant: str | None,
) -> None:
    dsn, by_status = listed
    wanted = {job_id for status in statuses for job_id in by_status.get(status.value, [])}
    jobs = every_page(dsn, job_store.JobFilter(tenant, statuses=statuses), size)
    assert [job.id for job in jobs if job.id in wanted] == [job.id for job in jobs], "only those statuses"
    assert len(jobs) == len({job.id for job in jobs}), "each job once"
    assert {job.id for job in jobs} == wanted
    keys = [(job.created_at, job.id) for job in jobs]
    assert keys == sorted(keys, reverse=True), "newest first"
