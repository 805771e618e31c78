"""What a score task does: claim a chunk's pending images, score them, write results idempotently."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import case, exists, func, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from skinscan.db import session_scope
from skinscan.jobs.counts import job_counts
from skinscan.model.registry import bundle_ref
from skinscan.model.scorer import Scored, Scorer, get_scorer
from skinscan.model.store import BundleStoreError, local_bundle
from skinscan.settings import Settings, load_settings
from skinscan.storage import Storage, StorageError, get_storage
from skinscan.tables import ImageRecord, Job, Prediction, utcnow

log = logging.getLogger(__name__)
jobs_log = logging.getLogger("skinscan.jobs")

# Tries per image: a delivery that crashed, timed out or hit an outage counts one try for each image it tried.
MAX_ATTEMPTS = 8
OPEN_STATUSES = ("uploading", "queued", "running")  # a job whose images may still be scored
MISSING_OBJECT = "the stored image is missing (it was deleted from storage); upload it again"
# Tries on an image whose stored object is not found before it fails as missing: storage that lags (a replica, a
# restore in progress) gets the task's backoff between tries to catch up. A missing bucket is an outage instead.
MISSING_ATTEMPTS = 4
# Errors of a service, not of an image: the task retries with backoff and the image stays pending.
TRANSIENT_ERRORS = (StorageError, DBAPIError, ConnectionError, TimeoutError)


class ChunkIncomplete(RuntimeError):
    """Some images of a chunk could not be scored this time and stay pending; the task retries them later."""


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# PostgreSQL: a chunk's predictions as one fixed statement over one JSON document of the rows. Its text never
# changes, so it is parsed once per connection; a multi-row VALUES of a chunk (288 placeholders) is longer than
# psycopg's query cache takes and cost ~4 ms of client CPU a chunk to re-parse.
_INSERT_JSON_ROWS = text(
    "INSERT INTO predictions (image_id, model_version, probabilities, label, confidence, malignancy, flagged,"
    " heatmap, created_at) SELECT r.image_id, :version, r.probabilities, r.label, r.confidence, r.malignancy,"
    " r.flagged, r.heatmap, :created_at FROM json_to_recordset(CAST(:rows AS json)) AS r(image_id varchar,"
    " probabilities json, label varchar, confidence float8, malignancy float8, flagged boolean, heatmap json)"
    " ON CONFLICT (image_id, model_version) DO NOTHING RETURNING image_id")


def write_predictions(session: Session, scorer: Scorer, results: list[Scored]) -> int:
    """Insert predictions, skipping any (image, model version) already written; return rows written.

    On PostgreSQL one fixed statement over a JSON document of the rows; elsewhere one statement compiled once per
    process and sent with every row's parameters (SQLAlchemy's "insert many values" batching).
    """
    now = utcnow()  # one time for the chunk's rows, on every database
    rows = [
        {
            "image_id": r.image_id, "model_version": scorer.version, "probabilities": r.probabilities,
            "label": r.label, "confidence": max(r.probabilities.values()),
            "malignancy": round(scorer.malignancy(r.probabilities), 6), "flagged": scorer.flagged(r.probabilities),
            "heatmap": r.heatmap, "created_at": now,
        }
        for r in results if r.probabilities is not None
    ]
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        fields = ("image_id", "probabilities", "label", "confidence", "malignancy", "flagged", "heatmap")
        document = json.dumps([{f: r[f] for f in fields} for r in rows])
        return len(session.execute(_INSERT_JSON_ROWS, {"rows": document, "version": scorer.version,
                                                       "created_at": now}).all())
    stmt = (_insert(session)(Prediction.__table__).on_conflict_do_nothing(index_elements=["image_id", "model_version"])
            .returning(Prediction.__table__.c.image_id))
    return len(session.connection().execute(stmt, rows).all())


def claim_chunk(job_id: str, image_ids: list[str], settings: Settings) -> tuple[str | None, list[tuple[str, str, int]]]:
    """Mark the job running and fail the chunk's images already tried MAX_ATTEMPTS times, with the reason.

    Returns the job's model version and the (image id, storage key, attempts before this delivery) of the images
    still pending, least-tried first; the version is None when the job is gone or finished. On a first delivery
    (no image tried yet) the try is counted here, in the same transaction, before anything is scored. A job still
    uploading is scored part by part and stays uploading (refresh_job finishes a job only once it is closed for
    uploads).
    """
    with session_scope(settings) as session:
        # One conditional UPDATE reads and moves the job and takes its row lock for the transaction: a cancel (or
        # any finish) committed before it is never overwritten, and one that comes after waits for this claim.
        now = utcnow()
        claimed = session.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(OPEN_STATUSES))
            .values(status=case((Job.status == "queued", "running"), else_=Job.status),
                    started_at=case((Job.status == "queued", func.coalesce(Job.started_at, now)),
                                    else_=Job.started_at),
                    updated_at=now)
            .returning(Job.model_version)
        ).first()
        if claimed is None:  # gone, or finished (done, failed, cancelled)
            return None, []
        reason = (f"could not be scored in {MAX_ATTEMPTS} attempts (the worker crashed, timed out or could not "
                  "reach a service each time)")
        gave_up = session.execute(
            update(ImageRecord)
            .where(ImageRecord.id.in_(image_ids), ImageRecord.job_id == job_id, ImageRecord.status == "pending",
                   ImageRecord.attempts >= MAX_ATTEMPTS)
            .values(status="failed",
                    error=literal(reason) + func.coalesce(literal("; last error: ") + ImageRecord.error, ""))
        ).rowcount or 0
        if gave_up:
            session.execute(update(Job).where(Job.id == job_id).values(failed=Job.failed + gave_up))
        todo = session.execute(
            select(ImageRecord.id, ImageRecord.storage_key, ImageRecord.attempts).where(
                ImageRecord.id.in_(image_ids), ImageRecord.job_id == job_id, ImageRecord.status == "pending")
            .order_by(ImageRecord.attempts, ImageRecord.position)
        ).all()
        if todo and _first_delivery(todo):
            _count_attempt(session, job_id, [i for i, _, _ in todo])
        return claimed.model_version, [(i, k, a) for i, k, a in todo]


def _first_delivery(todo: list[Any]) -> bool:
    """Whether no image of the chunk has been tried yet (then it is scored as one batch)."""
    return all(attempts == 0 for _, _, attempts in todo)


def _count_attempt(session: Session, job_id: str, image_ids: list[str]) -> None:
    session.execute(update(ImageRecord).where(ImageRecord.id.in_(image_ids), ImageRecord.job_id == job_id,
                                              ImageRecord.status == "pending")
                    .values(attempts=ImageRecord.attempts + 1))


def count_attempt(job_id: str, image_ids: list[str], settings: Settings) -> None:
    """Count one try on pending images and commit it before they are scored (so a crash still counts)."""
    with session_scope(settings) as session:
        _count_attempt(session, job_id, image_ids)


def note_error(job_id: str, image_ids: list[str], error: str, settings: Settings) -> None:
    """Keep the last error of pending images (shown as the reason if they finally fail)."""
    with session_scope(settings) as session:
        session.execute(update(ImageRecord).where(ImageRecord.id.in_(image_ids), ImageRecord.job_id == job_id,
                                            ImageRecord.status == "pending").values(error=error[:500]))


def record_results(job_id: str, scorer: Scorer, results: list[Scored], settings: Settings) -> None:
    """Write a chunk's predictions, image statuses and the job's counters in one transaction.

    The job's row is locked first (the order a cancel and the counter refresh lock in), then only images still
    pending move, and only those that moved get a prediction: an image cancelled (or failed) while its chunk was
    in flight keeps no prediction, and a cancel coming now waits for this transaction. The counters move by the
    images this call took out of pending (a redelivered chunk moves them by nothing), so a chunk costs no count
    over the job's images; the job is recounted in full once none is pending, when it finishes (refresh_job).
    """
    with session_scope(settings) as session:
        locked = session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow())
                                 .returning(Job.id)).first()
        if locked is None:  # the job was deleted while its chunk was scored
            return
        ok = [r.image_id for r in results if r.probabilities is not None]
        moved: set[str] = set()
        if ok:
            moved = set(session.scalars(
                update(ImageRecord).where(ImageRecord.id.in_(ok), ImageRecord.job_id == job_id,
                                          ImageRecord.status == "pending")
                .values(status="scored", error=None).returning(ImageRecord.id)))
        write_predictions(session, scorer, [r for r in results if r.image_id in moved])
        failed = 0
        for r in results:
            if r.error is not None:
                failed += session.execute(
                    update(ImageRecord).where(ImageRecord.id == r.image_id, ImageRecord.job_id == job_id,
                                              ImageRecord.status == "pending")
                    .values(status="failed", error=r.error)).rowcount or 0
        if moved or failed:
            session.execute(update(Job).where(Job.id == job_id)
                            .values(scored=Job.scored + len(moved), failed=Job.failed + failed))
        pending = session.scalar(select(exists().where(ImageRecord.job_id == job_id,
                                                       ImageRecord.status == "pending")))
    if not pending:
        refresh_job(job_id, settings)


def score_items(scorer: Scorer, storage: Storage, items: list[tuple[str, str | None]]) -> list[Scored]:
    """Score (image id, storage key) pairs; an object missing from storage fails that image, an outage raises."""
    missing = [i for i, k in items if not k]
    stored = [(i, k) for i, k in items if k]
    try:
        results = scorer.score_stored(storage, stored)
    except StorageError:
        gone = {i for i, k in stored if not storage.exists(k)}  # raises StorageError again if storage is down
        if not gone:
            raise
        log.warning("%d stored images are missing", len(gone))
        missing += sorted(gone)
        results = scorer.score_stored(storage, [(i, k) for i, k in stored if i not in gone])
    return [Scored(i, error=MISSING_OBJECT) for i in missing] + results


def _look_again(job_id: str, group: list[tuple[str, str, int]], results: list[Scored],
                settings: Settings) -> tuple[list[Scored], list[str]]:
    """Keep pending the images whose stored object was not found on a try before their MISSING_ATTEMPTS-th.

    Returns the results to record now and the ids left pending (their task retries with backoff).
    """
    tries = {i: attempts + 1 for i, key, attempts in group if key}
    later = [r.image_id for r in results
             if r.error == MISSING_OBJECT and r.image_id in tries and tries[r.image_id] < MISSING_ATTEMPTS]
    for image_id in later:
        note_error(job_id, [image_id], f"the stored image was not found (try {tries[image_id]} of "
                   f"{MISSING_ATTEMPTS}); it is looked for again", settings)
    if later:
        log.warning("job %s: %d stored images not found; looking again later", job_id, len(later))
    final = [Scored(r.image_id, error=f"{MISSING_OBJECT} (not found in {tries[r.image_id]} tries)")
             if r.error == MISSING_OBJECT and r.image_id in tries else r
             for r in results if r.image_id not in later]
    return final, later


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def score_chunk(job_id: str, image_ids: list[str], settings: Settings | None = None) -> int:
    """Score one chunk of a job's images end to end; return how many were scored now.

    A first delivery scores the chunk as one batch. A redelivery (after a crash, a timeout or an outage)
    scores one image at a time, least-tried first, counting a try per image before it starts, so a poison
    image uses up only its own tries and cannot take the rest of the chunk down with it.
    """
    settings = settings or load_settings()
    version, todo = claim_chunk(job_id, image_ids, settings)
    if version is None:
        return 0
    if not todo:
        refresh_job(job_id, settings)
        return 0
    with session_scope(settings) as session:
        ref = bundle_ref(session, version)
    try:
        path = local_bundle(ref, settings)  # fetched from object storage into this machine's cache, verified
    except BundleStoreError as exc:  # damaged in storage: retrying cannot help, fail the chunk with the reason
        from worker.bundle_failures import fail_for_unusable_bundle

        fail_for_unusable_bundle(job_id, [i for i, _, _ in todo], version, exc, settings)
        return 0
    scorer = get_scorer(path, settings.backend, settings.threads, settings.batch_size, settings.decode_workers,
                        referral_sensitivity=settings.referral_sensitivity)
    storage = get_storage(settings)
    first = _first_delivery(todo)  # claim_chunk has counted this try
    groups = [todo] if first else [[t] for t in todo]
    scored, incomplete = 0, []
    for group in groups:
        ids = [i for i, _, _ in group]
        if not first:
            count_attempt(job_id, ids, settings)
        try:
            results = score_items(scorer, storage, [(i, k) for i, k, _ in group])
        except TRANSIENT_ERRORS as exc:
            note_error(job_id, ids, _describe(exc), settings)
            raise
        except Exception as exc:  # noqa: BLE001 - an image that breaks the scorer: retry it alone, then give up
            log.exception("job %s: scoring %d images failed", job_id, len(ids))
            note_error(job_id, ids, _describe(exc), settings)
            incomplete += ids
            continue
        results, not_found = _look_again(job_id, group, results, settings)
        incomplete += not_found
        record_results(job_id, scorer, results, settings)
        scored += sum(1 for r in results if r.probabilities is not None)
    if incomplete:
        raise ChunkIncomplete(f"job {job_id}: {len(incomplete)} images stay pending after an error")
    return scored


def refresh_job(job_id: str, settings: Settings) -> None:
    """Recompute a job's counters from its images; when none is pending, store metrics and mark it done."""
    finished = None
    with session_scope(settings) as session:
        # Lock the job before counting, so a refresh that counted earlier cannot overwrite a later one's counts.
        job = session.get(Job, job_id, with_for_update=session.get_bind().dialect.name == "postgresql")
        if job is None:
            return
        counts = dict(session.execute(
            select(ImageRecord.status, func.count()).where(ImageRecord.job_id == job_id).group_by(ImageRecord.status)
        ).all())
        job.scored, job.failed = counts.get("scored", 0), counts.get("failed", 0)
        job.total = sum(counts.values())
        job.updated_at = utcnow()
        if counts.get("pending", 0) == 0 and job.status in ("queued", "running"):
            from skinscan.jobs.metrics import store_job_metrics

            store_job_metrics(session, job)
            job.status = "done" if job.scored > 0 else "failed"
            if job.scored == 0:
                job.error = "no image in this job could be scored"
            job.finished_at = utcnow()
            figures = job_counts(job)
            finished = (job.id, f" ({job.name})" if job.name else "", job.status, figures.images, figures.scored,
                        figures.not_scored, figures.refused)
    if finished:  # committed: one line per finished job (`skinscan serve` shows it on its console)
        jobs_log.info("job %s%s %s: %d images, %d scored, %d not scored; files refused at upload: %d", *finished)


def stalled_jobs(settings: Settings) -> list[str]:
    """Return ids of queued/running jobs with pending images and no progress for requeue_after_seconds."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(settings) as session:
        return list(session.scalars(
            select(Job.id).where(Job.status.in_(("queued", "running")), Job.updated_at < cutoff)
        ))

