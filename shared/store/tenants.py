"""SQL for tenants, their limits, and the shared token buckets that rate-limit submissions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.store.db import ASYNC_COMMIT, Cursor, Prepared, outside_transactions


@dataclass(frozen=True)
class TenantLimits:
    max_active_jobs: int
    submit_rate_per_second: float
    submit_burst: int


@dataclass(frozen=True)
class Tenant:
    name: str
    #: None: the CONVEYOR_TENANT_* default applies.
    max_active_jobs: int | None
    submit_rate_per_second: float | None
    submit_burst: int | None
    created_at: datetime

    def limits(self, defaults: TenantLimits) -> TenantLimits:
        return TenantLimits(
            max_active_jobs=defaults.max_active_jobs
            if self.max_active_jobs is None
            else self.max_active_jobs,
            submit_rate_per_second=self.submit_rate_per_second or defaults.submit_rate_per_second,
            submit_burst=self.submit_burst or defaults.submit_burst,
        )


_COLUMNS = "name, max_active_jobs, submit_rate_per_second, submit_burst, created_at"


def create_tenant(cur: Cursor, name: str) -> bool:
    """Create a tenant with default limits; False if it already exists."""
    cur.execute("INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,))
    return bool(cur.rowcount == 1)


#: Read before every /v1 request when CONVEYOR_AUTH=none (the default tenant's limits).
_GET_TENANT = Prepared(
    "conveyor_get_tenant",
    f"SELECT {_COLUMNS} FROM tenants WHERE name = %(name)s",  # noqa: S608 - fixed fragments only
    {"name": "text"},
)


def get_tenant(cur: Cursor, name: str) -> Tenant | None:
    _GET_TENANT.execute(cur, {"name": name})
    row = cur.fetchone()
    return Tenant(*row) if row else None


def list_tenants(cur: Cursor) -> list[Tenant]:
    cur.execute(f"SELECT {_COLUMNS} FROM tenants ORDER BY name")  # noqa: S608
    return [Tenant(*row) for row in cur.fetchall()]


def set_limits(
    cur: Cursor,
    name: str,
    *,
    max_active_jobs: int | None,
    submit_rate_per_second: float | None,
    submit_burst: int | None,
) -> bool:
    """Set a tenant's limits (None resets one to the default); False if no such tenant."""
    cur.execute(
        "UPDATE tenants SET max_active_jobs = %s, submit_rate_per_second = %s, submit_burst = %s "
        "WHERE name = %s",
        (max_active_jobs, submit_rate_per_second, submit_burst, name),
    )
    return bool(cur.rowcount == 1)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    #: Whole submissions left right now, after this one.
    remaining: int
    #: Seconds until the next submission would be allowed (0 when allowed).
    retry_after: int
    #: Seconds until the bucket is full again.
    reset: int


#: Takes ``%(cost)s`` tokens (one per job) from ``%(tenant)s``'s bucket if it holds ``%(need)s`` and
#: ``{guard}`` is true; returns the tokens left and whether it took them (see ``take_submission_token``).
BUCKET_UPSERT = """
    INSERT INTO rate_buckets AS b (tenant, tokens, refilled_at, allowed)
    SELECT %(tenant)s, %(burst)s - %(cost)s, now(), true WHERE {guard}
    ON CONFLICT (tenant) DO UPDATE SET
        allowed = rate_bucket_level(b.tokens, b.refilled_at, %(rate)s, %(burst)s) >= %(need)s,
        tokens = rate_bucket_level(b.tokens, b.refilled_at, %(rate)s, %(burst)s)
                 - %(cost)s * (rate_bucket_level(b.tokens, b.refilled_at, %(rate)s, %(burst)s)
                               >= %(need)s)::int,
        refilled_at = now()
    RETURNING tokens, allowed"""


def bucket_params(tenant: str, limits: TenantLimits, cost: int) -> dict[str, Any]:
    burst = float(limits.submit_burst)
    return {"tenant": tenant, "burst": burst, "rate": limits.submit_rate_per_second,
            "cost": float(cost), "need": min(float(cost), burst)}  # fmt: skip


def rate_decision(tokens: float, allowed: bool, limits: TenantLimits, cost: int) -> RateDecision:
    rate, burst = limits.submit_rate_per_second, float(limits.submit_burst)
    reset = math.ceil((burst - tokens) / rate)
    if allowed:
        return RateDecision(True, max(0, int(tokens)), 0, reset)
    need = min(float(cost), burst)
    return RateDecision(False, 0, max(1, math.ceil((need - tokens) / rate)), reset)


def take_submission_token(cur: Cursor, tenant: str, limits: TenantLimits, cost: int = 1) -> RateDecision:
    """Take ``cost`` tokens (one per job) from the tenant's bucket if it has them; one statement,
    atomic across replicas. Its row stays locked until the transaction ends: inside a longer
    transaction (a tenant's retry), the tenant's other submissions wait for that transaction.

    The bucket refills continuously at ``submit_rate_per_second`` up to ``submit_burst``. A refused
    request takes nothing, so a client that waits as told by Retry-After gets through. A batch larger
    than the burst is allowed once the bucket is full and leaves it in debt, so the jobs it carried
    still count against the rate.
    """
    cur.execute(BUCKET_UPSERT.format(guard="true"), bucket_params(tenant, limits, cost))
    row = cur.fetchone()
    assert row is not None
    return rate_decision(float(row[0]), bool(row[1]), limits, cost)


def give_back_tokens(cur: Cursor, tenant: str, limits: TenantLimits, cost: int) -> None:
    """Return ``cost`` tokens taken by ``jobs.take_tokens`` for a request that then wrote nothing and is
    not charged (another request held its key, or stored it meanwhile): up to the burst, as if never
    taken. Self-committing, without waiting for the disk."""
    outside_transactions(cur, "give_back_tokens")
    cur.execute(
        "UPDATE rate_buckets SET tokens = least(tokens + %(cost)s, %(burst)s) WHERE tenant = %(tenant)s"  # noqa: S608
        f" RETURNING {ASYNC_COMMIT}",
        bucket_params(tenant, limits, cost),
    )
