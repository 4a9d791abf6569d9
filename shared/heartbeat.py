"""Heartbeat files: how a liveness probe tells a working worker process from a hung one.

A ``conveyor worker`` container runs several dramatiq processes. With ``CONVEYOR_WORKER_HEARTBEAT_FILE``
set to a path ``P``, each process touches its own file ``P.<pid>`` from its lease keeper thread, at start
and then every third of a lease (``worker_service/leases.py``). ``conveyor worker-alive --max-age S``
(the Kubernetes liveness probe and the compose healthcheck) passes only if at least
``CONVEYOR_WORKER_PROCESSES`` processes have a file and every one of them was touched in the last ``S``
seconds. One file per process, not one shared file: with a shared file one live process would hide a
frozen sibling.

What it detects: a process that is frozen (stopped, deadlocked, stuck holding the GIL in C code) or a
lease keeper thread that no longer runs, which also means its jobs' leases are lapsing. What it does
not: a job stuck in its handler while the process lives; the lease and the job's timeout handle that.
An unreachable Postgres does not stop the heartbeat, so an outage never restarts every worker.

Files of processes that no longer exist are ignored (and ``conveyor worker`` removes all old files
before it starts dramatiq, so a restarted container never sees a reused pid with an old file).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def path_for(base: str, pid: int) -> Path:
    """The heartbeat file of one process."""
    return Path(f"{base}.{pid}")


def beat(base: str) -> None:
    """Create or touch this process's heartbeat file. Raises OSError if the file cannot be written."""
    path_for(base, os.getpid()).touch()


def remove(base: str) -> None:
    """Remove this process's heartbeat file (a clean stop)."""
    path_for(base, os.getpid()).unlink(missing_ok=True)


def heartbeats(base: str) -> dict[int, float]:
    """Every heartbeat file next to ``base``: pid -> last touch (seconds since the epoch)."""
    base_path = Path(base)
    pattern = re.compile(re.escape(base_path.name) + r"\.(\d+)")
    found: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in base_path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                with contextlib.suppress(FileNotFoundError):  # its process removed it meanwhile
                    found[int(match.group(1))] = entry.stat().st_mtime
    return found


def clear(base: str) -> None:
    """Remove every heartbeat file of ``base`` (before the worker starts its processes)."""
    for pid in heartbeats(base):
        path_for(base, pid).unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass(frozen=True)
class Verdict:
    alive: bool
    message: str


def check(
    base: str,
    *,
    max_age: float,
    expected_processes: int,
    now: float | None = None,
    exists: Callable[[int], bool] = process_exists,
    what: str = "worker",
) -> Verdict:
    """Whether every process beat within ``max_age`` seconds, and enough of them did."""
    now = time.time() if now is None else now
    ages = {pid: now - mtime for pid, mtime in heartbeats(base).items() if exists(pid)}
    stale = {pid: age for pid, age in sorted(ages.items()) if age > max_age}
    if stale:
        listed = ", ".join(f"pid {pid} {age:.0f}s ago" for pid, age in stale.items())
        return Verdict(False, f"{what} process(es) stopped beating (limit {max_age:g}s): {listed}")
    if len(ages) < max(1, expected_processes):
        return Verdict(
            False,
            f"{len(ages)} of {expected_processes} {what} processes have a heartbeat file {base}.<pid> "
            "(still starting, or the heartbeat file setting differs between the process and the probe)",
        )
    newest = min(ages.values())
    return Verdict(True, f"{len(ages)} {what} process(es) alive, newest heartbeat {newest:.0f}s ago")
