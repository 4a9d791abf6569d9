"""RateLimit headers (draft-ietf-httpapi-ratelimit-headers) for submissions.

    RateLimit-Policy: "submissions";q=200;w=2     quota of q requests per window of w seconds
    RateLimit: "submissions";r=57;t=1             r left now; t seconds until the quota is whole again

Conveyor's limit is a token bucket (``q`` = burst, refilled at ``rate`` per second), so ``w`` is the
time an empty bucket takes to refill.
"""

from __future__ import annotations

import math

from shared.store.tenants import RateDecision, TenantLimits

POLICY = "submissions"


def rate_limit_headers(decision: RateDecision, limits: TenantLimits) -> dict[str, str]:
    window = max(1, math.ceil(limits.submit_burst / limits.submit_rate_per_second))
    return {
        "RateLimit-Policy": f'"{POLICY}";q={limits.submit_burst};w={window}',
        "RateLimit": f'"{POLICY}";r={decision.remaining};t={max(0, decision.reset)}',
    }
