"""Prometheus metrics of the API, served at ``/metrics`` on the API's own port.

Under gunicorn each worker process writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` (set and emptied
by ``gunicorn_conf`` when the server starts) and ``/metrics`` merges them, so a scrape sees the whole
server whichever worker answers it. Labels are bounded: route templates (``/v1/jobs/<uuid:job_id>``),
never raw paths; job types, never ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from api_service.auth import authorize_metrics
from shared.errors import IdempotencyKeyInFlight, IdempotencyKeyReused, RateLimited, TooManyActiveJobs

HTTP_REQUESTS = Counter(
    "conveyor_http_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "conveyor_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_SUBMITTED = Counter("conveyor_jobs_submitted_total", "Jobs accepted (202, not replays).", ["type"])
IDEMPOTENT_REPLAYS = Counter(
    "conveyor_idempotent_replays_total", "Submissions answered with the stored response of an earlier one."
)
IDEMPOTENCY_CONFLICTS = Counter(
    "conveyor_idempotency_conflicts_total",
    "Submissions refused because of their Idempotency-Key.",
    ["reason"],  # in_flight (409) or reused (422)
)
LIMITED = Counter(
    "conveyor_submissions_limited_total",
    "Submissions and tenants' retries refused by a tenant limit.",
    ["limit"],  # rate or active_jobs
)

#: Route label for requests that matched no route (404s for unknown paths): one value, not the path.
UNMATCHED = "unmatched"


def _before() -> None:
    g.request_started = time.perf_counter()


#: The ``method`` label's values: a client can send any method name, and each would be a new series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"


def _after(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
    method = request.method if request.method in METHODS else OTHER_METHOD
    HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
    started = g.get("request_started")
    if started is not None:
        HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)
    return response


@contextmanager
def counting_submission_refusals() -> Iterator[None]:
    """Count submissions refused for their idempotency key or a tenant limit (then re-raise)."""
    try:
        yield
    except (IdempotencyKeyInFlight, IdempotencyKeyReused, RateLimited, TooManyActiveJobs) as exc:
        count_refusal(exc)
        raise


def count_refusal(refusal: Exception) -> None:
    """Count one submission refused for its idempotency key or a tenant limit (a batch's jobs one by
    one); other refusals (invalid jobs) are not counted here."""
    if isinstance(refusal, IdempotencyKeyInFlight):
        IDEMPOTENCY_CONFLICTS.labels("in_flight").inc()
    elif isinstance(refusal, IdempotencyKeyReused):
        IDEMPOTENCY_CONFLICTS.labels("reused").inc()
    elif isinstance(refusal, RateLimited):
        LIMITED.labels("rate").inc()
    elif isinstance(refusal, TooManyActiveJobs):
        LIMITED.labels("active_jobs").inc()


def count_submission(job_type: str, replayed: bool) -> None:
    if replayed:
        IDEMPOTENT_REPLAYS.inc()
    else:
        JOBS_SUBMITTED.labels(job_type).inc()


def metrics_view() -> Response:
    authorize_metrics()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def register(app: Flask) -> None:
    app.before_request(_before)
    app.after_request(_after)
    app.add_url_rule("/metrics", "metrics", metrics_view)
