"""SQL for idempotency keys. The key row itself is written by ``jobs.insert_job``, in the same statement
as the job it answers for."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from shared.store.db import Cursor


@dataclass(frozen=True)
class StoredKey:
    fingerprint: str
    job_id: uuid.UUID
    response_status: int


def job_unfinished(alias: str) -> str:
    """SQL: the job of the key row ``alias`` is still waiting or running. Such a key answers for its job
    past its TTL: a client retrying after the TTL of a job that still retries must get that job back,
    not a second one. Once the job finishes, the TTL alone counts."""
    return f"EXISTS (SELECT 1 FROM jobs WHERE jobs.id = {alias}.job_id AND jobs.finished_at IS NULL)"  # noqa: S608


def lock_id(tenant: str, key: str) -> int:
    """A signed 64-bit advisory lock id for the tenant's key, taken by a single submission (collisions
    only cost a spurious 409). Batches take none (``api_service.submission.submit_batch``)."""
    digest = hashlib.sha256(b"conveyor-idempotency\0" + tenant.encode() + b"\0" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def find_live_many(cur: Cursor, tenant: str, keys: Sequence[str]) -> dict[str, StoredKey]:
    """``find_live`` for several keys in one statement."""
    if not keys:
        return {}
    # One primary-key probe per key, whatever the statistics say. Written as `key = ANY(keys)`, a
    # planner that underestimates the tenant's keys (a growing table not yet analyzed) reads all of
    # the tenant's keys instead, and a lookup costs more the more keys the tenant holds.
    cur.execute(
        f"""
        SELECT k.key, i.fingerprint, i.job_id, i.response_status
        FROM unnest(%s::text[]) AS k(key)
        CROSS JOIN LATERAL (
            SELECT fingerprint, job_id, response_status FROM idempotency_keys
            WHERE tenant = %s AND key = k.key
              AND (expires_at > now() OR {job_unfinished("idempotency_keys")})
            LIMIT 1
        ) AS i
        """,  # noqa: S608 - fixed fragments only
        (list(keys), tenant),
    )
    return {
        key: StoredKey(fingerprint, job_id, status) for key, fingerprint, job_id, status in cur.fetchall()
    }


def find_live(cur: Cursor, tenant: str, key: str) -> StoredKey | None:
    """The tenant's record of this key if it exists and has not expired (or its job is unfinished)."""
    return find_live_many(cur, tenant, [key]).get(key)


def purge_expired(cur: Cursor, limit: int) -> int:
    """Delete up to ``limit`` expired keys whose job has finished; small batches keep locks short."""
    cur.execute(
        f"""
        DELETE FROM idempotency_keys WHERE (tenant, key) IN (
            SELECT tenant, key FROM idempotency_keys k
            WHERE expires_at <= now() AND NOT {job_unfinished("k")}
            ORDER BY expires_at LIMIT %s FOR UPDATE OF k SKIP LOCKED
        )
        """,  # noqa: S608 - fixed fragments only
        (limit,),
    )
    return int(cur.rowcount)
