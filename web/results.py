"""Result rows of a job for the API, the pages and CSV export: one row per uploaded file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.csvsafe import iter_csv_text
from skinscan.jobs.counts import job_counts
from skinscan.labels import CLASSES
from skinscan.model.registry import production_model
from skinscan.reviews import current_reviews
from skinscan.tables import ImageRecord, Job, Prediction
from web.referral import OperatingPoint, deployment_sensitivity, flag_reason, operating_point
from web.risk_order import results_version, risk_page

CSV_COLUMNS = ["image_id", "filename", "risk_rank", "status", "predicted_label", *[f"prob_{c}" for c in CLASSES],
               "malignancy_score", "flagged", "flag_reason", "model_version", "true_label", "error",
               "review_decision", "review_diagnosis", "review_note", "reviewed_by", "reviewed_at"]


def _iso(value: datetime) -> str:
    """ISO 8601 with a UTC offset (SQLite gives back naive datetimes; they are stored in UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _current(preds: list[Prediction], preferred: list[str | None]) -> Prediction | None:
    for version in preferred:
        for p in preds:
            if p.model_version == version:
                return p
    return max(preds, key=lambda p: p.created_at) if preds else None


def rows_for(session: Session, images: list[ImageRecord], job: Job, history: bool = False,
             version: str | None = None) -> list[dict[str, Any]]:
    """Return result rows for images: the given version's prediction if it has one, else production's, else the
    job's; each with why it was flagged. A cancelled image shows no prediction (it was not scored)."""
    ids = [i.id for i in images]
    preds: dict[str, list[Prediction]] = {}
    if ids:
        for p in session.scalars(select(Prediction).where(Prediction.image_id.in_(ids))):
            preds.setdefault(p.image_id, []).append(p)
    prod = production_model(session)
    preferred = [version, prod.version if prod else None, job.model_version]
    points: dict[str, OperatingPoint | None] = {}
    reviews = current_reviews(session, ids)
    rows = []
    for img in images:
        current = _current(preds.get(img.id, []), preferred) if img.status != "cancelled" else None
        if current is not None and current.model_version not in points:
            points[current.model_version] = operating_point(session, current.model_version, deployment_sensitivity())
        row: dict[str, Any] = {
            "image_id": img.id, "filename": img.filename, "status": img.status,
            "predicted_label": current.label if current else None,
            "probabilities": current.probabilities if current else None,
            "confidence": current.confidence if current else None,
            "malignancy_score": current.malignancy if current else None,
            "flagged": current.flagged if current else None,
            "flag_reason": flag_reason(current.flagged, current.malignancy, current.confidence,
                                       points[current.model_version]) if current else "",
            "model_version": current.model_version if current else None,
            "true_label": img.true_label, "error": img.error if img.status == "failed" else None,
        }
        review = reviews.get(img.id)  # the clinician's current (latest) review; re-scoring never changes it
        row.update({
            "review_decision": review.decision if review else None,
            "review_diagnosis": review.diagnosis if review else None,
            "review_note": review.note if review else None,
            "reviewed_by": review.reviewer if review else None,
            "reviewed_at": _iso(review.created_at) if review else None,
        })
        if history:
            row["history"] = [
                {"model_version": p.model_version, "predicted_label": p.label, "malignancy_score": p.malignancy,
                 "flagged": p.flagged, "created_at": p.created_at.isoformat()}
                for p in sorted(preds.get(img.id, []), key=lambda p: p.created_at)
            ]
        rows.append(row)
    return rows


def job_images(session: Session, job: Job, limit: int | None = None, offset: int = 0) -> list[ImageRecord]:
    """Return a job's images in upload order, optionally one page of them."""
    q = select(ImageRecord).where(ImageRecord.job_id == job.id).order_by(ImageRecord.position).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.scalars(q))


def _result_cells(r: dict[str, Any]) -> list[Any]:
    probs = r["probabilities"] or {}
    return [r["image_id"], r["filename"], r["risk_rank"], r["status"], r["predicted_label"] or "",
            *[f"{probs[c]:.6f}" if c in probs else "" for c in CLASSES],
            "" if r["malignancy_score"] is None else f"{r['malignancy_score']:.6f}",
            "" if r["flagged"] is None else int(r["flagged"]), r["flag_reason"], r["model_version"] or "",
            r["true_label"] or "", r["error"] or "",
            r["review_decision"] or "", r["review_diagnosis"] or "", r["review_note"] or "", r["reviewed_by"] or "",
            r["reviewed_at"] or ""]


def iter_csv(session: Session, job: Job, page: int = 500) -> Iterator[str]:
    """Yield the job's results as CSV text, a page of rows at a time; text cells (file names, labels and errors
    come from the clinic) are formula-safe."""
    return iter_csv_text(CSV_COLUMNS, ([_result_cells(r) for r in rows] for rows in ranked_rows(session, job, page)))


def ranked_rows(session: Session, job: Job, page: int = 500) -> Iterator[list[dict[str, Any]]]:
    """Yield a job's result rows a page at a time in the risk order of its page (rank 1 = highest malignancy
    score under the shown model version), each with its `risk_rank`.

    Pages are read by keyset over a total order (image id last), on PostgreSQL all in one REPEATABLE READ
    snapshot: while scoring goes on, every image is listed exactly once, as the job stood when the export began.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.commit()  # end what the request read; the export's transaction is one snapshot
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    version = results_version(session, job)
    rank, after = 0, None
    while True:
        images, after = risk_page(session, job, version, page, after)
        if not images:
            return
        rows = rows_for(session, images, job, version=version)
        for row in rows:
            rank += 1
            row["risk_rank"] = rank
        yield rows


def job_summary(job: Job, status_url: str | None = None) -> dict[str, Any]:
    """Return the JSON a status poll answers: status, counts, progress, timestamps, model version."""
    def ts(v: Any) -> str | None:
        if not v:
            return None
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()

    body: dict[str, Any] = {
        "id": job.id, "name": job.name, "status": job.status, "kind": job.kind,
        # one definition everywhere (skinscan.jobs.counts): total = images accepted, failed = not scored
        "counts": job_counts(job).as_api(),
        "progress": job.progress, "model_version": job.model_version,
        "created_at": ts(job.created_at), "started_at": ts(job.started_at), "finished_at": ts(job.finished_at),
        "has_labels": job.labels_format is not None, "error": job.error, "parts": job.parts,
    }
    if job.status == "cancelled":  # images the cancellation left unscored (0 included)
        body["counts"].setdefault("cancelled", 0)
    if status_url:
        body["status_url"] = status_url
    return body
