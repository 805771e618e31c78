"""API for the model registry and re-scoring: models, re-score runs with progress, and the change report."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from skinscan import audit
from skinscan.changes import (
    PAGE_DEFAULT,
    PAGE_MAX,
    CursorError,
    Position,
    change_page,
    iter_change_rows,
    iter_changes_csv,
    latest_run,
)
from skinscan.model.registry import list_models, model_summary
from skinscan.rescore_runs import list_runs, run_summaries, run_summary
from skinscan.tables import RescoreRun
from web.api_schemas import (
    ChangeReportSchema,
    ChangesQuery,
    ModelListSchema,
    RescoreRunListSchema,
    RescoreRunSchema,
    RescoreRunsQuery,
)
from web.auth import require_api_key
from web.context import db
from web.errors import ApiError
from web.openapi import doc

log = logging.getLogger(__name__)
bp = Blueprint("api_models", __name__, url_prefix="/api/v1")


@bp.get("/models")
@doc(ModelListSchema)
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
@doc(RescoreRunListSchema, query=RescoreRunsQuery, errors=(400,))
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
    return jsonify({"runs": run_summaries(session, list_runs(session, g.clinic.id, limit), g.clinic.id)})


@bp.get("/rescore-runs/<int:run_id>")
@doc(RescoreRunSchema)
@require_api_key
def rescore_run(run_id: int):  # type: ignore[no-untyped-def]
    """One re-score run's progress and summary, counted for this clinic."""
    run = _run_for_clinic(str(run_id))
    return jsonify(run_summary(db(), run, g.clinic.id))


@bp.get("/changes")
@doc(ChangeReportSchema, query=ChangesQuery, csv=True, errors=(400, 404))
@require_api_key
def changes():  # type: ignore[no-untyped-def]
    """The clinic's change report of a run (?run=ID, default the newest finished): newly flagged first.

    JSON comes a page at a time (?limit=, default 100, at most 1000; ?cursor= from the previous page's
    next_cursor); CSV streams the whole report, read a page at a time.
    """
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError("format must be json or csv", 400)
    try:
        limit = int(request.args.get("limit", str(PAGE_DEFAULT)))
    except ValueError:
        raise ApiError("query parameter 'limit' must be a whole number", 400) from None
    if not 1 <= limit <= PAGE_MAX:
        raise ApiError(f"query parameter 'limit' must be between 1 and {PAGE_MAX}", 400)
    raw_cursor = request.args.get("cursor")
    try:
        after = Position.decode(raw_cursor) if raw_cursor else None
    except CursorError as exc:
        raise ApiError(f"query parameter 'cursor': {exc}", 400) from None
    run = _run_for_clinic(request.args.get("run"))
    session = db()
    summary = run_summary(session, run, g.clinic.id)
    audit.record(session, "changes.export" if fmt == "csv" else "changes.view", g.actor, g.clinic.id,
                 "rescore_run", str(run.id), {"format": fmt, "rows": summary["changed"],
                                              "cursor": raw_cursor is not None})
    session.commit()
    if fmt == "csv":
        rows = iter_change_rows(session, run, g.clinic.id)
        response = Response(stream_with_context(iter_changes_csv(rows)), mimetype="text/csv")
        response.headers["Content-Disposition"] = f'attachment; filename="skinscan-changes-run{run.id}.csv"'
        return response
    rows, position = change_page(session, run, g.clinic.id, after, limit)
    return jsonify({"run": summary, "changes": rows, "next_cursor": position.encode() if position else None})
