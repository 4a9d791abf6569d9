"""SQL for dead letters: failed jobs (filed by a trigger when a job fails) and messages that name no job
of ours (filed by the relay from the queues' ``.XQ``). They stay until an operator replays or purges them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.store import jobs as job_store
from shared.store.db import Cursor


@dataclass(frozen=True)
class DeadLetter:
    id: int
    job_id: uuid.UUID | None
    tenant: str | None
    queue: str
    job_type: str | None
    error_type: str
    reason: str
    message: str | None
    dead_at: datetime
    #: The failed job's attempts and last error (None for a message that names no job).
    attempts: int | None
    error: dict[str, Any] | None


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operation applies to. Empty sequences and None mean "any"."""

    #: None: every tenant's (admin). A tenant's view never includes messages that name no job.
    tenant: str | None = None
    types: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    error_types: tuple[str, ...] = ()
    dead_after: datetime | None = None
    dead_before: datetime | None = None
    #: Keyset position for listing: strictly older than (dead_at, id).
    after: tuple[datetime, int] | None = None

    @property
    def is_everything(self) -> bool:
        return not (self.tenant or self.types or self.queues or self.error_types or self.dead_after
                    or self.dead_before)  # fmt: skip


def _where(selection: Selection) -> tuple[str, dict[str, Any]]:
    """A WHERE fragment over dead_letters (alias d) and its parameters; fixed SQL, values as parameters."""
    clauses = ["TRUE"]
    params: dict[str, Any] = {}
    if selection.tenant is not None:
        clauses.append("d.tenant = %(sel_tenant)s")
        params["sel_tenant"] = selection.tenant
    if selection.types:
        clauses.append("d.job_type = ANY(%(sel_types)s)")
        params["sel_types"] = list(selection.types)
    if selection.queues:
        clauses.append("d.queue = ANY(%(sel_queues)s)")
        params["sel_queues"] = list(selection.queues)
    if selection.error_types:
        clauses.append("d.error_type = ANY(%(sel_errors)s)")
        params["sel_errors"] = list(selection.error_types)
    if selection.dead_after is not None:
        clauses.append("d.dead_at >= %(sel_after)s")
        params["sel_after"] = selection.dead_after
    if selection.dead_before is not None:
        clauses.append("d.dead_at < %(sel_before)s")
        params["sel_before"] = selection.dead_before
    if selection.after is not None:
        clauses.append("(d.dead_at, d.id) < (%(sel_pos_ts)s, %(sel_pos_id)s)")
        params["sel_pos_ts"], params["sel_pos_id"] = selection.after
    return " AND ".join(clauses), params


def list_dead_letters(cur: Cursor, selection: Selection, limit: int) -> list[DeadLetter]:
    """Newest first, at most ``limit``, with the failed job's attempts and last error."""
    where, params = _where(selection)
    cur.execute(
        f"""
        SELECT d.id, d.job_id, d.tenant, d.queue, d.job_type, d.error_type, d.reason, d.message, d.dead_at,
               j.attempts, j.error
        FROM dead_letters d LEFT JOIN jobs j ON j.id = d.job_id
        WHERE {where}
        ORDER BY d.dead_at DESC, d.id DESC
        LIMIT %(limit)s
        """,  # noqa: S608 - fixed fragments only
        {**params, "limit": limit},
    )
    return [DeadLetter(*row) for row in cur.fetchall()]


def replay(cur: Cursor, selection: Selection) -> list[uuid.UUID]:
    """Requeue the failed jobs behind the selected dead letters; returns the ids that moved.

    A job moves only if it is still failed (row-locked while it moves), so replaying the same selection
    twice, or concurrently, requeues each job once. The dead letters of requeued jobs disappear with
    their ``failed`` status. Messages that name no job cannot be replayed; purge them instead.
    """
    where, params = _where(selection)
    return job_store.requeue_jobs(
        cur,
        f"id IN (SELECT d.job_id FROM dead_letters d WHERE {where} AND d.job_id IS NOT NULL)",  # noqa: S608
        params,
    )


def purge(cur: Cursor, selection: Selection) -> int:
    """Delete the selected dead letters (a purged failed job stays ``failed`` in the job list)."""
    where, params = _where(selection)
    cur.execute(f"DELETE FROM dead_letters d WHERE {where}", params)  # noqa: S608
    return int(cur.rowcount)


def file_message(
    cur: Cursor, *, queue: str, error_type: str, reason: str, message: str, message_sha256: str
) -> bool:
    """File a dead message that names no job of ours; False if this very message was filed before."""
    cur.execute(
        """
        INSERT INTO dead_letters (queue, error_type, reason, message, message_sha256)
        VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (message_sha256) DO NOTHING
        """,
        (queue, error_type, reason[:2000], message, message_sha256),
    )
    return bool(cur.rowcount == 1)


def count_by_queue(cur: Cursor) -> dict[str, int]:
    cur.execute("SELECT queue, count(*) FROM dead_letters GROUP BY queue")
    return {queue: int(n) for queue, n in cur.fetchall()}
