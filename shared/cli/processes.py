"""``conveyor migrate|api|worker|relay|run|settings``: running Conveyor's processes.

``api``, ``worker`` and ``relay`` replace the ``conveyor`` process (exec), so the signals a container
runtime sends reach gunicorn and dramatiq directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time

from shared import heartbeat, prometheus_dir
from shared.errors import MigrationBlocked, StoreUnavailable
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Extra seconds dramatiq's main process gets beyond the worker shutdown timeout in ``conveyor run``.
RUN_STOP_MARGIN_SECONDS = 10


def _exec(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def _no_arguments(command: str, extra: list[str]) -> int | None:
    """2, after saying so, if a command that takes no arguments got some; else None."""
    if not extra:
        return None
    print(f"conveyor {command}: takes no arguments, got: {' '.join(extra)}", file=sys.stderr)
    return 2


def cmd_migrate(settings: Settings, extra: list[str]) -> int:
    """Create the database if needed and apply pending migrations."""
    from shared.store.migrate import migrate

    if (refused := _no_arguments("migrate", extra)) is not None:
        return refused

    try:
        applied = migrate(settings)
    except StoreUnavailable as exc:
        print(f"conveyor migrate: cannot reach Postgres at {settings.redacted_database_url()}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    except MigrationBlocked as exc:
        print(f"conveyor migrate: {exc}", file=sys.stderr)
        return 1
    print(f"migrations applied: {', '.join(applied)}" if applied else "database schema is up to date")
    return 0


def cmd_api(settings: Settings, extra: list[str]) -> int:
    """Run the HTTP API under gunicorn."""
    _exec(["-m", "gunicorn", "--config", "python:api_service.gunicorn_conf", *extra, "api_service.wsgi:app"])
    return 0  # pragma: no cover


def worker_argv(settings: Settings) -> list[str]:
    return [
        "-m", "dramatiq", "worker_service.app",
        "--processes", str(settings.worker_processes),
        "--threads", str(settings.worker_threads),
        "--worker-shutdown-timeout", str(settings.worker_shutdown_timeout_seconds * 1000),
        "--skip-logging",
    ]  # fmt: skip


def cmd_worker(settings: Settings, extra: list[str]) -> int:
    """Run the dramatiq worker (extra arguments go to dramatiq, e.g. -Q conveyor.default)."""
    if settings.worker_heartbeat_file:  # a restarted container must not see the last one's files
        heartbeat.clear(settings.worker_heartbeat_file)
    if settings.worker_metrics_bind:  # every dramatiq process records here; one serves them all
        bind = settings.worker_metrics_bind
        path = os.environ.get(prometheus_dir.ENV) or prometheus_dir.default_dir("worker", bind)
        if not prometheus_dir.port_free(bind):
            # Another worker serves this port from this directory: leave its files alone. This worker
            # records into a private directory, and its metrics process says why it cannot serve.
            path = prometheus_dir.default_dir("worker", f"{bind}-{os.getpid()}")
        prometheus_dir.prepare(path)
        os.environ[prometheus_dir.ENV] = path
    _exec([*worker_argv(settings), *extra])
    return 0  # pragma: no cover


def cmd_relay(settings: Settings, extra: list[str]) -> int:
    """Run the outbox relay."""
    os.environ.pop(prometheus_dir.ENV, None)  # one process: plain metrics, not the multiprocess files
    if settings.relay_heartbeat_file:  # a restarted container must not see the last one's files
        heartbeat.clear(settings.relay_heartbeat_file)
    _exec(["-m", "worker_service.relay", *extra])
    return 0  # pragma: no cover


def cmd_run(settings: Settings, extra: list[str]) -> int:
    """Run api + worker + relay in the foreground; Ctrl-C stops all three."""
    if settings.auth == "none":
        print(
            "WARNING: CONVEYOR_AUTH=none - authentication is off (local development only).", file=sys.stderr
        )
    children = {
        name: subprocess.Popen([sys.executable, "-m", "shared.cli", name], start_new_session=True)
        for name in ("api", "worker", "relay")
    }
    print(f"Conveyor API on http://{settings.api_bind} (docs at /docs); Ctrl-C stops everything.")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(
                    f"conveyor run: {name} exited with {child.returncode}; stopping the rest", file=sys.stderr
                )
                exit_code = child.returncode or 1
                stopping = True
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.worker_shutdown_timeout_seconds + RUN_STOP_MARGIN_SECONDS
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return exit_code


def cmd_settings(settings: Settings, extra: list[str]) -> int:
    """Print every setting's variable and current value (secrets hidden)."""
    if (refused := _no_arguments("settings", extra)) is not None:
        return refused
    for f in dataclasses.fields(Settings):
        print(f"{f.metadata['env']}={settings.display_value(f.name)}")
    return 0
