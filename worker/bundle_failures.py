"""A chunk whose model bundle cannot be used (damaged in storage): its images fail at once with the reason."""

from __future__ import annotations

import logging

from sqlalchemy import update

from skinscan.db import session_scope
from skinscan.model.health import record_unusable, unusable_reason
from skinscan.settings import Settings
from skinscan.tables import ImageRecord, Job

log = logging.getLogger(__name__)


def fail_for_unusable_bundle(job_id: str, image_ids: list[str], version: str, error: Exception,
                             settings: Settings) -> None:
    """Record the bundle as unusable, fail the chunk's pending images with the reason and finish the job if it
    has none left pending (a damaged bundle never heals by retrying: it must be stored again)."""
    from worker.pipeline import refresh_job

    reason = unusable_reason(error)
    record_unusable(settings, version, str(error))
    with session_scope(settings) as session:
        session.execute(update(ImageRecord).where(ImageRecord.id.in_(image_ids), ImageRecord.job_id == job_id,
                                                  ImageRecord.status == "pending")
                        .values(status="failed", error=reason))
    refresh_job(job_id, settings)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "failed", Job.scored == 0)
                        .values(error=f"no image in this job could be scored: {reason}"[:1000]))
    log.error("job %s: %d images failed: %s", job_id, len(image_ids), reason)
