"""The Celery application: Redis broker in production, kombu's in-process memory transport embedded."""

from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab
from kombu import Queue

from skinscan.settings import Settings, load_settings

SCORE_QUEUE = "skinscan"
RESCORE_QUEUE = "rescore"


def create_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app: late acks, redelivery on worker loss, clinic queue served before re-scoring."""
    settings = settings or load_settings()
    app = Celery("skinscan", broker=settings.broker_url, include=["worker.tasks"])
    visibility = int(os.environ.get("SKINSCAN_VISIBILITY_TIMEOUT", "3600"))
    schedule = {
        "requeue-stalled-jobs": {"task": "worker.tasks.requeue_stalled", "schedule": 60.0},
    }
    if settings.rescore_enabled:
        schedule["nightly-rescore"] = {
            "task": "worker.tasks.nightly_rescore",
            "schedule": crontab(hour=settings.rescore_hour, minute=settings.rescore_minute),
        }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=SCORE_QUEUE,
        task_queues=(Queue(SCORE_QUEUE), Queue(RESCORE_QUEUE)),
        task_routes={"worker.tasks.rescore_chunk": {"queue": RESCORE_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Poll the clinic queue first: a re-score never holds up an upload. Redelivery of a message whose
        # worker died happens after the visibility timeout; the stalled-job sweeper covers lost messages.
        broker_transport_options={"visibility_timeout": visibility, "queue_order_strategy": "priority"},
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=schedule,
    )
    return app


celery_app = create_celery()
_APPS: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """Return a Celery app for these settings' broker (the module's app when the broker is the same)."""
    if settings.broker_url == celery_app.conf.broker_url:
        return celery_app
    if settings.broker_url not in _APPS:
        _APPS[settings.broker_url] = create_celery(settings)
    return _APPS[settings.broker_url]
