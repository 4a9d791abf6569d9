"""SQL for the outbox: the rows that guarantee a job's message reaches RabbitMQ."""

from __future__ import annotations

from collections.abc import Sequence

from shared.messages import Dispatch
from shared.store.db import Cursor


def take_due(cur: Cursor, *, limit: int) -> list[Dispatch]:
    """Lock up to ``limit`` due rows for the caller's transaction and return what to publish, in the
    order they came due.

    The caller publishes them, then deletes the confirmed ones (``delete_published``) and backs off the
    others (``record_publish_error``) before it commits. Rows another relay holds are skipped, and so
    are rows whose ``locked_until`` is still ahead: fresh rows the API that wrote them is publishing
    (its grace period), and rows backing off after a failed publish. If the caller dies first, its
    transaction ends and the rows are due again at once.

    A row comes due at the later of its ``available_at`` and its ``locked_until`` (``greatest``
    ignores a NULL), the key of the index ``outbox_by_relay_time`` (migration 0013): the rows held or
    backing off lie beyond ``now()`` in it, so a poll reads only the rows it takes. A row that backed
    off therefore comes after the rows that came due during its backoff, not in ``available_at`` order.

    The transaction does not wait for its commit to reach the disk: losing the DELETE to a Postgres
    crash only means the rows are published again, and the worker's claim ignores the copies.
    """
    cur.execute(
        """
        SET LOCAL synchronous_commit = off;
        SELECT outbox.id, jobs.id, jobs.type, jobs.queue, jobs.priority, jobs.request_id
        FROM outbox JOIN jobs ON jobs.id = outbox.job_id
        WHERE greatest(outbox.available_at, outbox.locked_until) <= now()
        ORDER BY greatest(outbox.available_at, outbox.locked_until)
        LIMIT %(limit)s
        FOR UPDATE OF outbox SKIP LOCKED
        """,
        {"limit": limit},
    )
    return [Dispatch(job_id, job_type, queue, priority, outbox_id, request_id)
            for outbox_id, job_id, job_type, queue, priority, request_id in cur.fetchall()]  # fmt: skip


def delete_published(cur: Cursor, outbox_ids: Sequence[int]) -> None:
    """Forget rows whose messages RabbitMQ confirmed.

    Like the relay's transaction (``take_due``), the deletion does not wait for its commit to reach
    the disk: lost to a Postgres crash, the rows are published again, and the worker's claim ignores
    the copies. So the API's deletions, every 50 ms in each process, do not queue for WAL flushes
    beside the submissions, whose commits must wait for theirs. Called inside a transaction, it makes
    that whole transaction commit so: the relay's, which already does, and no other.
    """
    if outbox_ids:
        cur.execute(
            "SET LOCAL synchronous_commit = off; DELETE FROM outbox WHERE id = ANY(%s)", (list(outbox_ids),)
        )


def record_publish_error(cur: Cursor, outbox_ids: Sequence[int], error: str, retry_in_seconds: float) -> None:
    """Note why rows were not published and make them due again after ``retry_in_seconds``."""
    if outbox_ids:
        cur.execute(
            "UPDATE outbox SET last_error = %s, locked_until = now() + %s * interval '1 second', "
            "publish_attempts = publish_attempts + 1 "
            "WHERE id = ANY(%s)",
            (error[:1000], retry_in_seconds, list(outbox_ids)),
        )


def backlog(cur: Cursor) -> tuple[int, float]:
    """Rows due but not yet published, and the age in seconds of the oldest.

    Rows backing off after a failed publish count from their ``available_at``, unlike in ``take_due``:
    while RabbitMQ is down the backlog and its age keep growing (``ConveyorOutboxStuck``), rather than
    start again at every backoff.
    """
    cur.execute(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(available_at)), 0) "
        "FROM outbox WHERE available_at <= now()"
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1])
