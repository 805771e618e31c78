"""The OpenAPI document is generated from the app's routes: every /api/v1 route is in it (drift is impossible), a
new route appears by itself, and the declared schemas describe what the API really answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import schemathesis
from flask import Blueprint, Flask, jsonify
from realservices import Api

from web.auth import require_api_key
from web.openapi import spec


def _document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.is_json
    return response.get_json()  # type: ignore[no-any-return]


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def test_every_api_route_is_documented(app: Flask) -> None:
    """Each rule under /api/v1 in app.url_map, with each of its methods, is an operation of the document."""
    paths = _document(app)["paths"]
    rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")]
    assert len(rules) >= 12
    for rule in rules:
        path = _openapi_path(rule.rule)
        assert path in paths, f"{rule.rule} is not in the OpenAPI document"
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            operation = paths[path][method.lower()]
            assert operation["summary"] and operation["operationId"], (rule.rule, method)
            view = app.view_functions[rule.endpoint]
            assert operation["summary"] == (view.__doc__ or "").strip().splitlines()[0].strip()
            secured = getattr(view, "requires_api_key", False)
            assert operation["security"] == ([{"bearer": []}] if secured else []), rule.rule
            assert ("401" in operation["responses"]) == bool(secured) and "429" in operation["responses"]
    documented = {(p, m) for p, ops in paths.items() for m in ops if m != "parameters" and p.startswith("/api/")}
    assert documented == {(_openapi_path(r.rule), m.lower()) for r in rules
                          for m in (r.methods or set()) - {"HEAD", "OPTIONS"}}, "no operation without a route"


def test_a_new_route_appears_without_editing_the_generator(settings: Any) -> None:
    """A blueprint added to the API is documented from its rule and docstring alone: typed path parameters, Bearer
    security, 401/404/429, and a generic answer since it declares no schema."""
    from web import create_app

    app = create_app(settings, {"TESTING": True})
    extra = Blueprint("extra", __name__, url_prefix="/api/v1")

    @extra.post("/jobs/<job_id>/things/<int:number>")
    @require_api_key
    def add_thing(job_id: str, number: int):  # type: ignore[no-untyped-def]
        """Add a thing to a job.

        A longer description on the following lines.
        """
        return jsonify({})

    app.register_blueprint(extra)
    operation = spec(app)["paths"]["/api/v1/jobs/{job_id}/things/{number}"]
    parameters = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert parameters == {"job_id": {"type": "string"}, "number": {"type": "integer", "minimum": 0}}
    post = operation["post"]
    assert post["summary"] == "Add a thing to a job." and post["description"] == "A longer description on the " \
        "following lines."
    assert post["operationId"] == "extra.add_thing" and post["security"] == [{"bearer": []}]
    assert set(post["responses"]) == {"default", "401", "404", "429"}


def test_the_document_loads_in_schemathesis(app: Flask) -> None:
    """The fuzz test's loader reads every operation of the document without an error."""
    schema = schemathesis.openapi.from_dict(_document(app))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14


def _validator(document: dict[str, Any], path: str, method: str, status: str = "200") -> Any:
    """A JSON Schema validator of one documented answer (its $refs resolved in the document)."""
    schema = document["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    nullable_aware = _nullable_to_json_schema({**schema, "components": document["components"]})
    return jsonschema.Draft7Validator(nullable_aware)


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema's type list (what jsonschema understands)."""
    if isinstance(node, dict):
        out = {k: _nullable_to_json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_nullable_to_json_schema(v) for v in node]
    return node


def test_declared_schemas_match_real_answers(app: Flask, api: Api, jpeg: Callable[..., bytes]) -> None:
    """The answers of the main operations validate against their documented schemas (and a wrong answer would
    not: the job schema requires its counts)."""
    document = _document(app)
    created = api.submit([("a.jpg", jpeg(1)), ("b.jpg", jpeg(2))])
    assert created.status_code == 202
    _validator(document, "/api/v1/jobs", "post", "202").validate(created.get_json())
    job_id = created.get_json()["id"]
    checks = [("/api/v1/jobs", "/api/v1/jobs"), ("/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}"),
              ("/api/v1/jobs/{job_id}/results", f"/api/v1/jobs/{job_id}/results"),
              ("/api/v1/models", "/api/v1/models"), ("/api/v1/rescore-runs", "/api/v1/rescore-runs")]
    for documented, real in checks:
        response = api.get(real)
        assert response.status_code == 200, (real, response.get_data(as_text=True)[:300])
        _validator(document, documented, "get").validate(response.get_json())
    missing_counts = {k: v for k, v in api.get(f"/api/v1/jobs/{job_id}").get_json().items() if k != "counts"}
    with pytest.raises(jsonschema.ValidationError):
        _validator(document, "/api/v1/jobs/{job_id}", "get").validate(missing_counts)
    error = api.get("/api/v1/jobs/nope")
    assert error.status_code == 404
    _validator(document, "/api/v1/jobs/{job_id}", "get", "404").validate(error.get_json())
