"""The JSON API, version 1: submit jobs, poll them, read results and metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context, url_for
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.jobs.cancellation import CancelRefused
from skinscan.jobs.deletion import Deletion
from skinscan.jobs.intake import (
    UploadError,
    add_images,
    apply_labels,
    create_job,
    discard_stored,
    enqueue_committed,
    fail_job,
    finalize_job,
    iter_files,
    label_details,
    parse_labels,
)
from skinscan.jobs.metrics import null_unsupported
from skinscan.storage import StorageError
from skinscan.tables import ImageRecord, Job, JobMetrics
from web.api_schemas import (
    JobCreatedSchema,
    JobListQuery,
    JobMetricsSchema,
    JobPageSchema,
    JobSchema,
    ResultsPageSchema,
    ResultsQuery,
    UploadSchema,
)
from web.auth import require_api_key
from web.batches import batch_key_arg, claim_part, job_for_batch, part_arg
from web.context import db, settings, storage
from web.errors import ApiError
from web.job_actions import cancel_owned_job, delete_owned_job, job_to_delete
from web.lookup import int_arg, owned_job
from web.openapi import doc
from web.results import iter_csv, job_images, job_summary, rows_for

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api/v1")
LABELS_MAX_BYTES = 10 * 1024 * 1024
STORAGE_DOWN = "image storage is unavailable; nothing was kept from this upload, send it again later"


def _uploaded_files() -> list[tuple[str, Any]]:
    files = [(f.filename or "unnamed", f.stream) for f in request.files.getlist("files")]
    files += [(f.filename or "upload.zip", f.stream) for f in request.files.getlist("zip")]
    return files


def _labels_bytes() -> bytes | None:
    labels = request.files.get("labels")
    data = labels.read(LABELS_MAX_BYTES + 1) if labels else None
    if data is not None and len(data) > LABELS_MAX_BYTES:  # refused whole, never parsed cut short
        raise UploadError(f"the labels file is over {LABELS_MAX_BYTES // (1024 * 1024)} MB", 413)
    return data


def _created(job: Job, accepted: int, rejected: list[Any],
             labels: dict[str, Any] | None = None, status: int = 202, **extra: Any) -> tuple[Response, int]:
    body = job_summary(job, url_for("api.job_status", job_id=job.id, _external=True))
    body["results_url"] = url_for("api.job_results", job_id=job.id, _external=True)
    body["accepted"] = accepted
    body["rejected"] = [r.__dict__ for r in rejected]
    if labels is not None:
        body["labels"] = labels
    body.update(extra)
    return jsonify(body), status


def _part_received(job: Job, part: int | None) -> tuple[Response, int]:
    """A numbered part that is not the next: received before (200, stored once) or early (409)."""
    if part is not None and part > job.parts:
        raise ApiError(f"part {part} of job {job.id} came before part {job.parts}; send that one first", 409)
    return _created(job, 0, [], status=200, duplicate_part=True)


def _existing(job: Job) -> tuple[Response, int]:
    """The job a batch key already names: 200, nothing of this request stored."""
    return _created(job, 0, [], status=200, resumed=True)


@contextmanager
def _kept_or_discarded(session: Session) -> Iterator[None]:
    """Store an upload (a new job, or a part of one): refused as a whole (UploadError) or with storage down, it is
    rolled back, every object it stored is removed, and the client is told why (the refusal's status, or 503)."""
    try:
        yield
    except UploadError as exc:
        discard_stored(session, storage())
        raise ApiError(str(exc), exc.status, exc.details) from None
    except StorageError:
        discard_stored(session, storage())
        raise ApiError(STORAGE_DOWN, 503) from None


@bp.post("/jobs")
@doc(JobCreatedSchema, status=202, description="job created (and queued unless finalize=false)",
     form=UploadSchema, errors=(400, 413, 415, 503),
     also=((200, "the clinic's job of this batch_key (resumed: true); nothing of this request was stored"),))
@require_api_key
def create():  # type: ignore[no-untyped-def]
    """Create a job from files and/or zips (+ optional labels CSV); commit, then enqueue; 202."""
    finalize = request.form.get("finalize", "true").lower() not in ("0", "false", "no")
    session = db()
    key = batch_key_arg(request.form.get("batch_key"))
    if key and (known := job_for_batch(session, g.clinic.id, key)) is not None:
        return _existing(known)
    try:
        with _kept_or_discarded(session):
            result = create_job(session, storage(), g.clinic, _uploaded_files(), _labels_bytes(), settings(),
                                g.actor, finalize=finalize, name=request.form.get("name"), batch_key=key)
            session.commit()
    except IntegrityError:  # the same batch key, committed by a concurrent request meanwhile: answer its job
        discard_stored(session, storage())
        known = job_for_batch(session, g.clinic.id, key) if key else None
        if known is None:
            raise
        return _existing(known)
    enqueue_committed(db(), result.job, settings(), closed=finalize)  # a part is scored while the next uploads
    log.info("job %s created: %d images accepted, %d refused", result.job.id, result.accepted,
             len(result.rejected))
    return _created(result.job, result.accepted, result.rejected,
                    label_details(result.labels) if result.labels is not None else None)


@bp.post("/jobs/<job_id>/images")
@doc(JobCreatedSchema, status=202, description="images added", form=UploadSchema,
     errors=(400, 409, 413, 415, 503), also=((200, "this part was received before (duplicate_part: true)"),))
@require_api_key
def add(job_id: str):  # type: ignore[no-untyped-def]
    """Add a part of files to a job created with finalize=false."""
    job = owned_job(job_id)
    if job.status != "uploading":  # checked again under the job's row lock before the part commits
        raise ApiError(f"job is {job.status}; images can only be added while it is uploading", 409)
    session = db()
    part = part_arg(request.form.get("part"))
    if part is not None and part != job.parts:
        return _part_received(job, part)
    session.commit()  # end the lookup's transaction: the part is stored with no transaction held open
    with _kept_or_discarded(session):
        accepted, rejected = add_images(session, storage(), job, iter_files(_uploaded_files(), settings()),
                                        settings())
        # add_images has locked the job's row (lock_open_job) just before inserting the rows: the part is counted
        # under that lock, so the row is held only while the part commits, not while its images are stored.
        if claim_part(session, job.id, part) != "new":  # a concurrent request carried the same part
            discard_stored(session, storage())
            return _part_received(session.get(Job, job.id, populate_existing=True) or job, part)
        session.commit()
    session.refresh(job)  # its parts counter moved in SQL
    enqueue_committed(session, job, settings(), closed=False)  # scored while the next part uploads
    return _created(job, accepted, rejected)


@bp.post("/jobs/<job_id>/start")
@doc(JobSchema, status=202, description="queued", errors=(400, 409, 413))
@require_api_key
def start(job_id: str):  # type: ignore[no-untyped-def]
    """Close an uploading job (optionally with a labels CSV) and queue it for scoring."""
    job = owned_job(job_id)
    session = db()
    match = None
    try:
        truth = parse_labels(_labels_bytes())
        job = _locked_uploading(session, job.id)  # every check and write below holds the job's row lock
        if truth is not None:
            match = apply_labels(session, job, truth)
        if not session.scalar(select(func.count()).where(ImageRecord.job_id == job.id,
                                                         ImageRecord.storage_key.is_not(None))):
            raise UploadError("the job has no accepted images", 400)
    except UploadError as exc:  # no ghost: the job says why it did not start (and can be deleted)
        session.rollback()
        fail_job(session, _locked_uploading(session, job.id), f"the job could not start: {exc}")
        session.commit()
        raise ApiError(str(exc), exc.status, exc.details) from None
    finalize_job(session, job)
    session.commit()
    enqueue_committed(db(), job, settings())
    body = job_summary(job, url_for("api.job_status", job_id=job.id, _external=True))
    if match is not None:
        body["labels"] = label_details(match)
    return jsonify(body), 202


def _locked_uploading(session: Session, job_id: str) -> Job:
    """The job under its row lock (held until commit), still uploading; else 409 (a request closed it first)."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status != "uploading":
        session.rollback()
        raise ApiError(f"job is already {job.status if job else 'deleted'}", 409)
    return job


@bp.get("/jobs")
@doc(JobPageSchema, query=JobListQuery, errors=(400,))
@require_api_key
def list_jobs():  # type: ignore[no-untyped-def]
    """The clinic's jobs, newest first, paginated (?page=1&per_page=20)."""
    page = int_arg("page", 1, 1, 1_000_000, strict=True)
    per_page = int_arg("per_page", 20, 1, 200, strict=True)
    session = db()
    mine = [Job.clinic_id == g.clinic.id]
    if (key := batch_key_arg(request.args.get("batch_key"))) is not None:
        mine.append(Job.batch_key == key)  # the job a client's batch key names (none, or one)
    total = session.scalar(select(func.count()).select_from(Job).where(*mine)) or 0
    jobs = session.scalars(select(Job).where(*mine)
                           .order_by(Job.created_at.desc(), Job.id).limit(per_page).offset((page - 1) * per_page))
    return jsonify({"page": page, "per_page": per_page, "total": total,
                    "jobs": [job_summary(j, url_for("api.job_status", job_id=j.id)) for j in jobs]})


@bp.get("/jobs/<job_id>")
@doc(JobSchema)
@require_api_key
def job_status(job_id: str):  # type: ignore[no-untyped-def]
    """Status, counts and progress of one job: one read of the job row by its key (the key's clinic is cached)."""
    return jsonify(job_summary(owned_job(job_id)))


@bp.post("/jobs/<job_id>/cancel")
@doc(JobSchema, description="cancelled (again: unchanged)", errors=(409,))
@require_api_key
def cancel(job_id: str):  # type: ignore[no-untyped-def]
    """Cancel a job that is uploading, queued or running: its images not yet scored are never scored; 200."""
    try:
        job, cancelled = cancel_owned_job(job_id)
    except CancelRefused as exc:
        raise ApiError(str(exc), 409) from None
    body = job_summary(job, url_for("api.job_status", job_id=job.id, _external=True))
    body["cancelled_now"] = cancelled
    return jsonify(body)


@bp.delete("/jobs/<job_id>")
@require_api_key
def delete(job_id: str):  # type: ignore[no-untyped-def]
    """Delete a job, its results and its stored images (audited); deleting it again answers the same way."""
    target = job_to_delete(job_id)
    return jsonify((target if isinstance(target, Deletion) else delete_owned_job(target)).as_dict())


@bp.get("/jobs/<job_id>/results")
@doc(ResultsPageSchema, query=ResultsQuery, csv=True, errors=(400,))
@require_api_key
def job_results(job_id: str):  # type: ignore[no-untyped-def]
    """Per-image results as JSON (paginated with ?limit&offset) or CSV (?format=csv, all rows, streamed)."""
    job = owned_job(job_id)
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
    limit = int_arg("limit", 1000, 1, 10_000, strict=True)
    offset = int_arg("offset", 0, 0, 100_000_000, strict=True)
    history = request.args.get("history", "false").lower() in ("1", "true", "yes")
    rows = rows_for(session, job_images(session, job, limit, offset), job, history=history)
    return jsonify({"job": job_summary(job), "offset": offset, "limit": limit, "total": job.total,
                    "results": rows})


@bp.get("/jobs/<job_id>/metrics")
@doc(JobMetricsSchema, errors=(409,))
@require_api_key
def job_metrics(job_id: str):  # type: ignore[no-untyped-def]
    """Class distribution and counts; with labels, accuracy, balanced accuracy, per-class figures, AUC."""
    job = owned_job(job_id)
    session = db()
    row = session.get(JobMetrics, (job.id, job.model_version)) if job.model_version else None
    if row is None:
        if job.status in ("done", "failed", "cancelled"):
            raise ApiError("metrics are not available for this job", 404)
        raise ApiError(f"metrics are computed when the job is done (now {job.status})", 409)
    audit.record(session, "job.view_metrics", g.actor, job.clinic_id, "job", job.id)
    session.commit()
    # per-class figures over no image are null (older rows too)
    return jsonify({"job": job_summary(job), "metrics": null_unsupported(dict(row.metrics))})


@bp.get("/openapi.json")
@doc(description="the OpenAPI 3 document")
def openapi():  # type: ignore[no-untyped-def]
    """The OpenAPI 3 document describing this API, generated from its routes."""
    from web.openapi import spec

    return jsonify(spec(current_app))
