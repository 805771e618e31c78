"""SkinScan's Flask web application: JSON API under /api/v1 and the clinic's pages."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from skinscan.logs import cap_library_loggers
from skinscan.settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    """Application factory: configure from settings, register blueprints, error handlers and headers."""
    settings = settings or load_settings()
    settings.check_production()
    cap_library_loggers()
    from skinscan.session_secret import session_secret
    from web.limits import CountingRequest, max_form_parts

    app = Flask(__name__)
    app.request_class = CountingRequest
    app.config.update(
        SECRET_KEY=session_secret(settings),  # never the built-in default: forgeable sign-ins
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MAX_FORM_PARTS=max_form_parts(settings),  # Werkzeug's default (1,000) would cap SKINSCAN_MAX_FILES
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.production,
        WTF_CSRF_TIME_LIMIT=None,
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)
    if settings.trusted_proxies:
        # Behind N load balancers the client address is the Nth-from-last X-Forwarded-For entry (Werkzeug's
        # ProxyFix); with 0 the headers are ignored, so a client cannot choose the address it is throttled by.
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies,  # type: ignore[method-assign]
                                x_proto=settings.trusted_proxies)
    app.extensions["skinscan.settings"] = settings

    from web import api, errors, health, ratelimit

    errors.register(app)
    ratelimit.init_app(app)
    from web import unstorable

    unstorable.init_app(app)  # after the rate limits, so a refused request still counts
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    from web import api_model_versions

    app.register_blueprint(api_model_versions.bp)
    from web import api_reviews

    app.register_blueprint(api_reviews.bp)
    from web import pages  # a broken import here must stop start-up, not serve an app without its pages

    pages.init_app(app)

    @app.after_request
    def _security_headers(response):  # type: ignore[no-untyped-def]
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'",
        )
        if settings.production:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    return app
