"""Re-scoring stored images with the production model: start or resume a run, score its chunks, keep its counts.

A run's images are those in its scope (a clinic or all, uploaded since a date or ever) that had a prediction
before the run began but none from the run's model (`model_to`) then. That set never changes afterwards, so the
run's counters are recomputed from the predictions table at any time, and a chunk delivered twice, or a run killed
and started again, still ends with exactly one prediction per image for the model (the predictions table is
unique per image and model version, and writes skip rows that exist). Upload jobs and image statuses are never
touched: re-scoring only adds predictions.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.db import session_scope
from skinscan.registry import RegistryError, bundle_path_for, production_model, replaced_model
from skinscan.rescore_runs import (
    DONE,
    RUNNING,
    SUPERSEDED,
    aware,
    has_prediction,
    remaining_images,
    run_counts,
    run_images,
)
from skinscan.settings import Settings, load_settings
from skinscan.storage import get_storage
from skinscan.tables import ImageRecord, RescoreRun, utcnow
from worker.pipeline import TRANSIENT_ERRORS, score_items, write_predictions
from worker.scoring import Scored, Scorer, get_scorer

log = logging.getLogger(__name__)

RESCORE_TASK = "worker.tasks.rescore_chunk"
RESCORE_QUEUE = "rescore"
_START_LOCK = 0x5C1A_0002  # PostgreSQL advisory lock key: one run starts (or resumes) at a time


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def refresh_run(run_id: int, settings: Settings) -> None:
    """Recompute a run's counters; when every image is re-scored or failed, store its summary and mark it done."""
    from skinscan.changes import change_counts

    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id, with_for_update=_is_pg(session))
        if run is None:
            return
        if run.status != RUNNING:
            return
        run.total, run.done, run.failed = run_counts(session, run)
        run.updated_at = utcnow()
        if run.done + run.failed >= run.total:
            run.changed, run.flagged = change_counts(session, run)
            run.status, run.finished_at = DONE, utcnow()
            run.duration_s = round((run.finished_at - aware(run.started_at)).total_seconds(), 3)
            log.info("re-score run %d done: %s -> %s, %d images, %d changed, %d newly flagged, %d failed, %.1fs",
                     run.id, run.model_from, run.model_to, run.total, run.changed, run.flagged, run.failed,
                     run.duration_s)


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
        path = bundle_path_for(session, version)
    written = 0
    if todo:
        scorer = get_scorer(path, settings.backend, settings.threads, settings.batch_size, settings.decode_workers,
                            referral_sensitivity=settings.referral_sensitivity)
        if scorer.version != version:
            raise RegistryError(f"the bundle at {path} is {scorer.version}, not the registered {version}")
        results = _score(scorer, settings, todo)
        with session_scope(settings) as session:
            written = write_predictions(session, scorer, results)
            failures = {r.image_id: r.error for r in results if r.error is not None}
            if failures:
                run = session.get(RescoreRun, run_id, with_for_update=_is_pg(session))
                if run is not None:
                    run.errors = {**(run.errors or {}), **failures}
                log.warning("re-score run %d: %d images could not be scored", run_id, len(failures))
    refresh_run(run_id, settings)
    return written


def _same_scope(clinic_id: str | None, since: datetime | None) -> list[Any]:
    return [RescoreRun.clinic_id.is_(None) if clinic_id is None else RescoreRun.clinic_id == clinic_id,
            RescoreRun.since.is_(None) if since is None else RescoreRun.since == since]


def _open_run(session: Session, settings: Settings, clinic_id: str | None, since: datetime | None, actor: str,
              requeue_active: bool) -> tuple[int | None, bool]:
    """Find or create the run to work on; return (run id or None, whether to enqueue its remaining images)."""
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
    run = RescoreRun(model_from=replaced_model(session), model_to=production.version, clinic_id=clinic_id,
                     since=since, status=RUNNING, actor=actor, started_at=utcnow(), updated_at=utcnow(),
                     total=0, done=0, failed=0, changed=0, flagged=0)
    total = session.scalar(select(func.count()).select_from(run_images(run).subquery())) or 0
    if total == 0:
        log.info("every image in scope has a prediction of %s; nothing to re-score", production.version)
        return None, False
    run.total = total
    session.add(run)
    session.flush()
    audit.record(session, "rescore.start", actor, clinic_id, "rescore_run", str(run.id),
                 {"model_from": run.model_from, "model_to": run.model_to, "images": total,
                  "since": since.isoformat() if since else None})
    log.info("re-score run %d: %d images from %s to %s", run.id, total, run.model_from, run.model_to)
    return run.id, True


def start_rescore(settings: Settings | None = None, clinic_id: str | None = None, since: datetime | None = None,
                  actor: str = "system", chunk_size: int | None = None, inline: bool = False,
                  requeue_active: bool = True) -> RescoreRun | None:
    """Start (or resume) re-scoring every image in scope that lacks a prediction of the production model.

    Commits the run, then sends its remaining images in chunks to the 'rescore' queue (or scores them here when
    inline). A run still in progress is resumed rather than duplicated; its images are sent again only when
    requeue_active or it made no progress for requeue_after_seconds. Returns None when there is nothing to do.
    """
    settings = settings or load_settings()
    with session_scope(settings) as session:
        run_id, send = _open_run(session, settings, clinic_id, since, actor, requeue_active)
    if run_id is None:
        return None
    if send:
        sent = enqueue_run(run_id, settings, chunk_size or settings.chunk_size, inline)
        log.info("re-score run %d: %d chunks %s", run_id, sent, "scored inline" if inline else "queued")
    refresh_run(run_id, settings)
    with session_scope(settings) as session:
        return session.get(RescoreRun, run_id)


def enqueue_run(run_id: int, settings: Settings, chunk_size: int, inline: bool = False) -> int:
    """Send (or, inline, score) a committed run's remaining images in chunks; return the number of chunks."""
    from worker.celery_app import celery_for
    from worker.dispatch import chunked

    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id)
        if run is None or run.status != RUNNING:
            return 0
        ids = list(session.scalars(remaining_images(run)))
    chunks = chunked(ids, max(1, chunk_size))
    if inline:
        for chunk in chunks:
            rescore_chunk(run_id, chunk, settings)
        return len(chunks)
    app = celery_for(settings)
    for chunk in chunks:
        app.send_task(RESCORE_TASK, args=[run_id, chunk], queue=RESCORE_QUEUE)
    return len(chunks)
