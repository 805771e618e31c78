"""Finding lost work: re-send only the chunks that were really lost (sending a committed job's chunks, recording
each dispatch, is skinscan.jobs.dispatch's).

Every chunk sent to the workers is recorded first (JobChunk for an upload job, RescoreChunk for a re-score run):
when it was dispatched and as which Celery task id, committed before the message is published. The stalled-job
sweeper re-sends a chunk only when it is unfinished, was dispatched longer ago than the lost-message bound
(`requeue_after_seconds`), is not held by a worker (the broker's unacknowledged messages) and is no longer waiting
in its queue: queues are first in, first out, so a chunk dispatched before the oldest message still waiting has
already been delivered. A queue backlog therefore breeds no duplicate tasks. What workers hold and what waits are
read in one atomic snapshot, twice a moment apart, so a message being delivered is never in neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from skinscan.db import session_scope
from skinscan.jobs.dispatch import (
    RESCORE_QUEUE,
    RESCORE_TASK,
    SCORE_QUEUE,
    SCORE_TASK,
    chunked,
    new_task_id,
    pending_image_ids,
    send_tasks,
)
from skinscan.settings import Settings, load_settings
from skinscan.tables import JobChunk, RescoreChunk, RescoreRun, utcnow

log = logging.getLogger(__name__)

ALWAYS = datetime.max.replace(tzinfo=UTC)  # a queue with no chunk waiting: every older chunk was delivered
NEVER = datetime.min.replace(tzinfo=UTC)  # a queue whose waiting chunks cannot be told: none is lost
CONFIRM_AFTER = 1.0  # seconds between the two reads of a queue's state (a delivery in progress shows)
SWEEP_LIMIT = 1000  # re-score chunks looked at per sweep (the oldest first): a sweep costs O(SWEEP_LIMIT)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class QueueState:
    """What the broker says about a queue: tasks held by workers, and before when every message was delivered."""

    held: frozenset[str] = frozenset()
    horizon: datetime = ALWAYS


def is_lost(dispatched_at: datetime, task_id: str | None, cutoff: datetime, state: QueueState) -> bool:
    """True when an unfinished chunk is lost: sent before the cutoff, delivered already and held by no worker."""
    when = _aware(dispatched_at)
    return when < cutoff and when < state.horizon and (task_id is None or task_id not in state.held)


def horizon(length: int, head: list[str], dispatched: dict[str, datetime], depth: int) -> datetime:
    """The dispatch time before which every chunk has left a queue, from its length and its next messages.

    The first chunk among the next messages gives it; a queue with no chunk waiting gives ALWAYS, and one whose
    next `depth` messages are none of ours (more waiting behind them) gives NEVER.
    """
    if length == 0:
        return ALWAYS
    for task_id in head:
        if task_id in dispatched:
            return _aware(dispatched[task_id])
    return ALWAYS if length <= depth else NEVER


def queue_state(settings: Settings, queue: str, lookup: Callable[[list[str]], dict[str, datetime]],
                depth: int = 20, confirm_after: float = CONFIRM_AFTER) -> QueueState:
    """Read the broker's view of a queue (Redis); another broker gives the default: nothing held or waiting.

    Each read is one atomic snapshot of the held messages and the queue's head. It is taken twice, `confirm_after`
    seconds apart, and a chunk counts as held or waiting if either says so: a worker takes a message off the queue
    (BRPOP) before it records it as held, so a delivery in progress is in neither for a moment.
    """
    from skinscan.broker import celery_for
    from worker.leases import queue_snapshot

    app = celery_for(settings)
    if not str(app.conf.broker_url or "").startswith(("redis://", "rediss://")):
        return QueueState()
    states = []
    with app.connection_for_read() as conn:
        for n in range(2):
            if n:
                time.sleep(confirm_after)
            held, length, head = queue_snapshot(conn.default_channel, queue, depth)
            states.append(QueueState(frozenset(held), horizon(length, head, lookup(head) if head else {}, depth)))
    return QueueState(states[0].held | states[1].held, min(states[0].horizon, states[1].horizon))


def _job_dispatch_times(settings: Settings) -> Callable[[list[str]], dict[str, datetime]]:
    def lookup(task_ids: list[str]) -> dict[str, datetime]:
        with session_scope(settings) as session:
            return dict(session.execute(select(JobChunk.task_id, JobChunk.dispatched_at)
                                        .where(JobChunk.task_id.in_(task_ids))).all())
    return lookup


def _rescore_dispatch_times(settings: Settings) -> Callable[[list[str]], dict[str, datetime]]:
    def lookup(task_ids: list[str]) -> dict[str, datetime]:
        with session_scope(settings) as session:
            return dict(session.execute(select(RescoreChunk.task_id, RescoreChunk.dispatched_at)
                                        .where(RescoreChunk.task_id.in_(task_ids))).all())
    return lookup


def _lost_job_chunks(settings: Settings, job_id: str, cutoff: datetime,
                     state: QueueState) -> list[tuple[str, list[Any]]]:
    """Record the re-send of a stalled job's lost chunks (and of pending images no chunk covers); return them."""
    with session_scope(settings) as session:
        in_order = pending_image_ids(session, job_id)
        pending = set(in_order)
        if not pending:
            return []
        rows = list(session.scalars(select(JobChunk).where(JobChunk.job_id == job_id)
                                    .order_by(JobChunk.seq).with_for_update()))
        covered: set[str] = set()
        sends: list[tuple[str, list[Any]]] = []
        now = utcnow()
        for row in rows:
            covered.update(row.image_ids)
            if pending.intersection(row.image_ids) and is_lost(row.dispatched_at, row.task_id, cutoff, state):
                row.task_id, row.dispatched_at, row.sends = new_task_id(), now, row.sends + 1
                sends.append((row.task_id, [job_id, list(row.image_ids)]))
        uncovered = [i for i in in_order if i not in covered]
        seq = max((r.seq for r in rows), default=-1) + 1
        for n, ids in enumerate(chunked(uncovered, settings.chunk_size)):
            record = JobChunk(job_id=job_id, seq=seq + n, image_ids=ids, task_id=new_task_id(), dispatched_at=now)
            session.add(record)
            sends.append((record.task_id, [job_id, ids]))
    return sends


def _lost_rescore_chunks(settings: Settings, cutoff: datetime, state: QueueState) -> list[tuple[str, list[Any]]]:
    """Record the re-send of running re-score runs' lost chunks (the SWEEP_LIMIT oldest candidates); return them."""
    bound = min(cutoff, state.horizon)
    with session_scope(settings) as session:
        rows = list(session.execute(
            select(RescoreChunk.run_id, RescoreChunk.first_id, RescoreChunk.task_id, RescoreChunk.dispatched_at,
                   RescoreChunk.image_ids)
            .join(RescoreRun, RescoreRun.id == RescoreChunk.run_id)
            .where(RescoreRun.status == "running", RescoreChunk.completed_at.is_(None),
                   RescoreChunk.dispatched_at < bound)
            .order_by(RescoreChunk.dispatched_at).limit(SWEEP_LIMIT)))
        sends: list[tuple[str, list[Any]]] = []
        now = utcnow()
        for run_id, first_id, task_id, dispatched_at, image_ids in rows:
            if not is_lost(dispatched_at, task_id, cutoff, state):
                continue
            fresh = new_task_id()
            moved = session.execute(
                update(RescoreChunk).where(RescoreChunk.run_id == run_id, RescoreChunk.first_id == first_id,
                                           RescoreChunk.completed_at.is_(None), RescoreChunk.task_id == task_id)
                .values(task_id=fresh, dispatched_at=now, sends=RescoreChunk.sends + 1)).rowcount
            if moved:
                sends.append((fresh, [run_id, list(image_ids)]))
    return sends


def requeue_lost(settings: Settings | None = None) -> int:
    """Re-send the lost chunks of stalled jobs and running re-score runs; return how many were sent.

    A job is looked at once it made no progress for requeue_after_seconds; its counters are recomputed then too.
    """
    from worker import pipeline

    settings = settings or load_settings()
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    total = 0
    jobs = pipeline.stalled_jobs(settings)
    if jobs:
        state = queue_state(settings, SCORE_QUEUE, _job_dispatch_times(settings))
        for job_id in jobs:
            sends = _lost_job_chunks(settings, job_id, cutoff, state)
            total += send_tasks(settings, SCORE_TASK, SCORE_QUEUE, sends)
            if sends:
                log.warning("job %s: %d lost chunks sent again", job_id, len(sends))
            pipeline.refresh_job(job_id, settings)
    with session_scope(settings) as session:
        open_runs = session.scalar(select(func.count()).select_from(RescoreRun).where(RescoreRun.status == "running"))
    if open_runs:
        state = queue_state(settings, RESCORE_QUEUE, _rescore_dispatch_times(settings))
        sends = _lost_rescore_chunks(settings, cutoff, state)
        total += send_tasks(settings, RESCORE_TASK, RESCORE_QUEUE, sends)
        if sends:
            log.warning("%d lost re-score chunks sent again", len(sends))
    return total
