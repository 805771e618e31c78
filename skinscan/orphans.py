"""Stored objects that no committed image claims: recording an upload's intent first, and sweeping what is left.

An upload request commits an `uploads` row naming a fresh key prefix before it stores its first object, stores
every object under that prefix, and deletes the row in the same transaction that commits the image rows. A row
that outlives the grace period (SKINSCAN_ORPHAN_GRACE_SECONDS) therefore belongs to a request that was refused,
hit a storage outage, or died with its process; the sweeper (beat, or `skinscan sweep-orphans`) deletes every
object under its prefix that no committed image claims, then the row.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from skinscan.db import session_scope
from skinscan.settings import Settings
from skinscan.storage import Storage, StorageError, get_storage
from skinscan.tables import ImageRecord, Upload, new_id, utcnow

log = logging.getLogger(__name__)

# Keys of images stored before uploads recorded their intent: clinic/job/image.ext, no upload prefix.
LEGACY_IMAGE_KEY = re.compile(r"[0-9a-f]{32}/[0-9a-f]{32}/[0-9a-f]{32}\.(?:jpg|png|bmp|tif)")


@dataclass(frozen=True)
class UploadIntent:
    """A committed intent to store objects: its id and the key prefix every object of the request goes under."""

    id: str
    job_id: str
    prefix: str


def begin_upload(settings: Settings, clinic_id: str, job_id: str) -> UploadIntent:
    """Commit (in a transaction of its own) the intent to store objects under a fresh prefix; return it."""
    upload_id = new_id()
    prefix = f"{clinic_id}/{job_id}/{upload_id}/"
    with session_scope(settings) as session:
        session.add(Upload(id=upload_id, clinic_id=clinic_id, job_id=job_id, prefix=prefix))
    return UploadIntent(upload_id, job_id, prefix)


def end_upload(session: Session, intent: UploadIntent) -> None:
    """Delete the intent in the caller's transaction (the one committing the image rows).

    Raises StorageError when the sweeper already took the intent (the request outlived the grace period): its
    objects may be gone, so the rows must not be committed.
    """
    gone = session.execute(delete(Upload).where(Upload.id == intent.id)).rowcount
    if gone != 1:
        raise StorageError("this upload took longer than the orphan grace period and its stored images were "
                           "removed; send it again")


def delete_unclaimed(session: Session, storage: Storage, prefix: str, job_id: str) -> int:
    """Delete the objects under an upload's prefix that no committed image of its job claims; return how many."""
    keys = storage.list_keys(prefix)
    claimed = set(session.scalars(select(ImageRecord.storage_key)
        .where(ImageRecord.job_id == job_id))) if keys else set()
    removed = 0
    for key in keys:
        if key not in claimed:
            storage.delete(key)
            removed += 1
    return removed


def discard_upload(session: Session, storage: Storage, intents: list[UploadIntent]) -> bool:
    """Delete every object of refused, rolled-back uploads now, then their intents; False if storage failed.

    Stops at the first storage error (during an outage every call would fail slowly): the sweeper finishes later.
    Objects a committed image claims are never touched.
    """
    try:
        for intent in intents:
            delete_unclaimed(session, storage, intent.prefix, intent.job_id)
    except StorageError:
        log.warning("could not remove the stored images of a refused upload now; the orphan sweeper will")
        _keep_intents(session, intents)
        return False
    if intents:
        try:
            session.execute(delete(Upload).where(Upload.id.in_([i.id for i in intents])))
            session.commit()
        except Exception:  # noqa: BLE001 - the objects are gone; the sweeper drops the intents later
            session.rollback()
            log.warning("could not remove the intents of a discarded upload; the orphan sweeper will")
    return True


def _keep_intents(session: Session, intents: list[UploadIntent]) -> None:
    """Make sure the sweeper still knows these uploads (it may have taken an intent while the request ran)."""
    try:
        for intent in intents:
            if session.get(Upload, intent.id) is None:
                session.add(Upload(id=intent.id, clinic_id=intent.prefix.split("/", 1)[0], job_id=intent.job_id,
                                   prefix=intent.prefix))
        session.commit()
    except Exception:  # noqa: BLE001 - the database is failing too; nothing more can be done here
        session.rollback()
        log.exception("could not keep the intent of a discarded upload; its objects may stay orphaned")


def sweep_orphans(settings: Settings, storage: Storage | None = None, grace_seconds: int | None = None,
                  batch: int = 50) -> int:
    """Delete the objects of uploads older than the grace period that no committed image claims; return how many.

    Uploads are swept in batches, each intent locked while its prefix is swept (a request finishing late then
    finds it gone and refuses to commit); an intent whose objects could not all be deleted stays for next time.
    """
    storage = storage or get_storage(settings)
    grace = settings.orphan_grace_seconds if grace_seconds is None else grace_seconds
    cutoff = utcnow() - timedelta(seconds=grace)
    removed, more = 0, True
    while more:
        with session_scope(settings) as session:
            uploads = list(session.scalars(
                select(Upload).where(Upload.created_at <= cutoff).order_by(Upload.created_at).limit(batch)
                .with_for_update(skip_locked=True)))
            more = len(uploads) == batch
            for upload in uploads:
                try:
                    removed += delete_unclaimed(session, storage, upload.prefix, upload.job_id)
                except StorageError as exc:
                    log.warning("orphan sweep stopped: storage unavailable (%s); it goes on at the next sweep", exc)
                    more = False
                    break
                session.delete(upload)
    if removed:
        log.warning("removed %d stored images that no committed job claims (uploads refused or interrupted)",
                    removed)
    return removed


def sweep_legacy_orphans(settings: Settings, storage: Storage | None = None, grace_seconds: int | None = None,
                         batch: int = 500) -> int:
    """Delete images stored before upload intents existed (clinic/job/image keys) that no image row claims.

    Lists the whole bucket, so it is a command to run by hand once after upgrading, not a scheduled sweep; only
    objects older than the grace period are considered, and heatmaps and every newer key are left alone.
    """
    storage = storage or get_storage(settings)
    grace = settings.orphan_grace_seconds if grace_seconds is None else grace_seconds
    cutoff = (utcnow() - timedelta(seconds=grace)).timestamp()
    keys = [k for k in storage.list_keys("", older_than=cutoff) if LEGACY_IMAGE_KEY.fullmatch(k)]
    removed = 0
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        with session_scope(settings) as session:
            claimed = set(session.scalars(select(ImageRecord.storage_key).where(ImageRecord.storage_key.in_(part))))
        for key in part:
            if key not in claimed:
                storage.delete(key)
                removed += 1
    if removed:
        log.warning("removed %d images stored before upload intents existed that no image row claims", removed)
    return removed
