"""Signing clinic staff in and out of the pages: hashed passwords, a signed session cookie, CSRF on the forms."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, abort, flash, g, make_response, redirect, render_template, request, session, url_for
from sqlalchemy import select

from skinscan import audit
from skinscan.security import verify_password
from skinscan.tables import User
from skinscan.textcheck import unstorable
from web.context import db
from web.errors import wants_json
from web.pages.common import page_blueprint, safe_next

log = logging.getLogger(__name__)
bp = page_blueprint("auth")


def _fingerprint(user: User) -> str:
    """A digest of the password hash: a password change ends every session signed in with the old one."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def current_user() -> User | None:
    """Return the signed-in user of this request (loaded once), or None."""
    if "user" not in g:
        user = None
        uid = session.get("uid")
        if isinstance(uid, int):
            user = db().get(User, uid)
            if user is not None and session.get("pw") != _fingerprint(user):
                user = None
        g.user = user
        if user is not None:
            g.clinic = user.clinic
            g.actor = f"user:{user.email}"
    return g.user


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a page so it needs a signed-in user (sets g.user, g.clinic); else sign-in page or 401 JSON."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            if wants_json():
                abort(401)
            return redirect(url_for("auth.signin", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped


@bp.app_context_processor
def _inject_user() -> dict[str, Any]:
    return {"current_user": current_user()}


@bp.get("/")
def home():  # type: ignore[no-untyped-def]
    """The start page: the clinic's jobs, or the sign-in form."""
    return redirect(url_for("jobs.index") if current_user() else url_for("auth.signin"))


@bp.route("/signin", methods=["GET", "POST"])
def signin():  # type: ignore[no-untyped-def]
    """Show the sign-in form; check the email and password and start a session."""
    target = safe_next(request.values.get("next"), url_for("jobs.index"))
    if request.method == "GET":
        if current_user() is not None:
            return redirect(target)
        return render_template("signin.html", next=target, email="")
    email = request.form.get("email", "").strip().lower()[:320]
    password = request.form.get("password", "")
    address = request.remote_addr or "unknown"
    # Failed attempts (401) are counted per account and per address by web.ratelimit, which answers
    # signin_refused() before this view runs once either limit is reached.
    if unstorable(email):  # no account has it (a query with it fails on PostgreSQL); counted as a failure (400)
        log.warning("failed sign-in with an unstorable email from %s", address)
        flash("Email or password is not right: the email contains a character no address has.", "error")
        return render_template("signin.html", next=target, email=""), 400
    user = db().scalars(select(User).where(User.email == email)).first() if email else None
    if not verify_password(user, password):
        log.warning("failed sign-in for %r from %s", email, address)
        flash("Email or password is not right.", "error")
        return render_template("signin.html", next=target, email=email), 401
    assert user is not None
    session.clear()
    session.permanent = True
    session["uid"], session["pw"] = user.id, _fingerprint(user)
    audit.record(db(), "user.sign_in", f"user:{user.email}", user.clinic_id, "user", user.email)
    db().commit()
    log.info("user %s signed in", user.email)
    return redirect(target)


def signin_refused(wait: int) -> Response:
    """Answer a sign-in refused for too many failures: 429 with Retry-After and when to try again."""
    target = safe_next(request.values.get("next"), url_for("jobs.index"))
    email = request.form.get("email", "").strip().lower()[:320]
    log.warning("sign-in throttled for %r from %s (%d s left)", email, request.remote_addr, wait)
    minutes = (wait + 59) // 60
    flash(f"Too many failed sign-ins for this account or from this address. For your security, sign-in is "
          f"paused: try again in {minutes} minute{'' if minutes == 1 else 's'}.", "error")
    response = make_response(render_template("signin.html", next=target, email=email), 429)
    response.headers["Retry-After"] = str(wait)
    return response


@bp.post("/signout")
def signout():  # type: ignore[no-untyped-def]
    """End the session."""
    user = current_user()
    if user is not None:
        audit.record(db(), "user.sign_out", f"user:{user.email}", user.clinic_id, "user", user.email)
        db().commit()
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.signin"))
