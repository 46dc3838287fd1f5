"""The OpenAPI document tells the truth about the REST API (issue 18): every constraint the server
enforces on a parameter is in the schema, every status a route answers is documented, error bodies are
problem+json, and a method a path does not take is a 405 with an ``Allow`` listing the ones it does.

These are the fast, pinned forms of what ``tests/integration/test_controlplane_schemathesis.py`` finds
by generating requests; they also hold new routes to the same contract (every path parameter declares
a pattern: take it from ``services/controlplane/params.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.settings import ControlPlaneSettings
from services.common.store import LocalStore
from services.controlplane.app import create_app
from services.controlplane.domain.errors import InvalidRequest
from services.controlplane.domain.names import validate_digest, validate_name
from services.controlplane.problems import PROBLEM_BASE
from tests.doubles import IdleExecutor

TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V0 = "0" * 64


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = ControlPlaneSettings(
        tokens=[hashlib.sha256(TOKEN.encode()).hexdigest()], work_dir=tmp_path / "work"
    )
    return TestClient(create_app(settings, LocalStore(tmp_path / "store"), IdleExecutor(), background=False))


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/openapi.json").json()
    return body


def problem(r: Any, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == PROBLEM_BASE + kind
    return body


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def test_a_wrong_method_is_405_with_every_method_the_path_takes(client: TestClient) -> None:
    # Starlette named only the first route whose path matched: Allow: GET, with DELETE missing.
    r = client.put("/v1/datasets/cats", headers=AUTH)
    problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "DELETE, GET"
    assert client.options("/v1/fine-tunes/ft-1", headers=AUTH).headers["allow"] == "DELETE, GET"
    assert client.post("/v1/objects/a/b.mp4").headers["allow"] == "GET, PUT"
    # `score` is the path of PUT …/ratings/score, not a rating id (DELETE …/ratings/{rating_id})
    r = client.delete("/v1/datasets/cats/ratings/score", headers=AUTH)
    problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "PUT"
    # a rating id the API issued still reaches DELETE (404: there is no such rating)
    problem(client.delete("/v1/datasets/cats/ratings/r-0123", headers=AUTH), 404, "not-found")


def test_every_path_parameter_declares_its_pattern(spec: dict[str, Any]) -> None:
    missing = [
        f"{method} {path} {p['name']}"
        for method, path, op in operations(spec)
        for p in op.get("parameters", [])
        if p["in"] == "path"
        and "pattern" not in p["schema"]
        and not (p["schema"].get("type") == "integer" and {"minimum", "maximum"} <= set(p["schema"]))
    ]
    assert missing == [], "declare the server's constraint: use a type of services/controlplane/params.py"
    names = spec["paths"]["/v1/datasets/{name}"]["get"]["parameters"][0]["schema"]
    assert names["pattern"] == "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" and names["maxLength"] == 63
    tokens = [
        (path, '"pattern"' in json.dumps(p["schema"]))
        for method, path, op in operations(spec)
        for p in op.get("parameters", [])
        if p["name"] == "page_token"
    ]
    assert tokens and all(has for _, has in tokens), tokens


def test_every_status_the_shared_machinery_answers_is_documented(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        documented = set(op["responses"])
        params = op.get("parameters", [])
        if params or "requestBody" in op:
            assert "422" in documented, (method, path)
        if any(p["in"] == "path" for p in params):
            assert "404" in documented, (method, path)
        if "application/json" in op.get("requestBody", {}).get("content", {}):
            assert {"400", "413", "415"} <= documented, (method, path)  # malformed, too large, not JSON
        if path.startswith("/v1/") and path != "/v1/whoami":
            assert "503" in documented, (method, path)  # the store is unavailable
    assert "409" in spec["paths"]["/v1/fine-tunes"]["post"]["responses"]
    assert "409" in spec["paths"]["/v1/datasets/{name}/ratings/compile"]["post"]["responses"]
    assert "429" in spec["paths"]["/v1/fine-tunes/{finetune_id}/logs"]["get"]["responses"]


def test_errors_are_documented_as_problem_json(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and "application/problem+json" in response.get("content", {}):
                content = response["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)
                assert content["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 shape, never sent


def test_a_body_naming_a_version_the_dataset_lacks_is_422_naming_the_field(client: TestClient) -> None:
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    derived = client.post("/v1/datasets/cats/derive", json={"base": V0}, headers=AUTH)
    assert problem(derived, 422, "validation-error")["field"] == "base"
    score = {"version": V0, "video_id": "p0_v0", "score": 5}
    put = client.put("/v1/datasets/cats/ratings/score", json=score, headers=AUTH)
    assert problem(put, 422, "validation-error")["field"] == "version"
    compiled = client.post("/v1/datasets/cats/ratings/compile", json={"base": V0}, headers=AUTH)
    assert problem(compiled, 422, "validation-error")["field"] == "base"
    # the dataset itself missing stays a 404
    problem(client.post("/v1/datasets/dogs/derive", json={"base": V0}, headers=AUTH), 404, "not-found")


def test_compiling_ratings_of_a_dataset_without_versions_is_a_conflict(client: TestClient) -> None:
    assert client.post("/v1/datasets", json={"name": "cats"}, headers=AUTH).status_code == 201
    body = problem(client.post("/v1/datasets/cats/ratings/compile", headers=AUTH), 409, "conflict")
    assert "no version yet" in body["detail"]


def test_true_or_false_is_not_a_number(client: TestClient) -> None:
    # pydantic's lax mode read false as 0; the schema says integer
    r = client.put(
        "/v1/rollouts/web?create=true", json={"checkpoint": "base", "expected_revision": False}, headers=AUTH
    )
    assert problem(r, 422, "validation-error")["field"] == "expected_revision"
    # a canary is a checkpoint: "base" (the base model, fine as `current`) breaks its pattern
    canary = client.post("/v1/rollouts/web/canary", json={"checkpoint": "base", "percent": 10}, headers=AUTH)
    assert problem(canary, 422, "validation-error")["errors"][0]["field"] == "checkpoint"
    ok = client.put(
        "/v1/rollouts/web?create=true", json={"checkpoint": "base", "expected_revision": 0}, headers=AUTH
    )
    assert ok.status_code == 200, ok.text


def test_a_page_token_of_another_form_is_a_documented_422(client: TestClient) -> None:
    body = problem(
        client.get("/v1/datasets", params={"page_token": "not/a token"}, headers=AUTH),
        422,
        "validation-error",
    )
    assert body["field"] == "query:page_token"
    made_up = client.get("/v1/datasets", params={"page_token": "abcd"}, headers=AUTH)
    assert problem(made_up, 422, "validation-error")["field"] == "page_token"


@pytest.mark.parametrize("check", [validate_name, validate_digest])
def test_a_trailing_newline_is_not_part_of_a_valid_name(check: Any) -> None:
    # Python's `$` matches before a final newline: "cats\n" passed and reached the store's key check
    good = "cats" if check is validate_name else V0
    assert check(good)
    with pytest.raises(InvalidRequest):
        check(good + "\n")


def _patterns(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


def test_every_pattern_the_schema_declares_has_its_form_in_words(spec: dict[str, Any]) -> None:
    from services.controlplane.forms import FORMS

    patterns = _patterns(spec)
    assert len(patterns) >= 10  # the walk found the document's patterns
    assert sorted(patterns - set(FORMS)) == []


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "words", "sent"),
    [
        (
            "post",
            "/v1/evaluations",
            {"checkpoint": "bad one"},
            "checkpoint",
            "a checkpoint id, ckpt-",
            "'bad one'",
        ),
        ("get", "/v1/checkpoints/nope", None, "path:checkpoint_id", "a checkpoint id, ckpt-", "'nope'"),
        ("post", "/v1/datasets", {"name": "Bad Name!"}, "name", "1-63 characters of a-z", "'Bad Name!'"),
        ("get", "/v1/datasets/cats/versions/v1", None, "path:version", "its id (64 lower-case hex", "'v1'"),
    ],
)
def test_a_value_outside_a_pattern_is_told_the_form_in_words_not_the_regex(
    client: TestClient, method: str, path: str, body: Any, field: str, words: str, sent: str
) -> None:
    r = client.request(method.upper(), path, headers=AUTH, json=body)
    p = problem(r, 422, InvalidRequest.kind)
    assert p["field"] == field
    assert (
        p["detail"].startswith(f"{field}: expected ") and words in p["detail"] and p["detail"].endswith(sent)
    )
    assert "pattern" not in p["detail"] and "^" not in p["detail"]


def test_a_long_value_is_echoed_cut_short(client: TestClient) -> None:
    r = client.get("/v1/datasets/cats/versions/" + "X" * 60 + "Y" * 200, headers=AUTH)
    detail = problem(r, 422, InvalidRequest.kind)["detail"]
    assert "Y" * 10 not in detail and detail.endswith("…")
