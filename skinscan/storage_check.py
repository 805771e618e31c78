"""The bucket against the database, after a restore: the objects the backup order leaves to reconcile.

A backup is the database dump first, then a copy of the bucket (README, "Backup and restore"). Every object a row
of the dump names was stored before that row was committed, so the copy has it, unless its job was deleted
between the dump and the copy: those rows come back without their objects (reported as missing; delete the job
again). Objects stored after the dump (the images of jobs the dump does not have, heatmaps, a bundle registered
later) come back with no row: `delete_unclaimed` removes them. Objects under an upload intent of the dump (an
upload in flight, a deletion not finished) are left to the orphan sweeper, which handles them as on any day.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from skinscan.db import session_scope
from skinscan.settings import Settings
from skinscan.storage import Storage, get_storage
from skinscan.tables import ImageRecord, ModelVersion, Upload

log = logging.getLogger(__name__)

_JOB_KEY = re.compile(r"(?P<clinic>[0-9a-f]{32})/(?P<job>[0-9a-f]{32})/(?P<rest>.+)")
_HEATMAP = re.compile(r"gradcam/(?P<image>[0-9a-f]{32})-[0-9a-f]+\.(?:png|state\.json)")
MODELS_PREFIX = "models/"
_BATCH = 10_000


@dataclass
class StorageCheck:
    """What the bucket holds against the database, and what was deleted."""

    objects: int = 0
    claimed: int = 0
    unclaimed: list[str] = field(default_factory=list)  # no row names them: stored after the dump
    swept_later: int = 0  # under an upload intent: the orphan sweeper's
    foreign: list[str] = field(default_factory=list)  # not SkinScan's key layout: never touched
    missing: Counter[str] = field(default_factory=Counter)  # job id -> its images whose object is gone
    deleted: int = 0

    @property
    def consistent(self) -> bool:
        """Whether every row's object is there and every SkinScan object is claimed (or deleted now)."""
        return not self.missing and self.deleted == len(self.unclaimed)


def check_storage(settings: Settings, storage: Storage | None = None, delete: bool = False) -> StorageCheck:
    """List the whole bucket, compare it with the image, model and upload rows; delete unclaimed objects if asked.

    Meant for a restored deployment before its web, worker and beat start (a bundle being registered at the
    same moment has objects and no row yet). Costs one listing of the bucket and one pass over the image rows.
    """
    storage = storage or get_storage(settings)
    keys = set(storage.list_keys(""))
    result = StorageCheck(objects=len(keys))
    claimed: set[str] = set()
    with session_scope(settings) as session:
        model_prefixes = [p for p in session.scalars(select(ModelVersion.storage_prefix)) if p]
        intents = list(session.scalars(select(Upload.prefix)))
        rows = session.execute(select(ImageRecord.id, ImageRecord.job_id, ImageRecord.storage_key)
                               .execution_options(yield_per=_BATCH))
        image_ids: set[str] = set()
        for image_id, job_id, key in rows:
            image_ids.add(image_id)
            if key is None:
                continue
            if key in keys:
                claimed.add(key)
            else:
                result.missing[job_id] += 1
    for key in sorted(keys - claimed):
        if key.startswith(MODELS_PREFIX):
            owned = any(key.startswith(p) for p in model_prefixes)
        elif (match := _JOB_KEY.fullmatch(key)) is not None:
            if any(key.startswith(p) for p in intents):
                result.swept_later += 1
                continue
            heatmap = _HEATMAP.fullmatch(match["rest"])
            owned = heatmap is not None and heatmap["image"] in image_ids
        else:
            result.foreign.append(key)
            continue
        if owned:
            claimed.add(key)
        else:
            result.unclaimed.append(key)
    result.claimed = len(claimed)
    if delete:
        for key in result.unclaimed:
            storage.delete(key)
            result.deleted += 1
        if result.deleted:
            log.warning("deleted %d stored objects that no row of the database claims", result.deleted)
    return result


def report(result: StorageCheck) -> str:
    """Lines for the person who runs the check."""
    lines = [f"{result.objects} objects in the bucket: {result.claimed} claimed by the database, "
             f"{len(result.unclaimed)} claimed by nothing"
             + (f" ({result.deleted} deleted now)" if result.deleted else
                (" (run again with --delete to remove them)" if result.unclaimed else "")) + ", "
             f"{result.swept_later} under an unfinished upload or deletion (the orphan sweeper removes them), "
             f"{len(result.foreign)} not SkinScan's (left alone)."]
    if result.missing:
        lines.append(f"{sum(result.missing.values())} images of {len(result.missing)} jobs have no stored object. "
                     "A job deleted after the database dump was taken comes back without its images: delete it "
                     "again (DELETE /api/v1/jobs/ID or its job page). Jobs:")
        lines += [f"  {job_id}  {n} images missing" for job_id, n in sorted(result.missing.items())]
    return "\n".join(lines)
