"""Image pages: one image with its probabilities, Grad-CAM heatmap and review form; the image, thumbnails, heatmaps."""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Any

from flask import Response, abort, flash, g, jsonify, redirect, render_template, request, url_for
from PIL import Image as PILImage

from skinscan import audit
from skinscan.imaging import ImageError, decode_rgb
from skinscan.model.bundle import referral_threshold
from skinscan.reviews import (
    DECISIONS,
    NOTE_MAX_CHARS,
    ReviewedImageGone,
    ReviewError,
    next_flagged_unreviewed,
    record_review,
    review_history,
    risk_neighbours,
    unreviewed_flagged_count,
)
from skinscan.storage import StorageError
from skinscan.tables import ImageRecord, Job, ModelVersion, Prediction
from web.context import db, settings, storage
from web.lookup import owned_image
from web.pages.auth import login_required
from web.pages.common import page_blueprint
from web.pages.table import prediction_for, results_version

log = logging.getLogger(__name__)
bp = page_blueprint("images")

THUMB_SIDE = 160
CACHE_SECONDS = 7 * 24 * 3600
BROWSER_TYPES = ("image/jpeg", "image/png")


def _cached(body: bytes, mimetype: str, etag: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.set_etag(etag)
    response.headers["Cache-Control"] = f"private, max-age={CACHE_SECONDS}"
    return response


def _not_modified(etag: str) -> Response | None:
    if etag in request.if_none_match:
        response = Response(status=304)
        response.set_etag(etag)
        response.headers["Cache-Control"] = f"private, max-age={CACHE_SECONDS}"
        return response
    return None


def _stored_bytes(image: ImageRecord) -> bytes:
    if not image.storage_key:
        abort(404)
    try:
        return storage().get(image.storage_key)
    except StorageError:
        log.warning("image %s is missing from storage", image.id)
        abort(404)


@bp.get("/images/<image_id>/file")
@login_required
def file(image_id: str):  # type: ignore[no-untyped-def]
    """The uploaded image (metadata already stripped); TIFF and BMP are sent as PNG so browsers show them."""
    image = owned_image(image_id)
    etag = f"{image.sha256 or image.id}-full"
    if (cached := _not_modified(etag)) is not None:
        return cached
    data = _stored_bytes(image)
    if image.content_type in BROWSER_TYPES:
        return _cached(data, image.content_type or "image/jpeg", etag)
    try:
        img = decode_rgb(data)
    except ImageError:
        abort(404)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return _cached(out.getvalue(), "image/png", etag)


@bp.get("/images/<image_id>/thumb")
@login_required
def thumb(image_id: str):  # type: ignore[no-untyped-def]
    """A small JPEG of the image for the results table, made on the fly and cached by the browser."""
    image = owned_image(image_id)
    etag = f"{image.sha256 or image.id}-thumb{THUMB_SIDE}"
    if (cached := _not_modified(etag)) is not None:
        return cached
    try:
        img = decode_rgb(_stored_bytes(image), draft_size=THUMB_SIDE)
    except ImageError:
        abort(404)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85, optimize=True)
    return _cached(out.getvalue(), "image/jpeg", etag)


def _shown(image: ImageRecord) -> tuple[Job, str | None, Prediction | None]:
    """The image's job, the model version the pages show for it, and its prediction under that version."""
    job = db().get(Job, image.job_id)
    assert job is not None
    version = results_version(db(), job)
    return job, version, prediction_for(db(), image, version)


def _grid_heatmap(prediction: Prediction, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The heat map kept with the prediction (a Grad-CAM grid the page draws on the image), or None without one.

    Its geometry is the network's input: the whole image in "squash" mode, else the centre square of side
    min(width, height) * input_size / resize_size (worker.gradcam.display_crop's)."""
    if not prediction.heatmap or not meta.get("input_size") or not meta.get("resize_size"):
        return None
    mode = str(meta.get("resize_mode", "crop"))
    return {"state": "grid", "grid": prediction.heatmap, "mode": mode,
            "crop": 1.0 if mode == "squash" else round(int(meta["input_size"]) / int(meta["resize_size"]), 6)}


def _ask_heatmap(image: ImageRecord, version: str) -> dict[str, Any]:
    """The heatmap's state, asking a worker for it if needed; the page still works when the broker is down."""
    from skinscan.model.heatmaps import request_heatmap

    try:
        state = request_heatmap(storage(), image, version, settings())
    except Exception:  # noqa: BLE001 - broker or storage outage: say so instead of failing the page
        log.exception("could not request the heatmap of image %s", image.id)
        state = {"state": "error", "error": "the workers cannot be reached just now; reload the page later"}
    body = dict(state)
    if state["state"] == "ready":
        tag = hashlib.sha256(version.encode()).hexdigest()[:12]
        body["url"] = url_for("images.heatmap_png", image_id=image.id, v=tag)
    return body


def _referral_reason(prediction: Prediction, meta: dict[str, Any]) -> str:
    referral = meta.get("referral", {})
    threshold = referral_threshold(meta, settings().referral_sensitivity)
    uncertain = float(referral.get("uncertain_below", 0.5))
    reasons = []
    if prediction.malignancy >= threshold:
        reasons.append(f"its malignancy score {prediction.malignancy:.3f} is at or above the referral threshold "
                       f"{threshold:.3f}")
    if prediction.confidence < uncertain:
        reasons.append(f"the model is unsure (top class probability {prediction.confidence:.1%} is below "
                       f"{uncertain:.0%})")
    if not prediction.flagged:
        return (f"Not flagged: malignancy score {prediction.malignancy:.3f} is below the referral threshold "
                f"{threshold:.3f} and the top class probability is {prediction.confidence:.1%}.")
    return "Flagged for referral because " + " and ".join(reasons or ["of the model's referral rule"]) + "."


def _render_image(image: ImageRecord, form: dict[str, str] | None = None, error: str | None = None,
                  status: int = 200):  # type: ignore[no-untyped-def]
    """Render the image page: model output, heatmap, review form and history, risk-order navigation."""
    session = db()
    job, version, prediction = _shown(image)
    model = session.get(ModelVersion, version) if version else None
    probabilities = sorted((prediction.probabilities or {}).items(), key=lambda kv: -kv[1]) if prediction else []
    heatmap = None
    if prediction is not None and version and image.storage_key:
        heatmap = _grid_heatmap(prediction, model.meta if model else {}) or _ask_heatmap(image, version)
    history = review_history(session, image.id)
    neighbours = risk_neighbours(session, job, version, image)
    next_review = next_flagged_unreviewed(session, job, version, image)
    return render_template(
        "image.html", image=image, job=job, version=version, prediction=prediction, probabilities=probabilities,
        reason=_referral_reason(prediction, model.meta if model else {}) if prediction else None,
        heatmap=heatmap, history=history, current_review=history[0] if history else None,
        decisions=DECISIONS, note_max=NOTE_MAX_CHARS, form=form or {}, review_error=error,
        previous_id=neighbours.previous, next_id=neighbours.next, next_review_id=next_review,
        unreviewed=unreviewed_flagged_count(session, job, version),
        whole_image=bool(model and (model.meta or {}).get("resize_mode") == "squash"),
    ), status


@bp.get("/images/<image_id>")
@login_required
def show(image_id: str):  # type: ignore[no-untyped-def]
    """One image: the picture, its class probabilities, the referral flag, the Grad-CAM heatmap and reviews."""
    image = owned_image(image_id)
    session = db()
    audit.record(session, "image.view", g.actor, image.clinic_id, "image", image.id)
    session.commit()
    return _render_image(image)


@bp.post("/images/<image_id>/review")
@login_required
def review(image_id: str):  # type: ignore[no-untyped-def]
    """Record the signed-in clinician's review of the image, then go to the job's next flagged, unreviewed image."""
    image = owned_image(image_id)
    session = db()
    job, version, _prediction = _shown(image)
    form = {k: request.form.get(k, "") for k in ("decision", "diagnosis", "note")}
    try:
        record_review(session, image, decision=form["decision"], diagnosis=form["diagnosis"], note=form["note"],
                      reviewer=g.user.email, user_id=g.user.id, version=version, actor=g.actor)
        session.commit()
    except ReviewedImageGone as exc:
        session.rollback()
        flash(f"The review was not saved: {exc}.", "error")
        return redirect(url_for("jobs.index"))
    except ReviewError as exc:
        session.rollback()
        return _render_image(image, form, f"The review was not saved: {exc}.", 400)
    following = next_flagged_unreviewed(session, job, version, image)
    if following is None:
        flash("Review saved. Every flagged image of this job has been reviewed.", "info")
        return redirect(url_for("jobs.show", job_id=job.id))
    left = unreviewed_flagged_count(session, job, version)
    flash(f"Review of {image.filename} saved. {left} flagged image{'' if left == 1 else 's'} still to review.",
          "info")
    return redirect(url_for("images.show", image_id=following))


@bp.get("/images/<image_id>/heatmap")
@login_required
def heatmap(image_id: str):  # type: ignore[no-untyped-def]
    """The heatmap's state as JSON (ready with its URL, pending, or error); asks a worker for it if needed."""
    image = owned_image(image_id)
    _job, version, prediction = _shown(image)
    if prediction is None or version is None or not image.storage_key:
        return jsonify({"state": "unavailable", "error": "this image has no prediction to explain"}), 404
    model = db().get(ModelVersion, version)
    if (grid := _grid_heatmap(prediction, model.meta if model else {})) is not None:
        return jsonify(grid)
    body = _ask_heatmap(image, version)
    return jsonify(body), 202 if body["state"] == "pending" else 200


@bp.get("/images/<image_id>/heatmap.png")
@login_required
def heatmap_png(image_id: str):  # type: ignore[no-untyped-def]
    """The cached Grad-CAM overlay PNG (404 until a worker has computed it)."""
    from skinscan.model.heatmaps import heatmap_key

    image = owned_image(image_id)
    _job, version, prediction = _shown(image)
    if prediction is None or version is None:
        abort(404)
    key = heatmap_key(image, version)
    etag = hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached := _not_modified(etag)) is not None:
        return cached
    try:
        data = storage().get(key)
    except StorageError:
        abort(404)
    return _cached(data, "image/png", etag)
