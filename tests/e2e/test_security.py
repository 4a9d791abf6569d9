"""Access and bad-input suite against the running API: keys, scopes, tenants, limits, hostile requests.

Every refusal is checked for its exact problem type and status, and for leaving the database as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import TEST_TENANT, Keys
from support import ROOT, ApiClient, ServiceProcess, count_rows, new_key, pg

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"


def as_key(api: ApiClient, key: str | None) -> ApiClient:
    return ApiClient(api.base_url, key)


def expect_problem(response: requests.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    return body


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def existing_job(api_process: ServiceProcess, settings: Any, keys: Keys) -> str:
    """A job of tenant "tests", created before the database snapshots of the refusal tests."""
    client = ApiClient(f"http://{settings.api_bind}", keys.writer)
    job_id: str = client.submit({"type": "noop", "delay_seconds": 3600}).json()["id"]
    return job_id


def operations(api: ApiClient, job_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("POST", f"{api.base_url}/v1/jobs", {"type": "noop"}),
        ("GET", f"{api.base_url}/v1/jobs", None),
        ("GET", f"{api.base_url}/v1/jobs/{job_id}", None),
    ]


@pytest.mark.usefixtures("unchanged_database")
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer cvk_short",
        "Bearer cvk_aaaaaaaa_" + "A" * 43,  # well-formed, unknown
        "Bearer " + "x" * 500,
        "bearer\tcvk_aaaaaaaa_" + "A" * 43,
    ],
    ids=["absent", "empty", "no-token", "blank-token", "basic", "short", "unknown", "huge", "tab"],
)
def test_requests_without_a_valid_key_are_401(
    api: ApiClient, existing_job: str, authorization: str | None
) -> None:
    job_id = existing_job
    for method, url, body in operations(api, job_id):
        headers = {} if authorization is None else {"Authorization": authorization}
        response = requests.request(method, url, json=body, headers=headers, timeout=10)
        expect_problem(response, 401, "unauthorized")
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="conveyor"')
        if authorization:
            assert 'error="invalid_token"' in challenge


def test_a_key_from_the_right_family_with_a_wrong_secret_is_401(api: ApiClient, keys: Keys) -> None:
    forged = keys.writer[:-4] + ("AAAA" if not keys.writer.endswith("AAAA") else "BBBB")
    expect_problem(
        as_key(api, forged).session.get(f"{api.base_url}/v1/jobs", timeout=10), 401, "unauthorized"
    )


@pytest.mark.usefixtures("unchanged_database")
def test_a_read_only_key_cannot_submit(api: ApiClient, keys: Keys) -> None:
    reader = as_key(api, keys.reader)
    response = reader.submit({"type": "noop"}, key=new_key())
    body = expect_problem(response, 403, "forbidden")
    assert "jobs:write" in body["detail"]
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert reader.session.get(f"{api.base_url}/v1/jobs", timeout=10).status_code == 200


def test_scope_is_checked_before_the_body_is_validated(api: ApiClient, keys: Keys) -> None:
    response = as_key(api, keys.reader).submit({"type": "no-such-type", "bogus": True})
    expect_problem(response, 403, "forbidden")
    unauthenticated = requests.post(f"{api.base_url}/v1/jobs", data="{not json", timeout=10,
                                    headers={"Content-Type": "application/json"})  # fmt: skip
    expect_problem(unauthenticated, 401, "unauthorized")


def test_another_tenants_job_does_not_exist_for_you(api: ApiClient, keys: Keys) -> None:
    mine = api.submit({"type": "noop", "delay_seconds": 3600, "labels": {"owner": "tests"}}).json()["id"]
    intruder = as_key(api, keys.other_tenant)
    missing = expect_problem(
        intruder.session.get(f"{api.base_url}/v1/jobs/{mine}", timeout=10), 404, "job-not-found"
    )
    truly_missing = intruder.session.get(f"{api.base_url}/v1/jobs/{uuid.uuid4()}", timeout=10).json()
    assert missing["title"] == truly_missing["title"]
    assert missing.keys() == truly_missing.keys(), "no hint that the job exists"
    listed = intruder.session.get(f"{api.base_url}/v1/jobs", params={"label": "owner:tests"}, timeout=10)
    assert listed.json()["items"] == []
    peek = intruder.session.get(f"{api.base_url}/v1/jobs", params={"tenant": TEST_TENANT}, timeout=10)
    expect_problem(peek, 403, "forbidden")


def test_admin_sees_every_tenant(api: ApiClient, keys: Keys) -> None:
    mine = api.submit({"type": "noop", "delay_seconds": 3600}).json()["id"]
    theirs = as_key(api, keys.other_tenant).submit({"type": "noop", "delay_seconds": 3600}).json()["id"]
    admin = as_key(api, keys.admin)
    assert admin.job(mine)["tenant"] == TEST_TENANT
    assert admin.job(theirs)["tenant"] == "others"
    page = admin.session.get(f"{api.base_url}/v1/jobs", params={"limit": 200}, timeout=10).json()
    assert {mine, theirs} <= {job["id"] for job in page["items"]}
    only_theirs = admin.session.get(f"{api.base_url}/v1/jobs", params={"tenant": "others"}, timeout=10).json()
    assert {job["tenant"] for job in only_theirs["items"]} == {"others"}


def test_idempotency_keys_are_scoped_per_tenant(api: ApiClient, keys: Keys) -> None:
    key, body = new_key(), {"type": "noop", "delay_seconds": 3600}
    mine = api.submit(body, key=key)
    theirs = as_key(api, keys.other_tenant).submit(body, key=key)
    assert mine.status_code == theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]
    assert (mine.json()["tenant"], theirs.json()["tenant"]) == (TEST_TENANT, "others")
    assert api.submit(body, key=key).json()["id"] == mine.json()["id"]


def test_revoked_key_stops_working_at_once(api: ApiClient, service_env: dict[str, str]) -> None:
    created = cli(service_env, "keys", "create", "--tenant", "revocation", "--scope", "jobs:read")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    client = as_key(api, key)
    assert client.session.get(f"{api.base_url}/v1/jobs", timeout=10).status_code == 200
    revoked = cli(service_env, "keys", "revoke", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    expect_problem(client.session.get(f"{api.base_url}/v1/jobs", timeout=10), 401, "unauthorized")
    again = cli(service_env, "keys", "revoke", key[:12])
    assert again.returncode == 1
    assert "no active key" in again.stderr


def limited_tenant(env: dict[str, str], name: str, *limits: str) -> str:
    created = cli(env, "keys", "create", "--tenant", name, "--scope", "jobs:write", "--scope", "jobs:read")
    assert created.returncode == 0, created.stderr
    changed = cli(env, "tenants", "set", name, *limits)
    assert changed.returncode == 0, changed.stderr
    return created.stdout.strip()


def test_submission_rate_is_limited_per_tenant(api: ApiClient, service_env: dict[str, str], dsn: str) -> None:
    name = f"rate-{uuid.uuid4().hex[:8]}"
    client = as_key(api, limited_tenant(service_env, name, "--submit-rate", "0.5", "--submit-burst", "2"))
    first = client.submit({"type": "noop", "delay_seconds": 3600})
    second = client.submit({"type": "noop", "delay_seconds": 3600})
    assert first.status_code == second.status_code == 202
    assert first.headers["RateLimit-Policy"] == '"submissions";q=2;w=4'
    assert first.headers["RateLimit"].startswith('"submissions";r=1;')
    assert second.headers["RateLimit"].startswith('"submissions";r=0;')
    key = new_key()
    refused = client.submit({"type": "noop", "delay_seconds": 3600}, key=key)
    expect_problem(refused, 429, "rate-limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert refused.headers["RateLimit"].startswith('"submissions";r=0;')
    with pg(dsn) as cur:
        cur.execute("SELECT count(*) FROM idempotency_keys WHERE key = %s", (key,))
        assert cur.fetchone() == (0,), "a 429 is never stored as the key's response"
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)
    retried = client.submit({"type": "noop", "delay_seconds": 3600}, key=key)
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers
    other_tenant_unaffected = api.submit({"type": "noop", "delay_seconds": 3600})
    assert other_tenant_unaffected.status_code == 202


def test_active_jobs_are_capped_per_tenant(api: ApiClient, service_env: dict[str, str], dsn: str) -> None:
    name = f"cap-{uuid.uuid4().hex[:8]}"
    client = as_key(api, limited_tenant(service_env, name, "--max-active-jobs", "2"))
    for _ in range(2):
        assert client.submit({"type": "noop", "delay_seconds": 3600}).status_code == 202
    before = count_rows(dsn, "jobs")
    refused = client.submit({"type": "noop"}, key=new_key())
    expect_problem(refused, 429, "too-many-active-jobs")
    assert refused.headers["Retry-After"] == "5"
    assert count_rows(dsn, "jobs") == before
    assert cli(service_env, "tenants", "set", name, "--max-active-jobs", "3").returncode == 0
    assert client.submit({"type": "noop", "delay_seconds": 3600}).status_code == 202


def test_a_retry_counts_against_the_cap_like_a_submission(
    api: ApiClient, service_env: dict[str, str]
) -> None:
    """Submit, cancel, retry: without the check, any key with jobs:write took its tenant past its cap."""
    name = f"cap-{uuid.uuid4().hex[:8]}"
    client = as_key(api, limited_tenant(service_env, name, "--max-active-jobs", "1"))
    first = client.submit({"type": "noop", "delay_seconds": 3600}).json()
    assert (
        client.session.post(f"{client.base_url}/v1/jobs/{first['id']}/cancel", timeout=10).status_code == 200
    )
    second = client.submit({"type": "noop", "delay_seconds": 3600})
    assert second.status_code == 202, "the cancelled job left room"
    refused = client.session.post(f"{client.base_url}/v1/jobs/{first['id']}/retry", timeout=10)
    expect_problem(refused, 429, "too-many-active-jobs")
    assert client.session.post(f"{client.base_url}/v1/jobs/{second.json()['id']}/cancel", timeout=10).ok
    retried = client.session.post(f"{client.base_url}/v1/jobs/{first['id']}/retry", timeout=10)
    assert retried.status_code == 202, retried.text


def test_a_retry_takes_a_token_from_the_submission_rate(
    api: ApiClient, keys: Keys, service_env: dict[str, str], dsn: str
) -> None:
    """Without it, retrying failed or cancelled jobs requeued them at any request rate while new
    submissions got 429. A refused retry leaves the job as it was."""
    name = f"rate-{uuid.uuid4().hex[:8]}"
    client = as_key(api, limited_tenant(service_env, name, "--submit-rate", "0.001", "--submit-burst", "1"))
    job = client.submit({"type": "noop", "delay_seconds": 3600}).json()
    cancel = client.session.post(f"{client.base_url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert cancel.status_code == 200
    refused = client.session.post(f"{client.base_url}/v1/jobs/{job['id']}/retry", timeout=10)
    expect_problem(refused, 429, "rate-limited")
    assert int(refused.headers["Retry-After"]) > 1
    assert refused.headers["RateLimit"].startswith('"submissions";r=0;')
    with pg(dsn) as cur:
        cur.execute("SELECT status FROM jobs WHERE id = %s", (job["id"],))
        assert cur.fetchone() == ("cancelled",), "the refused retry changed nothing"
    admin = as_key(api, keys.admin)
    retried = admin.session.post(f"{admin.base_url}/v1/jobs/{job['id']}/retry", timeout=10)
    assert retried.status_code == 202, retried.text
    assert "RateLimit" not in retried.headers, "an admin's retry takes no token"


@pytest.mark.usefixtures("unchanged_database")
def test_deeply_nested_json_is_400(api: ApiClient, settings: Any) -> None:
    depth = settings.max_json_depth + 1
    nested = "[" * depth + "]" * depth
    body = '{"type": "noop", "payload": {"x": ' + nested + "}}"
    response = api.session.post(f"{api.base_url}/v1/jobs", data=body, timeout=10,
                                headers={"Content-Type": "application/json"})  # fmt: skip
    expect_problem(response, 400, "json-too-deep")
    brackets_in_strings = '{"type": "noop", "bogus": "' + "[" * 100 + '"}'
    response = api.session.post(f"{api.base_url}/v1/jobs", data=brackets_in_strings, timeout=10,
                                headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 422, "brackets inside strings are not nesting"


@pytest.mark.usefixtures("unchanged_database")
def test_oversized_body_is_413(api: ApiClient, settings: Any) -> None:
    body = json.dumps({"type": "noop", "labels": {"a": "x" * settings.max_body_bytes}})
    response = api.session.post(f"{api.base_url}/v1/jobs", data=body, timeout=10,
                                headers={"Content-Type": "application/json"})  # fmt: skip
    expect_problem(response, 413, "payload-too-large")


@pytest.mark.usefixtures("unchanged_database")
def test_oversized_chunked_body_is_413_not_cut_at_the_limit(api: ApiClient, settings: Any) -> None:
    """Without a Content-Length, the body arrives in chunks; werkzeug stops reading at the limit. A body
    that is valid JSON within the limit, then padding, must not create a job from its first part."""
    body = b'{"type": "noop"}' + b" " * settings.max_body_bytes

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    response = api.session.post(f"{api.base_url}/v1/jobs", data=chunks(), timeout=10,
                                headers={"Content-Type": "application/json"})  # fmt: skip
    expect_problem(response, 413, "payload-too-large")


@pytest.mark.usefixtures("unchanged_database")
@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_wrong_content_type_is_415(api: ApiClient, content_type: str) -> None:
    response = api.session.post(f"{api.base_url}/v1/jobs", data='{"type": "noop"}', timeout=10,
                                headers={"Content-Type": content_type})  # fmt: skip
    expect_problem(response, 415, "unsupported-media-type")


def raw_request(base_url: str, request: bytes) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.usefixtures("unchanged_database")
def test_header_injection_attempts_are_refused_and_never_reflected(api: ApiClient, keys: Keys) -> None:
    body = b'{"type": "noop"}'
    for hostile_key in (b"abc\rSet-Cookie: pwned=1", b"abc\x00def", b"abc\x7fdef"):
        response = raw_request(
            api.base_url,
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + keys.writer.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            b"Idempotency-Key: " + hostile_key + b"\r\n\r\n" + body,
        )
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.split()[1] == b"400", response[:300]
        headers = rest.split(b"\r\n\r\n", 1)[0].lower()
        assert b"set-cookie" not in headers
        assert b"pwned" not in response


def test_location_header_is_built_from_the_job_id_only(api: ApiClient) -> None:
    accepted = api.submit({"type": "noop", "delay_seconds": 3600}, key="k;\tx")
    assert accepted.status_code == 400, "a key with a tab is refused before anything is built from it"
    accepted = api.submit({"type": "noop", "delay_seconds": 3600, "labels": {"a": "\r\nX-Evil: 1"}})
    assert accepted.status_code == 202
    assert accepted.headers["Location"] == f"/v1/jobs/{uuid.UUID(accepted.json()['id'])}"
    assert "X-Evil" not in accepted.headers


def test_responses_carry_security_headers(api: ApiClient) -> None:
    for response in (
        api.session.get(f"{api.base_url}/v1/jobs", timeout=10),
        api.session.get(f"{api.base_url}/v1/jobs/{uuid.uuid4()}", timeout=10),
        requests.get(f"{api.base_url}/healthz", timeout=10),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "Strict-Transport-Security" not in response.headers, "HSTS is off unless configured"


def test_health_and_contract_stay_open(api: ApiClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/problems/unauthorized"):
        assert requests.get(f"{api.base_url}{path}", timeout=10).status_code == 200, path
    spec = requests.get(f"{api.base_url}/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_docs_page_and_its_assets_are_open_and_served_whole(api: ApiClient) -> None:
    """Under gunicorn (which sends files its own way), without a key: the page and every file it loads."""
    page = requests.get(f"{api.base_url}/docs", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text)
    assert len(assets) >= 3, page.text
    for path in assets:
        response = requests.get(f"{api.base_url}{path}", timeout=10)
        assert response.status_code == 200, path
        assert int(response.headers["Content-Length"]) == len(response.content) > 0, path
        assert response.headers["ETag"] == f'"{hashlib.sha256(response.content).hexdigest()}"', path


def test_metrics_need_the_metrics_token_or_an_admin_key(api: ApiClient, keys: Keys, settings: Any) -> None:
    url = f"{api.base_url}/metrics"
    expect_problem(requests.get(url, timeout=10), 401, "unauthorized")
    expect_problem(as_key(api, keys.writer).session.get(url, timeout=10), 403, "forbidden")
    expect_problem(
        requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10), 401, "unauthorized"
    )
    by_token = requests.get(url, headers={"Authorization": f"Bearer {settings.metrics_token}"}, timeout=10)
    assert by_token.status_code == 200
    assert "conveyor_http_requests_total" in by_token.text
    assert as_key(api, keys.admin).session.get(url, timeout=10).status_code == 200


def test_secrets_never_reach_the_logs_or_metrics(
    api: ApiClient, api_process: ServiceProcess, keys: Keys, settings: Any
) -> None:
    api.submit({"type": "noop"})
    requests.get(f"{api.base_url}/v1/jobs", headers={"Authorization": f"Bearer {keys.admin}x"}, timeout=10)
    metrics = requests.get(
        f"{api.base_url}/metrics", headers={"Authorization": f"Bearer {settings.metrics_token}"}, timeout=10
    ).text
    log = api_process.log_text()
    for secret in (keys.writer, keys.reader, keys.admin, keys.other_tenant, settings.metrics_token):
        assert secret not in log
        assert secret not in metrics
    assert keys.writer[:12] not in metrics, "metrics are labelled by route, never by key"
