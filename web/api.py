"""The JSON API, version 1: submit jobs, poll them, read results and metrics."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, stream_with_context, url_for
from sqlalchemy import func, select

from skinscan import audit
from skinscan.storage import StorageError
from skinscan.tables import ImageRecord, Job, JobMetrics
from web.auth import require_api_key
from web.context import db, settings, storage
from web.errors import ApiError
from web.intake import (
    UploadError,
    add_images,
    apply_labels,
    create_job,
    discard_stored,
    enqueue_committed,
    finalize_job,
    iter_files,
    parse_labels,
)
from web.results import iter_csv, job_images, job_summary, rows_for

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api/v1")
STORAGE_DOWN = "image storage is unavailable; nothing was kept from this upload, send it again later"


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(f"query parameter {name!r} must be a whole number", 400) from None
    if not low <= value <= high:
        raise ApiError(f"query parameter {name!r} must be between {low} and {high}", 400)
    return value


def get_job(job_id: str) -> Job:
    """Return the signed-in clinic's job, or 404 (also for another clinic's job)."""
    job = db().get(Job, job_id) if len(job_id) <= 64 else None
    if job is None or job.clinic_id != g.clinic.id:
        raise ApiError("job not found", 404)
    return job


def _uploaded_files() -> list[tuple[str, Any]]:
    files = [(f.filename or "unnamed", f.stream) for f in request.files.getlist("files")]
    files += [(f.filename or "upload.zip", f.stream) for f in request.files.getlist("zip")]
    return files


def _labels_bytes() -> bytes | None:
    labels = request.files.get("labels")
    return labels.read(10 * 1024 * 1024) if labels else None






def _created(job: Job, accepted: int, rejected: list[Any]) -> tuple[Response, int]:
    body = job_summary(job, url_for("api.job_status", job_id=job.id, _external=True))
    body["results_url"] = url_for("api.job_results", job_id=job.id, _external=True)
    body["accepted"] = accepted
    body["rejected"] = [r.__dict__ for r in rejected]
    return jsonify(body), 202


@bp.post("/jobs")
@require_api_key
def create():  # type: ignore[no-untyped-def]
    """Create a job from files and/or zips (+ optional labels CSV); commit, then enqueue; 202."""
    finalize = request.form.get("finalize", "true").lower() not in ("0", "false", "no")
    session = db()
    try:
        result = create_job(session, storage(), g.clinic, _uploaded_files(), _labels_bytes(), settings(),
                            g.actor, finalize=finalize)
        session.commit()
    except UploadError as exc:
        discard_stored(session, storage())
        raise ApiError(str(exc), exc.status, exc.details) from None
    except StorageError:
        discard_stored(session, storage())
        raise ApiError(STORAGE_DOWN, 503) from None
    if finalize:
        enqueue_committed(db(), result.job, settings())
    log.info("job %s created: %d images accepted, %d refused", result.job.id, result.accepted,
             len(result.rejected))
    return _created(result.job, result.accepted, result.rejected)


@bp.post("/jobs/<job_id>/images")
@require_api_key
def add(job_id: str):  # type: ignore[no-untyped-def]
    """Add a part of files to a job created with finalize=false."""
    job = get_job(job_id)
    if job.status != "uploading":
        raise ApiError(f"job is {job.status}; images can only be added while it is uploading", 409)
    session = db()
    start = session.scalar(select(func.count()).where(ImageRecord.job_id == job.id)) or 0
    try:
        accepted, rejected = add_images(session, storage(), job, iter_files(_uploaded_files(), settings()),
                                        settings(), start=start)
        session.commit()
    except UploadError as exc:
        discard_stored(session, storage())
        raise ApiError(str(exc), exc.status, exc.details) from None
    except StorageError:
        discard_stored(session, storage())
        raise ApiError(STORAGE_DOWN, 503) from None
    return _created(job, accepted, rejected)


@bp.post("/jobs/<job_id>/start")
@require_api_key
def start(job_id: str):  # type: ignore[no-untyped-def]
    """Close an uploading job (optionally with a labels CSV) and queue it for scoring."""
    job = get_job(job_id)
    if job.status != "uploading":
        raise ApiError(f"job is already {job.status}", 409)
    session = db()
    try:
        truth = parse_labels(_labels_bytes())
        if truth is not None:
            apply_labels(session, job, truth)
    except UploadError as exc:
        session.rollback()
        raise ApiError(str(exc), exc.status, exc.details) from None
    if not session.scalar(select(func.count()).where(ImageRecord.job_id == job.id, ImageRecord.status == "pending")):
        raise ApiError("the job has no accepted images", 400)
    finalize_job(session, job)
    session.commit()
    enqueue_committed(db(), job, settings())
    return jsonify(job_summary(job, url_for("api.job_status", job_id=job.id, _external=True))), 202


@bp.get("/jobs")
@require_api_key
def list_jobs():  # type: ignore[no-untyped-def]
    """The clinic's jobs, newest first, paginated (?page=1&per_page=20)."""
    page = _int_arg("page", 1, 1, 1_000_000)
    per_page = _int_arg("per_page", 20, 1, 200)
    session = db()
    total = session.scalar(select(func.count()).select_from(Job).where(Job.clinic_id == g.clinic.id)) or 0
    jobs = session.scalars(select(Job).where(Job.clinic_id == g.clinic.id)
                           .order_by(Job.created_at.desc(), Job.id).limit(per_page).offset((page - 1) * per_page))
    return jsonify({"page": page, "per_page": per_page, "total": total,
                    "jobs": [job_summary(j, url_for("api.job_status", job_id=j.id)) for j in jobs]})


@bp.get("/jobs/<job_id>")
@require_api_key
def job_status(job_id: str):  # type: ignore[no-untyped-def]
    """Status, counts and progress of one job: a single-row read, cheap enough to poll every second."""
    return jsonify(job_summary(get_job(job_id)))


@bp.get("/jobs/<job_id>/results")
@require_api_key
def job_results(job_id: str):  # type: ignore[no-untyped-def]
    """Per-image results as JSON (paginated with ?limit&offset) or CSV (?format=csv, all rows, streamed)."""
    job = get_job(job_id)
    session = db()
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError("format must be json or csv", 400)
    audit.record(session, "job.export" if fmt == "csv" else "job.view_results", g.actor, job.clinic_id,
                 "job", job.id, {"format": fmt})
    session.commit()
    if fmt == "csv":
        response = Response(stream_with_context(iter_csv(session, job)), mimetype="text/csv")
        response.headers["Content-Disposition"] = f'attachment; filename="skinscan-{job.id}.csv"'
        return response
    limit = _int_arg("limit", 1000, 1, 10_000)
    offset = _int_arg("offset", 0, 0, 100_000_000)
    history = request.args.get("history", "false").lower() in ("1", "true", "yes")
    rows = rows_for(session, job_images(session, job, limit, offset), job, history=history)
    return jsonify({"job": job_summary(job), "offset": offset, "limit": limit, "total": job.total,
                    "results": rows})


@bp.get("/jobs/<job_id>/metrics")
@require_api_key
def job_metrics(job_id: str):  # type: ignore[no-untyped-def]
    """Class distribution and counts; with labels, accuracy, balanced accuracy, per-class figures, AUC."""
    job = get_job(job_id)
    session = db()
    row = session.get(JobMetrics, (job.id, job.model_version)) if job.model_version else None
    if row is None:
        if job.status in ("done", "failed"):
            raise ApiError("metrics are not available for this job", 404)
        raise ApiError(f"metrics are computed when the job is done (now {job.status})", 409)
    audit.record(session, "job.view_metrics", g.actor, job.clinic_id, "job", job.id)
    session.commit()
    return jsonify({"job": job_summary(job), "metrics": row.metrics})


@bp.get("/openapi.json")
def openapi():  # type: ignore[no-untyped-def]
    """The OpenAPI 3 document describing this API."""
    from web.openapi import spec

    return jsonify(spec())
