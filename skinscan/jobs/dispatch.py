"""Sending work to the workers by task name: a committed job's chunks, recorded before each message is sent
(JobChunk: when, as which Celery task id), and the task that finishes a job. worker/dispatch.py finds lost chunks and
sends them again."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from skinscan.settings import Settings, load_settings
from skinscan.tables import ImageRecord, JobChunk, utcnow

log = logging.getLogger(__name__)


SCORE_TASK, SCORE_QUEUE = "worker.tasks.score_chunk", "skinscan"
FINISH_TASK = "worker.tasks.finish_job"
RESCORE_TASK, RESCORE_QUEUE = "worker.tasks.rescore_chunk", "rescore"


def chunked(ids: list[str], size: int) -> list[list[str]]:
    """Split a list of ids into lists of at most size."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def new_task_id() -> str:
    """A Celery task id, chosen before the message is sent so that its dispatch record is committed first."""
    return str(uuid.uuid4())


def pending_image_ids(session: Session, job_id: str) -> list[str]:
    """Return the ids of a job's images not yet scored or failed, in upload order."""
    return list(session.scalars(
        select(ImageRecord.id).where(ImageRecord.job_id == job_id, ImageRecord.status == "pending")
            .order_by(ImageRecord.position)
    ))


def send_tasks(settings: Settings, task: str, queue: str, sends: Iterable[tuple[str, list[Any]]]) -> int:
    """Publish (task id, args) messages; return how many."""
    from skinscan.broker import celery_for

    app = celery_for(settings)
    n = 0
    for task_id, args in sends:
        app.send_task(task, args=args, queue=queue, task_id=task_id)
        n += 1
    return n


def enqueue_job(session: Session, job_id: str, settings: Settings | None = None, resend: bool = False) -> int:
    """Send score tasks for a job's pending images that no chunk covers yet; call only after they are committed.

    Each part of an upload is sent as soon as it commits, so scoring starts while later parts upload; a part's
    chunks are added to the job's dispatch records, committed before any message is sent. `resend` replaces the
    records and sends every pending image again (a restarted embedded service whose in-memory broker lost all).
    Returns how many chunks were sent.
    """
    settings = settings or load_settings()
    if session.in_transaction() and session.new:
        raise RuntimeError("enqueue_job called with uncommitted rows: commit the job first")
    pending = pending_image_ids(session, job_id)
    first_seq = 0
    if resend:
        session.execute(delete(JobChunk).where(JobChunk.job_id == job_id))
    else:
        covered: set[str] = set()
        for seq, image_ids in session.execute(select(JobChunk.seq, JobChunk.image_ids)
                                              .where(JobChunk.job_id == job_id)):
            covered.update(image_ids)
            first_seq = max(first_seq, seq + 1)
        pending = [i for i in pending if i not in covered]
    records = [{"job_id": job_id, "seq": first_seq + n, "image_ids": ids, "task_id": new_task_id(),
                "dispatched_at": utcnow(), "sends": 1} for n, ids in enumerate(chunked(pending, settings.chunk_size))]
    if records:
        session.execute(insert(JobChunk), records)
    session.commit()
    send_tasks(settings, SCORE_TASK, SCORE_QUEUE, ((r["task_id"], [job_id, r["image_ids"]]) for r in records))
    log.info("job %s: %d chunks enqueued", job_id, len(records))
    return len(records)


def finish_if_complete(session: Session, job_id: str, settings: Settings | None = None) -> bool:
    """After a job closes for uploads (committed): if no image is left pending, have a worker finish it (metrics,
    status); return whether a finish task was sent. Its images may all have been scored while it was uploading."""
    settings = settings or load_settings()
    left = session.scalar(select(func.count()).where(ImageRecord.job_id == job_id, ImageRecord.status == "pending"))
    session.commit()
    if left:
        return False
    send_tasks(settings, FINISH_TASK, SCORE_QUEUE, [(new_task_id(), [job_id])])
    return True
