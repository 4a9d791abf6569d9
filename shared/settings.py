"""Every setting of Conveyor, read from the environment in one place.

Each field below names its environment variable, its default and why it has that value. The defaults
work against the local services of a development machine (Postgres and RabbitMQ on 127.0.0.1).
``python -m shared.settings`` prints the table that the README shows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast


class SettingsError(ValueError):
    """An environment variable holds a value Conveyor cannot use."""


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    metadata = {"env": env, "doc": doc, "minimum": minimum, "choices": choices, "secret": secret}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # --- Postgres -------------------------------------------------------------------------------
    database_url: str = setting(
        "CONVEYOR_DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/conveyor",
        "Postgres DSN. `conveyor migrate` creates the database if it is missing.",
    )
    db_pool_size: int = setting(
        "CONVEYOR_DB_POOL_SIZE",
        10,
        "Connections per process, opened as needed. Size it to the threads that use the database: "
        "an API process's gunicorn threads + 1 (the published-rows deleter), a worker process's "
        "threads + 2 (the lease keeper and the group-commit writer); a relay uses 2.",
        minimum=1,
    )
    db_connect_timeout_seconds: int = setting(
        "CONVEYOR_DB_CONNECT_TIMEOUT_SECONDS",
        3,
        "How long a new connection may take. Short, so a dead Postgres turns into a quick 503.",
        minimum=1,
    )
    db_statement_timeout_ms: int = setting(
        "CONVEYOR_DB_STATEMENT_TIMEOUT_MS",
        10_000,
        "Upper bound on any one statement, so a stuck lock never hangs a request forever.",
        minimum=100,
    )
    db_prepared_statements: bool = setting(
        "CONVEYOR_DB_PREPARED_STATEMENTS",
        True,
        "Prepare the hot statements once per connection (SQL PREPARE). Set false behind a pooler in "
        "transaction mode (PgBouncer), where a session's prepared statements do not follow it.",
    )
    # --- RabbitMQ -------------------------------------------------------------------------------
    broker_url: str = setting(
        "CONVEYOR_BROKER_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        "AMQP URL of RabbitMQ. Query parameters are passed to pika; Conveyor adds heartbeat and "
        "timeout defaults when they are absent.",
    )
    queue_prefix: str = setting(
        "CONVEYOR_QUEUE_PREFIX",
        "conveyor.",
        "Prefix of every queue Conveyor declares, so it can share a vhost with other applications.",
    )
    rabbitmq_management_url: str = setting(
        "CONVEYOR_RABBITMQ_MANAGEMENT_URL",
        "http://127.0.0.1:15672",
        "RabbitMQ's management API, for the unacknowledged counts of `GET /v1/queues` (it uses the "
        "broker URL's user and password). Empty, or unreachable: the counts come over AMQP, without "
        "unacknowledged messages.",
    )
    publish_backoff_seconds: float = setting(
        "CONVEYOR_PUBLISH_BACKOFF_SECONDS",
        5.0,
        "After a failed publish the API stops publishing inline for this long and leaves its "
        "messages to the relay, so a dead broker never slows submissions down.",
        minimum=0,
    )
    # --- Security -------------------------------------------------------------------------------
    auth: str = setting(
        "CONVEYOR_AUTH",
        "keys",
        "`keys`: every /v1 request needs `Authorization: Bearer <API key>` (see `conveyor keys`). "
        "`none`: no authentication, every request acts as tenant `default` with every scope; for local "
        "development only (`make run` sets it unless CONVEYOR_AUTH is already set).",
        choices=("keys", "none"),
    )
    metrics_token: str = setting(
        "CONVEYOR_METRICS_TOKEN",
        "",
        "If set, `GET /metrics` also accepts `Authorization: Bearer <this token>` (for Prometheus). "
        "Without it, /metrics needs an API key with the `admin` scope (or CONVEYOR_AUTH=none).",
        secret=True,
    )
    api_docs: bool = setting(
        "CONVEYOR_API_DOCS",
        True,
        "Serve the interactive API docs at /docs. Set to false to hide them in production "
        "(/openapi.json stays, since clients are generated from it).",
    )
    hsts_seconds: int = setting(
        "CONVEYOR_HSTS_SECONDS",
        0,
        "If above 0, send Strict-Transport-Security with this max-age. Enable it only when the API is "
        "reached over HTTPS (often the ingress sets it instead).",
        minimum=0,
    )
    tenant_max_active_jobs: int = setting(
        "CONVEYOR_TENANT_MAX_ACTIVE_JOBS",
        10_000,
        "Default cap on a tenant's jobs waiting or running (429 above it). Per-tenant values: "
        "`conveyor tenants set`.",
        minimum=0,
    )
    tenant_submit_rate: float = setting(
        "CONVEYOR_TENANT_SUBMIT_RATE",
        100.0,
        "Default sustained submissions per second per tenant, across all API replicas (429 above it).",
        minimum=0.001,
    )
    tenant_submit_burst: int = setting(
        "CONVEYOR_TENANT_SUBMIT_BURST",
        200,
        "Default number of submissions a tenant may make at once before the rate applies.",
        minimum=1,
    )
    max_json_depth: int = setting(
        "CONVEYOR_MAX_JSON_DEPTH",
        32,
        "Deepest nesting of arrays and objects accepted in a request body (400 above it).",
        minimum=2,
    )
    max_payload_bytes: int = setting(
        "CONVEYOR_MAX_PAYLOAD_BYTES",
        65_536,
        "Largest job payload, as compact JSON (422 above it). Payloads travel through Postgres on every "
        "attempt; large data belongs in object storage, referenced from the payload.",
        minimum=2,
    )
    # --- HTTP API -------------------------------------------------------------------------------
    api_bind: str = setting("CONVEYOR_API_BIND", "127.0.0.1:8000", "Address gunicorn listens on.")
    api_workers: int = setting(
        "CONVEYOR_API_WORKERS", 2, "gunicorn worker processes (one per core is a good start).", minimum=1
    )
    api_threads: int = setting(
        "CONVEYOR_API_THREADS",
        4,
        "Threads per gunicorn worker; requests mostly wait on Postgres, so a few threads pay off.",
        minimum=1,
    )
    max_body_bytes: int = setting(
        "CONVEYOR_MAX_BODY_BYTES", 262_144, "Largest request body accepted (413 above it).", minimum=1024
    )
    idempotency_ttl_seconds: int = setting(
        "CONVEYOR_IDEMPOTENCY_TTL_SECONDS",
        86_400,
        "How long an Idempotency-Key is remembered (24 h, as Stripe), from the request or from its "
        "job's run_at if later, and in any case until its job finishes. A key reused after it is a new "
        "request.",
        minimum=60,
    )
    # --- Worker ---------------------------------------------------------------------------------
    worker_processes: int = setting("CONVEYOR_WORKER_PROCESSES", 2, "dramatiq worker processes.", minimum=1)
    worker_threads: int = setting(
        "CONVEYOR_WORKER_THREADS", 8, "Threads per worker process (jobs run concurrently).", minimum=1
    )
    worker_shutdown_timeout_seconds: int = setting(
        "CONVEYOR_WORKER_SHUTDOWN_TIMEOUT_SECONDS",
        30,
        "On SIGTERM, how long running jobs may take to finish before the process exits. Jobs still "
        "running then are re-run elsewhere once their lease expires. Keep it below the platform's "
        "kill grace period.",
        minimum=1,
    )
    job_lease_seconds: int = setting(
        "CONVEYOR_JOB_LEASE_SECONDS",
        30,
        "A running job's lease, renewed by its worker every third of it. A job whose lease lapses "
        "(worker killed, host lost) is retried or failed by the relay.",
        minimum=2,
    )
    retry_base_seconds: float = setting(
        "CONVEYOR_RETRY_BASE_SECONDS",
        2.0,
        "First retry delay; each later one doubles, with jitter.",
        minimum=0,
    )
    retry_max_seconds: float = setting(
        "CONVEYOR_RETRY_MAX_SECONDS",
        600.0,
        "Cap on one retry delay. Delays wait in Postgres, not in RabbitMQ, so RabbitMQ's "
        "consumer_timeout never applies to them; 10 min keeps retries timely.",
        minimum=0,
    )
    worker_metrics_bind: str = setting(
        "CONVEYOR_WORKER_METRICS_BIND",
        "127.0.0.1:9191",
        "Where the worker serves Prometheus metrics (0.0.0.0:9191 in a container). Empty: no metrics. "
        "Give each worker on one host its own port.",
    )
    demo_crash_enabled: bool = setting(
        "CONVEYOR_DEMO_CRASH_ENABLED",
        False,
        "Let `demo.sleep` jobs with `crash: true` SIGKILL their worker process (to rehearse poison "
        "messages). Off by default: with it on, anyone who may submit jobs can kill workers.",
    )
    # --- Relay ----------------------------------------------------------------------------------
    relay_poll_seconds: float = setting(
        "CONVEYOR_RELAY_POLL_SECONDS",
        0.5,
        "How often the relay looks for due outbox rows, lapsed leases and dead letters when idle "
        "(expired idempotency keys and old finished jobs are pruned once a minute). Bounds the extra "
        "latency of a retry or a scheduled job.",
        minimum=0.01,
    )
    relay_batch_size: int = setting(
        "CONVEYOR_RELAY_BATCH_SIZE", 200, "Outbox rows the relay publishes per round.", minimum=1
    )
    outbox_grace_seconds: float = setting(
        "CONVEYOR_OUTBOX_GRACE_SECONDS",
        5.0,
        "How long the relay leaves a fresh outbox row to the API that wrote it before publishing it "
        "itself. The API normally publishes within milliseconds.",
        minimum=0.1,
    )
    # --- High availability and probes ---------------------------------------------------------
    queue_type: str = setting(
        "CONVEYOR_QUEUE_TYPE",
        "classic",
        "`classic`: single-node queues with job priorities 0-9. `quorum`: replicated queues for a "
        "RabbitMQ cluster, which survive the loss of a minority of its nodes; job priority then has no "
        "effect on RabbitMQ 3.x (4.x knows two levels: 5-9 before 0-4). Every process must use the same "
        "value, and an existing queue cannot change type: switch with a new CONVEYOR_QUEUE_PREFIX, or "
        "drain and delete the old queues (docs/deploy.md).",
        choices=("classic", "quorum"),
    )
    queue_delivery_limit: int = setting(
        "CONVEYOR_QUEUE_DELIVERY_LIMIT",
        20,
        "Quorum queues only: how often a message may come back unacknowledged (its worker died or "
        "stopped holding it) before RabbitMQ dead-letters it to `.XQ`, where the relay publishes it "
        "again if its job still waits. Claims and leases already deal with jobs that kill their worker, "
        "so this is a backstop; 20, RabbitMQ 4's default, stays out of the way of ordinary worker "
        "restarts. Like the type, it cannot change on an existing queue (a RabbitMQ `delivery-limit` "
        "policy can lower it).",
        minimum=1,
    )
    worker_heartbeat_file: str = setting(
        "CONVEYOR_WORKER_HEARTBEAT_FILE",
        "",
        "If set, every worker process touches `<this path>.<pid>` every third of "
        "CONVEYOR_JOB_LEASE_SECONDS, and `conveyor worker-alive` (a liveness probe) fails when one of "
        "them goes stale. Empty: no heartbeat. Containers use /tmp/conveyor-worker-heartbeat.",
    )
    relay_heartbeat_file: str = setting(
        "CONVEYOR_RELAY_HEARTBEAT_FILE",
        "",
        "If set, the relay touches `<this path>.<pid>` after every round, and `conveyor relay-alive` (a "
        "liveness probe) fails when it goes stale: a relay stuck on a hung connection gets restarted. "
        "Empty: no heartbeat. Containers use /tmp/conveyor-relay-heartbeat.",
    )
    relay_metrics_bind: str = setting(
        "CONVEYOR_RELAY_METRICS_BIND",
        "127.0.0.1:9192",
        "Where the relay serves Prometheus metrics, including queue depth and backlog (0.0.0.0:9192 in "
        "a container). Empty: no metrics.",
    )
    retention_seconds: int = setting(
        "CONVEYOR_RETENTION_SECONDS",
        7 * 86_400,
        "How long a finished job (succeeded, cancelled, or failed and no longer a dead letter) is kept "
        "before the relay deletes it. Dead letters are kept until an operator replays or purges them.",
        minimum=60,
    )
    queue_stats_refresh_seconds: float = setting(
        "CONVEYOR_QUEUE_STATS_REFRESH_SECONDS",
        10.0,
        "How often the relay refreshes the queue-depth gauges it exports. Scrapes read the last refresh, "
        "so a slow RabbitMQ never slows a scrape.",
        minimum=0.5,
    )
    # --- Logging --------------------------------------------------------------------------------
    log_level: str = setting(
        "CONVEYOR_LOG_LEVEL",
        "INFO",
        "Python log level of every process. At INFO a worker writes two lines per job (`attempt started`, "
        "the outcome); WARNING leaves them out, and a worker then drains no-op jobs about a third faster "
        "(docs/performance.md).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            values[f.name] = _parse(f, raw)
        if "database_url" in values:
            _check_dsn(values["database_url"])
        return cls(**values)

    def display_value(self, name: str) -> str:
        """A setting's value as it may be shown or logged: URLs without passwords, secrets hidden."""
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        value = getattr(self, name)
        if f.metadata["secret"]:
            return "***" if value else ""
        if name in ("database_url", "broker_url"):
            return _redact(str(value))
        return str(value)

    def redacted_database_url(self) -> str:
        return _redact(self.database_url)

    def redacted_broker_url(self) -> str:
        return _redact(self.broker_url)


_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false"}


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env, kind = f.metadata["env"], cast(type, type(f.default))
    try:
        if kind is bool:
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            value: Any = raw.lower() in {"1", "true", "yes", "on"}
        else:
            value = kind(raw)
    except ValueError:
        raise SettingsError(f"{env} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {raw!r}") from None
    if kind is float and not math.isfinite(value):
        raise SettingsError(f"{env} must be a finite number, got {raw!r}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise SettingsError(f"{env} must be one of {', '.join(choices)}; got {raw!r}")
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise SettingsError(f"{env} must be at least {minimum}, got {raw!r}")
    return value


#: A libpq keyword/value connection string's password (``host=db password='a b' dbname=x``).
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
#: A URL's userinfo password, up to the authority's last ``@``: also when it holds a character
#: the URL parser splits on (an unencoded ``#`` or ``?``), where ``urlsplit`` finds no password.
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)([^/]*)@", re.IGNORECASE)


def _check_dsn(dsn: str) -> None:
    """SettingsError unless libpq can read ``dsn`` (a ``postgresql://`` URL or ``key=value`` pairs)."""
    import psycopg2.extensions  # here: settings are read by processes that never open a connection too

    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        reason = (str(exc).strip().splitlines() or ["invalid"])[0]
        raise SettingsError(
            f"CONVEYOR_DATABASE_URL is not a Postgres connection string ({reason}): {_redact(dsn)!r}; "
            "use postgresql://user:password@host:5432/database"
        ) from None


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _redact(url: str) -> str:
    """The connection string with any password replaced by ***: the one libpq reads in it (a
    ``postgresql://`` URL or ``key=value`` pairs, as psycopg2 takes them), else a URL's userinfo
    password or ``password=`` parameter (the AMQP URL)."""
    secret = _libpq_password(url)
    if secret:
        masked = url
        for form in dict.fromkeys(
            (secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret, safe=":"),
             urllib.parse.quote(secret))
        ):  # fmt: skip
            masked = masked.replace(form, "***")
        if masked != url:
            return masked
    if not _SCHEME.match(url):
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    url = _URL_PASSWORD.sub(r"\1***@", url, count=1)
    parts = urllib.parse.urlsplit(url)
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else pair
        for pair in parts.query.split("&")
        if pair
        for name in [pair.split("=", 1)[0]]
    )
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _libpq_password(dsn: str) -> str | None:
    """The password libpq would use from ``dsn``; None if there is none or libpq cannot read it."""
    import psycopg2.extensions

    try:
        password = psycopg2.extensions.parse_dsn(dsn).get("password")
    except psycopg2.ProgrammingError:
        return None
    return password or None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings.from_env()


def markdown_table() -> str:
    lines = ["| Variable | Default | What it does |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f"`{f.default}`" if f.default != "" else "(empty)"
        lines.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['doc']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
