"""The worker's dramatiq entry point: ``dramatiq worker_service.app`` (``conveyor worker`` runs it).

Order matters: the broker is set before any actor is declared (dramatiq binds actors to the global
broker at declaration). One actor per registered job type, named after it, on the type's queue. Per-
process resources (the lease keeper and deadline threads) start in ``after_process_boot`` and stop in
``after_worker_shutdown``, after in-flight jobs finished, so leases are renewed during a graceful stop.
``after_process_boot`` also freezes the process's start-up objects out of the garbage collector's full
collections (``shared/startup_heap.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import dramatiq
from dramatiq.middleware import CurrentMessage

from shared.broker import create_broker
from shared.job_types import REGISTRY, JobType
from shared.logs import configure_logging
from shared.messages import queue_name
from shared.settings import get_settings
from shared.startup_heap import freeze_startup_heap
from shared.store import Database
from worker_service import metrics
from worker_service.deadlines import DeadlineMonitor
from worker_service.executor import Executor, Handler, Message
from worker_service.group_commit import GroupCommit
from worker_service.handlers import load_handler
from worker_service.leases import LeaseKeeper

logger = logging.getLogger(__name__)


class WorkerRuntime(dramatiq.Middleware):
    """Owns the per-process resources of a worker and their lifecycle."""

    def __init__(self) -> None:
        self.settings = get_settings()
        self.db = Database(self.settings, application_name="conveyor-worker")
        self.leases = LeaseKeeper(
            self.db, self.settings.job_lease_seconds, heartbeat_file=self.settings.worker_heartbeat_file
        )
        self.deadlines = DeadlineMonitor()
        self.group = GroupCommit(self.db, self.settings.job_lease_seconds)
        self.executor = Executor(self.settings, self.db, self.group, self.leases, self.deadlines)

    @property
    def forks(self) -> list[Callable[[], int]]:
        """The metrics server, in its own process (dramatiq's CLI forks it once per host)."""
        return [metrics.serve_metrics] if self.settings.worker_metrics_bind else []

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self.group.start()
        self.leases.start()
        self.deadlines.start()
        # Last, so that what the process built to run jobs is frozen too (shared/startup_heap.py).
        freeze_startup_heap()
        logger.info("worker process ready; queues: %s", ", ".join(sorted(broker.get_declared_queues())))

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.leases.stop()
        self.deadlines.stop()
        self.group.stop()
        self.db.close()


def _actor_for(runtime: WorkerRuntime, job_type: JobType, handler: Handler) -> None:
    def run_job() -> None:
        # CurrentMessage holds the MessageProxy (with fail() and redelivered), typed as a Message.
        message = cast(Message, CurrentMessage.get_current_message())
        assert message is not None, "CurrentMessage middleware is installed"
        runtime.executor.execute(job_type, handler, message)

    run_job.__name__ = "run_" + job_type.name.replace(".", "_")
    queue = queue_name(runtime.settings.queue_prefix, job_type.queue)
    dramatiq.actor(actor_name=job_type.name, queue_name=queue)(run_job)


configure_logging(get_settings())
runtime = WorkerRuntime()
broker = create_broker(runtime.settings, middleware=[CurrentMessage(), runtime])
dramatiq.set_broker(broker)
for _job_type in REGISTRY.values():
    _actor_for(runtime, _job_type, load_handler(_job_type))
