"""The Celery application as producers and beat see it: Redis broker in production, kombu's in-process memory
transport embedded; queues, routes and the beat schedule. Tasks are sent by name (send_task), so nothing here
imports the worker; worker/celery_app.py adds the worker's own consumer step."""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab
from kombu import Queue

from skinscan.logs import cap_library_loggers
from skinscan.settings import Settings, load_settings

SCORE_QUEUE = "skinscan"
RESCORE_QUEUE = "rescore"


def create_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app: late acks, redelivery on worker loss, clinic queue served before re-scoring."""
    settings = settings or load_settings()
    cap_library_loggers()  # worker and beat: no signed URLs or key ids in a DEBUG log
    app = Celery("skinscan", broker=settings.broker_url, include=["worker.tasks"])
    visibility = settings.visibility_timeout
    sweep = float(settings.sweep_interval_seconds)
    schedule = {
        "requeue-stalled-jobs": {"task": "worker.tasks.requeue_stalled", "schedule": sweep},
        "fail-stale-uploads": {"task": "worker.tasks.fail_stale_uploads", "schedule": sweep},
        "sweep-orphaned-objects": {"task": "worker.tasks.sweep_orphans", "schedule": sweep},
        # Jobs past their clinic's retention (none while every clinic keeps its jobs, the default).
        "nightly-retention": {"task": "worker.tasks.apply_retention",
                              "schedule": crontab(hour=settings.retention_hour, minute=settings.retention_minute)},
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
        task_routes={"worker.tasks.rescore_chunk": {"queue": RESCORE_QUEUE},
                     "worker.tasks.apply_retention": {"queue": RESCORE_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Poll the clinic queue first: a re-score never holds up an upload. A message whose worker died goes
        # back on its queue once its lease (the visibility timeout, 30 s by default) runs out: live workers
        # renew the leases of the messages they hold (worker.leases), so only a dead worker's expire. The
        # stalled-job sweeper covers messages lost with the broker. kombu scans for expired leases every
        # interval x throttle seconds (100 s by default); scan every few seconds instead.
        broker_transport_options={"visibility_timeout": visibility, "queue_order_strategy": "priority",
                                  "unacked_restore_interval": max(1, min(10, visibility // 4)),
                                  "unacked_restore_throttle": 1},
        # A hung task is killed (its images stay pending, the sweeper resends them, attempts are counted); its lease
        # is renewed while it runs, so a limit longer than the visibility timeout never causes a redelivery.
        task_time_limit=settings.task_time_limit,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=schedule,
    )
    return app


_APPS: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """Return this process's Celery app for these settings' broker (one per broker)."""
    if settings.broker_url not in _APPS:
        _APPS[settings.broker_url] = create_celery(settings)
    return _APPS[settings.broker_url]
