"""The clinic's web pages: sign in, jobs, uploads, results, images with Grad-CAM, and the model in service."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()


def init_app(app: Flask) -> None:
    """Register the page blueprints, template helpers and CSRF protection (not on the bearer-key API)."""
    from web import api
    from web.pages import auth, display, images, jobs, keys, model

    if app.config["PERMANENT_SESSION_LIFETIME"] == timedelta(days=31):  # Flask's default: a working day instead
        app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(hours=12)
    csrf.init_app(app)
    csrf.exempt(api.bp)
    for blueprint in list(app.blueprints.values()):  # every bearer-key API blueprint, not only the first
        if (blueprint.url_prefix or "").startswith("/api/"):
            csrf.exempt(blueprint)
    for module in (auth, jobs, images, model, keys):
        app.register_blueprint(module.bp)
    display.register(app)
