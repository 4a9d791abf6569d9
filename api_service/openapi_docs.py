"""The OpenAPI document's conventions, in one place: the shared problem schema, the error responses of
each operation, the headers every response carries, and examples.

Client generators are the document's main readers, so it must be exact: every response an operation
can give (errors included, each with the problem types it can carry), stable ``operationId``s, named
schemas instead of anonymous ones, and constraints only where the API really enforces them.

``ConveyorDocs`` is an apispec plugin applied to the whole document:

- every operation takes an optional ``X-Request-ID`` and every response echoes one;
- Python regular expressions become ECMA 262 ones (``^...$``), as OpenAPI requires;
- a ``Dict`` field's length limit is a number of properties, not a string length;
- ``JobStatus`` is one named enum wherever a status appears;
- a nullable nested object is ``{"anyOf": [ref, NULL_ONLY]}``: that model, or null and nothing else
  (``allOf`` + ``nullable`` refused null under OpenAPI 3.0.3's strict reading; apispec's default is an
  ``anyOf`` with an untyped object).

Examples of requests and responses live in ``openapi_examples``. The snapshot of the document is
``openapi.json`` at the top of the repository (``make openapi``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import marshmallow as ma
from apispec import APISpec, BasePlugin
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls
from flask_smorest import Blueprint
from marshmallow import fields

from api_service.idempotency import HEADER as IDEMPOTENCY_HEADER
from api_service.idempotency import KEY_PATTERN, MAX_KEY_LENGTH, REPLAYED_HEADER
from api_service.problems import CATALOG, MEDIA_TYPE, UNAVAILABLE_DETAIL
from api_service.request_ids import HEADER as REQUEST_ID
from shared.job_types import REGISTRY
from shared.jobs import JobStatus

F = TypeVar("F", bound=Callable[..., Any])


class ProblemErrorSchema(ma.Schema):
    """One problem with the request: where it is, and what is wrong."""

    class Meta:
        unknown = ma.INCLUDE  # a response: members may be added

    pointer = fields.String(
        metadata={"description": "JSON pointer into the request body.", "example": "/priority"}
    )
    parameter = fields.String(metadata={"description": "Name of the query parameter.", "example": "limit"})
    detail = fields.String(required=True, metadata={"example": "Must be greater than or equal to 0."})


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details: every error response of Conveyor.

    `type` is `/problems/<slug>` (served by `GET /problems/{slug}` and described in docs/api.md), or
    `about:blank` for a plain HTTP error such as an unknown path. Other members may be added (the
    readiness probe adds `checks`).
    """

    class Meta:
        unknown = ma.INCLUDE  # RFC 9457 extension members

    type = fields.String(
        required=True,
        metadata={
            "format": "uri-reference",
            "description": "Identifies the problem type.",
            "example": "/problems/validation-error",
        },
    )
    title = fields.String(
        required=True,
        metadata={
            "description": "Short summary of the problem type.",
            "example": "Request validation failed",
        },
    )
    status = fields.Integer(
        required=True,
        metadata={"description": "The HTTP status code.", "minimum": 400, "maximum": 599, "example": 422},
    )
    detail = fields.String(
        required=True,
        metadata={
            "description": "What went wrong with this request.",
            "example": "The request is invalid; see `errors`.",
        },
    )
    errors = fields.List(
        fields.Nested(ProblemErrorSchema),
        metadata={"description": "Validation problems (`validation-error` only), one per invalid value."},
    )


INFO = {
    "description": "Submit background jobs over HTTP, then follow them to the end.\n\n"
    "Errors are RFC 9457 problem details (`application/problem+json`); each `type` is "
    "`/problems/<slug>`, which this API describes at `GET /problems/{slug}`. Every `/v1` operation needs "
    "an API key (`Authorization: Bearer <key>`).\n\n"
    "Versioning: `/v1` stays backwards compatible. Operations, optional parameters and request "
    "fields, response fields and headers, problem types and job types may be added, so a client must "
    "ignore response fields it does not know. Nothing is removed or renamed, no optional input becomes "
    "required, no accepted input is refused, and the set of job statuses stays as it is. A breaking "
    "change gets a new prefix, `/v2`, while `/v1` keeps working.",
    "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
}


# --- headers -------------------------------------------------------------------------------------

_INTEGER = {"type": "integer", "minimum": 0}
_HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": _INTEGER, "example": 5},
    "RateLimit-Policy": {
        "description": "The tenant's submission quota: `q` submissions, refilled over `w` seconds "
        "(draft-ietf-httpapi-ratelimit-headers).",
        "schema": {"type": "string"},
        "example": '"submissions";q=200;w=2',
    },
    "RateLimit": {
        "description": "Submissions left now (`r`) and seconds until the quota is whole again (`t`).",
        "schema": {"type": "string"},
        "example": '"submissions";r=199;t=1',
    },
    "WWW-Authenticate": {
        "description": 'The Bearer challenge; with `error="insufficient_scope"` it names the scope needed.',
        "schema": {"type": "string"},
        "example": 'Bearer realm="conveyor", error="invalid_token"',
    },
    "Location": {
        "description": "Path of the job.",
        "schema": {"type": "string", "format": "uri-reference"},
        "example": "/v1/jobs/2d7b52cc-f075-46b7-b01e-22a8f8c214e4",
    },
    REPLAYED_HEADER: {
        "description": "`true` when this is the stored response to an earlier request with the same "
        "`Idempotency-Key`; absent otherwise.",
        "schema": {"type": "string", "enum": ["true"]},
    },
}


def header(name: str, *, required: bool = False) -> dict[str, Any]:
    """A response header object for one of the headers Conveyor sends."""
    return {**_HEADERS[name], "required": required}


#: Every response carries the request's id (the one sent, if well-formed, or a new one).
REQUEST_ID_RESPONSE_HEADER = {
    "description": "The request's id: the `X-Request-ID` sent, if it was 1-128 characters of "
    "`A-Z a-z 0-9 . _ : -`, otherwise a new one. It is on every log line of the request, and a "
    "submitted job's worker logs carry it too.",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    "example": "3f1c9a0e5b7d4e2fa6c8b1d0e9f7a5c3",
}
REQUEST_ID_PARAMETER = {
    "description": "An id to correlate this request with its logs, 1-128 characters of "
    "`A-Z a-z 0-9 . _ : -`. Any other value is replaced by a new id, never refused.",
    "required": False,
    "schema": {"type": "string"},
    "example": "checkout-7f3a2b",
}
IDEMPOTENCY_KEY_PARAMETER = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "description": "Makes the submission safe to retry: the same key and body return the original "
    f"job instead of creating another. 1-{MAX_KEY_LENGTH} visible ASCII characters other than space, "
    'comma, double quote and backslash, optionally quoted ("…"); a UUID is a good key. Keys are scoped '
    "to the tenant and remembered for 24 hours by default.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_KEY_LENGTH + 2,
        "pattern": KEY_PATTERN,
    },
    "example": "0b5e8f4c-9d2a-4e57-a1c3-7f6b2d9e8a10",
}


# --- error responses -----------------------------------------------------------------------------

#: A plain 404 (``about:blank``): no route matches, e.g. a job id that is not a UUID.
NOT_FOUND = "about:blank"

#: Headers each problem type carries: name -> always present.
_PROBLEM_HEADERS: dict[str, dict[str, bool]] = {
    "unauthorized": {"WWW-Authenticate": True},
    "forbidden": {"WWW-Authenticate": True},
    "rate-limited": {"Retry-After": True, "RateLimit-Policy": False, "RateLimit": False},
    "too-many-active-jobs": {"Retry-After": True},
    "idempotency-key-in-flight": {"Retry-After": True},
    "service-unavailable": {"Retry-After": True},
    "not-ready": {"Retry-After": True},
}

#: A realistic ``detail`` for each problem type's example.
_EXAMPLE_DETAILS = {
    "validation-error": "The request is invalid; see `errors`.",
    "malformed-json": (
        "The request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
        "column 17 (char 16)."
    ),
    "json-too-deep": "The request body nests arrays and objects deeper than 32 levels.",
    "unauthorized": "The API key is not valid (unknown, revoked or malformed).",
    "forbidden": "This API key does not have the jobs:write scope.",
    "rate-limited": "Tenant 'acme' may submit (or retry) 100 jobs per second (bursts of 200).",
    "too-many-active-jobs": (
        "The tenant may have at most 10000 jobs waiting or running, and has reached that; retry once some "
        "have finished."
    ),
    "unsupported-media-type": "Send the request body as application/json, not text/plain.",
    "payload-too-large": "The data value transmitted exceeds the capacity limit.",
    "job-not-found": "No job has the id 2d7b52cc-f075-46b7-b01e-22a8f8c214e4.",
    "idempotency-key-invalid": "The Idempotency-Key header is empty.",
    "idempotency-key-in-flight": "A request with this Idempotency-Key is still in progress.",
    "idempotency-key-reused": "This Idempotency-Key was already used for a different request.",
    "illegal-transition": "The job already succeeded; a finished job cannot be cancelled.",
    "service-unavailable": UNAVAILABLE_DETAIL,
    "not-ready": "Unreachable: rabbitmq.",
}
_EXAMPLE_EXTRAS: dict[str, dict[str, Any]] = {
    "validation-error": {
        "errors": [
            {
                "pointer": "/priority",
                "detail": "Must be greater than or equal to 0 and less than or equal to 9.",
            }
        ]
    },
    "not-ready": {"checks": {"postgres": "ok", "rabbitmq": "AMQPConnectionError: connection refused"}},
}


def _problem_example(slug: str) -> dict[str, Any]:
    if slug == NOT_FOUND:
        summary = "No such route"
        value: dict[str, Any] = {
            "type": "about:blank",
            "title": "Not Found",
            "status": 404,
            "detail": "The requested URL was not found on the server.",
        }
    else:
        problem = CATALOG[slug]
        summary = problem.title
        value = {"type": problem.uri, "title": problem.title, "status": problem.status,
                 "detail": _EXAMPLE_DETAILS[slug], **_EXAMPLE_EXTRAS.get(slug, {})}  # fmt: skip
    return {"summary": summary, "value": value}


def _example_name(slug: str) -> str:
    """The name of a problem type's example in ``components/examples``."""
    return "about-blank" if slug == NOT_FOUND else slug


def _status_of(slug: str) -> int:
    return 404 if slug == NOT_FOUND else CATALOG[slug].status


def _description(slugs: list[str]) -> str:
    lines = []
    for slug in slugs:
        if slug == NOT_FOUND:
            lines.append("- `about:blank`: no route matches the path (e.g. an id that is not a UUID)")
        else:
            lines.append(f"- `{CATALOG[slug].uri}`: {CATALOG[slug].title}")
    return "Problem types:\n\n" + "\n".join(lines)


def _headers(slugs: list[str]) -> dict[str, Any] | None:
    names = {name for slug in slugs for name in _PROBLEM_HEADERS.get(slug, {})}
    always = {
        name for name in names if all(_PROBLEM_HEADERS.get(slug, {}).get(name, False) for slug in slugs)
    }
    return {name: header(name, required=name in always) for name in sorted(names)} or None


def documents_problems(*slugs: str, descriptions: Mapping[int, str] | None = None) -> Callable[[F], F]:
    """Document the problem+json responses an operation can give, by problem type.

    ``@documents_problems("unauthorized", "forbidden", "job-not-found", NOT_FOUND)`` documents a 401, a
    403 and a 404 carrying either type, each with its headers and an example per type.
    ``descriptions`` replaces the generated description of a status.
    """
    by_status: dict[int, list[str]] = {}
    for slug in slugs:
        by_status.setdefault(_status_of(slug), []).append(slug)

    def decorate(view: F) -> F:
        for status, group in sorted(by_status.items(), reverse=True):
            view = Blueprint.alt_response(
                _BLUEPRINT,
                status,
                schema=ProblemSchema,
                content_type=MEDIA_TYPE,
                description=(descriptions or {}).get(status) or _description(group),
                headers=_headers(group),
                examples={_example_name(slug): _example_name(slug) for slug in group},
            )(view)
        return view

    return decorate


#: alt_response only needs a Blueprint instance for its bookkeeping, not a registered one.
_BLUEPRINT = Blueprint("problems-doc", __name__)

#: The problems every authenticated operation can give: no key, no scope, no database.
AUTHENTICATED = ("unauthorized", "forbidden", "service-unavailable")
#: The problems of a request body, checked before the body reaches the operation.
BODY = ("malformed-json", "json-too-deep", "payload-too-large", "unsupported-media-type")


# --- the plugin ----------------------------------------------------------------------------------


_REF_PREFIX = "#/components/schemas/"


class ConveyorDocs(BasePlugin):
    """apispec plugin applying the conventions of the module docstring to the whole document."""

    def init_spec(self, spec: APISpec) -> None:
        super().init_spec(spec)
        marshmallow_plugin = next(p for p in spec.plugins if isinstance(p, MarshmallowPlugin))
        converter = marshmallow_plugin.converter
        if converter is None:
            raise RuntimeError("ConveyorDocs must come after apispec's MarshmallowPlugin")
        for function in (_ecma_pattern, _dict_size, _named_enum, _nullable_nested):
            converter.add_attribute_function(function)  # type: ignore[no-untyped-call]
        for slug in (*_EXAMPLE_DETAILS, NOT_FOUND):
            spec.components.example(_example_name(slug), _problem_example(slug))
        spec.components.header(REQUEST_ID, REQUEST_ID_RESPONSE_HEADER)
        spec.components.parameter(REQUEST_ID, "header", REQUEST_ID_PARAMETER)
        spec.components.schema(
            "JobStatus",
            {
                "type": "string",
                "enum": [status.value for status in JobStatus],
                "description": "`queued` (waiting, or scheduled for `run_at`), `running`, `retrying` "
                "(an attempt failed; the next may start at `run_at`), and the final `succeeded`, "
                "`failed` and `cancelled` (an operator may send failed and cancelled jobs round again).",
            },
        )
        for job_type in REGISTRY.values():
            schema = job_type.payload_schema()
            description = f"The payload of `{job_type.name}` jobs. {job_type.description}"
            spec.components.schema(type(schema).__name__, schema=schema, description=description)

    def schema_helper(self, name: str, definition: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
        """A schema's description is its class docstring; ``OPENAPI_KEYWORDS`` adds cross-field rules."""
        schema = kwargs.get("schema")
        if schema is None:
            return None
        cls = resolve_schema_cls(schema)
        doc = kwargs.get("description") or cls.__dict__.get("__doc__")
        return {
            **({"description": inspect.cleandoc(doc)} if doc else {}),
            **getattr(cls, "OPENAPI_KEYWORDS", {}),
        }

    def operation_helper(
        self, path: str | None = None, operations: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Every operation takes an X-Request-ID, and every response echoes one; statuses in order."""
        for operation in (operations or {}).values():
            operation.setdefault("parameters", []).append(REQUEST_ID)
            operation["responses"] = dict(
                sorted(operation.get("responses", {}).items(), key=lambda r: str(r[0]))
            )
            for response in operation.get("responses", {}).values():
                if isinstance(response, dict):
                    response.setdefault("headers", {})[REQUEST_ID] = REQUEST_ID


# Attribute functions: bound to apispec's field converter, called for every field after the built-in
# ones, with ``ret`` the property converted so far (which they may edit in place).


def _ecma_pattern(self: Any, field: fields.Field[Any], ret: dict[str, Any], **_: Any) -> dict[str, Any]:
    """``validate.Regexp`` matches at the start and ends its patterns with ``\\Z``: say it in ECMA 262."""
    pattern = ret.get("pattern")
    if isinstance(pattern, str) and pattern.endswith(r"\Z"):
        ret["pattern"] = "^" + pattern.removeprefix("^")[:-2] + "$"
    return {}


def _dict_size(self: Any, field: fields.Field[Any], ret: dict[str, Any], **_: Any) -> dict[str, Any]:
    """A ``Length`` validator on a ``Dict`` bounds its number of keys."""
    if isinstance(field, fields.Dict):
        for length, size in (("minLength", "minProperties"), ("maxLength", "maxProperties")):
            if length in ret:
                ret[size] = ret.pop(length)
    return {}


#: Enums documented once, as a named schema, and referenced wherever a field uses them.
_NAMED_ENUMS = {JobStatus: "JobStatus"}


def _named_enum(self: Any, field: fields.Field[Any], ret: dict[str, Any], **_: Any) -> dict[str, Any]:
    if isinstance(field, fields.Enum) and field.enum in _NAMED_ENUMS:
        ret.clear()
        return {"$ref": _REF_PREFIX + _NAMED_ENUMS[field.enum]}
    return {}


#: The schema of JSON null alone, in OpenAPI 3.0.3's terms.
NULL_ONLY = {"type": "object", "nullable": True, "enum": [None]}


def _nullable_nested(self: Any, field: fields.Field[Any], ret: dict[str, Any], **_: Any) -> dict[str, Any]:
    branches = ret.get("anyOf")
    if isinstance(field, fields.Nested) and field.allow_none and isinstance(branches, list):
        refs = [branch for branch in branches if "$ref" in branch]
        if len(refs) == 1:
            # OpenAPI 3.0.3: `nullable` only adds null to a `type` beside it, so `allOf: [$ref]` with
            # `nullable` still refused null (strict validators, openapi-core, rejected every queued
            # job's `error: null`). A second branch that is null and nothing else says it exactly.
            ret["anyOf"] = [*refs, NULL_ONLY]
            return {}
    return {}
