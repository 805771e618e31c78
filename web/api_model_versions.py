"""API for the model registry and re-scoring: models, re-score runs with progress, and the change report."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from skinscan import audit
from skinscan.changes import change_rows, iter_changes_csv, latest_run
from skinscan.registry import list_models, model_summary
from skinscan.rescore_runs import list_runs, run_summary
from skinscan.tables import RescoreRun
from web.auth import require_api_key
from web.context import db
from web.errors import ApiError

log = logging.getLogger(__name__)
bp = Blueprint("api_models", __name__, url_prefix="/api/v1")


@bp.get("/models")
@require_api_key
def models():  # type: ignore[no-untyped-def]
    """Registered model versions, oldest first; `production` names the one that scores new jobs."""
    rows = [model_summary(m) for m in list_models(db())]
    current = next((r["version"] for r in rows if r["in_production"]), None)
    return jsonify({"production": current, "models": rows})


def _run_for_clinic(raw: str | None) -> RescoreRun:
    """The run named by ?run=ID if it covered the signed-in clinic, else the clinic's newest finished run."""
    session = db()
    if raw is None:
        run = latest_run(session, g.clinic.id)
        if run is None:
            raise ApiError("no re-score has finished for this clinic yet", 404)
        return run
    try:
        run_id = int(raw)
    except ValueError:
        raise ApiError("query parameter 'run' must be a run id (a whole number)", 400) from None
    run = session.get(RescoreRun, run_id) if 0 < run_id < 2**31 else None
    if run is None or run.clinic_id not in (None, g.clinic.id):
        raise ApiError("re-score run not found", 404)
    return run


@bp.get("/rescore-runs")
@require_api_key
def rescore_runs():  # type: ignore[no-untyped-def]
    """The newest re-score runs that covered the clinic's images, with progress counted for this clinic."""
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise ApiError("query parameter 'limit' must be a whole number", 400) from None
    if not 1 <= limit <= 100:
        raise ApiError("query parameter 'limit' must be between 1 and 100", 400)
    session = db()
    runs = [run_summary(session, r, g.clinic.id) for r in list_runs(session, g.clinic.id, limit)]
    return jsonify({"runs": runs})


@bp.get("/rescore-runs/<int:run_id>")
@require_api_key
def rescore_run(run_id: int):  # type: ignore[no-untyped-def]
    """One re-score run's progress and summary, counted for this clinic."""
    run = _run_for_clinic(str(run_id))
    return jsonify(run_summary(db(), run, g.clinic.id))


@bp.get("/changes")
@require_api_key
def changes():  # type: ignore[no-untyped-def]
    """The clinic's change report of a run (?run=ID, default the newest finished): newly flagged first."""
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError("format must be json or csv", 400)
    run = _run_for_clinic(request.args.get("run"))
    session = db()
    rows = change_rows(session, run, g.clinic.id)
    audit.record(session, "changes.export" if fmt == "csv" else "changes.view", g.actor, g.clinic.id,
                 "rescore_run", str(run.id), {"format": fmt, "rows": len(rows)})
    summary = run_summary(session, run, g.clinic.id)
    session.commit()
    if fmt == "csv":
        response = Response(stream_with_context(iter_changes_csv(rows)), mimetype="text/csv")
        response.headers["Content-Disposition"] = f'attachment; filename="skinscan-changes-run{run.id}.csv"'
        return response
    return jsonify({"run": summary, "changes": rows})


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path items of this blueprint (merged into web.openapi.spec)."""
    schema = {"$ref": "#/components/schemas/Error"}
    error = {"description": "error", "content": {"application/json": {"schema": schema}}}

    def errors(*codes: int) -> dict[str, Any]:
        return {str(c): error for c in codes}

    def ok(description: str, schema: dict[str, Any], csv: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {"application/json": {"schema": schema}}
        if csv:
            content["text/csv"] = {"schema": {"type": "string"}}
        return {"200": {"description": description, "content": content}}

    nullable_str = {"type": "string", "nullable": True}
    model = {"type": "object", "properties": {
        "version": {"type": "string"}, "status": {"type": "string", "enum": ["registered", "production", "retired"]},
        "in_production": {"type": "boolean"}, "architecture": {"type": "string"}, "checksum": {"type": "string"},
        "classes": {"type": "array", "items": {"type": "string"}}, "input_size": {"type": "integer"},
        "referral": {"type": "object", "nullable": True}, "registered_at": {"type": "string"},
        "promoted_at": nullable_str}}
    run = {"type": "object", "properties": {
        "id": {"type": "integer"}, "status": {"type": "string", "enum": ["running", "done", "superseded"]},
        "model_from": nullable_str, "model_to": {"type": "string"},
        "scope": {"type": "object", "properties": {"clinic": {"type": "boolean"}, "since": nullable_str}},
        "images": {"type": "integer"}, "done": {"type": "integer"}, "failed": {"type": "integer"},
        "progress": {"type": "number", "minimum": 0, "maximum": 1}, "changed": {"type": "integer"},
        "flagged": {"type": "integer", "description": "images newly flagged for referral by the new model"},
        "started_at": {"type": "string"}, "finished_at": nullable_str,
        "duration_s": {"type": "number", "nullable": True}}}
    change = {"type": "object", "properties": {
        "image_id": {"type": "string"}, "job_id": {"type": "string"}, "filename": {"type": "string"},
        "change": {"type": "string", "enum": ["newly_flagged", "no_longer_flagged", "label_changed"]},
        "previous_model": {"type": "string"}, "previous_label": {"type": "string"},
        "previous_malignancy": {"type": "number"}, "previous_flagged": {"type": "boolean"},
        "new_model": {"type": "string"}, "new_label": {"type": "string"}, "new_malignancy": {"type": "number"},
        "new_flagged": {"type": "boolean"}, "true_label": nullable_str}}
    run_param = {"name": "run", "in": "query", "schema": {"type": "integer", "minimum": 1},
                 "description": "run id (default: the clinic's newest finished run)"}
    return {
        "/api/v1/models": {"get": {
            "summary": "Registered model versions and the one in production", "operationId": "listModels",
            "responses": {**ok("models", {"type": "object", "properties": {
                "production": nullable_str, "models": {"type": "array", "items": model}}}),
                **errors(401, 429)}}},
        "/api/v1/rescore-runs": {"get": {
            "summary": "Re-score runs with progress, counted for the clinic", "operationId": "listRescoreRuns",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100}}],
            "responses": {**ok("runs", {"type": "object", "properties": {
                "runs": {"type": "array", "items": run}}}), **errors(400, 401, 429)}}},
        "/api/v1/rescore-runs/{run_id}": {"get": {
            "summary": "One re-score run", "operationId": "getRescoreRun",
            "parameters": [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {**ok("the run", run), **errors(401, 404, 429)}}},
        "/api/v1/changes": {"get": {
            "summary": "Change report of a re-score: images whose class or referral flag changed, newly "
                       "flagged first (JSON, or CSV with format=csv)", "operationId": "getChanges",
            "parameters": [run_param, {"name": "format", "in": "query",
                                       "schema": {"type": "string", "enum": ["json", "csv"]}}],
            "responses": {**ok("the change report", {"type": "object", "properties": {
                "run": run, "changes": {"type": "array", "items": change}}}, csv=True),
                **errors(400, 401, 404, 429)}}},
    }
