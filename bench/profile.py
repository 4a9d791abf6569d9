"""Where the time goes: py-spy samples Conveyor's worker during a drain and its API under wrk.

py-spy samples the threads it sees as active. A thread blocked in Python on a socket counts as idle,
but one waiting inside psycopg2's C code for Postgres does not, so a Python frame of ``shared/store``
as the innermost frame is mostly a Postgres round trip. Each profile is summarised twice: the share
of samples in each library (by the file of the innermost frame), and the share of samples that pass
through each of Conveyor's own functions (inclusive, so the shares add up to more than 100%).
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

from bench import load, phases
from bench.phases import Subjects
from bench.services import BenchRun, Proc, wait_for

SAMPLE_RATE = 100  # per second and process: enough for shares, little overhead
OWN_PACKAGES = ("shared/", "worker_service/", "api_service/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def profile_conveyor(subjects: Subjects, jobs: int, seconds: float) -> list[str]:
    py_spy = shutil.which("py-spy") or str(Path(phases.PY).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    run = subjects.run
    sections = []

    # The worker, 1 x 8, draining pre-queued no-op jobs.
    run.fresh_database()
    api, base = subjects.conveyor_api()
    subjects.submit_batches(base, jobs)
    run.stop(api)
    worker = subjects.conveyor_worker(1, 8)
    phases.wait_consuming(worker, subjects.conveyor_queue, 1)
    out = run.dir / "worker.pyspy"
    spy = _record(run, py_spy, worker, out)

    def drained() -> bool:
        worker.check_running()
        return subjects.succeeded() >= jobs

    wait_for(drained, timeout=120 + jobs / 50, interval=0.2, what="the profiled drain")
    _finish(run, spy)
    run.stop(worker)
    sections.append(summarise(f"Worker (`conveyor worker`, 1 x 8) draining {jobs:,} no-op jobs", out))

    # The API, 2 x 4, under wrk with POST /v1/jobs.
    run.fresh_database()
    api, base = subjects.conveyor_api()
    out = run.dir / "api.pyspy"
    spy = _record(run, py_spy, api, out)
    load.run_wrk(base + "/v1/jobs", "single.lua", ["profile"], seconds)
    _finish(run, spy)
    run.stop(api)
    sections.append(summarise("API (gunicorn 2 x 4) under wrk, POST /v1/jobs with Idempotency-Key", out))
    return sections


def _record(run: BenchRun, py_spy: str, target: Proc, out: Path) -> Proc:
    argv = [
        py_spy,
        "record",
        "--pid",
        str(target.pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    spy = run.start(f"py-spy-{out.stem}", argv, {})
    time.sleep(1.0)  # attaching takes a moment; a py-spy that cannot attach exits at once
    spy.check_running()
    return spy


def _finish(run: BenchRun, spy: Proc) -> None:
    assert spy.popen is not None
    spy.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    spy.popen.wait(30)
    run.stop(spy)


def summarise(title: str, path: Path, top: int = 12) -> str:
    if not path.exists():
        return f"#### {title}\n\npy-spy wrote nothing (is ptrace allowed here?)."
    by_library: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in (_parse(frame) for frame in stack.split(";")) if f is not None]
        if not frames:
            continue
        total += count
        by_library[_library(frames[-1][1])] += count
        for func, file in set(frames):
            if file.startswith(OWN_PACKAGES):
                by_function[f"`{file}` {func}"] += count
    if not total:
        return f"#### {title}\n\nno samples."
    lines = [
        f"#### {title}",
        "",
        f"{total:,} samples at {SAMPLE_RATE}/s per process.",
        "",
        "| innermost frame in | share of CPU samples |",
        "|---|---:|",
    ]
    lines += [f"| {lib} | {n / total:.0%} |" for lib, n in by_library.most_common(top)]
    lines += ["", "| Conveyor function (inclusive) | share of CPU samples |", "|---|---:|"]
    lines += [f"| {func} | {n / total:.0%} |" for func, n in by_function.most_common(top)]
    return "\n".join(lines)


def _parse(frame: str) -> tuple[str, str] | None:
    match = _FRAME.match(frame.strip())
    if match is None:
        return None  # process and thread frames
    return match["func"], _short(match["file"])


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            rest = file.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3" and "/" in rest else rest
    return file


def _library(file: str) -> str:
    """The package (or stdlib module) a file belongs to; Conveyor's files by package."""
    if file.startswith("shared/store/"):
        return "shared/store (mostly inside psycopg2's C calls: a Postgres round trip)"
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in file or file.endswith(".py") else file
