"""Bad input at the HTTP edge: each gets the exact problem it deserves, and nothing is written.

These use Flask's test client against the real Postgres (and the real RabbitMQ for the one valid
submission).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Keys
from flask import Flask
from flask.testing import FlaskClient

from api_service.app import create_app
from api_service.context import EXTENSION, Services
from api_service.schemas import SURROGATE_MESSAGE
from shared.settings import Settings

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def app(settings: Settings, database: str, rabbitmq: str) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    services_of(app).publisher.close()


def services_of(app: Flask) -> Services:
    svc: Services = app.extensions[EXTENSION]
    return svc


@pytest.fixture
def client(app: Flask, keys: Keys) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {keys.writer}"
    return client


def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body: dict[str, Any] = response.get_json(force=True)
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


def post(client: FlaskClient, body: Any, **kwargs: Any) -> Any:
    return client.post("/v1/jobs", data=json.dumps(body), content_type="application/json", **kwargs)


@pytest.mark.usefixtures("unchanged_database")
class TestRejectedSubmissions:
    def test_unknown_type_is_422_pointing_at_type(self, client: FlaskClient) -> None:
        body = problem(post(client, {"type": "nope"}), 422, "validation-error")
        assert body["errors"] == [
            {"pointer": "/type", "detail": "Unknown job type 'nope'. Known types: demo.sleep, noop."}
        ]

    def test_payload_failing_its_schema_is_422_with_nested_pointers(self, client: FlaskClient) -> None:
        response = post(client, {"type": "demo.sleep", "payload": {"seconds": "long", "extra": 1}})
        pointers = {e["pointer"] for e in problem(response, 422, "validation-error")["errors"]}
        assert pointers == {"/payload/seconds", "/payload/extra"}

    @pytest.mark.parametrize(
        ("field", "value"),
        [("fatal", "true"), ("fatal", 1), ("crash", "off"), ("seconds", "2"), ("seconds", True),
         ("fail_attempts", "1")],
    )  # fmt: skip
    def test_payload_numbers_and_booleans_are_json_ones(
        self, client: FlaskClient, field: str, value: Any
    ) -> None:
        response = post(client, {"type": "demo.sleep", "payload": {field: value}})
        assert [e["pointer"] for e in problem(response, 422, "validation-error")["errors"]] == [
            f"/payload/{field}"
        ]

    def test_unknown_field_is_422(self, client: FlaskClient) -> None:
        body = problem(post(client, {"type": "noop", "colour": "red"}), 422, "validation-error")
        assert body["errors"] == [{"pointer": "/colour", "detail": "Unknown field."}]

    def test_missing_type_is_422(self, client: FlaskClient) -> None:
        body = problem(post(client, {"payload": {}}), 422, "validation-error")
        assert [e["pointer"] for e in body["errors"]] == ["/type"]

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("priority", 10),
            ("priority", -1),
            ("max_attempts", 0),
            ("timeout_seconds", 0),
            ("delay_seconds", -5),
        ],
    )
    def test_out_of_range_options_are_422(self, client: FlaskClient, field: str, value: int) -> None:
        body = problem(post(client, {"type": "noop", field: value}), 422, "validation-error")
        assert [e["pointer"] for e in body["errors"]] == [f"/{field}"]

    def test_delay_and_run_at_together_are_422(self, client: FlaskClient) -> None:
        response = post(client, {"type": "noop", "delay_seconds": 5, "run_at": "2030-01-01T00:00:00Z"})
        assert problem(response, 422, "validation-error")["errors"][0]["pointer"] == "/delay_seconds"

    def test_naive_run_at_is_422(self, client: FlaskClient) -> None:
        response = post(client, {"type": "noop", "run_at": "2030-01-01T00:00:00"})
        assert problem(response, 422, "validation-error")["errors"][0]["pointer"] == "/run_at"

    def test_non_string_label_is_422(self, client: FlaskClient) -> None:
        body = problem(post(client, {"type": "noop", "labels": {"team": 7}}), 422, "validation-error")
        assert body["errors"][0]["pointer"].startswith("/labels")

    def test_nul_characters_are_422_not_a_database_error(self, client: FlaskClient) -> None:
        body = problem(post(client, {"type": "noop", "labels": {"a": "x\u0000y"}}), 422, "validation-error")
        assert [e["pointer"] for e in body["errors"]] == ["/labels/a"]
        listed = problem(client.get("/v1/jobs?label=a:%00&type=%00"), 422, "validation-error")
        assert {e["parameter"] for e in listed["errors"]} == {"label", "type"}

    @pytest.mark.parametrize(
        ("path", "body", "pointer"),
        [
            ("/v1/jobs", '{"type": "noop", "labels": {"a": "x\\ud800"}}', "/labels/a"),
            ("/v1/jobs", '{"type": "noop", "payload": {"\\udfff": 1}}', "/payload/\udfff"),
            ("/v1/jobs/batch", '{"jobs": [{"type": "noop"}, {"type": "noop", "labels": {"b": "\\uDC00"}}]}',
             "/jobs/1/labels/b"),
            ("/v1/dead-letters/purge", '{"type": ["\\ud800"]}', "/type/0"),
            ("/v1/jobs", '\ufeff{"type": "noop", "labels": {"a": "\\ud800"}}', "/labels/a"),
        ],
        ids=["label-value", "payload-key", "batch-item", "purge-filter", "after-a-byte-order-mark"],
    )  # fmt: skip
    def test_unpaired_surrogates_are_422_not_a_server_error(
        self, client: FlaskClient, keys: Keys, path: str, body: str, pointer: str
    ) -> None:
        """The check read the body with json.loads, which refused a byte order mark that the parser
        ignores: that body's surrogate reached Postgres, a 500."""
        admin = {"Authorization": f"Bearer {keys.admin}"}  # purging needs it; the others accept it
        response = client.post(path, data=body, content_type="application/json", headers=admin)
        errors = problem(response, 422, "validation-error")["errors"]
        assert errors == [{"pointer": pointer, "detail": SURROGATE_MESSAGE}]

    def test_extreme_time_offsets_are_normalised_not_a_database_error(self, client: FlaskClient) -> None:
        response = client.get(
            "/v1/jobs?created_after=2020-01-01T00:00:00-23:31&created_before=0001-01-01T00:00:00%2B01:00"
        )
        assert response.status_code in (200, 422), response.get_data(as_text=True)

    def test_non_object_body_is_422(self, client: FlaskClient) -> None:
        problem(post(client, ["noop"]), 422, "validation-error")

    def test_malformed_json_is_400(self, client: FlaskClient) -> None:
        response = client.post("/v1/jobs", data='{"type": "noop",', content_type="application/json")
        problem(response, 400, "malformed-json")

    @pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch", "/v1/dead-letters/replay"])
    @pytest.mark.parametrize("body", ["", '{"jobs": ['], ids=["empty", "cut-short"])
    def test_a_body_that_is_not_json_is_400_on_every_operation_that_takes_one(
        self, client: FlaskClient, keys: Keys, path: str, body: str
    ) -> None:
        """An empty body was a 422 for its missing fields; the batch's malformed body was about:blank."""
        admin = {"Authorization": f"Bearer {keys.admin}"}
        response = client.post(path, data=body, content_type="application/json", headers=admin)
        problem(response, 400, "malformed-json")

    @pytest.mark.parametrize(
        ("path", "body", "pointer"),
        [
            ("/v1/jobs", '{"type": "noop", "type": "demo.sleep"}', "/type"),
            ("/v1/jobs", '{"type": "demo.sleep", "payload": {"seconds": 0, "seconds": 1}}',
             "/payload/seconds"),
            ("/v1/jobs", '{"type": "noop", "labels": {"team": "a", "t\\u0065am": "b"}}', "/labels/team"),
            ("/v1/jobs/batch", '{"jobs": [{"type": "noop"}, {"type": "noop"}, {"type": "noop"}, '
             '{"type": "demo.sleep", "payload": {"seconds": 0, "seconds": 1}}]}', "/jobs/3/payload/seconds"),
            ("/v1/jobs/batch", '{"jobs": [{"type": "noop", "idempotency_key": "a", "idempotency_key": "b"}]}',
             "/jobs/0/idempotency_key"),
            ("/v1/jobs/batch", '{"jobs": [], "jobs": [{"type": "noop"}]}', "/jobs"),
            ("/v1/dead-letters/replay", '{"all": false, "all": true}', "/all"),
        ],
        ids=["type", "payload", "escaped-label", "batch-payload", "batch-key", "batch-jobs", "replay"],
    )  # fmt: skip
    def test_a_member_name_given_twice_is_400_and_says_where(
        self, client: FlaskClient, keys: Keys, path: str, body: str, pointer: str
    ) -> None:
        """JSON parsers differ in which of the values they keep (json.loads kept the last): a proxy or
        an audit log reading the first saw another request than the one that ran, and the idempotency
        fingerprint could not tell the shadowed value apart."""
        admin = {"Authorization": f"Bearer {keys.admin}"}  # replaying needs it; the others accept it
        response = client.post(path, data=body, content_type="application/json", headers=admin)
        detail = problem(response, 400, "malformed-json")["detail"]
        assert f"more than once in one object, at {pointer};" in detail

    def test_a_duplicate_name_is_400_before_a_surrogate_in_either_value(self, client: FlaskClient) -> None:
        """The surrogate check found the kept value's surrogate (422) but not a shadowed one's."""
        for labels in ('{"a": "x", "a": "\\ud800"}', '{"a": "\\ud800", "a": "x"}'):
            body = f'{{"type": "noop", "labels": {labels}}}'
            response = client.post("/v1/jobs", data=body, content_type="application/json")
            problem(response, 400, "malformed-json")

    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
    def test_non_json_content_type_is_415(self, client: FlaskClient, content_type: str | None) -> None:
        response = client.post("/v1/jobs", data='{"type": "noop"}', content_type=content_type)
        problem(response, 415, "unsupported-media-type")

    def test_body_over_the_limit_is_413(self, client: FlaskClient, settings: Settings) -> None:
        padding = "x" * settings.max_body_bytes
        response = post(client, {"type": "noop", "labels": {"pad": padding}})
        problem(response, 413, "payload-too-large")

    @pytest.mark.parametrize(
        "key",
        ["", "a" * 256, "has space", "comma,separated", 'quote"inside', "caf\u00e9", '""'],
        ids=["empty", "too-long", "space", "comma", "quote", "non-ascii", "empty-quoted"],
    )
    def test_malformed_idempotency_key_is_400(self, client: FlaskClient, key: str) -> None:
        response = post(client, {"type": "noop"}, headers={"Idempotency-Key": key})
        problem(response, 400, "idempotency-key-invalid")

    def test_a_batch_refuses_an_idempotency_key_header(self, client: FlaskClient) -> None:
        """Its jobs carry their own keys; a header key was silently ignored (a retried batch ran twice)."""
        body = json.dumps({"jobs": [{"type": "noop"}]})
        response = client.post(
            "/v1/jobs/batch", data=body, content_type="application/json", headers={"Idempotency-Key": "abc"}
        )
        detail = problem(response, 400, "idempotency-key-invalid")["detail"]
        assert "each job its own idempotency_key" in detail

    def test_a_batch_jobs_bad_key_is_named_as_its_field(self, client: FlaskClient) -> None:
        body = json.dumps({"jobs": [{"type": "noop", "idempotency_key": ""}]})
        response = client.post("/v1/jobs/batch", data=body, content_type="application/json")
        assert response.status_code == 200, response.get_data(as_text=True)
        [result] = response.get_json()["results"]
        assert result["problem"]["detail"] == "This job's idempotency_key is empty."

    def test_a_batch_jobs_null_key_is_refused_not_taken_as_no_key(self, client: FlaskClient) -> None:
        """The schema says string: `null` created a job without a key, and a client that meant to send
        one would create a second job on its retry."""
        body = json.dumps({"jobs": [{"type": "noop", "idempotency_key": None}]})
        response = client.post("/v1/jobs/batch", data=body, content_type="application/json")
        [refused] = response.get_json()["results"]
        assert refused["status"] == 422
        assert refused["problem"]["errors"][0]["pointer"] == "/jobs/0/idempotency_key"

    def test_idempotency_key_sent_twice_is_400(self, client: FlaskClient) -> None:
        response = post(
            client, {"type": "noop"}, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
        problem(response, 400, "idempotency-key-invalid")


def test_a_surrogate_pair_and_an_escaped_backslash_are_fine(client: FlaskClient) -> None:
    body = '{"type": "noop", "labels": {"emoji": "\\ud83d\\ude00", "text": "\\\\ud800"}}'
    response = client.post("/v1/jobs", data=body, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["labels"] == {"emoji": "\U0001f600", "text": "\\ud800"}


def test_a_run_at_in_the_past_means_now(client: FlaskClient) -> None:
    """As api.md says; stored as sent, it made the job look 27 years overdue to the wait metrics and
    the queue statistics (and their stuck-job alert)."""
    response = post(client, {"type": "noop", "run_at": "2000-01-01T00:00:00Z"})
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job["run_at"] >= job["created_at"]


def test_longest_allowed_idempotency_key_is_accepted(client: FlaskClient) -> None:
    response = post(client, {"type": "noop"}, headers={"Idempotency-Key": "k" * 255})
    assert response.status_code == 202, response.get_data(as_text=True)


def test_a_body_is_read_only_for_an_operation(app: Flask) -> None:
    """Without a key, a POST to no route is a 404 or a 405, its body never read (the checks before
    parsing used to scan it, unauthenticated: 400 json-too-deep instead of 404)."""
    client = app.test_client()
    deep = b"[" * 100 + b"]" * 100
    for path, status in (("/nope", 404), ("/healthz", 405), ("/v1/jobs/x/y", 404)):
        response = client.post(path, data=deep, content_type="application/json")
        assert response.status_code == status, (path, response.get_data(as_text=True))


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch"])
@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ('{"type": "noop", "priority": ' + "9" * 5000 + "}", "number that cannot be read"),
        ('{"jobs": [{"type": "noop"}]}'.encode("utf-16"), "not UTF-8"),
        ('{"type": "noop", "labels": {"a": "\\ud800"}}'.encode("utf-16-le"), "not valid JSON"),
        (b'{"type": "noop", "labels": {"a": "\xff"}}', "not UTF-8"),
    ],
    ids=["5000-digit-integer", "utf-16", "utf-16-surrogate", "not-utf-8"],
)
def test_every_body_is_utf8_json_or_malformed(
    client: FlaskClient, path: str, body: str | bytes, detail: str
) -> None:
    """One parser for every operation. Flask's get_json (the batch endpoint) read UTF-16 and UTF-32,
    past the depth and surrogate checks that read UTF-8 (a deep UTF-16 batch was a 500); a 5,000-digit
    integer raised a ValueError that webargs let through as a 500."""
    response = client.post(path, data=body, content_type="application/json")
    assert detail in problem(response, 400, "malformed-json")["detail"]


def test_unknown_job_is_404(client: FlaskClient) -> None:
    problem(client.get("/v1/jobs/6a1f0f5e-0000-4000-8000-000000000000"), 404, "job-not-found")


def test_unknown_route_is_a_plain_problem(client: FlaskClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert client.get("/v1/nothing-here?x=1").status_code == 404, "not a 422 for its query"
    assert client.delete("/v1/jobs?x=1").status_code == 405
    assert response.mimetype == PROBLEM
    assert response.get_json()["type"] == "about:blank"


def test_head_and_options_answer_like_the_routes_they_ask_about(app: Flask, keys: Keys) -> None:
    """HEAD needs what GET needs and answers its status without a body; OPTIONS needs a valid key and
    lists the route's methods (both were a 403: "does not have the (none declared) scope")."""
    client = app.test_client()
    reader = {"Authorization": f"Bearer {keys.reader}"}
    head = client.head("/v1/jobs", headers=reader)
    assert (head.status_code, head.get_data()) == (200, b"")
    assert client.head("/v1/jobs").status_code == 401
    options = client.options(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=reader)
    assert options.status_code == 200
    assert {"POST", "OPTIONS"} <= set(options.headers["Allow"].split(", "))
    problem(client.options("/v1/jobs"), 401, "unauthorized")


def test_wrong_method_is_405_problem(client: FlaskClient) -> None:
    response = client.delete("/v1/jobs")
    assert response.status_code == 405
    assert response.mimetype == PROBLEM
    assert "Allow" in response.headers


def test_every_problem_type_resolves(client: FlaskClient) -> None:
    response = client.get("/problems/validation-error")
    assert response.status_code == 200
    assert response.get_json()["status"] == 422
    assert client.get("/problems/no-such-problem").status_code == 404


@pytest.mark.usefixtures("unchanged_database")
@pytest.mark.parametrize(
    ("query", "detail"),
    [("label=bad%20key:x", "Label keys are 1-63 characters"), ("tenant=Bad%20Name", "Tenant names are 1-63")],
)
def test_list_filters_say_what_a_valid_value_is(client: FlaskClient, query: str, detail: str) -> None:
    [error] = problem(client.get(f"/v1/jobs?{query}"), 422, "validation-error")["errors"]
    assert error["detail"].startswith(detail), error


@pytest.mark.parametrize(
    ("path", "repeated"),
    [("/v1/jobs?limit=1&limit=3", "limit"), ("/v1/jobs?status=queued&created_after=2026-01-01T00:00:00Z"
      "&created_after=2027-01-01T00:00:00Z", "created_after"), ("/v1/dead-letters?limit=1&limit=2", "limit")],
)  # fmt: skip
def test_a_single_valued_parameter_given_twice_is_422(client: FlaskClient, path: str, repeated: str) -> None:
    """webargs kept the first value and dropped the rest without a word."""
    errors = problem(client.get(path), 422, "validation-error")["errors"]
    assert errors == [{"parameter": repeated, "detail": "Give this parameter once; it takes one value."}]


def test_list_parameters_may_repeat(client: FlaskClient) -> None:
    assert client.get("/v1/jobs?status=queued&status=failed&type=noop&type=demo.sleep").status_code == 200


def test_list_rejects_unknown_and_invalid_parameters(client: FlaskClient) -> None:
    body = problem(client.get("/v1/jobs?stauts=failed&limit=0&cursor=zzz"), 422, "validation-error")
    assert {e["parameter"] for e in body["errors"]} == {"stauts", "limit", "cursor"}


@pytest.mark.parametrize(
    ("path", "position", "status"),
    [
        ("/v1/jobs", ["2026-11-30T05:12:13+16:00", "05fa928d-c6a4-4db3-ab2e-17d23538be72"], 200),
        ("/v1/dead-letters", ["2026-11-30T05:12:13+23:59", 5], 200),
        ("/v1/jobs", ["0001-01-01T00:00:00+01:00", "05fa928d-c6a4-4db3-ab2e-17d23538be72"], 422),
    ],
    ids=["jobs-offset-16h", "dead-letters-offset-24h", "jobs-before-year-1-in-utc"],
)
def test_a_tampered_cursor_is_never_a_500(
    app: Flask, keys: Keys, path: str, position: list[Any], status: int
) -> None:
    """A cursor is base64 JSON; a time with an offset Postgres cannot take (beyond +-15:59) reached the
    query and was a 500. Read in UTC it is a position like any other; one outside UTC's range is 422."""
    import base64

    cursor = base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")
    response = app.test_client().get(
        f"{path}?cursor={cursor}", headers={"Authorization": f"Bearer {keys.admin}"}
    )
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 422:
        assert [e["parameter"] for e in problem(response, 422, "validation-error")["errors"]] == ["cursor"]


def test_label_errors_point_at_the_label(client: FlaskClient) -> None:
    """A JSON pointer names a member of the body: marshmallow's errors pointed at /labels/<k>/key and
    /labels/<k>/value, which are not."""
    labels = {"-bad": "x", "long": "v" * 300, "number": 5}
    for path, prefix, body in (
        ("/v1/jobs", "", {"type": "noop", "labels": labels}),
        ("/v1/jobs/batch", "/jobs/0", {"jobs": [{"type": "noop", "labels": labels}]}),
    ):
        response = client.post(path, data=json.dumps(body), content_type="application/json")
        if path.endswith("batch"):
            errors = response.get_json()["results"][0]["problem"]["errors"]
        else:
            errors = problem(response, 422, "validation-error")["errors"]
        pointers = {e["pointer"] for e in errors}
        assert pointers == {f"{prefix}/labels/-bad", f"{prefix}/labels/long", f"{prefix}/labels/number"}, (
            errors
        )
        assert any("Label keys" in e["detail"] for e in errors if e["pointer"].endswith("-bad"))


@pytest.mark.usefixtures("unchanged_database")
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job}"), ("POST", "/v1/jobs/{job}/cancel"),
     ("POST", "/v1/jobs/batch"), ("GET", "/v1/queues")],
)  # fmt: skip
def test_operations_without_query_parameters_refuse_any(
    client: FlaskClient, keys: Keys, method: str, path: str
) -> None:
    """A misspelt option (``?dry_run=1``, ``?wait=30``) must not be silently ignored."""
    url = path.format(job=uuid.uuid4()) + "?foo=1&bar=2"
    body = json.dumps({"jobs": [{"type": "noop"}], "type": "noop"})
    admin = {"Authorization": f"Bearer {keys.admin}"}
    response = client.open(url, method=method, data=body, content_type="application/json", headers=admin)
    errors = problem(response, 422, "validation-error")["errors"]
    assert errors == [{"parameter": "bar", "detail": "Unknown parameter."},
                      {"parameter": "foo", "detail": "Unknown parameter."}]  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/dead-letters"])
def test_listings_name_an_unknown_query_parameter_as_the_other_operations_do(
    client: FlaskClient, keys: Keys, path: str
) -> None:
    admin = {"Authorization": f"Bearer {keys.admin}"}
    errors = problem(client.get(f"{path}?foo=1", headers=admin), 422, "validation-error")["errors"]
    assert errors == [{"parameter": "foo", "detail": "Unknown parameter."}]


def test_openapi_document_and_docs_are_served(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/readyz"} <= set(spec["paths"])
    assert spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    assert client.get("/docs").status_code == 200


@pytest.fixture
def app_without_postgres(settings: Settings) -> Flask:
    dead = dataclasses.replace(
        settings, database_url="postgresql://postgres@127.0.0.1:1/conveyor_test", db_connect_timeout_seconds=1
    )
    return create_app(dead)


@pytest.mark.usefixtures("unchanged_database")
def test_postgres_down_answers_503_with_retry_after(app_without_postgres: Flask, keys: Keys) -> None:
    client = app_without_postgres.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {keys.writer}"
    response = post(client, {"type": "noop"}, headers={"Idempotency-Key": "pg-down"})
    problem(response, 503, "service-unavailable")
    assert response.headers["Retry-After"] == "5"
    assert "postgresql://" not in response.get_data(as_text=True)
    problem(client.get("/v1/jobs/6a1f0f5e-0000-4000-8000-000000000000"), 503, "service-unavailable")
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["rabbitmq"] == "ok"
    assert ready.get_json()["checks"]["postgres"] != "ok"


def test_responses_are_valid_against_the_document_under_openapi_30_semantics(client: FlaskClient) -> None:
    """What a strict validator (openapi-core's) says of real responses: a queued job (`error`,
    `progress` and `result` null), a page of them and a batch's results."""
    from openapi_schema_validator import OAS30Validator

    document = client.get("/openapi.json").get_json()

    def errors(name: str, body: Any) -> list[str]:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        return [e.message for e in OAS30Validator(schema).iter_errors(body)]

    job = post(client, {"type": "noop", "delay_seconds": 3600})
    assert job.status_code == 202
    assert job.get_json()["error"] is None
    assert errors("Job", job.get_json()) == []
    assert errors("JobPage", client.get("/v1/jobs?limit=2").get_json()) == []
    batch = client.post(
        "/v1/jobs/batch", json={"jobs": [{"type": "noop", "delay_seconds": 3600}, {"type": "?"}]}
    )
    assert errors("JobBatchResult", batch.get_json()) == []


def test_a_tenants_retry_locks_in_a_submissions_order(app: Flask, keys: Keys, dsn: str) -> None:
    """Rate bucket first, then the job (and the active-job count its requeue updates): the other order
    deadlocked against a concurrent submission of the same tenant (a 503) when submissions took their
    token inside their insert's statement; a retry waiting for the bucket holds nothing of the job."""
    import threading
    import time

    import psycopg2

    from api_service.submission import retry_job
    from shared.jobs import NewJob
    from shared.store import jobs as job_store
    from shared.store.tenants import TenantLimits

    svc = services_of(app)
    tenant, job_id = "tests", uuid.uuid4()
    new = NewJob("noop", "default", {}, 5, 3, 60, None, 3600.0, {})
    svc.db.run(
        lambda cur: job_store.insert_job(
            cur, job_id, tenant, new, max_active_jobs=10**6, outbox_grace_seconds=0
        )
    )
    svc.db.run(lambda cur: job_store.cancel_job(cur, job_id, tenant))
    limits = TenantLimits(max_active_jobs=10**6, submit_rate_per_second=1000.0, submit_burst=1000)
    holder, probe = psycopg2.connect(dsn), psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:  # a submission of the tenant, holding its bucket
            cur.execute(
                "INSERT INTO rate_buckets (tenant, tokens, refilled_at, allowed)"
                " VALUES (%s, 1000, now(), true) ON CONFLICT (tenant) DO UPDATE SET refilled_at = now()",
                (tenant,),
            )
            outcome: list[Any] = []
            retry = threading.Thread(target=lambda: outcome.append(retry_job(svc, job_id, tenant, limits)))
            retry.start()
            time.sleep(0.5)  # the retry waits for the bucket...
            with probe.cursor() as other:  # ...and holds nothing of the job meanwhile
                other.execute("SELECT status FROM jobs WHERE id = %s FOR UPDATE NOWAIT", (str(job_id),))
                assert other.fetchone() == ("cancelled",)
            probe.rollback()
        holder.commit()
        retry.join(10)
    finally:
        holder.close()
        probe.close()
    [(moved, job, rate)] = outcome
    assert moved
    assert job.status.value == "queued"
    assert rate is not None


@pytest.mark.parametrize(
    ("limits", "slug", "label"),
    [({"submit_rate_per_second": 0.001, "submit_burst": 2, "max_active_jobs": 100}, "rate-limited", "rate"),
     ({"submit_rate_per_second": 1000.0, "submit_burst": 1000, "max_active_jobs": 1}, "too-many-active-jobs",
      "active_jobs")],
    ids=["rate", "active-jobs"],
)  # fmt: skip
def test_a_tenants_retry_refused_by_a_limit_is_counted_like_a_submission(
    app: Flask, limits: dict[str, Any], slug: str, label: str
) -> None:
    """A retry is limited like a submission, and its 429 counted in conveyor_submissions_limited_total
    too: it was not, so a tenant retrying into its limits never showed on the dashboard."""
    from prometheus_client import REGISTRY

    from shared.api_keys import Scope, generate_key
    from shared.store import api_keys as key_store
    from shared.store import tenants as tenant_store

    tenant, new = f"retry-{label}-{uuid.uuid4().hex[:8]}", generate_key()

    def create(cur: Any) -> None:
        tenant_store.create_tenant(cur, tenant)
        tenant_store.set_limits(cur, tenant, **limits)
        key_store.insert_key(cur, new, tenant, frozenset({Scope.JOBS_READ, Scope.JOBS_WRITE}), "test")

    services_of(app).db.run(create)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {new.key}"
    first = post(client, {"type": "noop", "delay_seconds": 3600}).get_json()["id"]
    assert client.post(f"/v1/jobs/{first}/cancel").status_code == 200
    assert post(client, {"type": "noop", "delay_seconds": 3600}).status_code == 202  # the last token, or room

    def limited() -> float:
        return REGISTRY.get_sample_value("conveyor_submissions_limited_total", {"limit": label}) or 0.0

    before = limited()
    problem(client.post(f"/v1/jobs/{first}/retry"), 429, slug)
    assert limited() - before == 1
