"""The measurements, one function per subject. Each returns plain numbers; ``run`` orders them.

Drain rates are steady-state rates: the jobs finished between the 10th and the 90th percentile of
completion times, divided by that interval. This leaves out the ramp-up (worker processes start one
after the other) and the tail, the same way for every subject.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench import cpu, load, stamps
from bench.services import (
    BROKER_URL,
    BenchRun,
    Proc,
    free_port,
    pg,
    purge,
    queue_consumers,
    queue_ready,
    scalar,
    wait_for,
)

PY = sys.executable
#: The API's server settings (the defaults of CONVEYOR_API_WORKERS and CONVEYOR_API_THREADS), used for
#: Conveyor and for the minimal endpoint alike.
API_WORKERS, API_THREADS = 2, 4
#: Jobs sent (and run) before a latency window opens, so it does not time the first connections.
WARM_UP = 20
#: How often a drain is checked for its progress (the raw subjects' stamp files, Conveyor's active
#: jobs). The check itself costs CPU (reading every stamp, counting the active jobs), so not more
#: often: the CPU window then opens and closes within a tenth of a second of 10% and 90% done.
STAMPS_POLL_SECONDS, CONVEYOR_POLL_SECONDS = 0.1, 0.2


@dataclass
class Measurements:
    """Every figure of the table, by key; None until measured. ``notes`` explain odd figures.

    A figure measured in several rounds (``--repeat``) keeps every round's value in ``samples``, in
    round order; ``values`` holds their median (NaN, an error, only if every round failed)."""

    values: dict[str, float | None] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    def put(self, key: str, value: float | None) -> None:
        if value is None:
            self.values[key] = None
            return
        samples = self.samples.setdefault(key, [])
        samples.append(value)
        measured = [v for v in samples if not math.isnan(v)]
        self.values[key] = statistics.median(measured) if measured else math.nan

    def rss(self, key: str, peaks: dict[int, float]) -> None:
        if peaks:
            self.peak_rss_mb[key] = max(self.peak_rss_mb.get(key, 0.0), max(peaks.values()))


def steady_rate(times: list[float]) -> float:
    """Jobs per second between the 10th and 90th percentile of completion times."""
    times = sorted(times)
    lo, hi = int(len(times) * 0.1), int(len(times) * 0.9) - 1
    if hi <= lo or times[hi] <= times[lo]:
        return float("nan")
    return (hi - lo) / (times[hi] - times[lo])


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Subjects:
    """Starts the subjects' processes for one run and knows their queue names."""

    def __init__(self, run: BenchRun) -> None:
        self.run = run
        self.dramatiq_queue = run.queue_prefix + "raw_dramatiq"
        self.celery_queue = run.queue_prefix + "celery"
        self.conveyor_queue = run.queue_prefix + "default"
        run.queues.update({self.dramatiq_queue, self.celery_queue, self.conveyor_queue})
        run.exchanges.update({self.celery_queue, self.celery_queue + ".ev"})
        run.exchanges.update({f"{self.celery_queue}.ctl.pidbox", f"reply.{self.celery_queue}.ctl.pidbox"})
        # The comparison subjects read these (the harness imports them too, to enqueue).
        os.environ.update(
            {
                "BENCH_BROKER_URL": BROKER_URL,
                "BENCH_RAW_DRAMATIQ_QUEUE": self.dramatiq_queue,
                "BENCH_CELERY_QUEUE": self.celery_queue,
                "BENCH_DATABASE_URL": run.dsn,
            }
        )

    def stamp_dir(self, name: str) -> Path:
        path = self.run.dir / "stamps" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def env(self, stamp_dir: Path | None = None) -> dict[str, str]:
        env = {**os.environ}
        if stamp_dir is not None:
            env["BENCH_STAMP_DIR"] = str(stamp_dir)
        return env

    # --- Conveyor ------------------------------------------------------------------------------

    def conveyor_api(self, **overrides: str) -> tuple[Proc, str]:
        port = free_port()
        env = self.run.conveyor_env(
            CONVEYOR_API_BIND=f"127.0.0.1:{port}",
            CONVEYOR_API_WORKERS=str(API_WORKERS),
            CONVEYOR_API_THREADS=str(API_THREADS),
            **overrides,
        )
        proc = self.run.start("conveyor-api", [PY, "-m", "shared.cli", "api"], env)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(proc, base + "/healthz"), timeout=60, what="Conveyor's API")
        return proc, base

    def conveyor_worker(self, processes: int, threads: int) -> Proc:
        env = self.run.conveyor_env(
            CONVEYOR_WORKER_PROCESSES=str(processes), CONVEYOR_WORKER_THREADS=str(threads)
        )
        return self.run.start("conveyor-worker", [PY, "-m", "shared.cli", "worker"], env)

    def conveyor_relay(self) -> Proc:
        return self.run.start("conveyor-relay", [PY, "-m", "shared.cli", "relay"], self.run.conveyor_env())

    def submit_batches(self, base: str, jobs: int, size: int = 1000) -> None:
        session = requests.Session()
        for start in range(0, jobs, size):
            count = min(size, jobs - start)
            response = session.post(
                f"{base}/v1/jobs/batch", json={"jobs": [{"type": "noop"}] * count}, timeout=120
            )
            response.raise_for_status()
            if response.json()["created"] != count:
                raise RuntimeError(f"batch refused jobs: {response.text[:500]}")

    def succeeded(self) -> int:
        return int(scalar(self.run.dsn, "SELECT count(*) FROM jobs WHERE status = 'succeeded'"))

    def unfinished(self) -> int:
        """Jobs still waiting or running: read from the small partial index of active jobs, so polling
        it costs Postgres next to nothing even with a million finished jobs in the table."""
        active = "SELECT count(*) FROM jobs WHERE finished_at IS NULL"
        return int(scalar(self.run.dsn, active))

    # --- raw dramatiq and Celery ---------------------------------------------------------------

    def dramatiq_worker(self, processes: int, threads: int, stamp_dir: Path) -> Proc:
        argv = [
            PY,
            "-m",
            "dramatiq",
            "bench.raw_dramatiq",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
        ]
        return self.run.start(f"dramatiq-{processes}x{threads}", argv, self.env(stamp_dir))

    def celery_workers(self, processes: int, threads: int, stamp_dir: Path) -> list[Proc]:
        return [
            self.run.start(
                f"celery-{processes}x{threads}-{i}",
                [
                    PY,
                    "-m",
                    "celery",
                    "-A",
                    "bench.raw_celery",
                    "worker",
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(threads),
                    "-Q",
                    self.celery_queue,
                    "-n",
                    f"w{i}@{self.run.run_id}",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "WARNING",
                ],
                self.env(stamp_dir),
            )
            for i in range(processes)
        ]


def _answers(proc: Proc, url: str) -> bool:
    proc.check_running()
    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.RequestException:
        return False


def _wait_stamps(
    directory: Path, expected: int, procs: list[Proc], timeout: float, window: cpu.DrainWindow | None = None
) -> list[tuple[float, float]]:
    def done() -> list[tuple[float, float]] | None:
        for proc in procs:
            proc.check_running()
        rows = stamps.read(directory)
        if window is not None:
            window.observe(len(rows))
        return rows if len(rows) >= expected else None

    result: list[tuple[float, float]] = wait_for(
        done, timeout=timeout, interval=STAMPS_POLL_SECONDS, what=f"{expected} jobs to run"
    )
    return result


def put_cpu(m: Measurements, key: str, per_unit: dict[str, float] | None) -> None:
    """Record the CPU per job or request of the measurement ``key`` (``cpu.<key>.<group>``, and
    ``cpu.<key>.all``), if its window could be read."""
    if per_unit is None:
        m.notes.append(f"{key}: too quick to read its CPU between {cpu.START:.0%} and {cpu.END:.0%} done")
        return
    for group, micros in per_unit.items():
        m.put(f"cpu.{key}.{group}", micros)
    m.put(f"cpu.{key}.all", sum(per_unit.values()))


def wrk_with_cpu(
    m: Measurements,
    key: str,
    server: Proc,
    url: str,
    script: str,
    args: list[str],
    seconds: float,
    *,
    units_per_request: int = 1,
) -> load.WrkResult:
    """``load.run_wrk`` against ``server``, recording the run's CPU per request (or per job, with
    ``units_per_request`` jobs in each request) under ``key``."""
    before = cpu.read([server.pid], 0)
    result = load.run_wrk(url, script, args, seconds)
    units = (result.requests - result.errors) * units_per_request
    put_cpu(m, key, cpu.per_unit(before, cpu.read([server.pid], units)))
    return result


def wait_consuming(proc: Proc, queue: str, consumers: int) -> None:
    def consuming() -> bool:
        proc.check_running()
        return queue_consumers(queue) >= consumers

    wait_for(consuming, timeout=60, interval=0.2, what=f"{proc.name} to consume {queue}")


def _wait_queued(queue: str, expected: int) -> None:
    wait_for(
        lambda: queue_ready(queue) >= expected,
        timeout=60,
        interval=0.1,
        what=f"{expected} messages in {queue}",
    )


# --- worker drain -------------------------------------------------------------------------------


def drain_dramatiq(subjects: Subjects, jobs: int, processes: int, threads: int, m: Measurements) -> float:
    from bench import raw_dramatiq

    purge(subjects.dramatiq_queue)  # what a failed phase before left
    for _ in range(jobs):
        raw_dramatiq.noop.send()
    _wait_queued(subjects.dramatiq_queue, jobs)
    directory = subjects.stamp_dir(f"dramatiq-drain-{processes}x{threads}")
    worker = subjects.dramatiq_worker(processes, threads, directory)
    window = cpu.DrainWindow([worker.pid], jobs)
    rows = _wait_stamps(directory, jobs, [worker], timeout=60 + jobs / 100, window=window)
    subjects.run.stop(worker)
    put_cpu(m, f"drain.dramatiq.{processes}x{threads}", window.per_job())
    return steady_rate([ran for ran, _ in rows])


def drain_celery(subjects: Subjects, jobs: int, processes: int, threads: int, m: Measurements) -> float:
    from bench import raw_celery

    purge(subjects.celery_queue)  # a killed worker's last unacknowledged messages
    with raw_celery.app.producer_or_acquire() as producer:
        for _ in range(jobs):
            raw_celery.noop.apply_async(producer=producer)
    _wait_queued(subjects.celery_queue, jobs)
    directory = subjects.stamp_dir(f"celery-drain-{processes}x{threads}")
    workers = subjects.celery_workers(processes, threads, directory)
    window = cpu.DrainWindow([worker.pid for worker in workers], jobs)
    rows = _wait_stamps(directory, jobs, workers, timeout=60 + jobs / 100, window=window)
    put_cpu(m, f"drain.celery.{processes}x{threads}", window.per_job())
    for worker in workers:  # every job ran; Celery's shutdown of its threads pool takes 10 s, so: kill
        subjects.run.stop(worker, signal.SIGKILL)
    return steady_rate([ran for ran, _ in rows])


def drain_conveyor(
    subjects: Subjects, jobs: int, processes: int, threads: int, m: Measurements, *, prefill: int = 0
) -> float:
    """Submit ``jobs`` noop jobs through the batch endpoint with no worker running, then start
    ``conveyor worker`` and wait until Postgres shows them all succeeded."""
    run = subjects.run
    fresh_conveyor_database(run, prefill)
    api, base = subjects.conveyor_api()
    subjects.submit_batches(base, jobs)
    run.stop(api)
    _wait_queued(subjects.conveyor_queue, jobs)
    worker = subjects.conveyor_worker(processes, threads)
    window = cpu.DrainWindow([worker.pid], jobs)

    def finished() -> bool:
        worker.check_running()
        unfinished = subjects.unfinished()
        window.observe(jobs - unfinished)
        return unfinished == 0

    wait_for(
        finished,
        timeout=120 + jobs / 50,
        interval=CONVEYOR_POLL_SECONDS,
        what=f"{jobs} Conveyor jobs to succeed",
    )
    m.rss("worker", worker.peak_rss_mb())
    run.stop(worker)
    put_cpu(m, f"{'scale.' if prefill else ''}drain.conveyor.{processes}x{threads}", window.per_job())
    with pg(run.dsn) as cur:
        cur.execute(
            "SELECT extract(epoch FROM finished_at) FROM jobs"
            " WHERE status = 'succeeded' AND labels = '{}'::jsonb"
        )
        times = [float(row[0]) for row in cur.fetchall()]
    return steady_rate(times)


def prefill_finished_jobs(dsn: str, rows: int) -> None:
    """Insert ``rows`` succeeded jobs (a day old, labelled so the drain ignores them), in batches, then
    bring the table to the state it would be in after a day of traffic (vacuumed and analysed)."""
    with pg(dsn) as cur:
        cur.execute("SET session_replication_role = replica")  # skip the per-row triggers: a bulk load
        batch = 100_000
        for start in range(0, rows, batch):
            cur.execute(
                "INSERT INTO jobs (id, tenant, type, queue, status, payload, priority, attempts,"
                " max_attempts, timeout_seconds, run_at, labels, result,"
                " created_at, started_at, finished_at, updated_at)"
                " SELECT gen_random_uuid(), 'default', 'noop', 'default', 'succeeded', '{}', 5, 1, 3, 60,"
                " t, '{\"bench\": \"prefill\"}', 'null', t, t, t, t"
                " FROM (SELECT now() - interval '1 day' - g * interval '1 ms' AS t"
                "       FROM generate_series(%s, %s) AS g) AS s",
                (start, min(rows, start + batch) - 1),
            )
        # A table that has held a million finished jobs for a while is vacuumed: do that now, or
        # autovacuum would work through the bulk load during the measurement and the figures would show
        # the load, not the table's size.
        cur.execute("VACUUM (ANALYZE) jobs")


def fresh_conveyor_database(run: BenchRun, prefill: int) -> None:
    """The run's database, empty or (``prefill`` > 0) a copy of the one with that many finished jobs
    (built once per run), then a checkpoint.

    After a checkpoint, the first change to each page writes the whole page to the WAL. Copying a
    database checkpoints; so, for an empty one, does this, so that both sides of a scale ratio start at
    the same point of the checkpoint cycle. The drain's jobs are then submitted before the drain
    starts, so those page images are written before it is timed, as in a steady state where each page
    changes many times between two checkpoints."""
    template = run.prefilled(functools.partial(prefill_finished_jobs, rows=prefill)) if prefill else None
    run.fresh_database(template)
    with pg(run.dsn) as cur:
        cur.execute("CHECKPOINT")


# --- HTTP submission ----------------------------------------------------------------------------


def submit_conveyor(
    subjects: Subjects, seconds: float, batch_size: int, m: Measurements, *, prefill: int = 0
) -> tuple[float, float, float]:
    """(single submissions/s, batch jobs/s, batch jobs/s from one connection) against Conveyor's API,
    every job with its own idempotency key."""
    run = subjects.run
    fresh_conveyor_database(run, prefill)
    api, base = subjects.conveyor_api()
    tag = uuid.uuid4().hex[:8]
    prefix = "scale." if prefill else ""
    single = wrk_with_cpu(
        m, prefix + "submit.single", api, base + "/v1/jobs", "single.lua", [f"s{tag}"], seconds
    )
    _check_errors("POST /v1/jobs", single, m)
    # Batches from one connection first: what a batch costs with no other batch around it. Then the
    # same load as the single submissions (WRK_CONNECTIONS connections); its requests still running
    # when wrk stops would get in the way of a measurement after it.
    alone = load.run_wrk(base + "/v1/jobs/batch", "batch.lua", [f"c{tag}", str(batch_size)], seconds, 1)
    _check_errors("POST /v1/jobs/batch, 1 connection", alone, m)
    batch = wrk_with_cpu(
        m, prefix + "submit.batch", api, base + "/v1/jobs/batch", "batch.lua",
        [f"b{tag}", str(batch_size)], seconds, units_per_request=batch_size,
    )  # fmt: skip
    _check_errors("POST /v1/jobs/batch", batch, m)
    m.rss("api", api.peak_rss_mb())
    run.stop(api)
    purge(subjects.conveyor_queue)
    return single.requests_per_second, _batch_rate(batch, batch_size), _batch_rate(alone, batch_size)


def poll_conveyor(subjects: Subjects, seconds: float, m: Measurements) -> float:
    """Requests/s of ``GET /v1/jobs/{id}`` on one job: what a client polling for a result costs."""
    run = subjects.run
    fresh_conveyor_database(run, 0)
    api, base = subjects.conveyor_api()
    created = requests.post(base + "/v1/jobs", json={"type": "noop"}, timeout=30)
    created.raise_for_status()
    result = wrk_with_cpu(
        m, "poll.single", api, f"{base}/v1/jobs/{created.json()['id']}", "get.lua", [], seconds
    )
    _check_errors("GET /v1/jobs/{id}", result, m)
    run.stop(api)
    purge(subjects.conveyor_queue)
    return result.requests_per_second


def _batch_rate(result: load.WrkResult, batch_size: int) -> float:
    """Jobs/s answered by successful batch requests (every job of a 200 is created or replayed; the
    keys are unique, so created)."""
    return (result.requests - result.errors) * batch_size / max(result.seconds, 1e-9)


def _check_errors(what: str, result: load.WrkResult, m: Measurements) -> None:
    if result.errors:
        m.notes.append(f"{what}: {result.summary}")


def submit_minimal(subjects: Subjects, seconds: float, m: Measurements) -> float:
    run = subjects.run
    with pg(run.dsn) as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_rows (id bigserial PRIMARY KEY, body jsonb NOT NULL)")
    port = free_port()
    argv = [
        PY,
        "-m",
        "gunicorn",
        "--workers",
        str(API_WORKERS),
        "--threads",
        str(API_THREADS),
        "--worker-class",
        "gthread",
        "--keep-alive",
        "5",
        "--reuse-port",  # as the API: each worker listens on its own socket
        "--bind",
        f"127.0.0.1:{port}",
        "--access-logfile",
        "-",
        "bench.minimal_app:app",
    ]
    server = run.start("minimal-flask", argv, subjects.env())
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(server, base + "/"), timeout=60, what="the minimal Flask endpoint")
    result = wrk_with_cpu(
        m, "submit.minimal", server, base + "/rows", "post.lua", ['{"type":"noop"}'], seconds
    )
    _check_errors("minimal Flask", result, m)
    run.stop(server)
    return result.requests_per_second


def submit_flower(subjects: Subjects, seconds: float, m: Measurements) -> float:
    run = subjects.run
    port = free_port()
    argv = [
        PY,
        "-m",
        "celery",
        "-A",
        "bench.raw_celery",
        "flower",
        "--address=127.0.0.1",
        f"--port={port}",
        "--loglevel=WARNING",
    ]
    env = {**subjects.env(), "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = run.start("flower", argv, env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(flower, base + "/healthcheck"), timeout=60, what="Flower")
    url = base + "/api/task/async-apply/bench.noop"
    result = wrk_with_cpu(m, "submit.flower", flower, url, "post.lua", ['{"args":[]}'], seconds)
    _check_errors("Flower async-apply", result, m)
    run.stop(flower)
    purge(subjects.celery_queue)
    return result.requests_per_second


# --- enqueue-to-start latency -------------------------------------------------------------------


def latency_conveyor(subjects: Subjects, rate: float, seconds: float, m: Measurements) -> tuple[float, float]:
    """p50 and p99 (ms) of started_at - created_at, both Postgres' clock, with jobs submitted one by
    one over HTTP at ``rate`` per second to a running API, worker (2 x 8) and relay."""
    run = subjects.run
    run.fresh_database()
    api, base = subjects.conveyor_api()
    relay = subjects.conveyor_relay()
    worker = subjects.conveyor_worker(2, 8)
    wait_consuming(worker, subjects.conveyor_queue, 2)

    def send(session: requests.Session, i: int) -> None:
        response = session.post(
            f"{base}/v1/jobs", json={"type": "noop"}, timeout=10, headers={"Idempotency-Key": f"latency-{i}"}
        )
        response.raise_for_status()

    for i in range(WARM_UP):  # open the pools' connections before the measured window
        send(requests.Session(), -1 - i)
    wait_for(lambda: subjects.succeeded() >= WARM_UP, timeout=60, interval=0.1, what="the warm-up jobs")
    window_start = scalar(run.dsn, "SELECT now()")
    failures = load.paced(send, rate, seconds)
    if failures:
        m.notes.append(f"Conveyor latency: {failures} submissions failed")
    expected = WARM_UP + int(rate * seconds) - failures
    wait_for(lambda: subjects.succeeded() >= expected, timeout=60, interval=0.2, what="the latency jobs")
    with pg(run.dsn) as cur:
        cur.execute(
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM started_at - created_at) * 1000)"
            " FROM jobs WHERE status = 'succeeded' AND created_at >= %s",
            (window_start,),
        )
        row = cur.fetchone()
    m.rss("worker", worker.peak_rss_mb())
    m.rss("api", api.peak_rss_mb())
    for proc in (worker, relay, api):
        run.stop(proc)
    return float(row[0][0]), float(row[0][1])


def latency_dramatiq(subjects: Subjects, rate: float, seconds: float, m: Measurements) -> tuple[float, float]:
    """p50 and p99 (ms) of (actor start - send time), sent at ``rate`` per second to a 2 x 8 worker."""
    from bench import raw_dramatiq

    purge(subjects.dramatiq_queue)  # what a failed phase before left
    directory = subjects.stamp_dir("dramatiq-latency")
    worker = subjects.dramatiq_worker(2, 8, directory)
    wait_consuming(worker, subjects.dramatiq_queue, 2)
    for _ in range(WARM_UP):
        raw_dramatiq.noop.send(time.time())
    _wait_stamps(directory, WARM_UP, [worker], timeout=60)

    def send(_session: requests.Session, _i: int) -> None:
        raw_dramatiq.noop.send(time.time())

    failures = load.paced(send, rate, seconds)
    rows = _wait_stamps(directory, WARM_UP + int(rate * seconds) - failures, [worker], timeout=60)
    subjects.run.stop(worker)
    latencies = [latency * 1000 for _, latency in sorted(rows)[WARM_UP:]]
    return percentile(latencies, 0.5), percentile(latencies, 0.99)
