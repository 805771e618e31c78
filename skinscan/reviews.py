"""Clinicians' reviews of scored images: record them (audited, per reviewer), read the current ones, navigate.

A review is a row in `reviews`, never changed: a second review of an image adds a row, and the latest row is
the image's current review. Re-scoring writes predictions only, so a stored decision survives a new model.
"Flagged" is the flag the pages show: `Prediction.flagged` under the job's shown model version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, not_, or_, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.labels import CLASSES
from skinscan.tables import ImageRecord, Job, Prediction, Review
from skinscan.textcheck import unstorable

log = logging.getLogger(__name__)

DECISIONS: dict[str, str] = {
    "agree": "Agree with the model's referral flag",
    "disagree": "Disagree with the model's referral flag",
    "reviewed": "Reviewed, no opinion on the flag",
}
NOTE_MAX_CHARS = 2000
# A cancelled image may hold a prediction a chunk in flight wrote, but no page counts or shows it as scored.
NOT_SHOWN_STATUSES = ("cancelled",)
_IN_CHUNK = 500


class ReviewError(ValueError):
    """A review that cannot be recorded, with a message for the person who sent it."""


class ReviewedImageGone(ReviewError):
    """The image was deleted (its job deleted by hand or by the clinic's retention) before the review was saved."""


@dataclass(frozen=True)
class Neighbours:
    """The images before and after one image in its job's risk order (None at either end)."""

    previous: str | None
    next: str | None


def clean_review(decision: str | None, diagnosis: str | None, note: str | None) -> tuple[str, str | None, str | None]:
    """Return (decision, diagnosis, note) checked and normalised, or raise ReviewError saying what is wrong."""
    decision = (decision or "").strip().lower()
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)} (got {decision or 'nothing'!r})")
    diagnosis = (diagnosis or "").strip().lower() or None
    if diagnosis is not None and diagnosis not in CLASSES:
        raise ReviewError(f"diagnosis must be one of {', '.join(CLASSES)} or empty (got {diagnosis[:40]!r})")
    note = (note or "").replace("\r\n", "\n").strip() or None
    if note is not None:
        if len(note) > NOTE_MAX_CHARS:
            raise ReviewError(f"the note is {len(note)} characters long; at most {NOTE_MAX_CHARS} are kept")
        if any(ord(ch) < 32 and ch not in "\n\t" for ch in note):
            raise ReviewError("the note contains control characters; use plain text")
        if unstorable(note):
            raise ReviewError(f"the note contains {unstorable(note)}; use plain text")
    return decision, diagnosis, note


def record_review(
    session: Session,
    image: ImageRecord,
    *,
    decision: str | None,
    diagnosis: str | None = None,
    note: str | None = None,
    reviewer: str,
    user_id: int | None,
    version: str | None,
    actor: str | None = None,
) -> Review:
    """Validate and add a review of an image (and its audit event) to the session; the caller commits.

    `version` is the model version whose prediction the reviewer saw; agreeing or disagreeing with the flag
    needs a prediction under it. `reviewer` is stored and exported (a user's email, or an API key's label);
    `actor` names them in the audit trail (default: the reviewer).
    """
    decision, diagnosis, note = clean_review(decision, diagnosis, note)
    # The image row is share-locked (a deletion then waits for this transaction) and read again: a job deleted
    # since the page was loaded (by hand, or by retention at its cut-off) refuses the review instead of a 500.
    if session.scalar(select(ImageRecord.id).where(ImageRecord.id == image.id)
                      .with_for_update(key_share=True)) is None:
        raise ReviewedImageGone("this image was deleted with its job (by hand, or by the clinic's retention) "
                                "before the review was saved; nothing was recorded")
    prediction = None
    if version is not None:
        prediction = session.scalars(select(Prediction).where(Prediction.image_id == image.id,
                                                              Prediction.model_version == version)).first()
    if prediction is None and decision != "reviewed":
        raise ReviewError("this image has no prediction to agree or disagree with; record it as 'reviewed'")
    review = Review(image_id=image.id, job_id=image.job_id, clinic_id=image.clinic_id, user_id=user_id,
                    reviewer=reviewer[:320], decision=decision, diagnosis=diagnosis, note=note,
                    model_version=prediction.model_version if prediction else None,
                    flagged=prediction.flagged if prediction else None)
    session.add(review)
    session.flush()
    audit.record(session, "image.review", actor or reviewer, image.clinic_id, "image", image.id,
                 {"review_id": review.id, "job_id": image.job_id, "decision": decision, "diagnosis": diagnosis,
                  "model_version": review.model_version, "note_chars": len(note or "")})
    log.info("review %s of image %s by %s: %s", review.id, image.id, reviewer, decision)
    return review


def review_history(session: Session, image_id: str) -> list[Review]:
    """Return every review of an image, newest first."""
    return list(session.scalars(select(Review).where(Review.image_id == image_id).order_by(Review.id.desc())))


def current_reviews(session: Session, image_ids: Iterable[str]) -> dict[str, Review]:
    """Return the current (latest) review of each of the images that has one, by image id."""
    ids = list(dict.fromkeys(image_ids))
    out: dict[str, Review] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start:start + _IN_CHUNK]
        latest = (select(func.max(Review.id)).where(Review.image_id.in_(chunk))
                  .group_by(Review.image_id).scalar_subquery())
        for review in session.scalars(select(Review).where(Review.id.in_(latest))):
            out[review.image_id] = review
    return out


def _reviewed(image_id_column=ImageRecord.id):  # type: ignore[no-untyped-def]
    return exists().where(Review.image_id == image_id_column)


def _shown_join(version: str | None):  # type: ignore[no-untyped-def]
    """An image with its prediction under the shown version (none for a cancelled image), as the pages join."""
    return and_(Prediction.image_id == ImageRecord.id, Prediction.model_version == version,
                ImageRecord.status.not_in(NOT_SHOWN_STATUSES))


def _shown_predictions(job: Job, version: str | None):  # type: ignore[no-untyped-def]
    """Images of the job joined with their prediction under the shown version."""
    return select(ImageRecord.id).join(Prediction, _shown_join(version)).where(ImageRecord.job_id == job.id)


def unreviewed_flagged_count(session: Session, job: Job, version: str | None) -> int:
    """Return how many of the job's images are flagged under the shown version and have no review yet.

    Counted as the job page's flagged_count counts (a cancelled image is not shown), less the reviewed ones.
    """
    if version is None:
        return 0
    stmt = (select(func.count()).select_from(ImageRecord).join(Prediction, _shown_join(version))
            .where(ImageRecord.job_id == job.id, Prediction.flagged.is_(True), not_(_reviewed())))
    return int(session.scalar(stmt) or 0)


def reviewed_count(session: Session, job: Job) -> int:
    """Return how many of the job's images have at least one review."""
    return int(session.scalar(select(func.count(func.distinct(Review.image_id))).where(Review.job_id == job.id))
               or 0)


def _risk_step(session: Session, job: Job, version: str | None, image: ImageRecord | None, forward: bool,
               flagged_unreviewed: bool, start_over: bool = False) -> str | None:
    """The id of the image after (or before) `image` in risk order, optionally only flagged, unreviewed ones."""
    if version is None:
        return None
    stmt = _shown_predictions(job, version)
    if flagged_unreviewed:
        stmt = stmt.where(Prediction.flagged.is_(True), not_(_reviewed()))
    here = None
    if image is not None and not start_over:
        here = session.execute(select(Prediction.malignancy).select_from(ImageRecord)
                               .join(Prediction, _shown_join(version)).where(ImageRecord.id == image.id)).first()
    if image is not None:
        stmt = stmt.where(ImageRecord.id != image.id)
    if here is not None and image is not None:
        m, p = here[0], image.position
        tie = Prediction.malignancy == m
        if forward:  # risk order: malignancy high to low, then upload order
            stmt = stmt.where(or_(Prediction.malignancy < m, and_(tie, ImageRecord.position > p)))
        else:
            stmt = stmt.where(or_(Prediction.malignancy > m, and_(tie, ImageRecord.position < p)))
    elif image is not None and not forward and not start_over:
        return None  # an unscored image has no place in risk order: nothing comes before it
    if forward:
        stmt = stmt.order_by(Prediction.malignancy.desc(), ImageRecord.position.asc())
    else:
        stmt = stmt.order_by(Prediction.malignancy.asc(), ImageRecord.position.desc())
    return session.scalars(stmt.limit(1)).first()


def risk_neighbours(session: Session, job: Job, version: str | None, image: ImageRecord) -> Neighbours:
    """Return the images just before and after this one in the job's risk order (highest malignancy first)."""
    return Neighbours(previous=_risk_step(session, job, version, image, forward=False, flagged_unreviewed=False),
                      next=_risk_step(session, job, version, image, forward=True, flagged_unreviewed=False))


def next_flagged_unreviewed(session: Session, job: Job, version: str | None, after: ImageRecord | None = None,
                            forward: bool = True) -> str | None:
    """Return the next (or previous) flagged, unreviewed image in risk order after `after`, wrapping around.

    Never returns `after` itself; None when no other flagged image of the job is waiting for review.
    """
    found = _risk_step(session, job, version, after, forward, flagged_unreviewed=True)
    if found is None and after is not None:  # wrap: start again from the top (or the bottom)
        found = _risk_step(session, job, version, after, forward, flagged_unreviewed=True, start_over=True)
    return found
