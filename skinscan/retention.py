"""Retention: each clinic says how many days its jobs are kept; a nightly run deletes the older ones.

A clinic's `retention_days` (None, the default: keep until deleted by hand) is counted from a job's upload
(`jobs.created_at`). The nightly run (beat, `SKINSCAN_RETENTION_HOUR`:`SKINSCAN_RETENTION_MINUTE` UTC, or
`skinscan apply-retention` by hand) deletes each job past it through the same path as a manual delete
(skinscan.jobs.deletion: rows, then every stored object, one `job.delete` audit event per job by the actor
`retention`), oldest first, at most `SKINSCAN_RETENTION_BATCH` jobs per task: a first run over a large archive
goes on in further tasks instead of holding one worker for hours. Each job is taken under a row lock that skips
jobs another deleter holds, so two runs (two beats, a redelivered task) never delete the same job twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from skinscan.db import session_scope
from skinscan.jobs.deletion import Deletion, delete_job
from skinscan.settings import Settings
from skinscan.storage import Storage, get_storage
from skinscan.tables import Clinic, Job, utcnow

log = logging.getLogger(__name__)

RETENTION_ACTOR = "retention"
MAX_RETENTION_DAYS = 36_500  # a hundred years: anything longer is a typo for "keep"


@dataclass(frozen=True)
class RetentionRun:
    """What one retention task did: the jobs it deleted, and whether jobs past retention may be left."""

    deletions: list[Deletion]
    more: bool

    @property
    def deleted(self) -> int:
        """Number of jobs deleted."""
        return len(self.deletions)

    @property
    def objects_left(self) -> int:
        """Stored objects storage could not delete now (the orphan sweeper removes them later)."""
        return sum(1 if d.objects_left is None else d.objects_left for d in self.deletions if not d.complete)


def check_days(days: int | None) -> int | None:
    """Return a valid retention in days (None: keep), or raise ValueError saying what is wrong."""
    if days is not None and not 1 <= days <= MAX_RETENTION_DAYS:
        raise ValueError(f"retention must be between 1 and {MAX_RETENTION_DAYS} days (got {days}); "
                         "use --keep to keep jobs until they are deleted by hand")
    return days


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite returns naive UTC times


def removal_time(created_at: datetime, days: int | None, settings: Settings) -> datetime | None:
    """When the nightly run deletes a job uploaded at created_at under this retention (None: it is kept)."""
    if days is None:
        return None
    due = _aware(created_at) + timedelta(days=days)
    run = due.replace(hour=settings.retention_hour, minute=settings.retention_minute, second=0, microsecond=0)
    return run if run >= due else run + timedelta(days=1)


def delete_expired(settings: Settings, storage: Storage | None = None, now: datetime | None = None,
                   limit: int | None = None) -> RetentionRun:
    """Delete up to `limit` jobs older than their clinic's retention at `now`, oldest first per clinic."""
    storage = storage or get_storage(settings)
    now = now or utcnow()
    limit = limit or settings.retention_batch
    with session_scope(settings) as session:
        clinics = list(session.execute(select(Clinic.id, Clinic.retention_days)
                                       .where(Clinic.retention_days.is_not(None)).order_by(Clinic.id)).all())
    deletions: list[Deletion] = []
    for clinic_id, days in clinics:
        cutoff = now - timedelta(days=days)
        while True:
            if len(deletions) >= limit:
                return RetentionRun(deletions, more=True)
            with session_scope(settings) as session:
                # The clinic's retention is read again with each job: changed to keep, the run stops at once.
                job = session.scalars(
                    select(Job).join(Clinic, Clinic.id == Job.clinic_id)
                    .where(Job.clinic_id == clinic_id, Clinic.retention_days == days, Job.created_at <= cutoff)
                    .order_by(Job.created_at, Job.id).limit(1)
                    .with_for_update(skip_locked=True, of=Job)).first()
                if job is None:
                    break
                uploaded = _aware(job.created_at).date().isoformat()
                deletion = delete_job(session, storage, job, RETENTION_ACTOR, settings.orphan_grace_seconds)
            deletions.append(deletion)
            log.info("retention: job %s of clinic %s deleted (uploaded %s, retention %d days)", deletion.job_id,
                     clinic_id, uploaded, days)
    return RetentionRun(deletions, more=False)
