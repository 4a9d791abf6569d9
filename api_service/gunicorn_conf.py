"""gunicorn settings, taken from Conveyor's settings so there is one place to configure the API."""

import glob
import os
import tempfile
from typing import Any

from shared.settings import get_settings

_settings = get_settings()

bind = _settings.api_bind
workers = _settings.api_workers
# Threads: requests wait on Postgres most of the time.
worker_class = "gthread"
threads = _settings.api_threads
# Do not import the app before forking: each worker opens its own database and AMQP connections.
preload_app = False
# Below Kubernetes' default 30 s grace period, so in-flight requests finish on SIGTERM.
graceful_timeout = 20
timeout = 30
# Long filter URLs are legitimate; 8190 is gunicorn's maximum (its default is 4094).
limit_request_line = 8190
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), shared by every
# server on the host; Conveyor does not use it.
control_socket_disable = True

# Prometheus multiprocess mode: every worker writes its samples here and /metrics merges them. One
# directory per bind address, so two servers on one host never mix their files; emptied at start so
# the counters of a previous run (or of dead workers' pids) never leak into this one.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), "conveyor-api-metrics-" + bind.replace(":", "-").replace("/", "-")),
)


def on_starting(server: Any) -> None:
    """Empty the multiprocess directory of prometheus_client's files only (never anything else in it)."""
    os.makedirs(_metrics_dir, exist_ok=True)
    for leftover in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.remove(leftover)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
