"""Clients generated from the committed openapi.json work against the running API and worker.

Many users never read Conveyor's code: they generate a client from the document and call the API
through it. So these tests do what such a user does, offline, with the two generators most used for
Python: openapi-python-client (a full scenario, every response read as a typed model) and
openapi-generator (it imports and round-trips a job).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import Keys
from support import ROOT, wait_for

from shared.settings import Settings

pytestmark = pytest.mark.e2e

SNAPSHOT = ROOT / "openapi.json"
BIN = Path(sys.executable).parent


def _generate(*command: str, cwd: Path) -> None:
    # The generators' post-processing hooks (ruff) are found on PATH, next to this interpreter.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=180, cwd=cwd, env=env
    )
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"


@contextmanager
def imported(directory: Path, package: str) -> Iterator[ModuleType]:
    """Import a generated package from ``directory``; forget it (and the path) afterwards."""
    sys.path.insert(0, str(directory))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(directory))
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def python_client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openapi-python-client")
    _generate(
        "openapi-python-client", "generate", "--path", str(SNAPSHOT), "--meta", "none",
        "--output-path", str(out / "conveyor_client"), cwd=out,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def generator_client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openapi-generator")
    _generate(
        "openapi-generator-cli", "generate", "-g", "python", "-i", str(SNAPSHOT), "-o", str(out),
        "--additional-properties", "packageName=conveyor_generated",
        "--global-property", "apiTests=false,modelTests=false,apiDocs=false,modelDocs=false",
        cwd=out,
    )  # fmt: skip
    return out


@pytest.mark.usefixtures("conveyor")  # the API, the worker and the relay
def test_openapi_python_client_runs_the_whole_scenario(
    python_client_dir: Path, keys: Keys, settings: Settings
) -> None:
    run = uuid.uuid4().hex[:12]
    with imported(python_client_dir, "conveyor_client") as generated:
        from conveyor_client.api.jobs import get_job, list_jobs, submit_job
        from conveyor_client.models import (
            DemoSleepPayload,
            Job,
            JobCreate,
            JobCreateLabels,
            JobCreatePayload,
            JobCreateType,
            JobPage,
            JobStatus,
            Problem,
        )

        client = generated.AuthenticatedClient(base_url=f"http://{settings.api_bind}", token=keys.writer)
        with client:
            # Submit with an idempotency key, then replay it: same job, marked as a replay.
            body = JobCreate(
                type_=JobCreateType.DEMO_SLEEP,
                payload=JobCreatePayload.from_dict(DemoSleepPayload(seconds=0.1).to_dict()),
                labels=JobCreateLabels.from_dict({"run": run}),
            )
            key = str(uuid.uuid4())
            first = submit_job.sync_detailed(client=client, body=body, idempotency_key=key)
            assert first.status_code == 202, first.content
            assert isinstance(first.parsed, Job)
            assert "Idempotent-Replayed" not in first.headers
            assert first.headers["Location"] == f"/v1/jobs/{first.parsed.id}"
            replay = submit_job.sync_detailed(client=client, body=body, idempotency_key=key)
            assert replay.status_code == 202
            assert isinstance(replay.parsed, Job)
            assert replay.parsed.id == first.parsed.id
            assert replay.headers["Idempotent-Replayed"] == "true"

            # Poll until the worker has run it.
            def finished() -> Any:
                job = get_job.sync(client=client, job_id=first.parsed.id)
                assert isinstance(job, Job)
                return job if job.status is JobStatus.SUCCEEDED else None

            done = wait_for(finished, timeout=30, interval=0.1, what="the job to succeed")
            assert done.payload.to_dict() == {
                "seconds": 0.1,
                "fail_attempts": 0,
                "fatal": False,
                "crash": False,
            }
            assert done.attempts == 1
            assert done.error is None

            # List with filters, two jobs a page, following next_cursor to the end.
            for _ in range(2):
                extra = JobCreate(type_=JobCreateType.NOOP, labels=JobCreateLabels.from_dict({"run": run}))
                assert submit_job.sync_detailed(client=client, body=extra).status_code == 202
            seen: list[Job] = []
            cursor: Any = None
            pages = 0
            while True:
                page = list_jobs.sync(
                    client=client, label=[f"run:{run}"], type_=["noop", "demo.sleep"], limit=2,
                    **({"cursor": cursor} if cursor else {}),
                )  # fmt: skip
                assert isinstance(page, JobPage)
                seen.extend(page.items)
                pages += 1
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert pages == 2
            assert len({job.id for job in seen}) == 3
            assert [job.created_at for job in seen] == sorted((job.created_at for job in seen), reverse=True)
            succeeded_sleeps = list_jobs.sync(
                client=client, label=[f"run:{run}"], type_=["demo.sleep"], status=[JobStatus.SUCCEEDED]
            )
            assert isinstance(succeeded_sleeps, JobPage)
            assert [job.id for job in succeeded_sleeps.items] == [first.parsed.id]

            # Errors are typed problems.
            missing = get_job.sync_detailed(client=client, job_id=uuid.uuid4())
            assert missing.status_code == 404
            assert isinstance(missing.parsed, Problem)
            assert missing.parsed.type_ == "/problems/job-not-found"
            assert missing.parsed.status == 404
            invalid = list_jobs.sync_detailed(client=client, limit=0)
            assert invalid.status_code == 422
            assert isinstance(invalid.parsed, Problem)
            assert invalid.parsed.type_ == "/problems/validation-error"
            assert isinstance(invalid.parsed.errors, list)
            assert [error.parameter for error in invalid.parsed.errors] == ["limit"]


@pytest.mark.usefixtures("conveyor")
def test_openapi_generator_client_imports_and_round_trips_a_job(
    generator_client_dir: Path, keys: Keys, settings: Settings
) -> None:
    with imported(generator_client_dir, "conveyor_generated") as generated:
        configuration = generated.Configuration(host=f"http://{settings.api_bind}", access_token=keys.writer)
        with generated.ApiClient(configuration) as api_client:
            jobs = generated.JobsApi(api_client)
            submitted = jobs.submit_job(
                generated.JobCreate(type="noop", labels={"client": "openapi-generator"}),
                idempotency_key=str(uuid.uuid4()),
            )
            assert isinstance(submitted, generated.Job)
            fetched = jobs.get_job(submitted.id)
            assert fetched.id == submitted.id
            assert fetched.type == "noop"
            assert fetched.labels == {"client": "openapi-generator"}
            assert fetched.status in set(generated.JobStatus)

            with pytest.raises(generated.ApiException) as refused:
                jobs.get_job(str(uuid.uuid4()))
            assert refused.value.status == 404
