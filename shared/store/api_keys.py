"""SQL for API keys. Keys are stored as sha256 hashes; the visible prefix finds the row."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from shared.api_keys import NewKey, Scope
from shared.store.db import Cursor, Prepared
from shared.store.tenants import Tenant


@dataclass(frozen=True)
class StoredKey:
    id: uuid.UUID
    prefix: str
    tenant: str
    scopes: frozenset[Scope]
    description: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class KeyLookup:
    """What authenticating a request needs, read in one statement: the key's hash, scopes and tenant."""

    secret_sha256: bytes
    scopes: frozenset[Scope]
    tenant: Tenant


def insert_key(
    cur: Cursor, new: NewKey, tenant: str, scopes: frozenset[Scope], description: str
) -> uuid.UUID:
    key_id = uuid.uuid4()
    cur.execute(
        "INSERT INTO api_keys (id, prefix, secret_sha256, tenant, scopes, description) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (key_id, new.prefix, new.secret_sha256, tenant, sorted(s.value for s in scopes), description),
    )
    return key_id


#: Run before every /v1 request, so prepared: planning this join cost Postgres more than running it
#: (112 against 48 us of CPU per lookup, docs/performance.md).
_LOOKUP_ACTIVE = Prepared(
    "conveyor_lookup_active_key",
    """
    SELECT k.secret_sha256, k.scopes,
           t.name, t.max_active_jobs, t.submit_rate_per_second, t.submit_burst, t.created_at
    FROM api_keys k JOIN tenants t ON t.name = k.tenant
    WHERE k.prefix = %(prefix)s AND k.revoked_at IS NULL
    """,
    {"prefix": "text"},
)


def lookup_active(cur: Cursor, prefix: str) -> KeyLookup | None:
    """The unrevoked key with this prefix, with its tenant's limits; None if absent or revoked.

    Read on every request (no cache), so a revoked key stops working at once on every replica.
    """
    _LOOKUP_ACTIVE.execute(cur, {"prefix": prefix})
    row = cur.fetchone()
    if row is None:
        return None
    scopes = frozenset(Scope(s) for s in row[1] if s in Scope._value2member_map_)
    return KeyLookup(bytes(row[0]), scopes, Tenant(*row[2:]))


def list_keys(cur: Cursor, tenant: str | None = None) -> list[StoredKey]:
    cur.execute(
        "SELECT id, prefix, tenant, scopes, description, created_at, revoked_at FROM api_keys "
        "WHERE %(tenant)s::text IS NULL OR tenant = %(tenant)s ORDER BY tenant, created_at",
        {"tenant": tenant},
    )
    return [
        StoredKey(r[0], r[1], r[2], frozenset(Scope(s) for s in r[3]), r[4], r[5], r[6])
        for r in cur.fetchall()
    ]


def revoke(cur: Cursor, prefix: str) -> bool:
    """Revoke the key with this prefix; False if there is none or it was already revoked."""
    cur.execute("UPDATE api_keys SET revoked_at = now() WHERE prefix = %s AND revoked_at IS NULL", (prefix,))
    return bool(cur.rowcount == 1)
