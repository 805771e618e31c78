"""Multi-part uploads (finalize=false) that were never started: closed after the timeout with what they hold.

Every part is scored as it commits, so an abandoned upload holds results the clinic can read. After
SKINSCAN_UPLOAD_TIMEOUT_SECONDS with no new part the job is closed as `start` would close it (without labels):
queued, its images scored, then `done` with a note saying it was closed automatically; its stored images stay
with it until the job is deleted, like any job's. A job that accepted no image at all fails with the reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, select

from skinscan import audit
from skinscan.db import session_scope
from skinscan.settings import Settings
from skinscan.tables import ImageRecord, Job, utcnow

log = logging.getLogger(__name__)


def closed_note(timeout: int, images: int) -> str:
    """What a job closed for lack of a new part says (its `error`, shown on the job page and in the API)."""
    return (f"the upload was never finished (no new part for {timeout} seconds): the job was closed automatically "
            f"with the {images:,} images received; submit any missing images as a new job")


def close_stale_uploads(settings: Settings) -> int:
    """Close jobs left `uploading` with no new part for upload_timeout_seconds; return how many were closed."""
    from skinscan.jobs.dispatch import enqueue_job, finish_if_complete

    cutoff = utcnow() - timedelta(seconds=settings.upload_timeout_seconds)
    closed: list[str] = []
    with session_scope(settings) as session:
        # Locked and re-checked in one statement: a part or a start committing now keeps its job (skip_locked).
        jobs = list(session.scalars(select(Job).where(Job.status == "uploading", Job.updated_at < cutoff)
                                    .with_for_update(skip_locked=True)))
        for job in jobs:
            counts = dict(session.execute(select(ImageRecord.status, func.count())
                                          .where(ImageRecord.job_id == job.id).group_by(ImageRecord.status)).all())
            job.total, job.scored, job.failed = sum(counts.values()), counts.get("scored", 0), counts.get("failed", 0)
            job.updated_at = utcnow()
            stored = session.scalar(select(func.count()).where(ImageRecord.job_id == job.id,
                                                               ImageRecord.storage_key.is_not(None)))
            if not stored:
                job.status, job.finished_at = "failed", utcnow()
                job.error = (f"the upload was never finished (no new part for {settings.upload_timeout_seconds} "
                             "seconds) and no image was received; submit the images again")
                log.warning("job %s: upload never finished, no image received; marked failed", job.id)
                continue
            job.status, job.error = "queued", closed_note(settings.upload_timeout_seconds, job.total)
            audit.record(session, "job.upload_closed", "system", job.clinic_id, "job", job.id,
                         {"images": job.total, "timeout_seconds": settings.upload_timeout_seconds})
            closed.append(job.id)
            log.warning("job %s: upload never finished; closed with its %d images", job.id, job.total)
    for job_id in closed:  # committed: send what no chunk covers yet, or have it finished if nothing is pending
        with session_scope(settings) as session:
            try:
                enqueue_job(session, job_id, settings)
                finish_if_complete(session, job_id, settings)
            except Exception:  # noqa: BLE001 - the job is committed and queued: the stalled-job sweeper resends
                log.exception("job %s closed but not enqueued; it will be requeued", job_id)
    return len(jobs)

