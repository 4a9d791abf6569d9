"""Statements that move thousands of jobs at once cost the triggers on ``jobs`` a few steps per row.

The triggers' statements that join a statement's old rows with its new rows are planned once per
connection by PL/pgSQL, for the rows of the first statement that ran them; on a pooled connection
that is usually one job (a claim, a retry), and a nested loop made for one row compared every old row
with every new row of a later replay of thousands (migration
``0012_triggers_planned_for_their_rows.sql``). These tests write one job first on the connection, then
thousands in one statement, and read from ``auto_explain`` (nested statements included) how many rows
each step of the triggers' executed plans produced or read and discarded. Each bulk write is checked too: the
dead letters filed and removed, the active-job count against a recount, an illegal transition refused.

The common case costs the triggers little too: a worker's round runs one trigger function, which reads
the round's changed rows once and writes only what changed (migration ``0014_one_update_trigger.sql``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest
from support import active_counts, executed_plans, insert_noops, largest_step, pg, scratch_database

from shared.errors import IllegalTransition
from shared.jobs import WORKER_LOST
from shared.settings import Settings
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import dead_letters as dead_letter_store
from shared.store import jobs as job_store
from shared.store.db import Cursor

TENANT = "default"
ROWS = 2_000
#: Above this many rows the triggers' joins run through EXECUTE (migration 0012).
SAVED_PLAN_ROWS = 64


@pytest.fixture(scope="module")
def fresh(settings: Settings, database: str) -> Iterator[Settings]:
    """A database of this module's own, so that its dead letters and counts are these tests' only."""
    with scratch_database(settings, "bulk_transitions") as scratch:
        yield scratch


def insert_jobs(fresh: Settings, count: int) -> list[uuid.UUID]:
    return [row.job_id for row in insert_noops(fresh, count)]


def claim_and_lose(cur: Cursor, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Claim the jobs, then fail them all in one statement, as the relay does when their worker is lost
    (one attempt each): the ids that failed."""
    claimed = attempt_store.write_round(cur, job_ids, 300, []).claims
    assert all(isinstance(claimed[job_id], attempt_store.Claimed) for job_id in job_ids)
    cur.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = ANY(%s::uuid[])",
        ([str(job_id) for job_id in job_ids],),
    )
    lost = attempt_store.recover_lapsed_leases(cur, limit=len(job_ids), retry_base=1, retry_cap=1)
    assert {job.status.value for job in lost} == {"failed"}
    return [job.id for job in lost]


def dead_letters(dsn: str, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The dead letters of these jobs: job id -> error type."""
    with pg(dsn) as cur:
        cur.execute(
            "SELECT job_id::text, error_type FROM dead_letters WHERE job_id = ANY(%s::uuid[])",
            ([str(job_id) for job_id in job_ids],),
        )
        return {uuid.UUID(job_id): error_type for job_id, error_type in cur.fetchall()}


Work = Callable[[Cursor], object]


def trigger_joins(plans: list[str]) -> list[str]:
    """The statements of the triggers that read a statement's old rows together with its new rows."""
    return [plan for plan in plans if "old_rows o JOIN new_rows n" in plan]


def largest_trigger_step(dsn: str, first: Work, then: Work) -> int:
    """On one connection, run ``first(cursor)`` (PL/pgSQL saves the plans of the triggers' statements),
    then ``then(cursor)``; return the most rows any step of the plans the triggers' statements executed
    during ``then`` produced, or read and discarded (``Rows Removed by Join Filter``: a nested loop that
    compares every old row with every new one)."""
    plans = [
        plan for plan in executed_plans(dsn, then, first=first) if re.search(r"\b(old|new)_rows\b", plan)
    ]
    assert len(trigger_joins(plans)) >= 3, f"the triggers' joins were not logged: {plans!r}"
    return largest_step(plans)


def test_a_replay_of_thousands_after_a_single_retry_reads_each_row_a_few_times(fresh: Settings) -> None:
    """An operator replays the dead letters of an outage on a connection that retried one job before;
    the replayed jobs then fail again, all at once. The old rows were compared with the new ones in a
    nested loop made for that one job: ROWS x ROWS rows read and discarded in each joining statement
    (1.6 s for 2,000 jobs, minutes for 20,000, every job locked all along)."""
    dsn = fresh.database_url
    base = active_counts(dsn)[1]
    job_ids = insert_jobs(fresh, ROWS + 1)
    with pg(dsn) as cur:
        assert set(claim_and_lose(cur, job_ids)) == set(job_ids)
    assert dead_letters(dsn, job_ids) == dict.fromkeys(job_ids, WORKER_LOST.type)
    assert active_counts(dsn) == (base, base)

    retried, bulk = job_ids[0], job_ids[1:]
    replayed: list[uuid.UUID] = []
    steps = largest_trigger_step(
        dsn,
        lambda cur: job_store.retry_job(cur, retried, TENANT),
        lambda cur: replayed.extend(dead_letter_store.replay(cur, dead_letter_store.Selection(TENANT))),
    )
    assert set(replayed) == set(bulk)
    assert steps <= 2 * ROWS, f"replaying {ROWS} jobs: a step produced or discarded {steps} rows"
    assert dead_letters(dsn, job_ids) == {}, "a requeued job keeps no dead letter"
    assert active_counts(dsn) == (base + ROWS + 1, base + ROWS + 1)

    failed: list[uuid.UUID] = []
    steps = largest_trigger_step(
        dsn,
        lambda cur: claim_and_lose(cur, [retried]),
        lambda cur: failed.extend(claim_and_lose(cur, bulk)),
    )
    assert set(failed) == set(bulk)
    assert steps <= 2 * ROWS, f"claiming and failing {ROWS} jobs: a step produced or discarded {steps} rows"
    assert dead_letters(dsn, job_ids) == dict.fromkeys(job_ids, WORKER_LOST.type)
    assert active_counts(dsn) == (base, base)


@pytest.mark.parametrize("rows", [1, SAVED_PLAN_ROWS, SAVED_PLAN_ROWS + 1, 500])
def test_an_illegal_transition_among_many_refuses_the_whole_statement(fresh: Settings, rows: int) -> None:
    """The same check and the same error whether the triggers' saved plans or EXECUTE run the join:
    one queued job sent straight to ``succeeded`` among claims refuses them all."""
    job_ids = [str(job_id) for job_id in insert_jobs(fresh, rows)]
    before = active_counts(fresh.database_url)
    db = Database(fresh)
    try:
        with pytest.raises(IllegalTransition, match="illegal job status transition: queued -> succeeded"):
            db.execute(
                lambda cur: cur.execute(
                    "UPDATE jobs SET status = CASE WHEN id = %s THEN 'succeeded' ELSE 'running' END"
                    " WHERE id = ANY(%s::uuid[])",
                    (job_ids[-1], job_ids),
                )
            )
    finally:
        db.close()
    with pg(fresh.database_url) as cur:
        cur.execute("SELECT DISTINCT status FROM jobs WHERE id = ANY(%s::uuid[])", (job_ids,))
        assert cur.fetchall() == [("queued",)]
    assert active_counts(fresh.database_url) == before


def test_a_worker_round_runs_only_the_trigger_statements_it_has_rows_for(fresh: Settings) -> None:
    """Claims (queued -> running) move no active count and no dead letter: the trigger reads the
    round's rows once and writes nothing. Successes add the count's update, and nothing touches the
    dead letters. Three triggers ran four such statements for every round, whatever its rows, two of
    them on ``dead_letters``."""
    dsn = fresh.database_url
    job_ids = insert_jobs(fresh, 4)
    base = active_counts(dsn)[1]
    rounds: list[attempt_store.Round] = []

    plans = executed_plans(
        dsn, lambda cur: rounds.append(attempt_store.write_round(cur, job_ids[:2], 300, []))
    )
    claimed = [
        answer.job for answer in rounds[-1].claims.values() if isinstance(answer, attempt_store.Claimed)
    ]
    assert len(claimed) == 2
    assert len(trigger_joins(plans)) == 1, trigger_joins(plans)

    plans = executed_plans(
        dsn,
        lambda cur: rounds.append(
            attempt_store.write_round(cur, job_ids[2:], 300, [(job, "null") for job in claimed])
        ),
    )
    assert rounds[-1].succeeded == {job.id for job in claimed}
    joins = trigger_joins(plans)
    assert len(joins) == 2, joins
    assert any("INSERT INTO tenant_active_jobs" in plan for plan in joins)
    assert not any("dead_letters" in plan for plan in joins)
    assert active_counts(dsn) == (base - 2, base - 2)
    assert dead_letters(dsn, job_ids) == {}
