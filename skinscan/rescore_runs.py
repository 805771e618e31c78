"""What a re-score run covers and how far it is: its images, counters and summary, recomputed from predictions.

A run's images are those in its scope (a clinic or all, uploaded since a date or ever) that had a prediction
before the run began but none from the run's model (`model_to`) then. That set never changes afterwards, so the
counters can be recomputed from the predictions table at any time and redelivered work cannot count twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, exists, func, or_, select
from sqlalchemy.orm import Session

from skinscan.tables import ImageRecord, Prediction, RescoreRun

RUNNING, DONE, SUPERSEDED = "running", "done", "superseded"


def aware(value: datetime) -> datetime:
    """Return a datetime with UTC attached when the database gave it back naive (SQLite)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def has_prediction(version: str, before: datetime | None = None) -> Any:
    """Return an EXISTS clause: the image (correlated) has a prediction of version (made by `before`)."""
    query = select(Prediction.id).where(Prediction.image_id == ImageRecord.id, Prediction.model_version == version)
    if before is not None:
        query = query.where(Prediction.created_at <= before)
    return exists(query)


def run_images(run: RescoreRun, clinic_id: str | None = None) -> Any:
    """Return a SELECT of the ids of a run's images (optionally only one clinic's)."""
    scored_before = exists(select(Prediction.id).where(Prediction.image_id == ImageRecord.id,
                                                       Prediction.created_at <= run.started_at))
    query = select(ImageRecord.id).where(scored_before, ~has_prediction(run.model_to, run.started_at))
    for clinic in (run.clinic_id, clinic_id):
        if clinic is not None:
            query = query.where(ImageRecord.clinic_id == clinic)
    if run.since is not None:
        query = query.where(ImageRecord.created_at >= run.since)
    return query


def remaining_images(run: RescoreRun) -> Any:
    """Return a SELECT of the run's image ids still without a prediction of model_to (and not failed), in order."""
    query = run_images(run).where(~has_prediction(run.model_to))
    failed = list((run.errors or {}).keys())
    if failed:
        query = query.where(ImageRecord.id.not_in(failed))
    return query.order_by(ImageRecord.created_at, ImageRecord.id)


def run_counts(session: Session, run: RescoreRun, clinic_id: str | None = None) -> tuple[int, int, int]:
    """Return (images, re-scored, failed) of a run, recomputed from the predictions table."""
    ids = run_images(run, clinic_id).subquery()
    total, done = session.execute(
        select(func.count(), func.count(case((has_prediction(run.model_to), 1))))
        .select_from(ImageRecord).join(ids, ids.c.id == ImageRecord.id)
    ).one()
    failed = 0
    errors = list((run.errors or {}).keys())
    if errors:
        failed = session.scalar(
            select(func.count()).select_from(ImageRecord).join(ids, ids.c.id == ImageRecord.id)
            .where(ImageRecord.id.in_(errors), ~has_prediction(run.model_to))
        ) or 0
    return int(total), int(done), int(failed)


def list_runs(session: Session, clinic_id: str | None = None, limit: int = 20) -> list[RescoreRun]:
    """Return the newest runs (those that covered a clinic's images, when one is named)."""
    query = select(RescoreRun)
    if clinic_id is not None:
        query = query.where(or_(RescoreRun.clinic_id.is_(None), RescoreRun.clinic_id == clinic_id))
    return list(session.scalars(query.order_by(RescoreRun.started_at.desc(), RescoreRun.id.desc()).limit(limit)))


def run_summary(session: Session, run: RescoreRun, clinic_id: str | None = None) -> dict[str, Any]:
    """Return a run as JSON: scope, models, progress and summary (counted for one clinic when one is named)."""
    from skinscan.changes import change_counts

    def ts(value: datetime | None) -> str | None:
        return aware(value).isoformat() if value else None

    if clinic_id is None:
        total, done, failed, changed, flagged = run.total, run.done, run.failed, run.changed, run.flagged
    else:
        total, done, failed = run_counts(session, run, clinic_id)
        changed, flagged = change_counts(session, run, clinic_id)
    return {
        "id": run.id, "status": run.status, "model_from": run.model_from, "model_to": run.model_to,
        "scope": {"clinic": run.clinic_id is not None, "since": ts(run.since)},
        "images": total, "done": done, "failed": failed,
        "progress": 1.0 if total == 0 else round(min(1.0, (done + failed) / total), 4),
        "changed": changed, "flagged": flagged,
        "started_at": ts(run.started_at), "finished_at": ts(run.finished_at), "duration_s": run.duration_s,
    }
