"""Re-scoring stored images with the production model: start or resume a run, score its chunks, keep its counts.

A run's images are those in its scope (a clinic or all, uploaded since a date or ever) that had a prediction
before the run began but none from the run's model (`model_to`) then. That set never changes afterwards. The run
is enqueued in keyset pages (skinscan.rescore_runs); each chunk writes its predictions, its change report lines and
its counts in one transaction, and adds its counts to the run only the first time it completes. A chunk delivered
twice, or a run killed and started again, still ends with exactly one prediction per image for the model (the
predictions table is unique per image and model version, and writes skip rows that exist), counted once. Every
step costs O(chunk). Upload jobs and image statuses are never touched: re-scoring only adds predictions.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.changes import change_line
from skinscan.db import session_scope
from skinscan.jobs.dispatch import RESCORE_QUEUE, RESCORE_TASK, new_task_id
from skinscan.model.registry import RegistryError, bundle_ref, production_model, replaced_model
from skinscan.model.scorer import Scored, Scorer, get_scorer
from skinscan.model.store import local_bundle
from skinscan.rescore_runs import (
    DONE,
    RUNNING,
    SUPERSEDED,
    Scope,
    add_clinic_counts,
    aware,
    bounded_errors,
    dialect_insert,
    has_prediction,
    scope_is_empty,
    scope_page,
)
from skinscan.settings import Settings, load_settings
from skinscan.storage import get_storage
from skinscan.tables import ImageRecord, Prediction, RescoreChange, RescoreChunk, RescoreRun, utcnow
from worker.pipeline import TRANSIENT_ERRORS, score_items, write_predictions

log = logging.getLogger(__name__)

__all__ = ["RESCORE_QUEUE", "RESCORE_TASK", "complete_chunk", "enqueue_run", "refresh_run", "rescore_chunk",
           "start_rescore", "tally_chunk"]

_START_LOCK = 0x5C1A_0002  # PostgreSQL advisory lock key: one run starts (or resumes) at a time
ENQUEUE_PAGE = 2048  # images read per keyset page when enqueueing (rounded to whole chunks)
NOT_SCORED = "could not be scored"


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _finish_if_complete(run: RescoreRun) -> bool:
    """Mark a running run done once all its images are enqueued and each is re-scored or failed (run locked)."""
    if run.status != RUNNING or run.enqueued_at is None or run.done + run.failed < run.total:
        return False
    run.status, run.finished_at = DONE, utcnow()
    run.updated_at = run.finished_at
    run.duration_s = round((run.finished_at - aware(run.started_at)).total_seconds(), 3)
    log.info("re-score run %d done: %s -> %s, %d images, %d changed, %d newly flagged, %d failed, %.1fs",
             run.id, run.model_from, run.model_to, run.total, run.changed, run.flagged, run.failed, run.duration_s)
    return True


def refresh_run(run_id: int, settings: Settings) -> None:
    """Mark a run done if every image is enqueued and re-scored or failed (reads its counters only: O(1))."""
    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id, with_for_update=_is_pg(session))
        if run is not None:
            _finish_if_complete(run)


def _supersede(run: RescoreRun, production: str | None) -> None:
    run.status, run.finished_at, run.updated_at = SUPERSEDED, utcnow(), utcnow()
    log.warning("re-score run %d to %s superseded: %s is in production now", run.id, run.model_to, production)


def _score(scorer: Scorer, settings: Settings, todo: list[tuple[str, str | None]]) -> list[Scored]:
    """Score a chunk as one batch; if the batch breaks the scorer, score image by image and fail the culprits."""
    storage = get_storage(settings)
    try:
        return score_items(scorer, storage, todo)
    except TRANSIENT_ERRORS:
        raise
    except Exception:  # noqa: BLE001 - an image that breaks the scorer must not block the rest of the run
        log.exception("re-scoring a chunk of %d images failed; trying them one by one", len(todo))
    results: list[Scored] = []
    for item in todo:
        try:
            results += score_items(scorer, storage, [item])
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded as the image's re-score error
            results.append(Scored(item[0], error=f"{type(exc).__name__}: {exc}"[:500]))
    return results


@dataclass
class ChunkTally:
    """A completed chunk's counts per clinic, its change report lines and its failures."""

    clinics: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    changes: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    gone: int = 0

    def total(self, counter: str) -> int:
        """A counter summed over the chunk's clinics."""
        return sum(c.get(counter, 0) for c in self.clinics.values())


def tally_chunk(run_id: int, model_to: str, started_at: datetime, size: int, images: dict[str, str],
                predictions: Iterable[Any], errors: dict[str, str]) -> ChunkTally:
    """Count a chunk from its images ({id: clinic id}) and their predictions: re-scored, failed, changed, flagged.

    An image with a prediction of model_to is re-scored; one without is failed (with its error, if one was given);
    a chunk image no longer stored is gone. The previous prediction is the latest made by started_at.
    """
    started = aware(started_at)
    new: dict[str, Any] = {}
    old: dict[str, Any] = {}
    for p in predictions:
        made = aware(p.created_at)
        if p.model_version == model_to and made > started:
            new[p.image_id] = p
        elif made <= started:
            best = old.get(p.image_id)
            if best is None or (made, p.id) > (aware(best.created_at), best.id):
                old[p.image_id] = p
    tally = ChunkTally(gone=max(0, size - len(images)))
    for image_id, clinic in images.items():
        counts = tally.clinics[clinic]
        if image_id not in new:
            counts["failed"] += 1
            tally.failures[image_id] = errors.get(image_id, NOT_SCORED)
            continue
        counts["done"] += 1
        line = change_line(run_id, clinic, old[image_id], new[image_id]) if image_id in old else None
        if line is not None:
            tally.changes.append(line)
            counts["changed"] += 1
            counts["flagged"] += int(line["rank"] == 0)
    return tally


def complete_chunk(session: Session, run_id: int, image_ids: list[str], errors: dict[str, str]) -> bool:
    """Count a chunk into its run the first time it completes (a redelivery counts nothing); True if counted.

    Locks the run, then the chunk; writes the chunk's counts and change report lines, adds the counts to the run's
    and its clinics' counters, keeps the first error samples, and marks the run done when it is complete.
    """
    pg = _is_pg(session)
    run = session.get(RescoreRun, run_id, with_for_update=pg)
    if run is None or run.status != RUNNING or not image_ids:
        return False
    chunk = session.get(RescoreChunk, (run_id, min(image_ids)), with_for_update=pg)
    if chunk is None:
        log.info("re-score run %d: a chunk not in the run's records (sent before its bookkeeping); it is counted "
                 "when the run is resumed and its recorded chunk completes", run_id)
        return False
    if chunk.completed_at is not None:
        return False
    ids = list(chunk.image_ids)
    images = dict(session.execute(select(ImageRecord.id, ImageRecord.clinic_id).where(ImageRecord.id.in_(ids))).all())
    predictions = session.scalars(select(Prediction).where(Prediction.image_id.in_(ids)))
    tally = tally_chunk(run.id, run.model_to, run.started_at, chunk.size, images, predictions, errors)
    if tally.changes:
        # executemany of one cached statement (a multi-VALUES INSERT would be compiled again for every chunk)
        session.execute(dialect_insert(session)(RescoreChange.__table__).on_conflict_do_nothing(), tally.changes)
    add_clinic_counts(session, run.id, tally.clinics)
    chunk.completed_at = utcnow()
    chunk.done, chunk.failed = tally.total("done"), tally.total("failed")
    chunk.changed, chunk.flagged, chunk.gone = tally.total("changed"), tally.total("flagged"), tally.gone
    run.done += chunk.done
    run.failed += chunk.failed
    run.changed += chunk.changed
    run.flagged += chunk.flagged
    run.total -= chunk.gone
    run.updated_at = utcnow()
    if tally.failures:
        log.warning("re-score run %d: %d images could not be scored", run.id, len(tally.failures))
        if len(run.errors or {}) < len(bounded_errors(run.errors, tally.failures)):
            run.errors = bounded_errors(run.errors, tally.failures)
    _finish_if_complete(run)
    return True


def rescore_chunk(run_id: int, image_ids: list[str], settings: Settings | None = None) -> int:
    """Score one chunk of a run's images with the run's model; return how many predictions were written."""
    settings = settings or load_settings()
    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id)
        if run is None or run.status != RUNNING:
            return 0
        production = production_model(session)
        if production is None or production.version != run.model_to:
            _supersede(run, production.version if production else None)
            return 0
        version = run.model_to
        todo = [(i, k) for i, k in session.execute(
            select(ImageRecord.id, ImageRecord.storage_key)
                .where(ImageRecord.id.in_(image_ids), ~has_prediction(version))
            .order_by(ImageRecord.created_at, ImageRecord.id))]
        ref = bundle_ref(session, version)
    written = 0
    results: list[Scored] = []
    scorer: Scorer | None = None
    if todo:
        path = local_bundle(ref, settings)  # fetched from object storage into this machine's cache, verified
        scorer = get_scorer(path, settings.backend, settings.threads, settings.batch_size, settings.decode_workers,
                            referral_sensitivity=settings.referral_sensitivity)
        if scorer.version != version:
            raise RegistryError(f"the bundle at {path} is {scorer.version}, not the registered {version}")
        results = _score(scorer, settings, todo)
    with session_scope(settings) as session:
        if scorer is not None:
            written = write_predictions(session, scorer, results)
        complete_chunk(session, run_id, image_ids, {r.image_id: r.error for r in results if r.error is not None})
    return written


def _same_scope(clinic_id: str | None, since: datetime | None) -> list[Any]:
    return [RescoreRun.clinic_id.is_(None) if clinic_id is None else RescoreRun.clinic_id == clinic_id,
            RescoreRun.since.is_(None) if since is None else RescoreRun.since == since]


def _open_run(session: Session, settings: Settings, clinic_id: str | None, since: datetime | None, actor: str,
              requeue_active: bool) -> tuple[int | None, bool]:
    """Find or create the run to work on; return (run id or None, whether to send its unfinished chunks again)."""
    if _is_pg(session):
        session.execute(select(func.pg_advisory_xact_lock(_START_LOCK)))
    production = production_model(session)
    if production is None:
        log.warning("no model is in production; nothing to re-score")
        return None, False
    for old in session.scalars(select(RescoreRun).where(RescoreRun.status == RUNNING,
                                                        RescoreRun.model_to != production.version)):
        _supersede(old, production.version)
    run = session.scalars(select(RescoreRun).where(RescoreRun.status == RUNNING,
                                                   RescoreRun.model_to == production.version,
                                                   *_same_scope(clinic_id, since))
                          .order_by(RescoreRun.id.desc())).first()
    if run is not None:
        stale = aware(run.updated_at) < utcnow() - timedelta(seconds=settings.requeue_after_seconds)
        log.info("resuming re-score run %d to %s (%d of %d done)", run.id, run.model_to, run.done, run.total)
        return run.id, requeue_active or stale
    started = utcnow()
    if scope_is_empty(session, Scope(production.version, started, clinic_id, since)):
        log.info("every image in scope has a prediction of %s; nothing to re-score", production.version)
        return None, False
    run = RescoreRun(model_from=replaced_model(session), model_to=production.version, clinic_id=clinic_id,
                     since=since, status=RUNNING, actor=actor, started_at=started, updated_at=started,
                     total=0, done=0, failed=0, changed=0, flagged=0)
    session.add(run)
    session.flush()
    audit.record(session, "rescore.start", actor, clinic_id, "rescore_run", str(run.id),
                 {"model_from": run.model_from, "model_to": run.model_to,
                  "since": since.isoformat() if since else None})
    log.info("re-score run %d: from %s to %s", run.id, run.model_from, run.model_to)
    return run.id, True


def start_rescore(settings: Settings | None = None, clinic_id: str | None = None, since: datetime | None = None,
                  actor: str = "system", chunk_size: int | None = None, inline: bool = False,
                  requeue_active: bool = True) -> RescoreRun | None:
    """Start (or resume) re-scoring every image in scope that lacks a prediction of the production model.

    Commits the run, then sends its images a keyset page at a time in chunks to the 'rescore' queue (or scores them
    here when inline). A run still in progress is resumed rather than duplicated: its enqueue goes on from where it
    stopped, and its unfinished chunks are sent again only when requeue_active or it made no progress for
    requeue_after_seconds. Returns None when there is nothing to do.
    """
    settings = settings or load_settings()
    with session_scope(settings) as session:
        run_id, resend = _open_run(session, settings, clinic_id, since, actor, requeue_active)
    if run_id is None:
        return None
    sent = enqueue_run(run_id, settings, chunk_size or settings.chunk_size, inline, resend)
    log.info("re-score run %d: %d chunks %s", run_id, sent, "scored inline" if inline else "queued")
    refresh_run(run_id, settings)
    with session_scope(settings) as session:
        return session.get(RescoreRun, run_id)


def _dispatch(settings: Settings, run_id: int, chunks: list[tuple[str, list[str]]], inline: bool) -> None:
    """Send recorded (and committed) chunks to the rescore queue, or score them here when inline."""
    if inline:
        for _, ids in chunks:
            rescore_chunk(run_id, ids, settings)
        return
    from skinscan.broker import celery_for

    app = celery_for(settings)
    for task_id, ids in chunks:
        app.send_task(RESCORE_TASK, args=[run_id, ids], queue=RESCORE_QUEUE, task_id=task_id)


def _resend_open_chunks(run_id: int, settings: Settings, inline: bool, page: int = 500) -> int:
    """Send a run's recorded chunks that have not completed again, a keyset page of chunks at a time."""
    after, sent = "", 0
    while True:
        with session_scope(settings) as session:
            rows = list(session.scalars(select(RescoreChunk).where(
                RescoreChunk.run_id == run_id, RescoreChunk.completed_at.is_(None), RescoreChunk.first_id > after)
                .order_by(RescoreChunk.first_id).limit(page)))
            now = utcnow()
            for row in rows:
                row.task_id, row.dispatched_at, row.sends = new_task_id(), now, row.sends + 1
            chunks = [(row.task_id or "", list(row.image_ids)) for row in rows]
        if not rows:
            return sent
        _dispatch(settings, run_id, chunks, inline)
        sent += len(chunks)
        after = rows[-1].first_id


def enqueue_run(run_id: int, settings: Settings, chunk_size: int, inline: bool = False,
                resend_open: bool = True) -> int:
    """Send (or, inline, score) a committed run's images in chunks, a keyset page at a time; return the chunks sent.

    Each page's chunks are recorded, the page added to the run's totals and the cursor moved in one transaction,
    committed before its messages are sent; a crash mid-way leaves the rest to the next resume. With resend_open,
    recorded chunks that have not completed are sent again first.
    """
    chunk_size = max(1, chunk_size)
    page_size = max(chunk_size, ENQUEUE_PAGE // chunk_size * chunk_size)
    sent = _resend_open_chunks(run_id, settings, inline) if resend_open else 0
    while True:
        with session_scope(settings) as session:
            run = session.get(RescoreRun, run_id, with_for_update=_is_pg(session))
            if run is None or run.status != RUNNING or run.enqueued_at is not None:
                return sent
            after = (run.cursor_at, run.cursor_id) if run.cursor_id is not None and run.cursor_at else None
            page = scope_page(session, Scope.of(run), after, page_size)
            now = utcnow()
            chunks = [(new_task_id(), [i for i, _, _ in page[n:n + chunk_size]])
                      for n in range(0, len(page), chunk_size)]
            if chunks:
                session.execute(insert(RescoreChunk), [
                    {"run_id": run_id, "first_id": min(ids), "image_ids": ids, "size": len(ids), "task_id": task_id,
                     "dispatched_at": now, "sends": 1, "done": 0, "failed": 0, "changed": 0, "flagged": 0,
                     "gone": 0} for task_id, ids in chunks])
                per_clinic: dict[str, dict[str, int]] = defaultdict(lambda: {"total": 0})
                for _, _, clinic in page:
                    per_clinic[clinic]["total"] += 1
                add_clinic_counts(session, run_id, per_clinic)
                run.total += len(page)
                run.cursor_id, run.cursor_at = page[-1][0], page[-1][1]
            run.updated_at = now
            if len(page) < page_size:
                run.enqueued_at = now
                _finish_if_complete(run)
        _dispatch(settings, run_id, chunks, inline)
        sent += len(chunks)
        if len(page) < page_size:
            return sent
