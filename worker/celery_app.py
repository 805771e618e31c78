"""The Celery app a worker and beat run: skinscan.broker's app for their broker, with the lease renewal step.

Built when a command asks for it, from the settings it read: importing this module reads no settings."""

from __future__ import annotations

from celery import Celery

from skinscan.broker import celery_for
from skinscan.settings import Settings
from worker.leases import LeaseRenewal


def worker_celery(settings: Settings) -> Celery:
    """Return the app for these settings' broker, renewing the leases of held messages while the worker lives."""
    app = celery_for(settings)
    if LeaseRenewal not in app.steps["consumer"]:
        app.steps["consumer"].add(LeaseRenewal)
    return app
