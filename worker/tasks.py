"""Celery tasks: thin wrappers that take ids and call the pipeline; retries with backoff on outages.

They are shared tasks: each Celery app (skinscan.broker's, one per broker) takes them when it is finalized, so
importing this module reads no settings and builds no app. Their names ("worker.tasks.*") are what producers send
and beat schedules: they stay as they are across releases.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.signals import worker_process_init
from sqlalchemy.exc import DBAPIError, OperationalError

from skinscan.settings import load_settings
from skinscan.storage import StorageError
from worker import pipeline

log = logging.getLogger(__name__)

_RETRY = {
    "autoretry_for": (StorageError, OperationalError, DBAPIError, ConnectionError, TimeoutError,
                      pipeline.ChunkIncomplete),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
}


class Retrying(Task):
    """A task retried on outages at most SKINSCAN_TASK_MAX_RETRIES times (read when it retries, not at import)."""

    @property
    def max_retries(self) -> int:  # type: ignore[override]
        """How many times a failed run is retried."""
        return load_settings().task_max_retries


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """Give each forked child its own database connections (never share a parent's sockets)."""
    from skinscan.db import dispose_engines

    dispose_engines()


@shared_task(name="worker.tasks.score_chunk", base=Retrying, **_RETRY)
def score_chunk(job_id: str, image_ids: list[str]) -> int:
    """Score one chunk of a job's images."""
    return pipeline.score_chunk(job_id, image_ids)


@shared_task(name="worker.tasks.gradcam", base=Retrying, **_RETRY)
def gradcam(image_id: str, model_version: str) -> bool:
    """Compute and cache the Grad-CAM heatmap of one image under one model version."""
    from worker.gradcam import compute_heatmap

    return compute_heatmap(image_id, model_version)


@shared_task(name="worker.tasks.finish_job", base=Retrying, **_RETRY)
def finish_job(job_id: str) -> None:
    """Recount a job whose images were all finished before it closed for uploads, and mark it done."""
    pipeline.refresh_job(job_id, load_settings())


@shared_task(name="worker.tasks.requeue_stalled")
def requeue_stalled() -> int:
    """Re-send only the chunks really lost (not finished, not held by a worker, not waiting in the queue)."""
    from worker.dispatch import requeue_lost

    total = requeue_lost(load_settings())
    if total:
        log.warning("requeued %d lost chunks of stalled jobs and re-score runs", total)
    return total


@shared_task(name="worker.tasks.fail_stale_uploads")  # the name beat schedules (kept across releases)
def fail_stale_uploads() -> int:
    """Close multi-part uploads never started: scored as a job with what they hold, or failed if they hold none."""
    from worker.stale_uploads import close_stale_uploads

    return close_stale_uploads(load_settings())


@shared_task(name="worker.tasks.sweep_orphans")
def sweep_orphans() -> int:
    """Delete stored images of uploads refused or interrupted longer ago than the grace period (no row claims them)."""
    from skinscan.orphans import sweep_orphans as sweep

    return sweep(load_settings())


@shared_task(name="worker.tasks.nightly_rescore", queue="rescore", bind=True, base=Retrying, **_RETRY)
def nightly_rescore(self: Task, clinic_id: str | None = None, since: str | None = None) -> int | None:
    """Start or resume re-scoring every stored image that lacks a prediction of the production model, once per
    night: the first task to claim the night runs it, a second beat's task finds the claim and does nothing."""
    import uuid
    from datetime import datetime

    from worker.nightly import run_nightly

    return run_nightly(load_settings(), self.request.id or uuid.uuid4().hex, clinic_id,
                       datetime.fromisoformat(since) if since else None)


@shared_task(name="worker.tasks.rescore_chunk", queue="rescore", base=Retrying, **_RETRY)
def rescore_chunk(run_id: int, image_ids: list[str]) -> int:
    """Re-score one chunk of a run's images with the run's model."""
    from worker.rescore import rescore_chunk as run_chunk

    return run_chunk(run_id, image_ids)


@shared_task(name="worker.tasks.apply_retention", queue="rescore", base=Retrying, **_RETRY)
def apply_retention(cutoff_at: str | None = None) -> int:
    """Delete jobs past their clinic's retention, a batch per task; a full batch sends the next task of the run
    (same cut-off time, so the run ends), behind clinic uploads on the low-priority queue."""
    from datetime import datetime

    from skinscan.retention import delete_expired
    from skinscan.tables import utcnow

    now = datetime.fromisoformat(cutoff_at) if cutoff_at else utcnow()
    run = delete_expired(load_settings(), now=now)
    if run.more:
        apply_retention.apply_async(kwargs={"cutoff_at": now.isoformat()})
    return run.deleted
