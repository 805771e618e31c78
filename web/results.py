"""Result rows of a job for the API, the pages and CSV export: one row per uploaded file."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.csvsafe import csv_row
from skinscan.labels import CLASSES
from skinscan.registry import production_model
from skinscan.tables import ImageRecord, Job, Prediction

CSV_COLUMNS = ["image_id", "filename", "status", "predicted_label", *[f"prob_{c}" for c in CLASSES],
               "malignancy_score", "flagged", "model_version", "true_label", "error"]


def _current(preds: list[Prediction], preferred: list[str | None]) -> Prediction | None:
    for version in preferred:
        for p in preds:
            if p.model_version == version:
                return p
    return max(preds, key=lambda p: p.created_at) if preds else None


def rows_for(session: Session, images: list[ImageRecord], job: Job, history: bool = False) -> list[dict[str, Any]]:
    """Return result rows for images: the production model's prediction if it has one, else the job's."""
    ids = [i.id for i in images]
    preds: dict[str, list[Prediction]] = {}
    if ids:
        for p in session.scalars(select(Prediction).where(Prediction.image_id.in_(ids))):
            preds.setdefault(p.image_id, []).append(p)
    prod = production_model(session)
    preferred = [prod.version if prod else None, job.model_version]
    rows = []
    for img in images:
        current = _current(preds.get(img.id, []), preferred)
        row: dict[str, Any] = {
            "image_id": img.id, "filename": img.filename, "status": img.status,
            "predicted_label": current.label if current else None,
            "probabilities": current.probabilities if current else None,
            "confidence": current.confidence if current else None,
            "malignancy_score": current.malignancy if current else None,
            "flagged": current.flagged if current else None,
            "model_version": current.model_version if current else None,
            "true_label": img.true_label, "error": img.error if img.status == "failed" else None,
        }
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


def iter_csv(session: Session, job: Job, page: int = 500) -> Iterator[str]:
    """Yield the job's results as CSV text, a page of rows at a time; text cells are formula-safe (csv_row)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    offset = 0
    while True:
        images = job_images(session, job, page, offset)
        if not images:
            break
        for r in rows_for(session, images, job):
            probs = r["probabilities"] or {}
            writer.writerow(csv_row([  # file names, labels and errors come from the clinic: no formulas
                r["image_id"], r["filename"], r["status"], r["predicted_label"] or "",
                *[f"{probs[c]:.6f}" if c in probs else "" for c in CLASSES],
                "" if r["malignancy_score"] is None else f"{r['malignancy_score']:.6f}",
                "" if r["flagged"] is None else int(r["flagged"]), r["model_version"] or "",
                r["true_label"] or "", r["error"] or "",
            ]))
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        offset += page
    rest = buf.getvalue()
    if rest:
        yield rest


def job_summary(job: Job, status_url: str | None = None) -> dict[str, Any]:
    """Return the JSON a status poll answers: status, counts, progress, timestamps, model version."""
    def ts(v: Any) -> str | None:
        if not v:
            return None
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()

    body: dict[str, Any] = {
        "id": job.id, "status": job.status, "kind": job.kind,
        "counts": {"total": job.total, "scored": job.scored, "failed": job.failed},
        "progress": job.progress, "model_version": job.model_version,
        "created_at": ts(job.created_at), "started_at": ts(job.started_at), "finished_at": ts(job.finished_at),
        "has_labels": job.labels_format is not None, "error": job.error,
    }
    if status_url:
        body["status_url"] = status_url
    return body
