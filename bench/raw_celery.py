"""The raw Celery subject: a trivial task with ``acks_late`` on the same RabbitMQ, no result backend.

``celery -A bench.raw_celery worker`` runs it and ``celery -A bench.raw_celery flower`` serves
Flower's API for it. The queue (and its direct exchange) is ``BENCH_CELERY_QUEUE``.
"""

from __future__ import annotations

import os

from celery import Celery

from bench import stamps

QUEUE = os.environ["BENCH_CELERY_QUEUE"]

app = Celery("bench", broker=os.environ["BENCH_BROKER_URL"])
app.conf.update(
    task_acks_late=True,  # acknowledge after the task ran, as Conveyor and dramatiq do
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # The run's own control and event exchanges, so the run can delete what it declared.
    control_exchange=QUEUE + ".ctl",
    event_exchange=QUEUE + ".ev",
)


@app.task(name="bench.noop")
def noop(sent_at: float = 0.0) -> None:
    stamps.record(sent_at)
