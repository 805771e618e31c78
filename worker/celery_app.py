"""The Celery application: Redis broker in production, kombu's in-process memory transport embedded."""

from __future__ import annotations

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
    visibility = settings.visibility_timeout
    sweep = float(settings.sweep_interval_seconds)
    schedule = {
        "requeue-stalled-jobs": {"task": "worker.tasks.requeue_stalled", "schedule": sweep},
        "fail-stale-uploads": {"task": "worker.tasks.fail_stale_uploads", "schedule": sweep},
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
        # kombu scans for unacked messages past the visibility timeout every interval x throttle seconds
        # (100 s by default); scan every few seconds instead so a killed worker's message returns promptly.
        broker_transport_options={"visibility_timeout": visibility, "queue_order_strategy": "priority",
                                  "unacked_restore_interval": max(1, min(10, visibility // 4)),
                                  "unacked_restore_throttle": 1},
        # A hung task is killed (its images stay pending, the sweeper resends them, attempts are counted);
        # keep this below the visibility timeout or Redis redelivers a task that is still running.
        task_time_limit=settings.task_time_limit,
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
