"""The OpenAPI 3.0 document of the JSON API (served at /api/v1/openapi.json)."""

from __future__ import annotations

from typing import Any

from skinscan import __version__
from skinscan.labels import CLASSES

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERROR for c in codes}


def _job_path_param() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}


def spec() -> dict[str, Any]:
    """Return the OpenAPI document."""
    from web import api_model_versions

    probs = {"type": "object", "properties": {c: {"type": "number"} for c in CLASSES}, "nullable": True}
    upload_body = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "JPEG, PNG, BMP or TIFF images, or .zip archives of them"},
                    "labels": {"type": "string", "format": "binary",
                               "description": "optional ground truth: HAM10000 metadata CSV or ISIC CSV"},
                    "finalize": {"type": "string", "enum": ["true", "false"],
                                 "description": "false keeps the job open for more parts (POST .../images)"},
                },
                "required": ["files"],
            }
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "SkinScan API", "version": __version__,
            "description": "Batch scoring of dermoscopic images. Decision support only: not a medical device.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"],
                          "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                         "details": {"type": "array", "items": {"type": "object"}}}},
                "Job": {
                    "type": "object",
                    "required": ["id", "status", "counts", "progress"],
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"type": "string", "enum": ["uploading", "queued", "running", "done", "failed"]},
                        "kind": {"type": "string"},
                        "counts": {"type": "object", "properties": {
                            "total": {"type": "integer"}, "scored": {"type": "integer"},
                            "failed": {"type": "integer"}}},
                        "progress": {"type": "number", "minimum": 0, "maximum": 1},
                        "model_version": {"type": "string", "nullable": True},
                        "created_at": {"type": "string", "nullable": True},
                        "started_at": {"type": "string", "nullable": True},
                        "finished_at": {"type": "string", "nullable": True},
                        "has_labels": {"type": "boolean"},
                        "error": {"type": "string", "nullable": True},
                        "status_url": {"type": "string"},
                    },
                },
                "Result": {
                    "type": "object",
                    "properties": {
                        "image_id": {"type": "string"}, "filename": {"type": "string"},
                        "status": {"type": "string", "enum": ["pending", "scored", "failed"]},
                        "predicted_label": {"type": "string", "nullable": True},
                        "probabilities": probs,
                        "confidence": {"type": "number", "nullable": True},
                        "malignancy_score": {"type": "number", "nullable": True},
                        "flagged": {"type": "boolean", "nullable": True},
                        "model_version": {"type": "string", "nullable": True},
                        "true_label": {"type": "string", "nullable": True},
                        "error": {"type": "string", "nullable": True},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/jobs": {
                "post": {
                    "summary": "Submit a batch of images", "operationId": "createJob",
                    "requestBody": {"required": True, "content": upload_body},
                    "responses": {"202": {"description": "job created and queued", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                        **_errors(400, 401, 413, 415, 429, 503)},
                },
                "get": {
                    "summary": "The clinic's jobs, newest first", "operationId": "listJobs",
                    "parameters": [
                        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                        {"name": "per_page", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                    ],
                    "responses": {"200": {"description": "a page of jobs", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "page": {"type": "integer"}, "per_page": {"type": "integer"},
                            "total": {"type": "integer"},
                            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}}}}},
                        **_errors(400, 401, 429)},
                },
            },
            "/api/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Job status and progress", "operationId": "getJob",
                    "parameters": [_job_path_param()],
                    "responses": {"200": {"description": "the job", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                        **_errors(401, 404, 429)},
                }
            },
            "/api/v1/jobs/{job_id}/images": {
                "post": {
                    "summary": "Add a part of images to an uploading job", "operationId": "addImages",
                    "parameters": [_job_path_param()],
                    "requestBody": {"required": True, "content": upload_body},
                    "responses": {"202": {"description": "images added"},
                                  **_errors(400, 401, 404, 409, 413, 415, 429, 503)},
                }
            },
            "/api/v1/jobs/{job_id}/start": {
                "post": {
                    "summary": "Queue an uploading job", "operationId": "startJob",
                    "parameters": [_job_path_param()],
                    "responses": {"202": {"description": "queued"}, **_errors(400, 401, 404, 409, 413, 429)},
                }
            },
            "/api/v1/jobs/{job_id}/results": {
                "get": {
                    "summary": "Per-image results (JSON, or CSV with format=csv)", "operationId": "getResults",
                    "parameters": [
                        _job_path_param(),
                        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "history", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {"200": {"description": "results", "content": {
                        "application/json": {"schema": {"type": "object", "properties": {
                            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}}}}},
                        "text/csv": {"schema": {"type": "string"}}}},
                        **_errors(400, 401, 404, 429)},
                }
            },
            "/api/v1/jobs/{job_id}/metrics": {
                "get": {
                    "summary": "Job metrics", "operationId": "getMetrics",
                    "parameters": [_job_path_param()],
                    "responses": {"200": {"description": "metrics", "content": {
                        "application/json": {"schema": {"type": "object"}}}}, **_errors(401, 404, 409, 429)},
                }
            },
            **api_model_versions.openapi_paths(),
            "/healthz": {"get": {"summary": "Liveness", "security": [], "operationId": "healthz",
                                 "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness", "security": [], "operationId": "readyz",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        },
    }
