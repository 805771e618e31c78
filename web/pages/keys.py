"""The clinic's API keys page: the keys by prefix, revoke one, rotate one (the new key shown once); audited."""

from __future__ import annotations

import logging

from flask import abort, flash, g, redirect, render_template, request, url_for

from skinscan.api_keys import ApiKeyError, list_keys, revoke_key, rotate_key
from web.auth import KEY_CACHE
from web.context import db, settings
from web.pages.auth import login_required
from web.pages.common import page_blueprint

log = logging.getLogger(__name__)
bp = page_blueprint("keys")


def _key_id() -> int:
    """The key the form names (a row id); 400 if it is not a number."""
    raw = request.form.get("key_id", "")
    if not raw.isdigit() or len(raw) > 18:
        abort(400)
    return int(raw)


@bp.get("/keys")
@login_required
def index():  # type: ignore[no-untyped-def]
    """The clinic's keys, active first."""
    return render_template("keys.html", keys=list_keys(db(), g.clinic.id), new_key=None,
                           cache_seconds=settings().api_key_cache_seconds)


@bp.post("/keys/revoke")
@login_required
def revoke():  # type: ignore[no-untyped-def]
    """Revoke one of the clinic's keys (another clinic's key id answers 404)."""
    try:
        prefix = revoke_key(db(), g.clinic.id, g.actor, key_id=_key_id())
    except ApiKeyError as exc:
        db().rollback()
        if "has no key" in str(exc):
            abort(404)
        flash(f"Nothing changed: {exc}.", "error")
        return redirect(url_for("keys.index"))
    db().commit()
    KEY_CACHE.clear()  # this process at once; the others within SKINSCAN_API_KEY_CACHE_SECONDS
    log.info("API key %s of clinic %s revoked by %s", prefix, g.clinic.id, g.actor)
    flash(f"Key {prefix} revoked. Programs using it are refused within "
          f"{settings().api_key_cache_seconds} seconds.", "info")
    return redirect(url_for("keys.index"))


@bp.post("/keys/rotate")
@login_required
def rotate():  # type: ignore[no-untyped-def]
    """Issue a new key in place of one of the clinic's keys; the new key is shown on this answer only."""
    try:
        key, revoked = rotate_key(db(), g.clinic, g.actor, key_id=_key_id())
    except ApiKeyError as exc:
        db().rollback()
        if "has no key" in str(exc):
            abort(404)
        flash(f"Nothing changed: {exc}.", "error")
        return redirect(url_for("keys.index"))
    db().commit()
    KEY_CACHE.clear()
    log.info("API key %s of clinic %s rotated by %s", revoked[0], g.clinic.id, g.actor)
    response = render_template("keys.html", keys=list_keys(db(), g.clinic.id), new_key=key, replaced=revoked[0],
                               cache_seconds=settings().api_key_cache_seconds)
    return response, 200, {"Cache-Control": "no-store"}
