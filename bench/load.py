"""Load generators: wrk (with a Lua script) for throughput, and a paced Python client for latency."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

WRK_DIR = Path(__file__).resolve().parent / "wrk"
#: One wrk thread: the machine has two cores, and every cycle wrk spends is one the server loses. The
#: same settings are used for every HTTP subject, so the comparison stays fair.
WRK_THREADS = 1
#: Open connections: twice the API's 2 workers x 4 threads, so no server thread waits for a request.
WRK_CONNECTIONS = 16


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    errors: int  # non-2xx answers, socket errors and timeouts

    @property
    def summary(self) -> str:
        return f"{self.requests} requests in {self.seconds:.1f}s, {self.errors} errors"


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    return path


def run_wrk(
    url: str, script: str, args: list[str], seconds: float, connections: int = WRK_CONNECTIONS
) -> WrkResult:
    out = subprocess.run(
        [
            wrk_path(),
            "-t",
            str(WRK_THREADS),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_DIR / script),
            url,
            "--",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done is None or rate is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds_taken = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(int(done.group(1)), seconds_taken, float(rate.group(1)), errors)


def paced(
    send: Callable[[requests.Session, int], None], rate: float, seconds: float, threads: int = 8
) -> int:
    """Call ``send(session, i)`` at ``rate`` calls per second for ``seconds``, spread over ``threads``
    threads (call i is due at start + i / rate; a late thread catches up without sleeping). Returns
    the number of calls that raised."""
    total = int(rate * seconds)
    start = time.monotonic() + 0.2
    failures = [0] * threads

    def loop(k: int) -> None:
        session = requests.Session()
        for i in range(k, total, threads):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                send(session, i)
            except Exception:
                failures[k] += 1

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(failures)
