"""API for clinicians' reviews: record a review of an image, read a job's reviews and its unreviewed count.

An API key belongs to a clinic, not a person: a review sent with a key is stored with no user and the key's
label (`api-key:<clinic name>`) as its reviewer, so the audit trail and the export say it came from the API.
Reviews made on the pages name the signed-in user.
"""

from __future__ import annotations

import logging
from datetime import UTC
from typing import Any

from flask import Blueprint, g, jsonify, request, url_for
from sqlalchemy import func, select

from skinscan.reviews import (
    DECISIONS,
    ReviewedImageGone,
    ReviewError,
    current_reviews,
    next_flagged_unreviewed,
    record_review,
    unreviewed_flagged_count,
)
from skinscan.tables import Job, Review
from web.auth import require_api_key
from web.context import db
from web.errors import ApiError
from web.lookup import int_arg, owned_image, owned_job
from web.pages.table import results_version

log = logging.getLogger(__name__)
bp = Blueprint("api_reviews", __name__, url_prefix="/api/v1")


def review_json(review: Review) -> dict[str, Any]:
    """Return a review as the API shows it."""
    at = review.created_at if review.created_at.tzinfo else review.created_at.replace(tzinfo=UTC)
    return {"id": review.id, "image_id": review.image_id, "job_id": review.job_id, "decision": review.decision,
            "diagnosis": review.diagnosis, "note": review.note, "reviewer": review.reviewer,
            "by_user": review.user_id is not None, "model_version": review.model_version,
            "flagged": review.flagged, "created_at": at.isoformat()}


@bp.post("/images/<image_id>/review")
@require_api_key
def create(image_id: str):  # type: ignore[no-untyped-def]
    """Record a review of one of the clinic's images: JSON {decision, diagnosis?, note?}; 201 with the review."""
    image = owned_image(image_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError("send a JSON object: {\"decision\": \"agree\" | \"disagree\" | \"reviewed\", "
                       "\"diagnosis\": class code or null, \"note\": text or null}", 400)
    fields = {}
    for name in ("decision", "diagnosis", "note"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(f"{name} must be a string or null", 400)
        fields[name] = value
    session = db()
    job = session.get(Job, image.job_id)
    assert job is not None
    version = results_version(session, job)
    try:
        review = record_review(session, image, decision=fields["decision"], diagnosis=fields["diagnosis"],
                               note=fields["note"], reviewer=g.actor, user_id=None, version=version)
        session.commit()
    except ReviewedImageGone as exc:
        session.rollback()
        raise ApiError(str(exc), 404) from None
    except ReviewError as exc:
        session.rollback()
        raise ApiError(str(exc), 400, [{"decisions": list(DECISIONS)}]) from None
    following = next_flagged_unreviewed(session, job, version, image)
    return jsonify({"review": review_json(review),
                    "unreviewed_flagged": unreviewed_flagged_count(session, job, version),
                    "next_flagged_unreviewed": following,
                    "reviews_url": url_for("api_reviews.job_reviews", job_id=job.id)}), 201


@bp.get("/jobs/<job_id>/reviews")
@require_api_key
def job_reviews(job_id: str):  # type: ignore[no-untyped-def]
    """The job's reviews, oldest first (?limit&offset), each marked current or not, and its unreviewed count."""
    job = owned_job(job_id)
    session = db()
    limit = int_arg("limit", 1000, 1, 10_000, strict=True)
    offset = int_arg("offset", 0, 0, 100_000_000, strict=True)
    total = session.scalar(select(func.count()).select_from(Review).where(Review.job_id == job.id)) or 0
    rows = list(session.scalars(select(Review).where(Review.job_id == job.id).order_by(Review.id)
                                .limit(limit).offset(offset)))
    current = {r.id for r in current_reviews(session, [r.image_id for r in rows]).values()}
    version = results_version(session, job)
    return jsonify({"job_id": job.id, "model_version": version, "total": total, "offset": offset, "limit": limit,
                    "unreviewed_flagged": unreviewed_flagged_count(session, job, version),
                    "next_flagged_unreviewed": next_flagged_unreviewed(session, job, version),
                    "reviews": [dict(review_json(r), current=r.id in current) for r in rows]})
