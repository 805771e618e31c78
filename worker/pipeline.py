"""What a score task does: claim a chunk's pending images, score them, write results idempotently."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from skinscan.db import session_scope
from skinscan.models import Image, Job, JobMetrics, Prediction, utcnow
from skinscan.registry import bundle_path_for
from skinscan.settings import Settings, load_settings
from skinscan.storage import get_storage
from worker.scoring import Scored, Scorer, get_scorer

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def write_predictions(session: Session, scorer: Scorer, results: list[Scored]) -> int:
    """Insert predictions, skipping any (image, model version) already written; return rows written."""
    rows = [
        {
            "image_id": r.image_id, "model_version": scorer.version, "probabilities": r.probabilities,
            "label": r.label, "confidence": max(r.probabilities.values()),
            "malignancy": round(scorer.malignancy(r.probabilities), 6), "flagged": scorer.flagged(r.probabilities),
            "created_at": utcnow(),
        }
        for r in results if r.probabilities is not None
    ]
    if not rows:
        return 0
    stmt = _insert(session)(Prediction).values(rows)
    stmt = stmt.on_conflict_do_nothing(index_elements=["image_id", "model_version"])
    return session.execute(stmt).rowcount or 0


def claim_chunk(job_id: str, image_ids: list[str], settings: Settings) -> tuple[str | None, list[tuple[str, str]]]:
    """Mark the job running, count an attempt on each pending image, fail those past the limit.

    Returns the job's model version and the (image id, storage key) pairs still to score.
    """
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in ("done", "failed", "uploading"):
            return None, []
        if job.status == "queued":
            job.status, job.started_at = "running", job.started_at or utcnow()
        job.updated_at = utcnow()
        session.execute(
            update(Image).where(Image.id.in_(image_ids), Image.job_id == job_id, Image.status == "pending")
            .values(attempts=Image.attempts + 1)
        )
        session.execute(
            update(Image).where(Image.id.in_(image_ids), Image.job_id == job_id, Image.status == "pending",
                                Image.attempts > MAX_ATTEMPTS)
            .values(status="failed", error=func.coalesce(Image.error, "") + f" (gave up after {MAX_ATTEMPTS} attempts)")
        )
        todo = session.execute(
            select(Image.id, Image.storage_key).where(
                Image.id.in_(image_ids), Image.job_id == job_id, Image.status == "pending")
            .order_by(Image.position)
        ).all()
        return job.model_version, [(i, k) for i, k in todo]


def record_results(job_id: str, scorer: Scorer, results: list[Scored], settings: Settings) -> None:
    """Write a chunk's predictions and image statuses in one transaction; a redelivered chunk changes nothing."""
    with session_scope(settings) as session:
        write_predictions(session, scorer, results)
        ok = [r.image_id for r in results if r.probabilities is not None]
        if ok:
            session.execute(update(Image).where(Image.id.in_(ok), Image.status == "pending")
                            .values(status="scored", error=None))
        for r in results:
            if r.error is not None:
                session.execute(update(Image).where(Image.id == r.image_id, Image.status == "pending")
                                .values(status="failed", error=r.error))
    refresh_job(job_id, settings)


def score_chunk(job_id: str, image_ids: list[str], settings: Settings | None = None) -> int:
    """Score one chunk of a job's images end to end; return how many were scored now."""
    settings = settings or load_settings()
    version, todo = claim_chunk(job_id, image_ids, settings)
    if version is None:
        return 0
    if not todo:
        refresh_job(job_id, settings)
        return 0
    with session_scope(settings) as session:
        path = bundle_path_for(session, version)
    scorer = get_scorer(path, settings.backend, settings.threads, settings.batch_size, settings.decode_workers)
    results = scorer.score_stored(get_storage(settings), todo)
    record_results(job_id, scorer, results, settings)
    return sum(1 for r in results if r.probabilities is not None)


def refresh_job(job_id: str, settings: Settings) -> None:
    """Recompute a job's counters from its images; when none is pending, store metrics and mark it done."""
    with session_scope(settings) as session:
        counts = dict(session.execute(
            select(Image.status, func.count()).where(Image.job_id == job_id).group_by(Image.status)
        ).all())
        job = session.get(Job, job_id, with_for_update=session.get_bind().dialect.name == "postgresql")
        if job is None:
            return
        job.scored, job.failed = counts.get("scored", 0), counts.get("failed", 0)
        job.total = sum(counts.values())
        job.updated_at = utcnow()
        if counts.get("pending", 0) == 0 and job.status in ("queued", "running"):
            from worker.job_metrics import compute_job_metrics

            metrics = compute_job_metrics(session, job)
            existing = session.get(JobMetrics, (job.id, job.model_version))
            if existing is None:
                session.add(JobMetrics(job_id=job.id, model_version=job.model_version, metrics=metrics))
            else:
                existing.metrics, existing.computed_at = metrics, utcnow()
            job.status = "done" if job.scored > 0 else "failed"
            if job.scored == 0:
                job.error = "no image in this job could be scored"
            job.finished_at = utcnow()
            log.info("job %s %s: %d scored, %d failed", job.id, job.status, job.scored, job.failed)


def stalled_jobs(settings: Settings) -> list[str]:
    """Return ids of queued/running jobs with pending images and no progress for requeue_after_seconds."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(settings) as session:
        return list(session.scalars(
            select(Job.id).where(Job.status.in_(("queued", "running")), Job.updated_at < cutoff)
        ))
