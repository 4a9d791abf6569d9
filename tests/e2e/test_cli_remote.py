"""``conveyor jobs|dlq|queues`` as an operator runs them: a separate process talking HTTP to the live API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import TEST_TENANT, Keys
from support import DEFAULT_QUEUE, ROOT, ApiClient, free_port, new_key

from shared.settings import Settings

pytestmark = pytest.mark.e2e

#: What a handler's FatalJobError is recorded as; the dead-letter tests filter on it, so the retryable
#: DemoFailure dead letters of other tests never fall into their selection.
FATAL = "worker_service.errors.FatalJobError"


@dataclass(frozen=True)
class Cli:
    """Runs ``python -m shared.cli`` with CONVEYOR_URL and CONVEYOR_API_KEY, as an operator would."""

    url: str
    key: str | None

    def __call__(
        self, *args: str, key: str | None = None, url: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_API_KEY"}
        env["CONVEYOR_URL"] = url or self.url
        if key or self.key:
            env["CONVEYOR_API_KEY"] = key or self.key or ""
        return subprocess.run(
            [sys.executable, "-m", "shared.cli", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def ok(self, *args: str, key: str | None = None) -> str:
        done = self(*args, key=key)
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, *args: str, key: str | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", key=key))


@pytest.fixture
def cli(conveyor: ApiClient, settings: Settings, keys: Keys) -> Cli:
    """The CLI against the running system, with tenant "tests"' read/write key."""
    return Cli(f"http://{settings.api_bind}", keys.writer)


def failing_job(cli: Cli, *, seconds: float = 0, fatal: bool = False) -> str:
    payload = {"seconds": seconds, "fail_attempts": 5, "fatal": fatal}
    return cli.ok(
        "jobs", "submit", "demo.sleep", "--payload", json.dumps(payload), "--max-attempts", "1"
    ).strip()


def test_submitted_job_is_watched_until_it_succeeds(cli: Cli) -> None:
    submitted = cli("jobs", "submit", "demo.sleep", "--payload", '{"seconds": 1.5}', "--label", "via=cli")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert uuid.UUID(job_id)
    assert f"conveyor jobs watch {job_id}" in submitted.stderr

    watched = cli("jobs", "watch", job_id, "--max-interval", "0.5")
    assert watched.returncode == 0, watched.stderr
    last = watched.stdout.strip().splitlines()[-1]
    assert "100%" in last
    assert "succeeded" in last
    shown = cli.ok("jobs", "get", job_id)
    assert "status:           succeeded" in shown
    assert "via=cli" in shown


def test_resubmitting_with_the_same_idempotency_key_returns_the_same_job(cli: Cli) -> None:
    key = new_key()
    first = cli("jobs", "submit", "noop", "--idempotency-key", key)
    again = cli("jobs", "submit", "noop", "--idempotency-key", key)
    assert first.returncode == again.returncode == 0
    assert first.stdout.strip() == again.stdout.strip()
    assert "already submitted" in again.stderr


def test_list_filters_by_status_and_label_and_follows_every_page(cli: Cli, conveyor: ApiClient) -> None:
    run = new_key()
    ids = {cli.ok("jobs", "submit", "noop", "--label", f"run={run}").strip() for _ in range(3)}
    for job_id in ids:
        conveyor.wait_status(job_id, "succeeded")

    page = cli.json("jobs", "list", "--label", f"run={run}", "--status", "succeeded", "--limit", "2")
    assert len(page["items"]) == 2
    assert page["next_cursor"] is not None
    every = cli.json("jobs", "list", "--label", f"run={run}", "--limit", "2", "--all")
    assert {job["id"] for job in every["items"]} == ids
    assert every["next_cursor"] is None
    assert cli.json("jobs", "list", "--label", f"run={run}", "--status", "failed")["items"] == []

    table = cli("jobs", "list", "--label", f"run={run}", "--type", "noop", "--limit", "2")
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATUS"]
    assert len(table.stdout.splitlines()) == 3
    assert "--cursor" in table.stderr


def test_cancelling_a_delayed_job_cancels_it_and_twice_is_harmless(cli: Cli) -> None:
    job_id = cli.ok("jobs", "submit", "noop", "--delay", "300").strip()
    assert "cancelled job" in cli.ok("jobs", "cancel", job_id)
    assert cli.json("jobs", "get", job_id)["status"] == "cancelled"
    assert cli("jobs", "cancel", job_id).returncode == 0
    assert cli("jobs", "watch", job_id).returncode == 1


def test_retry_queues_a_failed_job_again(cli: Cli, conveyor: ApiClient) -> None:
    job_id = failing_job(cli)
    conveyor.wait_status(job_id, "failed")
    retried = cli.json("jobs", "retry", job_id)
    assert retried["status"] == "queued"
    assert retried["attempts"] == 0
    assert conveyor.wait_status(job_id, "failed")["attempts"] == 1  # a fresh cycle, and it ran again

    succeeded = cli.ok("jobs", "submit", "noop").strip()
    conveyor.wait_status(succeeded, "succeeded")
    refused = cli("jobs", "retry", succeeded)
    assert refused.returncode == 1
    assert "Job status does not allow this: The job is succeeded" in refused.stderr


def test_dead_letters_list_replay_once_and_purge(cli: Cli, conveyor: ApiClient, keys: Keys) -> None:
    started = datetime.now(UTC).isoformat()
    # Long enough that the second replay finds the replayed jobs still queued or running.
    jobs = {failing_job(cli, seconds=3, fatal=True) for _ in range(2)}
    for job_id in jobs:
        conveyor.wait_status(job_id, "failed")
    mine = ["--error-type", FATAL, "--dead-after", started]

    listed = cli.json("dlq", "list", *mine)
    assert {d["job_id"] for d in listed["items"]} == jobs
    assert {d["attempts"] for d in listed["items"]} == {1}
    assert next(iter(jobs)) in cli.ok("dlq", "list", *mine)

    selection = ["--type", "demo.sleep", "--tenant", TEST_TENANT, *mine]
    assert cli.ok("dlq", "replay", *selection, key=keys.admin).strip().startswith("replayed 2 job(s)")
    assert cli.ok("dlq", "replay", *selection, key=keys.admin).strip().startswith("replayed 0 job(s)")
    for job_id in jobs:  # each ran once more, and failed again: one attempt, no more
        assert conveyor.wait_status(job_id, "failed", timeout=20)["attempts"] == 1

    assert cli.ok("dlq", "purge", *selection, key=keys.admin).strip() == "purged 2 dead letter(s)"
    assert cli.json("dlq", "list", *mine)["items"] == []
    assert all(conveyor.job(job_id)["status"] == "failed" for job_id in jobs)


def test_purge_without_a_filter_or_all_is_refused(cli: Cli, keys: Keys) -> None:
    refused = cli("dlq", "purge", key=keys.admin)
    assert refused.returncode == 1
    assert "conveyor dlq purge: Request validation failed" in refused.stderr
    assert "/all: Give a filter, or all: true" in refused.stderr


def test_replay_needs_an_admin_key(cli: Cli) -> None:
    refused = cli("dlq", "replay", "--all")
    assert refused.returncode == 1
    assert "Scope missing: This API key does not have the admin scope." in refused.stderr


def test_queues_shows_the_default_queue(cli: Cli, keys: Keys) -> None:
    table = cli.ok("queues", key=keys.admin)
    assert table.splitlines()[1].split()[:2] == ["default", DEFAULT_QUEUE]
    assert "outbox:" in table
    stats = cli.json("queues", key=keys.admin)
    assert "default" in {queue["name"] for queue in stats["queues"]}


def test_unknown_job_is_reported_as_not_found(cli: Cli) -> None:
    missing = cli("jobs", "get", str(uuid.uuid4()))
    assert missing.returncode == 1
    assert "conveyor jobs get: Job not found: No job has the id" in missing.stderr


def test_bad_key_is_refused_and_never_printed(cli: Cli) -> None:
    bad_key = "cvk_nothere1_" + "x" * 43
    refused = cli("jobs", "list", key=bad_key)
    assert refused.returncode == 1
    assert "Authentication required" in refused.stderr
    assert bad_key not in refused.stdout + refused.stderr


def test_validation_errors_name_each_field(cli: Cli) -> None:
    refused = cli("jobs", "submit", "demo.sleep", "--payload", '{"seconds": -1}')
    assert refused.returncode == 1
    assert "Request validation failed" in refused.stderr
    assert "  /payload/seconds: " in refused.stderr


def test_unreachable_api_is_one_line_naming_the_url(cli: Cli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    down = cli("jobs", "list", url=url)
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1
    assert f"cannot reach the Conveyor API at {url}" in down.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "submit", "noop", "--payload", "{bad"], "argument --payload: not valid JSON"),
        (["jobs", "submit", "noop", "--payload", "[1]"], "must be a JSON object"),
        (
            ["jobs", "submit", "noop", "--payload", '{"a": {"to": 1, "to": 2}}'],
            'not valid JSON: the member "to" is given more than once',
        ),
        (["jobs", "submit", "noop", "--label", "nolabel"], "'nolabel' is not KEY=VALUE"),
        (["jobs", "submit", "noop", "--delay", "1", "--run-at", "2030-01-01T00:00Z"], "not allowed with"),
        (["jobs", "get", "not-a-uuid"], "is not a job id"),
        (["jobs", "list", "--url", "localhost:8000"], "is not an http:// or https:// URL"),
    ],
)
def test_usage_mistakes_exit_2_before_any_request(cli: Cli, args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
