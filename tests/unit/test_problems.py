"""RFC 9457 problem details (api_service/problems.py)."""

from __future__ import annotations

import json
import re

import marshmallow as ma
import pytest
from flask import Flask
from werkzeug.exceptions import (
    HTTPException,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
    UnprocessableEntity,
)

from api_service.problems import (
    CATALOG,
    MEDIA_TYPE,
    Problem,
    from_conveyor_error,
    from_http_exception,
    register,
    validation_errors,
)
from api_service.schemas import JobCreateSchema
from shared import errors

# --- validation_errors ------------------------------------------------------------------------------


def test_body_errors_become_json_pointers_and_schema_errors_point_at_the_whole_body() -> None:
    messages = {"json": {"payload": {"seconds": ["bad"]}, "_schema": ["x"]}}
    assert list(validation_errors(messages)) == [
        {"pointer": "/payload/seconds", "detail": "bad"},
        {"pointer": "", "detail": "x"},
    ]


def test_query_errors_name_the_parameter() -> None:
    messages = {"query": {"limit": ["Must be between 1 and 200."]}}
    assert list(validation_errors(messages)) == [
        {"parameter": "limit", "detail": "Must be between 1 and 200."}
    ]


def test_error_in_a_repeated_query_parameter_names_the_parameter_not_the_index() -> None:
    messages = {"query": {"status": {1: ["Must be one of: queued, running."]}}}
    assert list(validation_errors(messages)) == [
        {"parameter": "status", "detail": "Must be one of: queued, running."}
    ]


def test_each_message_of_a_field_is_its_own_error() -> None:
    messages = {"json": {"priority": ["too big", "not even"]}}
    assert list(validation_errors(messages)) == [
        {"pointer": "/priority", "detail": "too big"},
        {"pointer": "/priority", "detail": "not even"},
    ]


def test_json_pointer_escapes_tilde_and_slash() -> None:
    messages = {"json": {"labels": {"a/b": ["bad"], "c~d": ["bad"]}}}
    pointers = [e["pointer"] for e in validation_errors(messages)]
    assert pointers == ["/labels/a~1b", "/labels/c~0d"]


def test_json_pointer_escapes_tilde_before_slash() -> None:
    # RFC 6901: "~1" in a key must become "~01", not "~1" (which would decode back to "/").
    messages = {"json": {"~1": ["bad"], "/0": ["bad"]}}
    assert [e["pointer"] for e in validation_errors(messages)] == ["/~01", "/~10"]


def test_list_item_errors_point_at_the_index() -> None:
    messages = {"json": {"items": {0: {"name": ["missing"]}}}}
    assert list(validation_errors(messages)) == [{"pointer": "/items/0/name", "detail": "missing"}]


def test_real_schema_errors_flatten_to_pointers_into_the_body() -> None:
    with pytest.raises(ma.ValidationError) as caught:
        JobCreateSchema().load({"type": "demo.sleep", "payload": {"seconds": -1}, "priority": 12})
    pointers = {e["pointer"] for e in validation_errors({"json": caught.value.messages})}
    assert pointers == {"/payload/seconds", "/priority"}


# --- Problem ----------------------------------------------------------------------------------------


def test_problem_body_has_the_rfc_9457_members() -> None:
    body = Problem("job-not-found", "No job has id 42.").body()
    assert body == {
        "type": "/problems/job-not-found",
        "title": "Job not found",
        "status": 404,
        "detail": "No job has id 42.",
    }


def test_problem_body_lists_errors_when_given() -> None:
    errs = [{"pointer": "/type", "detail": "Missing data for required field."}]
    body = Problem("validation-error", "Invalid.", errors=errs).body()
    assert body["errors"] == errs
    assert body["status"] == 422


def test_problem_body_without_errors_has_no_errors_member() -> None:
    assert "errors" not in Problem("internal-error", "Oops.").body()


def test_problem_extra_members_are_added_to_the_body() -> None:
    body = Problem("illegal-transition", "Finished.", extra={"job_status": "failed"}).body()
    assert body["job_status"] == "failed"


def test_problem_of_an_unknown_slug_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Problem("no-such-problem", "x")


def test_problem_response_is_problem_json_with_its_status_and_headers() -> None:
    response = Problem("service-unavailable", "Down.", headers={"Retry-After": "5"}).response()
    assert response.status_code == 503
    assert response.mimetype == MEDIA_TYPE == "application/problem+json"
    assert response.headers["Retry-After"] == "5"
    assert json.loads(response.get_data()) == {
        "type": "/problems/service-unavailable",
        "title": "Service temporarily unavailable",
        "status": 503,
        "detail": "Down.",
    }


# --- the catalog ------------------------------------------------------------------------------------


def test_catalog_is_keyed_by_each_entrys_slug() -> None:
    assert all(slug == problem.slug for slug, problem in CATALOG.items())


@pytest.mark.parametrize("slug", list(CATALOG))
def test_catalog_entry_is_a_described_error_with_a_resolvable_uri(slug: str) -> None:
    problem = CATALOG[slug]
    assert 400 <= problem.status <= 599
    assert re.fullmatch(r"[a-z]+(-[a-z]+)*", slug)
    assert problem.uri == f"/problems/{slug}"
    assert problem.title
    assert problem.description


def test_catalog_titles_are_distinct() -> None:
    titles = [p.title for p in CATALOG.values()]
    assert len(set(titles)) == len(titles)


# --- translating exceptions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "slug", "status"),
    [
        (errors.StoreUnavailable("timeout"), "service-unavailable", 503),
        (errors.JobNotFound("No job has id x."), "job-not-found", 404),
        (errors.IllegalTransition("no"), "illegal-transition", 409),
        (errors.IdempotencyKeyInvalid("bad"), "idempotency-key-invalid", 400),
        (errors.IdempotencyKeyInFlight("busy"), "idempotency-key-in-flight", 409),
        (errors.IdempotencyKeyReused("other body"), "idempotency-key-reused", 422),
    ],
)
def test_conveyor_error_maps_to_its_documented_problem(
    error: errors.ConveyorError, slug: str, status: int
) -> None:
    problem = from_conveyor_error(error)
    assert problem.type.slug == slug
    assert problem.type.status == status


def test_unknown_job_type_maps_to_the_documented_422() -> None:
    # shared/errors.py documents UnknownJobType → 422.
    assert from_conveyor_error(errors.UnknownJobType("nope")).type.status == 422


def test_unavailable_database_asks_clients_to_retry_later() -> None:
    problem = from_conveyor_error(errors.StoreUnavailable("connection refused"))
    assert problem.headers == {"Retry-After": "5"}
    assert "connection refused" not in problem.detail


def test_key_in_flight_asks_clients_to_retry_soon() -> None:
    assert from_conveyor_error(errors.IdempotencyKeyInFlight("busy")).headers == {"Retry-After": "1"}


def test_unmapped_conveyor_error_becomes_an_internal_error() -> None:
    problem = from_conveyor_error(errors.BrokerUnavailable("secret broker detail"))
    assert problem.type.slug == "internal-error"
    assert "secret broker detail" not in problem.detail


def body_of(exc: HTTPException) -> tuple[int, str, dict[str, object]]:
    response = from_http_exception(exc)
    return response.status_code, response.mimetype, json.loads(response.get_data())


def test_unknown_route_is_an_about_blank_problem() -> None:
    status, mimetype, body = body_of(NotFound())
    assert (status, mimetype) == (404, MEDIA_TYPE)
    assert body["type"] == "about:blank"
    assert body["title"] == "Not Found"
    assert body["status"] == 404


def test_wrong_method_keeps_the_allow_header() -> None:
    response = from_http_exception(MethodNotAllowed(valid_methods=["GET", "POST"]))
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"
    assert response.mimetype == MEDIA_TYPE


def test_webargs_422_becomes_a_validation_problem_listing_each_error() -> None:
    exc = UnprocessableEntity()
    exc.data = {"messages": {"json": {"type": ["Missing data for required field."]}}}
    status, _, body = body_of(exc)
    assert status == 422
    assert body["type"] == "/problems/validation-error"
    assert body["errors"] == [{"pointer": "/type", "detail": "Missing data for required field."}]


def test_webargs_400_with_messages_is_malformed_json() -> None:
    exc = HTTPException()
    exc.code = 400
    exc.data = {"messages": {"json": ["Invalid JSON body."]}}
    status, _, body = body_of(exc)
    assert (status, body["type"]) == (400, "/problems/malformed-json")


def test_too_large_body_is_payload_too_large() -> None:
    status, _, body = body_of(RequestEntityTooLarge())
    assert (status, body["type"]) == (413, "/problems/payload-too-large")


def test_server_error_hides_its_description() -> None:
    status, _, body = body_of(InternalServerError(description="psycopg2 said: password=hunter2"))
    assert (status, body["type"]) == (500, "/problems/internal-error")
    assert "hunter2" not in json.dumps(body)


# --- the handlers registered on an app --------------------------------------------------------------


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    register(app)

    @app.get("/problem")
    def raise_problem() -> None:
        raise Problem("illegal-transition", "The job already finished.")

    @app.get("/conveyor-error")
    def raise_conveyor_error() -> None:
        raise errors.JobNotFound("No job has this id.")

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("secret internals")

    return app


@pytest.mark.parametrize(
    ("path", "status", "type_"),
    [
        ("/problem", 409, "/problems/illegal-transition"),
        ("/conveyor-error", 404, "/problems/job-not-found"),
        ("/crash", 500, "/problems/internal-error"),
        ("/no-such-route", 404, "about:blank"),
    ],
)
def test_every_error_leaves_the_app_as_problem_json(app: Flask, path: str, status: int, type_: str) -> None:
    response = app.test_client().get(path)
    assert response.status_code == status
    assert response.headers["Content-Type"] == MEDIA_TYPE
    assert response.get_json(force=True)["type"] == type_


def test_unexpected_exception_leaks_no_details(app: Flask) -> None:
    response = app.test_client().get("/crash")
    assert b"secret internals" not in response.get_data()
    assert b"Traceback" not in response.get_data()
