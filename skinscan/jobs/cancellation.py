"""Cancelling a job: its images not yet scored stop being scored, and the job ends `cancelled`, audited.

The pending images become `cancelled` in one transaction that holds the job's row lock (the lock the worker's
counter refresh takes), so the worker's claim, which only takes pending images, never scores them, and its
refresh, which only finishes queued or running jobs, never flips the job back. A chunk already being scored
writes nothing for images cancelled meanwhile: its results transaction locks the job row first and gives a
prediction only to images it moves out of `pending` (a cancel coming then waits for it). What was scored before
keeps its results, and its metrics are stored.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.tables import ImageRecord, Job, utcnow

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
FINISHED = ("done", "failed")
CANCEL_ACTION = "job.cancel"


class CancelRefused(ValueError):
    """The job cannot be cancelled (it already finished)."""


def cancel_job(session: Session, job_id: str, actor: str) -> tuple[Job, int]:
    """Cancel a job's pending images and end it `cancelled`; return (job, images cancelled now), committed.

    Cancelling a cancelled job changes nothing (0 images); a done or failed job raises CancelRefused.
    """
    locking = session.get_bind().dialect.name == "postgresql"
    job = session.get(Job, job_id, with_for_update=locking, populate_existing=True)
    if job is None:
        raise LookupError(job_id)
    if job.status == CANCELLED:
        session.commit()
        return job, 0
    if job.status in FINISHED:
        session.rollback()
        raise CancelRefused(f"job is already {job.status}; only a job that is uploading, queued or running can be "
                            "cancelled")
    was = job.status
    cancelled = session.execute(
        update(ImageRecord).where(ImageRecord.job_id == job_id, ImageRecord.status == "pending")
        .values(status=CANCELLED, error="the job was cancelled before this image was scored")
    ).rowcount or 0
    counts = dict(session.execute(select(ImageRecord.status, func.count()).where(ImageRecord.job_id == job_id)
                                  .group_by(ImageRecord.status)).all())
    job.total, job.scored, job.failed = sum(counts.values()), counts.get("scored", 0), counts.get("failed", 0)
    job.status, job.finished_at, job.updated_at = CANCELLED, utcnow(), utcnow()
    if job.scored and job.model_version:
        _store_metrics(session, job)
    audit.record(session, CANCEL_ACTION, actor, job.clinic_id, "job", job.id,
                 {"was": was, "images_cancelled": cancelled, "scored": job.scored, "failed": job.failed})
    session.commit()
    log.info("job %s cancelled by %s: %d images not scored, %d scored", job.id, actor, cancelled, job.scored)
    return job, cancelled


def _store_metrics(session: Session, job: Job) -> None:
    """Store the metrics of what the job scored before it was cancelled."""
    from skinscan.jobs.metrics import store_job_metrics

    store_job_metrics(session, job)
