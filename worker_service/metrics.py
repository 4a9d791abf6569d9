"""Prometheus metrics of the worker, served on ``CONVEYOR_WORKER_METRICS_BIND`` (default port 9191).

Every dramatiq worker process records into ``PROMETHEUS_MULTIPROC_DIR`` (set and emptied by
``conveyor worker`` before dramatiq starts); one extra process, forked by dramatiq's CLI through this
middleware's ``forks``, serves the merged view. If the port is taken (a second worker on the host) that
process logs why and exits: the worker itself goes on, without metrics.

Counters, per job type and queue (and error type where there is one):

- ``conveyor_worker_jobs_started_total``        attempts started
- ``conveyor_worker_jobs_succeeded_total``      attempts that succeeded
- ``conveyor_worker_jobs_failed_total``         attempts that failed (retried or not)
- ``conveyor_worker_jobs_retried_total``        failed attempts followed by a retry
- ``conveyor_worker_jobs_dead_lettered_total``  jobs that ended failed (and became dead letters)
- ``conveyor_worker_jobs_cancelled_total``      running jobs stopped on a cancel request

plus ``conveyor_worker_job_duration_seconds`` and ``conveyor_worker_queue_wait_seconds`` (from the time a
job was due, its ``run_at``, to its start) histograms and the ``conveyor_worker_jobs_in_progress`` gauge.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from shared import prometheus_dir
from shared.logs import configure_logging
from shared.settings import get_settings

logger = logging.getLogger(__name__)

_BY_JOB = ["type", "queue"]
_BY_ERROR = ["type", "queue", "error_type"]

STARTED = Counter("conveyor_worker_jobs_started_total", "Job attempts started.", _BY_JOB)
SUCCEEDED = Counter("conveyor_worker_jobs_succeeded_total", "Job attempts that succeeded.", _BY_JOB)
FAILED = Counter("conveyor_worker_jobs_failed_total", "Job attempts that failed, retried or not.", _BY_ERROR)
RETRIED = Counter("conveyor_worker_jobs_retried_total", "Failed attempts followed by a retry.", _BY_ERROR)
DEAD_LETTERED = Counter(
    "conveyor_worker_jobs_dead_lettered_total", "Jobs that ended failed and became dead letters.", _BY_ERROR
)
CANCELLED = Counter(
    "conveyor_worker_jobs_cancelled_total", "Running jobs stopped on a cancel request.", _BY_JOB
)
DURATION = Histogram(
    "conveyor_worker_job_duration_seconds",
    "Time one attempt ran, by outcome.",
    ["type", "queue", "outcome"],
    # Up to the longest timeout a job may have (TIMEOUT_SECONDS_RANGE: 24 h), so no attempt is only +Inf.
    buckets=(
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
        900,
        3600,
        14_400,
        43_200,
        86_400,
    ),
)
QUEUE_WAIT = Histogram(
    "conveyor_worker_queue_wait_seconds",
    "Time from when a job was due (run_at) to the start of its attempt.",
    _BY_JOB,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
IN_PROGRESS = Gauge(
    "conveyor_worker_jobs_in_progress", "Attempts running now.", _BY_JOB, multiprocess_mode="livesum"
)


def serve_metrics() -> int:
    """Fork process (see WorkerRuntime.forks): serve the merged metrics of this host's worker processes."""
    settings = get_settings()
    configure_logging(settings)
    if not settings.worker_metrics_bind:
        return 0
    if prometheus_dir.ENV not in os.environ:
        logger.error("worker metrics disabled: %s is not set; start the worker with `conveyor worker`",
                     prometheus_dir.ENV)  # fmt: skip
        return 1
    host, _, port = settings.worker_metrics_bind.rpartition(":")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        _, thread = start_http_server(int(port), host or "0.0.0.0", registry)  # noqa: S104
    except OSError as exc:
        logger.error(
            "worker metrics disabled: cannot listen on %s (%s). Another worker on this host? Give each one "
            "its own CONVEYOR_WORKER_METRICS_BIND, or an empty one to turn metrics off.",
            settings.worker_metrics_bind, exc,
        )  # fmt: skip
        return 1
    logger.info("worker metrics on http://%s/metrics", settings.worker_metrics_bind)
    thread.join()
    return 0


@functools.cache
def _child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: it takes a lock and validates the labels each time,
    and a worker asks for the same few children for every job."""
    return metric.labels(*labels)


def job_wait(job_type: str, queue: str, seconds: float) -> None:
    _child(QUEUE_WAIT, job_type, queue).observe(seconds)


def job_succeeded(job_type: str, queue: str) -> None:
    _child(SUCCEEDED, job_type, queue).inc()


class AttemptTimer:
    """Times one attempt and keeps the in-progress gauge right whatever happens."""

    def __init__(self, job_type: str, queue: str) -> None:
        self._labels = (job_type, queue)
        self._started = time.perf_counter()
        self._elapsed: float | None = None
        _child(STARTED, *self._labels).inc()
        _child(IN_PROGRESS, *self._labels).inc()

    def stop(self) -> None:
        """The attempt stopped running (its outcome may be written later)."""
        if self._elapsed is None:
            self._elapsed = time.perf_counter() - self._started
            _child(IN_PROGRESS, *self._labels).dec()

    def finish(self, outcome: str) -> None:
        self.stop()
        assert self._elapsed is not None
        _child(DURATION, *self._labels, outcome).observe(self._elapsed)
