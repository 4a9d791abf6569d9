"""SQL for the outbox: the rows that guarantee a job's message reaches RabbitMQ."""

from __future__ import annotations

from collections.abc import Sequence

from shared.messages import Dispatch
from shared.store.db import Cursor


def lease_due(cur: Cursor, *, limit: int, lease_seconds: float) -> list[Dispatch]:
    """Take up to ``limit`` due rows for ``lease_seconds`` and return what to publish.

    Rows held by another publisher (the API that just wrote them, or another relay) are skipped. A
    row whose publish fails simply comes due again when its lease ends: that is the relay's backoff.
    """
    cur.execute(
        """
        WITH due AS (
            SELECT id FROM outbox
            WHERE available_at <= now() AND (locked_until IS NULL OR locked_until <= now())
            ORDER BY available_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE outbox SET locked_until = now() + %(lease)s * interval '1 second',
                          publish_attempts = publish_attempts + 1
        FROM due, jobs
        WHERE outbox.id = due.id AND jobs.id = outbox.job_id
        RETURNING outbox.id, jobs.id, jobs.type, jobs.queue, jobs.priority, jobs.request_id,
                  outbox.available_at
        """,
        {"limit": limit, "lease": lease_seconds},
    )
    rows = sorted(cur.fetchall(), key=lambda row: row[6])
    return [Dispatch(job_id, job_type, queue, priority, outbox_id, request_id)
            for outbox_id, job_id, job_type, queue, priority, request_id, _ in rows]  # fmt: skip


def delete_published(cur: Cursor, outbox_ids: Sequence[int]) -> None:
    """Forget rows whose messages RabbitMQ confirmed."""
    if outbox_ids:
        cur.execute("DELETE FROM outbox WHERE id = ANY(%s)", (list(outbox_ids),))


def record_publish_error(cur: Cursor, outbox_ids: Sequence[int], error: str, retry_in_seconds: float) -> None:
    """Note why rows were not published and make them due again after ``retry_in_seconds``."""
    if outbox_ids:
        cur.execute(
            "UPDATE outbox SET last_error = %s, locked_until = now() + %s * interval '1 second' "
            "WHERE id = ANY(%s)",
            (error[:1000], retry_in_seconds, list(outbox_ids)),
        )


def backlog(cur: Cursor) -> tuple[int, float]:
    """Rows due but not yet published, and the age in seconds of the oldest."""
    cur.execute(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(available_at)), 0) "
        "FROM outbox WHERE available_at <= now()"
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1])
