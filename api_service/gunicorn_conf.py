"""gunicorn settings, taken from Conveyor's settings so there is one place to configure the API."""

import errno
import os
import socket
import sys
import time
from typing import Any

from shared import prometheus_dir
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
# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new connections over
# them. On one socket shared by every worker, whichever worker woke first took a whole burst of new
# connections: in the benchmark one of two workers often held all 16 of wrk's keep-alive connections
# while the other idled, and the API ran at one process's speed (docs/performance.md, session 12). An
# ingress controller's pool of keep-alive connections lands the same way. TCP binds only: workers on
# one Unix socket path would each replace the last one's.
reuse_port = not bind.startswith(("unix:", "fd://"))
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
# gunicorn's own lines (start, stop, access) as the same JSON lines as everything else.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "shared.logs.JsonFormatter"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    },
    "root": {"handlers": ["stderr"], "level": loglevel.upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), shared by every
# server on the host; Conveyor does not use it.
control_socket_disable = True

# Prometheus multiprocess mode: every worker writes its samples here and /metrics merges them; emptied
# at start so the counters of a previous run (or of dead workers' pids) never leak into this one.
_metrics_dir = os.environ.setdefault(prometheus_dir.ENV, prometheus_dir.default_dir("api", bind))


def when_ready(server: Any) -> None:
    """Before any worker starts: stop if another server holds the address (so that an API started on
    a port another one holds leaves that API's samples alone), then empty the samples directory."""
    if reuse_port:
        _refuse_a_taken_address(server)
    prometheus_dir.prepare(_metrics_dir)


def _refuse_a_taken_address(server: Any) -> None:
    """With ``reuse_port`` the workers bind, not the master, and a second API on the same address would
    share it without a word. A socket without SO_REUSEPORT cannot bind where any socket listens: the
    master binds one for a moment, and stops as gunicorn does when its address is in use (five tries,
    a second apart, for a server that is still stopping)."""
    for address in server.cfg.address:
        for attempt in range(5):
            if _free(address):
                break
            server.log.error("Connection in use: %s", address)
            if attempt < 4:
                time.sleep(1)
        else:
            server.log.error("Can't connect to %s", address)
            sys.exit(1)


def _free(address: tuple[str, int]) -> bool:
    """Whether a socket without SO_REUSEPORT can bind ``address`` (no other socket listens there)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        return False
    return True


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: Any) -> None:
    """Once a worker has loaded the app (before its first request): its start-up objects leave the
    garbage collector's full collections, which stopped every request of the process for 19-88 ms
    under load (shared/startup_heap.py)."""
    from shared.startup_heap import freeze_startup_heap

    freeze_startup_heap()
