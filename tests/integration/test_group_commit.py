"""The worker's group commit against the real Postgres: shared rounds, duplicate claims, discarded and
delayed successes."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from support import AnswerLostDatabase, pg, wait_for

from shared.errors import StoreUnavailable
from shared.jobs import JobStatus, NewJob
from shared.store import Database
from shared.store import attempts as attempt_store
from shared.store import jobs as job_store
from shared.store.db import Cursor
from worker_service.group_commit import GroupCommit, _Claim, _Success

NOOP = NewJob("noop", "default", {}, 5, 2, 60, None, 0.0, {})


@pytest.fixture
def group(db: Database) -> Iterator[GroupCommit]:
    group = GroupCommit(db, lease_seconds=30)
    group.start()
    yield group
    group.stop()


def insert(db: Database, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]

    def write(cur: Cursor) -> None:
        for job_id in ids:
            job_store.insert_job(cur, job_id, "default", NOOP, max_active_jobs=10**6, outbox_grace_seconds=0)

    db.run(write)
    return ids


def statuses(dsn: str, ids: list[uuid.UUID]) -> dict[str, int]:
    with pg(dsn) as cur:
        cur.execute(
            "SELECT status, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY status",
            ([str(i) for i in ids],),
        )
        return dict(cur.fetchall())


def test_threads_share_rounds_and_every_job_succeeds(group: GroupCommit, db: Database, dsn: str) -> None:
    ids = insert(db, 400)
    written: list[bool] = []
    todo = list(ids)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                job_id = todo.pop()
            claim = group.claim(job_id, uuid.uuid4())
            assert isinstance(claim, attempt_store.Claimed)
            assert claim.job.attempts == 1
            group.record_success(claim.job, uuid.uuid4(), '{"ok": true}', written.append)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(written) == 400, timeout=10, what="every success to be written")
    assert all(written)
    assert statuses(dsn, ids) == {"succeeded": 400}
    assert group.writes == 800
    assert group.rounds < 800 * 0.75, f"8 threads shared rounds: {group.rounds} rounds for 800 writes"


class GatedDatabase:
    """The real database; the first round waits until ``gate`` is set, so later requests queue up."""

    def __init__(self, db: Database) -> None:
        self.db, self.gate, self.rounds = db, threading.Event(), 0

    def execute(self, work: Callable[[Cursor], Any]) -> Any:
        self.rounds += 1
        if self.rounds == 1:
            self.gate.wait(10)
        return self.db.execute(work)


def test_duplicate_claims_in_one_round_claim_once(db: Database, dsn: str) -> None:
    [held, job_id] = insert(db, 2)
    gated = GatedDatabase(db)
    group = GroupCommit(gated, lease_seconds=30)  # type: ignore[arg-type]
    group.start()
    results: list[attempt_store.ClaimResult] = []
    try:
        first = threading.Thread(target=group.claim, args=(held, uuid.uuid4()))
        first.start()
        wait_for(lambda: gated.rounds == 1, timeout=5, what="the first round to start")
        # Two deliveries of the same job queue up behind it and go out together in the second round.
        threads = [
            threading.Thread(target=lambda: results.append(group.claim(job_id, uuid.uuid4())))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        wait_for(
            lambda: group.writes == 0 and len(group._claims) == 2, timeout=5, what="both claims to queue"
        )
        gated.gate.set()
        for thread in [first, *threads]:
            thread.join()
    finally:
        group.stop()
    assert group.rounds == 2
    claimed = [r for r in results if isinstance(r, attempt_store.Claimed)]
    refused = [r for r in results if isinstance(r, attempt_store.NotClaimable)]
    assert len(claimed) == 1
    assert len(refused) == 1
    assert refused[0].status.value == "running"
    assert statuses(dsn, [job_id]) == {"running": 1}


def test_one_round_claims_several_and_reports_every_written_success(db: Database, dsn: str) -> None:
    """The statement behind a round: several claims and several successes at once. The ids that
    succeeded come back once, on the first row; every one must be read, and only those."""
    to_finish, to_claim = insert(db, 4), insert(db, 3)
    first = db.execute(lambda cur: attempt_store.write_round(cur, to_finish, 30, []))
    running = [c.job for c in first.claims.values() if isinstance(c, attempt_store.Claimed)]
    assert len(running) == 4
    taken_over = running[0]
    with pg(dsn) as cur:  # the relay moved this attempt on: its success must not be written
        cur.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = %s", (str(taken_over.id),))
    second = db.execute(
        lambda cur: attempt_store.write_round(cur, to_claim, 30, [(job, '"done"') for job in running])
    )
    assert second.succeeded == {job.id for job in running[1:]}
    assert all(isinstance(second.claims[job_id], attempt_store.Claimed) for job_id in to_claim)
    assert statuses(dsn, to_finish) == {"succeeded": 3, "running": 1}
    assert statuses(dsn, to_claim) == {"running": 3}


def test_success_of_a_taken_over_attempt_is_reported_discarded(group: GroupCommit, db: Database) -> None:
    [job_id] = insert(db, 1)
    claim = group.claim(job_id, uuid.uuid4())
    assert isinstance(claim, attempt_store.Claimed)
    stale = claim.job
    # The lease lapses and another attempt takes over (as the relay's recovery would).
    db.execute(lambda cur: cur.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = %s", (job_id,)))
    outcome: list[bool] = []
    group.record_success(stale, uuid.uuid4(), "null", outcome.append)
    wait_for(lambda: outcome, timeout=5, what="the success round")
    assert outcome == [False]


def test_missing_job_and_finished_job_are_told_apart(group: GroupCommit, db: Database) -> None:
    assert isinstance(group.claim(uuid.uuid4(), uuid.uuid4()), attempt_store.Missing)
    [job_id] = insert(db, 1)
    claim = group.claim(job_id, uuid.uuid4())
    assert isinstance(claim, attempt_store.Claimed)
    done: list[bool] = []
    group.record_success(claim.job, uuid.uuid4(), "null", done.append)
    wait_for(lambda: done == [True], timeout=5, what="the success")
    again = group.claim(job_id, uuid.uuid4())
    assert isinstance(again, attempt_store.NotClaimable)
    assert again.status.value == "succeeded"


class FlakyDatabase:
    """The real database, unreachable for the first ``failures`` rounds."""

    def __init__(self, db: Database, failures: int) -> None:
        self.db, self.failures = db, failures

    def execute(self, work: Callable[[Cursor], Any]) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("OperationalError: connection refused (simulated)")
        return self.db.execute(work)


def test_successes_wait_out_an_outage_and_claims_get_the_error(db: Database, dsn: str) -> None:
    [first, second] = insert(db, 2)
    flaky = FlakyDatabase(db, failures=0)
    group = GroupCommit(flaky, lease_seconds=30)  # type: ignore[arg-type]
    group.start()
    try:
        claim = group.claim(first, uuid.uuid4())
        assert isinstance(claim, attempt_store.Claimed)
        flaky.failures = 3
        written: list[bool] = []
        group.record_success(claim.job, uuid.uuid4(), "null", written.append)
        wait_for(lambda: flaky.failures <= 2, timeout=5, what="the first failed round")
        with pytest.raises(StoreUnavailable):
            group.claim(second, uuid.uuid4())  # answered with the error while Postgres is "down"
        wait_for(lambda: written == [True], timeout=10, what="the success to be written after the outage")
        assert statuses(dsn, [first]) == {"succeeded": 1}
    finally:
        group.stop()


def test_stop_writes_pending_successes(db: Database, dsn: str) -> None:
    ids = insert(db, 20)
    group = GroupCommit(db, lease_seconds=30)
    group.start()
    claims = [group.claim(job_id, uuid.uuid4()) for job_id in ids]
    for claim in claims:
        assert isinstance(claim, attempt_store.Claimed)
        group.record_success(claim.job, uuid.uuid4(), "null", lambda ok: None)
    group.stop()
    assert statuses(dsn, ids) == {"succeeded": 20}


def test_a_success_postgres_refuses_does_not_take_its_round_along(db: Database, dsn: str) -> None:
    """A round whose statement fails for one item (here a result jsonb refuses, which the executor no
    longer lets through) is written again item by item: the others get their outcome."""
    claimed_first = insert(db, 2)
    first = db.execute(lambda cur: attempt_store.write_round(cur, claimed_first, 30, []))
    poisoned, fine = (c.job for c in first.claims.values() if isinstance(c, attempt_store.Claimed))
    [to_claim] = insert(db, 1)
    group = GroupCommit(db, lease_seconds=30)  # not started: the test writes one round itself
    written: dict[uuid.UUID, bool] = {}
    claim = _Claim(to_claim, uuid.uuid4())
    group._write(
        [claim],
        [
            _Success(
                poisoned, uuid.uuid4(), '{"s": "a\\u0000b"}', lambda ok: written.update({poisoned.id: ok})
            ),
            _Success(fine, uuid.uuid4(), '"done"', lambda ok: written.update({fine.id: ok})),
        ],
    )
    assert isinstance(claim.wait(), attempt_store.Claimed)
    assert written == {fine.id: True}, "the refused success is left to lease recovery, unreported"
    assert statuses(dsn, [to_claim, poisoned.id]) == {"running": 2}
    assert statuses(dsn, [fine.id]) == {"succeeded": 1}


class CountingCursor:
    """A cursor that records the statements it is given."""

    def __init__(self, cur: Cursor) -> None:
        self._cur = cur
        self.statements: list[str] = []

    def execute(self, statement: str, params: Any = None) -> None:
        self.statements.append(statement)
        self._cur.execute(statement, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


def test_a_round_explains_its_refused_claims_in_its_own_statement(db: Database) -> None:
    """The claims commit with the round's statement; a second statement to explain the refused ones
    could fail after that commit and report claims that did commit as failed."""
    [finished, claimable] = insert(db, 2)
    later = uuid.uuid4()
    db.run(
        lambda cur: job_store.insert_job(
            cur, later, "default", dataclasses.replace(NOOP, delay_seconds=3600.0), max_active_jobs=10**6,
            outbox_grace_seconds=0,
        )
    )  # fmt: skip
    first = db.execute(lambda cur: attempt_store.write_round(cur, [finished], 30, []))
    job = first.claims[finished]
    assert isinstance(job, attempt_store.Claimed)
    db.execute(lambda cur: attempt_store.write_round(cur, [], 30, [(job.job, "null")]))
    missing = uuid.uuid4()

    def round_(cur: Cursor) -> tuple[attempt_store.Round, list[str]]:
        counting = CountingCursor(cur)
        wanted = [finished, claimable, later, missing]
        result = attempt_store.write_round(counting, wanted, 30, [])  # type: ignore[arg-type]
        return result, counting.statements

    result, statements = db.execute(round_)
    assert [s for s in statements if not s.startswith(("SET", "PREPARE"))] == statements[-1:], statements
    assert isinstance(result.claims[claimable], attempt_store.Claimed)
    assert result.claims[finished] == attempt_store.NotClaimable(JobStatus.SUCCEEDED, due_later=False)
    assert result.claims[later] == attempt_store.NotClaimable(JobStatus.QUEUED, due_later=True)
    assert result.claims[missing] == attempt_store.Missing()


def test_a_claim_asked_again_with_its_token_gets_its_attempt_back(db: Database, dsn: str) -> None:
    """A claim that committed but whose answer was lost is asked again with the same token: it is
    answered with the attempt it made (lease renewed), while any other claim still sees the job
    running."""
    [job_id] = insert(db, 1)
    token = uuid.uuid4()
    first = db.execute(lambda cur: attempt_store.claim_job(cur, job_id, 30, token))
    assert isinstance(first, attempt_store.Claimed)
    with pg(dsn) as cur:  # the lease has nearly run out by the time the worker asks again
        cur.execute(
            "UPDATE jobs SET lease_expires_at = now() + interval '1 second' WHERE id = %s", (str(job_id),)
        )
    again = db.execute(lambda cur: attempt_store.claim_job(cur, job_id, 30, token))
    assert isinstance(again, attempt_store.Claimed)
    assert (again.job.attempts, again.job.started_at) == (1, first.job.started_at)
    with pg(dsn) as cur:
        cur.execute("SELECT lease_expires_at > now() + interval '20 seconds' FROM jobs WHERE id = %s",
                    (str(job_id),))  # fmt: skip
        assert cur.fetchone() == (True,), "the lease is renewed"
    other = db.execute(lambda cur: attempt_store.claim_job(cur, job_id, 30, uuid.uuid4()))
    assert other == attempt_store.NotClaimable(attempt_store.JobStatus.RUNNING, due_later=False)


def test_a_round_answers_claims_reclaims_and_refusals_together(db: Database, dsn: str) -> None:
    ours, queued, finished = insert(db, 3)
    token = uuid.uuid4()
    db.execute(lambda cur: attempt_store.write_round(cur, [ours], 30, [], [token]))
    done = db.execute(lambda cur: attempt_store.write_round(cur, [finished], 30, []))
    db.execute(lambda cur: attempt_store.write_round(cur, [], 30, [(done.claims[finished].job, "null")]))  # type: ignore[union-attr]
    tokens = [token, uuid.uuid4(), uuid.uuid4()]
    answer = db.execute(lambda cur: attempt_store.write_round(cur, [ours, queued, finished], 30, [], tokens))
    assert isinstance(answer.claims[ours], attempt_store.Claimed)
    assert answer.claims[ours].job.attempts == 1  # type: ignore[union-attr]
    assert isinstance(answer.claims[queued], attempt_store.Claimed)
    assert answer.claims[finished] == attempt_store.NotClaimable(
        attempt_store.JobStatus.SUCCEEDED, due_later=False
    )
    assert statuses(dsn, [ours, queued]) == {"running": 2}


def test_a_success_whose_answer_was_lost_is_reported_written(db: Database, dsn: str) -> None:
    """Written again, its fence no longer matched (the first try had moved the job to succeeded): it was
    reported as taken over, with an 'outcome discarded' warning and the discarded metric."""
    [job_id] = insert(db, 1)
    lossy = AnswerLostDatabase(db)
    group = GroupCommit(lossy, lease_seconds=30)  # type: ignore[arg-type]
    group.start()
    try:
        token = uuid.uuid4()
        claim = group.claim(job_id, token)
        assert isinstance(claim, attempt_store.Claimed)
        lossy.lose = 1
        written: list[bool] = []
        group.record_success(claim.job, token, "null", written.append)
        wait_for(lambda: written, timeout=10, what="the success to be reported")
    finally:
        group.stop()
    assert written == [True]
    assert statuses(dsn, [job_id]) == {"succeeded": 1}


def test_a_reclaim_is_refused_if_the_attempt_changed_hands_while_it_waited(db: Database, dsn: str) -> None:
    """The token is checked on the row the statement finally locks: the relay took the attempt over and
    another worker claimed the job while the reclaim waited, so it is no longer this worker's."""
    [job_id] = insert(db, 1)
    token = uuid.uuid4()
    assert isinstance(
        db.execute(lambda cur: attempt_store.claim_job(cur, job_id, 30, token)), attempt_store.Claimed
    )
    holder = psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:  # the relay's takeover, not yet committed
            cur.execute("UPDATE jobs SET status = 'retrying' WHERE id = %s", (str(job_id),))
            answers: list[attempt_store.ClaimResult] = []
            reclaim = threading.Thread(
                target=lambda: answers.append(
                    db.execute(lambda c: attempt_store.claim_job(c, job_id, 30, token))
                )
            )
            reclaim.start()
            time.sleep(0.5)  # the reclaim waits for the row
            cur.execute(  # another worker's claim, in the same transaction for the test's sake
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = now(),"
                " claim_token = %s WHERE id = %s",
                (str(uuid.uuid4()), str(job_id)),
            )
        holder.commit()
        reclaim.join(10)
    finally:
        holder.close()
    assert answers == [attempt_store.NotClaimable(JobStatus.RUNNING, due_later=False)]


def test_the_retried_claim_keeps_its_job_when_a_duplicate_delivery_shares_its_round(db: Database) -> None:
    """Of two deliveries of one job in a round, the first used to be the one that claims: the retry of
    a claim whose answer was lost, second in the round, then saw its own job as running elsewhere."""
    [job_id] = insert(db, 1)
    lossy = AnswerLostDatabase(db)
    group = GroupCommit(lossy, lease_seconds=30)  # type: ignore[arg-type]  # not started: rounds by hand
    mine = _Claim(job_id, uuid.uuid4())
    lossy.lose = 1
    group._write([mine], [])
    with pytest.raises(StoreUnavailable):
        mine.wait()
    duplicate, again = _Claim(job_id, uuid.uuid4()), _Claim(job_id, mine.token)
    group._write([duplicate, again], [])
    assert isinstance(again.wait(), attempt_store.Claimed)
    assert duplicate.wait() == attempt_store.NotClaimable(JobStatus.RUNNING, due_later=False)


def test_a_success_written_alone_after_a_failed_round_is_not_reported_discarded(
    db: Database, dsn: str
) -> None:
    """A round that fails for one item is written item by item; a success whose lone write lost its
    answer is kept for the next round, in doubt, and reported written once found written."""
    ids = insert(db, 2)
    tokens = [uuid.uuid4(), uuid.uuid4()]
    jobs = []
    for job_id, token in zip(ids, tokens, strict=True):
        claimed = db.execute(lambda cur, j=job_id, t=token: attempt_store.claim_job(cur, j, 30, t))
        assert isinstance(claimed, attempt_store.Claimed)
        jobs.append(claimed.job)

    class Scripted(AnswerLostDatabase):
        calls = 0

        def execute(self, work: Callable[[Cursor], Any]) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("one bad item")  # the round is written again item by item
            self.lose = 1 if self.calls == 2 else 0  # the first lone write commits, its answer is lost
            return super().execute(work)

    group = GroupCommit(Scripted(db), lease_seconds=30)  # type: ignore[arg-type]
    written: list[bool] = []
    group._write(
        [], [_Success(job, token, "null", written.append) for job, token in zip(jobs, tokens, strict=True)]
    )
    assert written == [True], "the second success, written alone"
    assert len(group._successes) == 1, "the first is kept for the next round"
    group._write([], group._successes)
    assert written == [True, True]
    assert statuses(dsn, ids) == {"succeeded": 2}
