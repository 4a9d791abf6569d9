"""The raw dramatiq subject: a trivial actor on a plain RabbitmqBroker, no database, no confirms.

``dramatiq bench.raw_dramatiq`` runs it; the harness imports it to enqueue. The queue name and the
broker come from the environment the harness sets (``BENCH_RAW_DRAMATIQ_QUEUE``, ``BENCH_BROKER_URL``).
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench import stamps

#: Loading without publisher confirms is dramatiq's default and its fastest way to enqueue.
broker = RabbitmqBroker(url=os.environ["BENCH_BROKER_URL"], confirm_delivery=False)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=os.environ["BENCH_RAW_DRAMATIQ_QUEUE"], actor_name="noop", max_retries=0)
def noop(sent_at: float = 0.0) -> None:
    stamps.record(sent_at)
