"""Deleting a job: its rows (images, predictions, metrics, reviews) and every object it stored, audited.

Every object of a job lives under one key prefix, `<clinic id>/<job id>/` (uploaded images under each upload's
prefix below it, Grad-CAM heatmaps under `gradcam/`; thumbnails are made on the fly and never stored). The rows
go first, in one transaction that also writes the audit event and an upload intent for the whole prefix, dated
back past the orphan grace period; then the objects are deleted. So no row ever points to a deleted object, and
if storage fails part way the intent stays: deleting the job again, or the orphan sweeper, removes the rest.
Deleting a job that was already deleted answers as before (found through the audit trail) and retries any
objects left. The audit event has no foreign key to the job, so it outlives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.storage import Storage, StorageError
from skinscan.tables import AuditEvent, ImageRecord, Job, JobMetrics, Prediction, Upload, new_id, utcnow

log = logging.getLogger(__name__)

DELETE_ACTION = "job.delete"


@dataclass(frozen=True)
class Deletion:
    """What deleting a job did: rows removed, objects removed and objects storage kept for now."""

    job_id: str
    images: int
    objects_deleted: int
    objects_left: int | None  # None: storage could not even be listed
    already_deleted: bool = False

    @property
    def complete(self) -> bool:
        """Whether every stored object of the job is gone."""
        return self.objects_left == 0

    @property
    def message(self) -> str:
        """One sentence for the user."""
        if self.complete:
            what = "was already deleted" if self.already_deleted else f"and its {self.images} images were deleted"
            return f"The job {what}; no stored image of it is left."
        left = "some" if self.objects_left is None else str(self.objects_left)
        return (f"The job's records were deleted, but storage could not remove {left} stored objects now; they are "
                "removed at the next orphan sweep, or when you delete the job again.")

    def as_dict(self) -> dict[str, object]:
        """JSON form for the API."""
        return {"id": self.job_id, "deleted": True, "already_deleted": self.already_deleted, "images": self.images,
                "objects_deleted": self.objects_deleted, "objects_left": self.objects_left,
                "complete": self.complete, "message": self.message}


def job_prefix(clinic_id: str, job_id: str) -> str:
    """The key prefix every stored object of a job is under."""
    return f"{clinic_id}/{job_id}/"


def was_deleted(session: Session, clinic_id: str, job_id: str) -> bool:
    """Whether the audit trail records the deletion of this clinic's job."""
    return session.scalar(select(AuditEvent.id).where(
        AuditEvent.clinic_id == clinic_id, AuditEvent.action == DELETE_ACTION, AuditEvent.target_type == "job",
        AuditEvent.target_id == job_id).limit(1)) is not None


def delete_job(session: Session, storage: Storage, job: Job, actor: str, grace_seconds: int) -> Deletion:
    """Delete a job's rows (audited, committed), then its stored objects; return what was done.

    The job's row is locked first: of simultaneous deletions one deletes and audits, and the others, let through
    once it committed, find the row gone and answer as for a job deleted before.
    """
    job_id, clinic_id = job.id, job.clinic_id
    locked = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if locked is None:
        session.rollback()
        return retry_deleted(session, storage, clinic_id, job_id)
    job = locked
    prefix = job_prefix(clinic_id, job_id)
    images = session.scalar(select(func.count()).where(ImageRecord.job_id == job_id)) or 0
    audit.record(session, DELETE_ACTION, actor, clinic_id, "job", job_id,
                 {"name": job.name, "status": job.status, "images": images, "scored": job.scored,
                  "created_at": job.created_at.isoformat() if job.created_at else None})
    # The intents of this job's uploads (a ghost's, or a part being added now) give way to one for the whole
    # prefix: a request still adding a part then finds its intent gone and refuses to commit.
    session.execute(delete(Upload).where(Upload.job_id == job_id))
    intent_id = new_id()
    session.add(Upload(id=intent_id, clinic_id=clinic_id, job_id=job_id, prefix=prefix,
                       created_at=utcnow() - timedelta(seconds=grace_seconds + 1)))
    image_ids = select(ImageRecord.id).where(ImageRecord.job_id == job_id).scalar_subquery()
    session.execute(delete(Prediction).where(Prediction.image_id.in_(image_ids)))
    session.execute(delete(JobMetrics).where(JobMetrics.job_id == job_id))
    session.execute(delete(ImageRecord).where(ImageRecord.job_id == job_id))  # reviews go with them (cascade)
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()
    log.info("job %s deleted by %s: %d image rows", job_id, actor, images)
    removed, left = remove_objects(session, storage, intent_id, prefix)
    return Deletion(job_id, images, removed, left)


def retry_deleted(session: Session, storage: Storage, clinic_id: str, job_id: str) -> Deletion:
    """For a job deleted before: remove any stored objects its deletion left; return what is left."""
    prefix = job_prefix(clinic_id, job_id)
    intent = session.scalars(select(Upload).where(Upload.job_id == job_id, Upload.prefix == prefix)).first()
    if intent is None:
        return Deletion(job_id, 0, 0, 0, already_deleted=True)
    removed, left = remove_objects(session, storage, intent.id, prefix)
    return Deletion(job_id, 0, removed, left, already_deleted=True)


def remove_objects(session: Session, storage: Storage, intent_id: str, prefix: str) -> tuple[int, int | None]:
    """Delete every object under a deleted job's prefix, then its intent; return (deleted, left or None).

    Stops at the first storage error (during an outage every call would fail slowly) and keeps the intent, so
    the orphan sweeper or a repeated deletion finishes the work.
    """
    try:
        keys = storage.list_keys(prefix)
    except StorageError as exc:
        log.warning("could not list the stored objects of deleted job prefix %s: %s", prefix, exc)
        return 0, None
    removed = 0
    for key in keys:
        try:
            storage.delete(key)
        except StorageError as exc:
            log.warning("could not delete %d stored objects of a deleted job now (%s); the orphan sweeper will",
                        len(keys) - removed, exc)
            return removed, len(keys) - removed
        removed += 1
    session.execute(delete(Upload).where(Upload.id == intent_id))
    session.commit()
    return removed, 0
