"""The committed openapi.json is the contract that client generators read: it is exactly what the app
serves, both validators that generators trust accept it, and it follows Conveyor's conventions.

These tests need no running service: the app is built in-process and only asked for its document.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT

from api_service.app import create_app
from api_service.problems import CATALOG
from shared.settings import Settings

SNAPSHOT = ROOT / "openapi.json"
REFRESH = "make openapi"
BIN = Path(sys.executable).parent
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def served(settings: Settings) -> Iterator[dict[str, Any]]:
    """The document as the app serves it at /openapi.json."""
    app = create_app(settings)
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    yield response.get_json()
    app.extensions["conveyor"].publisher.close()


@pytest.fixture(scope="module")
def snapshot() -> dict[str, Any]:
    if not SNAPSHOT.exists():
        pytest.fail(f"{SNAPSHOT.name} is missing. Create it with `{REFRESH}`.", pytrace=False)
    document: dict[str, Any] = json.loads(SNAPSHOT.read_text())
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def _lines(document: dict[str, Any]) -> list[str]:
    return json.dumps(document, indent=2, sort_keys=True).splitlines()


def test_snapshot_is_what_the_app_serves(served: dict[str, Any], snapshot: dict[str, Any]) -> None:
    if served != snapshot:
        diff = difflib.unified_diff(
            _lines(snapshot), _lines(served), "openapi.json (committed)", "/openapi.json (app)", lineterm=""
        )
        shown = list(diff)
        pytest.fail(
            f"openapi.json differs from the document the app serves. If the change is intended, refresh "
            f"it with `{REFRESH}` and commit it (client generators read it).\n"
            + "\n".join(shown[:300])
            + (f"\n... {len(shown) - 300} more diff lines" if len(shown) > 300 else ""),
            pytrace=False,
        )


def _run(*command: str) -> str:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def test_snapshot_passes_openapi_spec_validator() -> None:
    assert "OK" in _run("openapi-spec-validator", str(SNAPSHOT))


def test_snapshot_passes_openapi_generator_validate() -> None:
    output = _run("openapi-generator-cli", "validate", "-i", str(SNAPSHOT))
    # Its only recommendations may be the job types' payload schemas: documented for clients to use,
    # though no operation refers to them (a job's payload is a free-form object).
    warnings = [line.strip() for line in output.splitlines() if line.startswith("\t- ")]
    assert all(re.fullmatch(r"- Unused model: \w+Payload", w) for w in warnings), output


def test_every_operation_is_named_tagged_and_described(snapshot: dict[str, Any]) -> None:
    ids = []
    for method, path, operation in operations(snapshot):
        where = f"{method} {path}"
        assert re.fullmatch(r"[a-z]+[A-Za-z]*", operation.get("operationId", "")), where
        ids.append(operation["operationId"])
        assert operation.get("tags"), where
        assert operation.get("summary"), where
        assert operation.get("description"), where
        assert {"$ref": "#/components/parameters/X-Request-ID"} in operation["parameters"], where
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    assert set(ids) >= {
        "submitJob", "getJob", "listJobs", "cancelJob", "retryJob", "listDeadLetters", "replayDeadLetters",
        "purgeDeadLetters", "getQueueStats", "getHealth", "getReadiness", "getProblemType",
    }  # fmt: skip


def test_every_response_is_documented_with_its_request_id(snapshot: dict[str, Any]) -> None:
    for method, path, operation in operations(snapshot):
        responses = operation["responses"]
        where = f"{method} {path}"
        assert "default" not in responses, where
        assert "500" not in responses, where
        assert any(status.startswith("2") for status in responses), where
        for status, response in responses.items():
            assert response["headers"]["X-Request-ID"] == {"$ref": "#/components/headers/X-Request-ID"}
            if status.startswith(("4", "5")):
                content = response["content"]
                assert list(content) == ["application/problem+json"], f"{where} {status}"
                assert content["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }
            else:
                assert list(response.get("content", {})) in ([], ["application/json"]), f"{where} {status}"


def test_every_v1_operation_needs_a_key_and_documents_refusals(snapshot: dict[str, Any]) -> None:
    assert snapshot["security"] == [{"bearerAuth": []}]
    for method, path, operation in operations(snapshot):
        statuses = set(operation["responses"])
        if path.startswith("/v1/"):
            assert "security" not in operation, f"{method} {path} overrides the global security"
            assert {"401", "403", "503"} <= statuses, f"{method} {path}"
        else:
            assert operation["security"] == [], f"{method} {path} is open"
        if "requestBody" in operation:
            assert {"400", "413", "415", "422"} <= statuses, f"{method} {path}"


def test_no_schema_is_anonymous_where_a_model_would_be_generated(snapshot: dict[str, Any]) -> None:
    """Request and response bodies are named schemas, so every generator names their classes alike."""
    for method, path, operation in operations(snapshot):
        bodies = [operation.get("requestBody", {}), *operation["responses"].values()]
        for body in bodies:
            for media in body.get("content", {}).values():
                assert set(media["schema"]) == {"$ref"}, f"{method} {path}: inline schema {media['schema']}"


def test_every_problem_type_resolves_to_a_section_of_the_api_docs() -> None:
    headings = set(re.findall(r"^### ([a-z-]+)$", (ROOT / "docs" / "api.md").read_text(), re.MULTILINE))
    assert set(CATALOG) <= headings, f"no section in docs/api.md for {sorted(set(CATALOG) - headings)}"


def test_every_operation_id_is_listed_in_the_api_docs(snapshot: dict[str, Any]) -> None:
    listed = set(
        re.findall(r"^\| `(\w+)` \| `[A-Z]+ /", (ROOT / "docs" / "api.md").read_text(), re.MULTILINE)
    )
    assert {operation["operationId"] for _, _, operation in operations(snapshot)} == listed


def _examples(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every (where, schema, example) pair of the document: media types, parameters and schemas."""
    if isinstance(node, dict):
        schema = node.get("schema")
        if isinstance(schema, dict):
            if "example" in node:
                yield path, schema, node["example"]
            for name, example in (node.get("examples") or {}).items():
                if "value" in example:
                    yield f"{path}/examples/{name}", schema, example["value"]
        for key, value in node.items():
            yield from _examples(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _examples(value, f"{path}/{index}")


def oas30_errors(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    """What openapi-schema-validator (the validator of openapi-core) finds wrong with ``instance``."""
    from openapi_schema_validator import OAS30Validator

    validator = OAS30Validator({**schema, "components": document["components"]})
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def test_every_example_is_valid_under_openapi_30_semantics(snapshot: dict[str, Any]) -> None:
    """Generators and validators read `nullable` strictly: with `allOf: [$ref]` it did not admit null,
    and every example of a queued job (`"error": null`) was invalid against its own document."""
    found = list(_examples(snapshot["paths"])) + list(_examples(snapshot["components"].get("responses", {})))
    assert len(found) > 50, "the walk finds the document's examples"
    invalid = {
        where: errors
        for where, schema, example in found
        if (errors := oas30_errors(snapshot, schema, example))
    }
    assert not invalid, json.dumps(invalid, indent=1)[:3000]


def test_response_schemas_let_fields_be_added(snapshot: dict[str, Any]) -> None:
    """api.md promises that responses may gain fields within /v1; `additionalProperties: false` made
    generated clients (openapi-generator's Java client) throw on the first new field."""
    schemas = snapshot["components"]["schemas"]
    responses = {
        ref.rsplit("/", 1)[1]
        for ref in re.findall(r'"\$ref": "(#/components/schemas/[^"]+)"', json.dumps(snapshot["paths"]))
    }
    requests = {
        "JobCreate",
        "JobBatch",
        "JobBatchItem",
        "DeadLetterSelection",
        "NoopPayload",
        "DemoSleepPayload",
    }
    closed = sorted(
        name for name, schema in schemas.items()
        if name not in requests and schema.get("type") == "object"
        and schema.get("additionalProperties") is not True
    )  # fmt: skip
    assert "Job" in responses
    assert not closed, f"response schemas closed to new fields: {closed}"
    assert all(schemas[name].get("additionalProperties") is False for name in requests), (
        "requests stay strict"
    )
