"""Security settings and the admin CLI: auth modes, the docs switch and page, payload cap, fail-closed
scopes."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import psycopg2
import pytest
from flask import Flask
from marshmallow import fields
from support import ROOT, pg

from api_service.app import create_app
from api_service.auth import _REQUIRED_SCOPE
from api_service.context import EXTENSION, Services
from shared import job_types
from shared.job_types import JobType
from shared.settings import Settings


def make_app(settings: Settings, **changes: object) -> Iterator[Flask]:
    app = create_app(dataclasses.replace(settings, **changes))
    yield app
    services: Services = app.extensions[EXTENSION]
    services.publisher.close()
    services.db.close()


@pytest.fixture
def open_app(settings: Settings, database: str, rabbitmq: str) -> Iterator[Flask]:
    yield from make_app(settings, auth="none")


def test_every_v1_operation_declares_a_scope(open_app: Flask) -> None:
    for rule in open_app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/"):
            continue
        view = open_app.view_functions[rule.endpoint]
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            handler = getattr(view.view_class, method.lower())  # type: ignore[attr-defined]
            assert getattr(handler, _REQUIRED_SCOPE, None) is not None, f"{method} {rule.rule} has no scope"


def test_auth_none_acts_as_the_default_tenant_and_says_so_loudly(
    settings: Settings, database: str, rabbitmq: str, capfd: pytest.CaptureFixture[str]
) -> None:
    apps = make_app(settings, auth="none")
    app = next(apps)
    # Log lines go straight to file descriptor 2 (shared/logs.py), so they are captured there.
    warning = next(line for line in capfd.readouterr().err.splitlines() if "AUTHENTICATION IS OFF" in line)
    assert '"level": "warning"' in warning
    client = app.test_client()
    response = client.post("/v1/jobs", json={"type": "noop", "delay_seconds": 3600})
    assert response.status_code == 202
    assert response.get_json()["tenant"] == "default"
    assert client.get("/metrics").status_code == 200
    next(apps, None)


def test_keys_mode_is_the_default(settings: Settings) -> None:
    assert Settings().auth == "keys"
    assert Settings.from_env({}).auth == "keys"


def test_interactive_docs_can_be_turned_off(settings: Settings, database: str, rabbitmq: str) -> None:
    for app in make_app(settings, api_docs=False):
        client = app.test_client()
        assert client.get("/docs").status_code == 404
        assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 404
        assert [rule.rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/docs")] == []
        assert client.get("/openapi.json").status_code == 200


class PageReferences(HTMLParser):
    """What a page makes the browser fetch (script src, stylesheet and icon href, img src, and the
    document URL Swagger UI is given) and the text of its inline scripts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.spec_urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [url for name in ("src", "href") if (url := found.get(name)) is not None]
        self.spec_urls += [url for url in [found.get("data-spec-url")] if url is not None]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def test_interactive_docs_page_loads_only_assets_this_api_serves(
    settings: Settings, database: str, rabbitmq: str
) -> None:
    for app in make_app(settings):  # auth=keys, and no key given: the page and its assets are open
        client = app.test_client()
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.mimetype == "text/html"
        found = PageReferences(page.get_data(as_text=True))
        for url in [*found.urls, *found.spec_urls]:
            parts = urlsplit(url)
            assert (parts.scheme, parts.netloc) == ("", ""), f"{url} is not on this origin"
            assert url.startswith("/"), url
        assert found.inline_scripts == [], "an inline script would need 'unsafe-inline' or a hash"
        assert found.spec_urls == ["/openapi.json"]
        assert {PurePosixPath(url).name for url in found.urls} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
        content_types = {".js": "text/javascript", ".css": "text/css"}
        for url in found.urls:
            with client.get(url) as asset:  # a file response: closing it closes the file
                assert asset.status_code == 200, url
                assert asset.mimetype == content_types[PurePosixPath(url).suffix], url
                assert asset.mimetype_params == {"charset": "utf-8"}, url
                assert asset.headers["X-Content-Type-Options"] == "nosniff", url
                assert asset.headers["Cache-Control"] == "no-cache", url
                assert asset.headers["ETag"] == f'"{hashlib.sha256(asset.get_data()).hexdigest()}"', url
            with client.get(url, headers={"If-None-Match": asset.headers["ETag"]}) as again:
                assert (again.status_code, again.get_data()) == (304, b""), url
        for other in ("LICENSE", "README.md", "..%2F__init__.py", "swagger-ui.js"):
            assert client.get(f"/docs/assets/{other}").status_code == 404, other


def test_interactive_docs_page_policy_names_no_other_host(open_app: Flask) -> None:
    response = open_app.test_client().get("/docs")
    assert response.status_code == 200
    policy = response.headers["Content-Security-Policy"]
    directives = {name: sources for name, *sources in (part.split() for part in policy.split(";"))}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"], "scripts from this API only, nothing inline"
    assert directives["connect-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    sources = [source for sources in directives.values() for source in sources]
    # Keywords ('self', 'none') and data: only: no host, no scheme that would admit every host.
    assert all(source.startswith("'") or source == "data:" for source in sources), policy
    assert not [source for source in sources if source.startswith("'unsafe-")], policy
    assert f"Content-Security-Policy: {policy}\n" in (ROOT / "docs" / "security.md").read_text()


def test_hsts_is_sent_when_configured(settings: Settings, database: str, rabbitmq: str) -> None:
    for app in make_app(settings, auth="none", hsts_seconds=31536000):
        response = app.test_client().get("/healthz")
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


def test_payload_over_its_cap_is_422(
    open_app: Flask, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    blob = JobType("test.blob", "a type that takes any text", {"text": fields.String(required=True)})
    monkeypatch.setitem(job_types.REGISTRY, blob.name, blob)
    client = open_app.test_client()
    too_big = "x" * settings.max_payload_bytes
    response = client.post("/v1/jobs", json={"type": "test.blob", "payload": {"text": too_big}})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["pointer"] == "/payload"
    fits = client.post(
        "/v1/jobs", json={"type": "test.blob", "payload": {"text": "x" * 100}, "delay_seconds": 3600}
    )
    assert fits.status_code == 202


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--tenant", "Bad Name", "--scope", "jobs:read"], "invalid tenant name"),
        (["keys", "create", "--tenant", "t", "--scope", "jobs:delete"], "unknown scope(s) jobs:delete"),
        (["tenants", "set", "default", "--submit-rate", "fast"], "is not a number"),
        (["tenants", "set", "default", "--submit-burst", "0"], "below the minimum"),
        (["tenants", "set", "default", "--submit-rate", "nan"], "not a finite number"),
        (["tenants", "set", "default", "--submit-rate", "inf"], "not a finite number"),
        (["tenants", "set", "default", "--submit-rate", "1e400"], "not a finite number"),
        (["tenants", "set", "default", "--submit-rate", "1e7"], "above the maximum"),
        (["tenants", "set", "default", "--max-active-jobs", "99999999999999999999"], "above the maximum"),
        (["tenants", "set", "default", "--submit-burst", "2147483648"], "above the maximum of 2147483647"),
        (["tenants", "set", "default", "--submit-rate", "1000001"], "above the maximum of 1000000"),
        (["worker-alive", "--max-age", "abc"], "not a number of seconds: 'abc'"),
        (["migrate", "--bogus"], "takes no arguments, got: --bogus"),
        (["settings", "extra"], "takes no arguments, got: extra"),
        (["jobs", "list", "--limit", "0"], "0 is not between 1 and 200"),
        (["dlq", "list", "--limit", "x"], "'x' is not a whole number"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("database")
def test_postgres_refuses_a_submission_rate_that_is_not_finite(dsn: str) -> None:
    """What `tenants set` refuses, the table refuses too (the API's token bucket cannot use it)."""
    assert run_cli("tenants", "create", "rate-check").returncode in (0, 1)
    for rate in ("NaN", "Infinity"):
        with pytest.raises(psycopg2.errors.CheckViolation), pg(dsn) as cur:
            cur.execute(
                "UPDATE tenants SET submit_rate_per_second = %s::float8 WHERE name = 'rate-check'", (rate,)
            )


@pytest.mark.usefixtures("database")
def test_cli_manages_tenants_and_lists_keys_without_secrets() -> None:
    name = "cli-tenant"
    assert run_cli("tenants", "create", name).returncode == 0
    assert run_cli("tenants", "create", name).returncode == 1
    created = run_cli("keys", "create", "--tenant", name, "--scope", "jobs:read", "--description", "ci bot")
    assert created.returncode == 0
    key = created.stdout.strip()
    listed = run_cli("keys", "list", "--tenant", name)
    assert key[:12] in listed.stdout
    assert key not in listed.stdout
    assert "ci bot" in listed.stdout
    assert run_cli("tenants", "set", name, "--max-active-jobs", "7", "--submit-rate", "2.5").returncode == 0
    tenants = run_cli("tenants", "list").stdout
    row = next(line for line in tenants.splitlines() if line.startswith(name))
    assert row.split()[1:] == ["7", "2.5", "200*"]
    assert run_cli("tenants", "set", "nobody-here", "--max-active-jobs", "1").returncode == 1
    unknown = run_cli("keys", "list", "--tenant", "nobody-here")
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "conveyor keys list: no tenant nobody-here")


def test_cli_reports_an_unreachable_database_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "CONVEYOR_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach Postgres" in result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_explains_a_database_it_cannot_use_in_one_line(dsn: str) -> None:
    """An unreadable DSN is a usage error; a database without Conveyor's tables says to migrate (both
    were tracebacks)."""
    env = __import__("os").environ
    unreadable = subprocess.run(
        [sys.executable, "-m", "shared.cli", "tenants", "list"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**env, "CONVEYOR_DATABASE_URL": "host=db password=hunter2 notaurl"},
    )  # fmt: skip
    assert unreadable.returncode == 2
    assert "CONVEYOR_DATABASE_URL is not a Postgres connection string" in unreadable.stderr
    assert "hunter2" not in unreadable.stderr
    unmigrated = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "list"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**env, "CONVEYOR_DATABASE_URL": dsn.rsplit("/", 1)[0] + "/postgres"},
    )  # fmt: skip
    assert unmigrated.returncode == 1
    assert "run `conveyor migrate` first" in unmigrated.stderr
    for result in (unreadable, unmigrated):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("database")
def test_cli_output_into_a_closed_pipe_is_not_a_traceback() -> None:
    """`conveyor tenants list | head -0`: the reader is gone before the first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "tenants", "list"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr


@pytest.mark.usefixtures("rabbitmq")
def test_queue_statistics_never_follow_a_redirect_with_rabbitmqs_password(settings: Settings) -> None:
    """The management API request carries the broker's password in its Authorization header; urllib's
    default opener followed a 3xx to wherever it pointed, header and all."""
    import http.server

    from shared.broker import queue_depth

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/elsewhere"):
                seen.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0}')
                return
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        depth = queue_depth(dataclasses.replace(settings, rabbitmq_management_url=url), "conveyor.nothing")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [], "the redirect was not followed"
    assert depth.source == "amqp", "the statistics came over AMQP instead"
