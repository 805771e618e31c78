"""Job pages: the clinic's jobs, uploading a new batch, one job's progress, summary, results and exports."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, flash, g, jsonify, redirect, render_template, request, stream_with_context, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.jobs.cancellation import CancelRefused
from skinscan.jobs.counts import job_counts
from skinscan.jobs.deletion import Deletion
from skinscan.jobs.intake import (
    UploadError,
    create_job,
    discard_stored,
    enqueue_committed,
    label_details,
    upload_refusals,
)
from skinscan.jobs.metrics import null_unsupported
from skinscan.labels import CLASSES, MALIGNANT
from skinscan.retention import removal_time
from skinscan.reviews import next_flagged_unreviewed, unreviewed_flagged_count
from skinscan.storage import StorageError
from skinscan.tables import ImageRecord, Job, JobMetrics, Prediction
from web.context import db, settings, storage
from web.errors import wants_json
from web.job_actions import cancel_owned_job, delete_owned_job, job_to_delete
from web.lookup import int_arg, owned_job
from web.pages.auth import login_required
from web.pages.common import page_blueprint
from web.pages.table import (
    PER_PAGE,
    TableQuery,
    flag_counts_by_job,
    refused_files,
    results_page,
    results_version,
    split_filename,
    tile_counts,
)
from web.referral import operating_point
from web.results import iter_csv, job_summary, ranked_rows

log = logging.getLogger(__name__)
bp = page_blueprint("jobs")

JOBS_PER_PAGE = 25
LABELS_MAX_BYTES = 10 * 1024 * 1024


@bp.get("/jobs")
@login_required
def index():  # type: ignore[no-untyped-def]
    """The clinic's jobs, newest first, with status, counts, progress and model version."""
    session = db()
    total = session.scalar(select(func.count()).select_from(Job).where(Job.clinic_id == g.clinic.id)) or 0
    pages = max(1, -(-total // JOBS_PER_PAGE))
    page = min(int_arg("page", 1, 1, 1_000_000), pages)
    jobs = list(session.scalars(select(Job).where(Job.clinic_id == g.clinic.id)
                                .order_by(Job.created_at.desc(), Job.id)
                                .limit(JOBS_PER_PAGE).offset((page - 1) * JOBS_PER_PAGE)))
    counts = flag_counts_by_job(session, jobs)
    retention = g.clinic.retention_days
    removals = {j.id: removal_time(j.created_at, retention, settings()) for j in jobs}
    return render_template("jobs.html", jobs=jobs, page=page, pages=pages, total=total,
                           flagged={j: f for j, (f, _) in counts.items()},
                           unreviewed={j: u for j, (_, u) in counts.items()},
                           retention=retention, removals=removals)


@bp.get("/jobs/new")
@login_required
def new():  # type: ignore[no-untyped-def]
    """The upload form: images or zips, dragged in or chosen, and an optional labels CSV."""
    return render_template("new_job.html", limits=settings())


def _upload_refused(message: str, status: int, details: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    if wants_json():
        return jsonify({"error": message, "status": status, "details": details}), status
    return render_template("new_job.html", limits=settings(), error=message, details=details,
                           name=request.form.get("name", "")), status


@bp.post("/jobs/new")
@login_required
def create():  # type: ignore[no-untyped-def]
    """Store the upload and commit the job, then enqueue it; refused files are listed, accepted ones kept."""
    files = [(f.filename or "unnamed", f.stream) for f in request.files.getlist("files") if f.filename]
    labels = request.files.get("labels")
    labels_bytes = labels.read(LABELS_MAX_BYTES + 1) if labels is not None and labels.filename else None
    if not files:
        return _upload_refused("Choose at least one image or zip file to upload.", 400, [])
    if labels_bytes is not None and len(labels_bytes) > LABELS_MAX_BYTES:
        return _upload_refused(f"the labels file is over {LABELS_MAX_BYTES // (1024 * 1024)} MB", 413, [])
    session = db()
    try:
        result = create_job(session, storage(), g.clinic, files, labels_bytes, settings(), g.actor,
                            name=request.form.get("name"))
        session.commit()
    except UploadError as exc:
        discard_stored(session, storage())
        return _upload_refused(str(exc), exc.status, exc.details)
    except StorageError:
        discard_stored(session, storage())
        return _upload_refused("Image storage is unavailable; nothing was kept from this upload. Send it again "
                               "later.", 503, [])
    enqueue_committed(db(), result.job, settings())
    job_url = url_for("jobs.show", job_id=result.job.id)
    rejected = [r.__dict__ for r in result.rejected]
    log.info("job %s created from the pages: %d accepted, %d refused", result.job.id, result.accepted,
             len(rejected))
    labels = label_details(result.labels) if result.labels is not None else None
    if wants_json():
        return jsonify({"job_id": result.job.id, "job_url": job_url, "accepted": result.accepted,
                        "rejected": rejected, "labels": labels}), 201
    # One count everywhere: images accepted (the job's images) and files refused (listed as refusals on the job).
    flash(f"{result.accepted:,} image{'' if result.accepted == 1 else 's'} accepted and queued for scoring.", "info")
    if rejected:
        flash(f"{len(rejected):,} file{' was' if len(rejected) == 1 else 's were'} refused at upload and will not "
              "be scored; they are listed under “Files refused at upload”.", "error")
    if labels is not None:
        flash(f"Labels: {labels['labels_summary']}", "info")
    return redirect(job_url)


def _confusion(metrics: dict[str, Any]) -> dict[str, Any] | None:
    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return None
    order = list(metrics.get("confusion_matrix_classes") or CLASSES)  # the matrix's row and column order
    known = [c for c in metrics.get("known_labels") or order if c in order]
    rows = []
    for label in known:
        counts = matrix[order.index(label)]
        total = sum(counts)
        rows.append({"label": label, "total": total,
                     "cells": [{"count": n, "share": (n / total) if total else 0.0} for n in counts]})
    return {"columns": order, "rows": rows}


def _referral_capture(session: Session, job: Job, version: str | None) -> list[dict[str, Any]]:
    """How many labelled melanomas and malignant lesions the referral flag caught."""
    rows = session.execute(
        select(ImageRecord.true_label, Prediction.flagged).join(Prediction, Prediction.image_id == ImageRecord.id)
        .where(ImageRecord.job_id == job.id, Prediction.model_version == version, ImageRecord.true_label.is_not(None),
               ImageRecord.status == "scored")
    ).all()
    out = []
    for name, members in (("Melanoma", {"mel"}), ("Malignant lesions", set(MALIGNANT))):
        labelled = [flagged for label, flagged in rows if label in members]
        if labelled:
            out.append({"name": name, "flagged": sum(1 for f in labelled if f), "total": len(labelled)})
    return out


@bp.get("/jobs/<job_id>")
@login_required
def show(job_id: str):  # type: ignore[no-untyped-def]
    """One job: live progress, counts by class, referrals, metrics when labelled, and the results table."""
    job = owned_job(job_id)
    session = db()
    version = results_version(session, job)
    query = TableQuery.from_args(request.args)
    table = results_page(session, job, version, query)
    metrics_row = session.get(JobMetrics, (job.id, version)) if version else None
    metrics = null_unsupported(dict(metrics_row.metrics)) if metrics_row else {}
    labelled = bool(job.labels_format) and "accuracy" in metrics
    counts, flagged = tile_counts(session, job, version)
    audit.record(session, "job.view", g.actor, job.clinic_id, "job", job.id)
    session.commit()
    return render_template(
        "job.html", job=job, summary=job_summary(job), version=version, query=query, table=table,
        per_page_choices=PER_PAGE, counts=counts, flagged=flagged, split_filename=split_filename,
        point=operating_point(session, version, settings().referral_sensitivity), refused=refused_files(session, job),
        upload_refused=upload_refusals(session, job),
        unreviewed=unreviewed_flagged_count(session, job, version),
        next_review_id=next_flagged_unreviewed(session, job, version),
        metrics=metrics if labelled else None, confusion=_confusion(metrics) if labelled else None,
        capture=_referral_capture(session, job, version) if job.labels_format else [],
        removal=removal_time(job.created_at, g.clinic.retention_days, settings()),
    )


@bp.get("/jobs/<job_id>/status")
@login_required
def status(job_id: str):  # type: ignore[no-untyped-def]
    """The job's status, counts and progress as JSON, for the page's progress bar and tiles to poll.

    The tiles' figures cost one grouped query (images per predicted class and flag), no per-image work.
    """
    job = owned_job(job_id)
    session = db()
    counts, flagged = tile_counts(session, job, results_version(session, job))
    body = job_summary(job)
    figures = job_counts(job)  # the same figures as the API's counts and the pages
    body["tiles"] = {"scored": figures.scored, "failed": figures.not_scored, "total": figures.images, "classes": counts,
                     "flagged": flagged, "flag_rate": round(flagged / job.scored, 4) if job.scored else None}
    return jsonify(body)


@bp.post("/jobs/<job_id>/cancel")
@login_required
def cancel(job_id: str):  # type: ignore[no-untyped-def]
    """Cancel the job: images not yet scored are not scored; what was scored keeps its results."""
    try:
        job, cancelled = cancel_owned_job(job_id)
    except CancelRefused as exc:
        flash(str(exc)[:1].upper() + str(exc)[1:] + ".", "error")
        return redirect(url_for("jobs.show", job_id=job_id))
    flash(f"Job cancelled: {cancelled:,} image{'' if cancelled == 1 else 's'} not yet scored will not be scored; "
          f"the {job.scored:,} scored keep their results.", "info")
    return redirect(url_for("jobs.show", job_id=job.id))


@bp.post("/jobs/<job_id>/delete")
@login_required
def delete(job_id: str):  # type: ignore[no-untyped-def]
    """Delete the job, its results and its stored images, once the form's confirmation box is ticked."""
    job = job_to_delete(job_id)
    if isinstance(job, Deletion):  # deleted before: what is left of it was removed now
        flash(job.message, "info")
        return redirect(url_for("jobs.index"))
    if request.form.get("confirm") != "yes":
        flash("Tick the box to confirm that the job and its images are to be deleted.", "error")
        return redirect(url_for("jobs.show", job_id=job.id, _anchor="manage"))
    deletion = delete_owned_job(job)
    flash(deletion.message, "info" if deletion.complete else "error")
    return redirect(url_for("jobs.index"))


def _export(job_id: str, fmt: str, mimetype: str, rows: Callable[[Session, Job], Iterator[str]]) -> Response:
    """Audit an export of the clinic's job and stream it as a download."""
    job = owned_job(job_id)
    session = db()
    audit.record(session, "job.export", g.actor, job.clinic_id, "job", job.id, {"format": fmt, "via": "pages"})
    session.commit()
    response = Response(stream_with_context(rows(session, job)), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="skinscan-{job.id}.{fmt}"'
    return response


@bp.get("/jobs/<job_id>/results.csv")
@login_required
def export_csv(job_id: str):  # type: ignore[no-untyped-def]
    """Every row of the job as CSV (streamed)."""
    return _export(job_id, "csv", "text/csv", iter_csv)


def _iter_json(session: Session, job: Job, page: int = 500) -> Iterator[str]:
    """Yield the job and all its result rows as one JSON document, a page of rows at a time."""
    yield '{"job": ' + json.dumps(job_summary(job)) + ', "results": ['
    first = True
    for rows in ranked_rows(session, job, page):  # the page's risk order, each row with its risk_rank
        text = ",".join(json.dumps(row) for row in rows)
        yield text if first else "," + text
        first = False
    yield "]}\n"


@bp.get("/jobs/<job_id>/results.json")
@login_required
def export_json(job_id: str):  # type: ignore[no-untyped-def]
    """Every row of the job as JSON (streamed)."""
    return _export(job_id, "json", "application/json", _iter_json)
