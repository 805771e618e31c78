"""The OpenAPI 3.0 document of the JSON API (served at /api/v1/openapi.json), generated from the app's routes.

Every rule of the app's url_map under /api/ (and the health checks) becomes an operation: its path with typed path
parameters, its methods, the summary and description from the view's docstring, Bearer security when the view
uses `web.auth.require_api_key`, 401/404/429 where those can answer, and what the view declares with `doc`
(marshmallow schemas of its query, body and answer, its success status and its other error statuses). A new
route therefore appears without editing this module; a route without `doc` is documented with a generic answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema
from werkzeug.routing import Rule

from skinscan import __version__
from web.api_schemas import ErrorSchema

F = TypeVar("F", bound=Callable[..., Any])
SchemaRef = type[Schema] | Schema
HEALTH_PATHS = ("/healthz", "/readyz")
_CONVERTERS: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "minimum": 0},
    "float": {"type": "number", "minimum": 0},
    "uuid": {"type": "string", "format": "uuid"},
    "path": {"type": "string"},
}
_ARGUMENT = re.compile(r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^>]*\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>")


@dataclass(frozen=True)
class Operation:
    """What a view declares about itself for the document (everything else comes from its route)."""

    response: SchemaRef | None = None
    status: int = 200
    description: str | None = None  # of the success answer
    query: SchemaRef | None = None
    form: SchemaRef | None = None  # a multipart/form-data body
    form_required: bool = True
    errors: tuple[int, ...] = ()
    csv: bool = False  # the success answer may also be text/csv (?format=csv)
    also: tuple[tuple[int, str], ...] = ()  # other success answers with the same schema: (status, description)


def doc(response: SchemaRef | None = None, *, status: int = 200, description: str | None = None,
        query: SchemaRef | None = None, form: SchemaRef | None = None, form_required: bool = True,
        errors: Iterable[int] = (), csv: bool = False, also: Iterable[tuple[int, str]] = ()) -> Callable[[F], F]:
    """Decorate a view with the schemas and statuses its operation answers (read by `spec`)."""

    def mark(view: F) -> F:
        declared = Operation(response, status, description, query, form, form_required, tuple(sorted(set(errors))),
                             csv, tuple(also))
        view.openapi = declared  # type: ignore[attr-defined]
        return view

    return mark


def _openapi_path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """Rule '/jobs/<job_id>' -> ('/jobs/{job_id}', [its path parameter]), typed from the rule's converters."""
    parameters = []
    for match in _ARGUMENT.finditer(rule.rule):
        schema = _CONVERTERS.get(match["converter"] or "default", {"type": "string"})
        parameters.append({"name": match["name"], "in": "path", "required": True, "schema": dict(schema)})
    return _ARGUMENT.sub(lambda m: "{" + m["name"] + "}", rule.rule), parameters


def _docstring(view: Callable[..., Any]) -> tuple[str, str | None]:
    lines = (view.__doc__ or "").strip().splitlines()
    summary = lines[0].strip() if lines else view.__name__.replace("_", " ")
    rest = " ".join(line.strip() for line in lines[1:]).strip()
    return summary, rest or None


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ErrorSchema}}}


ERROR_DESCRIPTIONS = {
    400: "bad request (the message says which input)", 401: "missing or invalid API key",
    404: "not found (also another clinic's object)", 409: "conflicts with the object's state",
    413: "upload too large (the message names the limit)", 415: "unsupported file type",
    429: "rate limit exceeded (Retry-After says when to retry)", 503: "a service is unavailable; retry later",
}


def _operation(view: Callable[..., Any], rule: Rule, method: str, has_path_parameters: bool) -> dict[str, Any]:
    declared: Operation | None = getattr(view, "openapi", None)
    secured = bool(getattr(view, "requires_api_key", False))
    summary, description = _docstring(view)
    operation: dict[str, Any] = {"summary": summary, "tags": [rule.endpoint.split(".")[0]],
                                 "security": [{"bearer": []}] if secured else []}
    if description:
        operation["description"] = description
    errors = set(declared.errors if declared else ())
    if secured:
        errors.add(401)
    if has_path_parameters:
        errors.add(404)
    if rule.rule.startswith("/api/"):
        errors.add(429)
    responses: dict[str, Any] = {}
    if declared is None:  # nothing declared: any answer, documented by the summary
        responses["default"] = {"description": "see the summary (this route declares no schema)"}
    else:
        content: dict[str, Any] = {}
        if declared.response is not None:
            content["application/json"] = {"schema": declared.response}
        if declared.csv:
            content["text/csv"] = {"schema": {"type": "string"}}
        ok: dict[str, Any] = {"description": declared.description or summary}
        if content:
            ok["content"] = content
        responses[str(declared.status)] = ok
        for code, text in declared.also:
            responses[str(code)] = {**ok, "description": text}
        if declared.query is not None:
            operation["parameters"] = [{"in": "query", "schema": declared.query}]
        if declared.form is not None and method in ("POST", "PUT", "PATCH"):
            operation["requestBody"] = {"required": declared.form_required,
                                        "content": {"multipart/form-data": {"schema": declared.form}}}
    for code in sorted(errors):
        responses[str(code)] = _error(ERROR_DESCRIPTIONS.get(code, "error"))
    operation["responses"] = responses
    return operation


def documented_rules(app: Flask) -> list[Rule]:
    """The rules the document covers: every rule under /api/ and the health checks."""
    return [rule for rule in app.url_map.iter_rules()
            if rule.rule.startswith("/api/") or rule.rule in HEALTH_PATHS]


def build(app: Flask) -> dict[str, Any]:
    """Generate the OpenAPI document from the app's url_map and the views' declarations."""
    spec = APISpec(
        title="SkinScan API", version=__version__, openapi_version="3.0.3", plugins=[MarshmallowPlugin()],
        info={"description": "Batch scoring of dermoscopic images. Decision support only: not a medical device."},
        servers=[{"url": "/"}],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("Error", schema=ErrorSchema)
    operation_ids: set[str] = set()
    paths: dict[str, dict[str, Any]] = {}
    path_parameters: dict[str, list[dict[str, Any]]] = {}
    for rule in sorted(documented_rules(app), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        path, parameters = _openapi_path(rule)
        path_parameters[path] = parameters
        methods = sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        for method in methods:
            operation = _operation(view, rule, method, bool(parameters))
            operation_id = rule.endpoint if len(methods) == 1 else f"{rule.endpoint}.{method.lower()}"
            while operation_id in operation_ids:
                operation_id += "_"
            operation_ids.add(operation_id)
            operation["operationId"] = operation_id
            paths.setdefault(path, {})[method.lower()] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations, parameters=path_parameters[path] or None)
    return spec.to_dict()


def spec(app: Flask) -> dict[str, Any]:
    """Return the app's OpenAPI document (built once per app)."""
    document = app.extensions.get("skinscan.openapi")
    if document is None:
        document = app.extensions["skinscan.openapi"] = build(app)
    return document  # type: ignore[no-any-return]
