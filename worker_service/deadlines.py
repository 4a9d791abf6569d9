"""Per-attempt timeouts: a monitor thread raises JobTimeout into a handler that passes its deadline.

Like dramatiq's TimeLimit it uses ``PyThreadState_SetAsyncExc``, so it cannot interrupt a blocking C
call or syscall; the exception arrives when that call returns. Unlike TimeLimit it only fires while the
handler runs, never during the worker's own bookkeeping: the exception is scheduled under the same
lock that the attempt takes to leave ``limit``, so it is raised inside the ``with`` block.
A handler stuck for good in C code stops having its lease renewed (see ``leases``), and the relay then
retries the job elsewhere.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from worker_service.errors import JobTimeout

logger = logging.getLogger(__name__)

#: How often deadlines are checked: the precision of timeouts.
CHECK_INTERVAL_SECONDS = 0.1


class DeadlineMonitor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def limit(self, deadline: float) -> Iterator[None]:
        """Run the block until ``deadline`` (a time.monotonic() value) at most."""
        thread_id = threading.get_ident()
        with self._lock:
            self._deadlines[thread_id] = deadline
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(thread_id, None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="conveyor-deadlines", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_SECONDS):
            now = time.monotonic()
            with self._lock:
                for thread_id, deadline in list(self._deadlines.items()):
                    if now >= deadline:
                        del self._deadlines[thread_id]
                        _raise_in_thread(thread_id)


def _raise_in_thread(thread_id: int) -> None:
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(JobTimeout))
    if done != 1:  # pragma: no cover - the thread ended between the check and the call
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        logger.warning("could not interrupt thread %s at its deadline", thread_id)
