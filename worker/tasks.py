"""Celery tasks: thin wrappers that take ids and call the pipeline; retries with backoff on outages."""

from __future__ import annotations

import logging

from celery.signals import worker_process_init
from sqlalchemy.exc import DBAPIError, OperationalError

from skinscan.settings import load_settings
from skinscan.storage import StorageError
from worker import pipeline
from worker.celery_app import celery_app

log = logging.getLogger(__name__)

_RETRY = {
    "autoretry_for": (StorageError, OperationalError, DBAPIError, ConnectionError, TimeoutError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": load_settings().task_max_retries,
}


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """Give each forked child its own database connections (never share a parent's sockets)."""
    from skinscan.db import dispose_engines

    dispose_engines()


@celery_app.task(name="worker.tasks.score_chunk", **_RETRY)
def score_chunk(job_id: str, image_ids: list[str]) -> int:
    """Score one chunk of a job's images."""
    return pipeline.score_chunk(job_id, image_ids)


@celery_app.task(name="worker.tasks.requeue_stalled")
def requeue_stalled() -> int:
    """Re-send chunks of jobs that made no progress for a while (lost messages after a broker restart)."""
    from skinscan.db import session_scope
    from worker.dispatch import enqueue_job

    settings = load_settings()
    total = 0
    for job_id in pipeline.stalled_jobs(settings):
        with session_scope(settings) as session:
            total += enqueue_job(session, job_id, settings)
        pipeline.refresh_job(job_id, settings)
    if total:
        log.warning("requeued %d chunks of stalled jobs", total)
    return total
