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
    "autoretry_for": (StorageError, OperationalError, DBAPIError, ConnectionError, TimeoutError,
                      pipeline.ChunkIncomplete),
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


@celery_app.task(name="worker.tasks.gradcam", **_RETRY)
def gradcam(image_id: str, model_version: str) -> bool:
    """Compute and cache the Grad-CAM heatmap of one image under one model version."""
    from worker.gradcam import compute_heatmap

    return compute_heatmap(image_id, model_version)


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


@celery_app.task(name="worker.tasks.fail_stale_uploads")
def fail_stale_uploads() -> int:
    """Mark jobs whose upload was never finished as failed, with the reason (they never look running)."""
    return pipeline.fail_stale_uploads(load_settings())


@celery_app.task(name="worker.tasks.sweep_orphans")
def sweep_orphans() -> int:
    """Delete stored images of uploads refused or interrupted longer ago than the grace period (no row claims them)."""
    from skinscan.orphans import sweep_orphans as sweep

    return sweep(load_settings())


@celery_app.task(name="worker.tasks.nightly_rescore", queue="rescore", **_RETRY)
def nightly_rescore(clinic_id: str | None = None, since: str | None = None) -> int | None:
    """Start or resume re-scoring every stored image that lacks a prediction of the production model."""
    from datetime import datetime

    from worker.rescore import start_rescore

    run = start_rescore(load_settings(), clinic_id, datetime.fromisoformat(since) if since else None,
                        actor="schedule", requeue_active=False)
    return run.id if run else None


@celery_app.task(name="worker.tasks.rescore_chunk", queue="rescore", **_RETRY)
def rescore_chunk(run_id: int, image_ids: list[str]) -> int:
    """Re-score one chunk of a run's images with the run's model."""
    from worker.rescore import rescore_chunk as run_chunk

    return run_chunk(run_id, image_ids)
