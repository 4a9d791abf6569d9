"""What the raw dramatiq and Celery no-op tasks record: when each ran, and how long after it was sent.

Each process appends ``<run time> <seconds since sent>`` lines to its own file in ``BENCH_STAMP_DIR``
(one O_APPEND write per message, a couple of microseconds), and the harness reads them afterwards.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_fd: int | None = None
_lock = threading.Lock()


def record(sent_at: float) -> None:
    global _fd
    now = time.time()
    if _fd is None:
        with _lock:
            if _fd is None:
                path = Path(os.environ["BENCH_STAMP_DIR"]) / f"{os.getpid()}.stamps"
                _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{now:.6f} {now - sent_at if sent_at else -1:.6f}\n".encode())


def read(directory: Path) -> list[tuple[float, float]]:
    """Every (run time, latency) recorded in ``directory``; latency is -1 when nothing was sent.

    The harness reads while the tasks still write: a file's last line may be only partly there (a
    read is not atomic with a concurrent write), so only the lines up to its last newline count.
    """
    rows = []
    for path in directory.glob("*.stamps"):
        text = path.read_text()
        for line in text[: text.rfind("\n") + 1].splitlines():
            ran, latency = line.split()
            rows.append((float(ran), float(latency)))
    return rows
