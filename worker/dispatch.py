"""Enqueueing work: split a committed job's pending images into chunks and send one task per chunk."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.settings import Settings, load_settings
from skinscan.tables import ImageRecord

log = logging.getLogger(__name__)


def chunked(ids: list[str], size: int) -> list[list[str]]:
    """Split a list of ids into lists of at most size."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def pending_image_ids(session: Session, job_id: str) -> list[str]:
    """Return the ids of a job's images not yet scored or failed, in upload order."""
    return list(session.scalars(
        select(ImageRecord.id).where(ImageRecord.job_id == job_id, ImageRecord.status == "pending")
            .order_by(ImageRecord.position)
    ))


def enqueue_job(session: Session, job_id: str, settings: Settings | None = None) -> int:
    """Send score tasks for a job's pending images; call only after the job is committed. Returns chunks."""
    from worker.celery_app import celery_for

    settings = settings or load_settings()
    celery_app = celery_for(settings)
    if session.in_transaction() and session.new:
        raise RuntimeError("enqueue_job called with uncommitted rows: commit the job first")
    chunks = chunked(pending_image_ids(session, job_id), settings.chunk_size)
    for chunk in chunks:
        celery_app.send_task("worker.tasks.score_chunk", args=[job_id, chunk], queue="skinscan")
    log.info("job %s: %d chunks enqueued", job_id, len(chunks))
    return len(chunks)
