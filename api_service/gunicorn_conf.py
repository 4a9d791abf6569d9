"""gunicorn settings, taken from Conveyor's settings so there is one place to configure the API."""

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
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
