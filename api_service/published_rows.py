"""Forgetting the outbox rows of messages the API published itself, a batch at a time.

After COMMIT the API publishes a due job's message and waits for RabbitMQ's confirm. The job's outbox
row, held for ``CONVEYOR_OUTBOX_GRACE_SECONDS`` so that the relay leaves it alone meanwhile, is then no
longer needed. Deleting it inside the request would cost every submission one more statement and commit;
instead each API process collects the ids and one background thread deletes them together, every
``interval`` seconds. If the process dies first, the rows come due when their grace period ends and the
relay publishes them again: a duplicate message, which the worker's claim ignores (the job is already
running or finished).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable

from shared.errors import StoreUnavailable
from shared.store import Database
from shared.store import outbox as outbox_store

logger = logging.getLogger(__name__)


class PublishedRows:
    def __init__(self, db: Database, interval: float = 0.05) -> None:
        self._db = db
        self._interval = interval
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._pid: int | None = None  # the process whose thread runs (gunicorn may fork after creation)
        atexit.register(self.flush)

    def add(self, outbox_ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.extend(outbox_ids)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="conveyor-published-rows", daemon=True).start()

    def flush(self) -> None:
        """Delete the collected rows now; on failure keep them for the next try."""
        with self._lock:
            ids, self._ids = self._ids, []
        if not ids:
            return
        try:
            self._db.execute(lambda cur: outbox_store.delete_published(cur, ids))
        except StoreUnavailable as exc:
            logger.warning("could not delete %d published outbox rows yet: %s", len(ids), exc)
            with self._lock:
                self._ids[:0] = ids

    def _run(self) -> None:
        while True:  # a daemon thread: it ends with the process (atexit flushes what is left)
            time.sleep(self._interval)
            try:
                self.flush()
            except Exception:  # never let the thread die: the relay would re-publish every row
                logger.exception("deleting published outbox rows failed")
