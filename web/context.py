"""Per-request access to settings, the database session and storage."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session

from skinscan.db import session_factory
from skinscan.settings import Settings
from skinscan.storage import Storage, get_storage


def settings() -> Settings:
    """Return the app's settings."""
    return current_app.extensions["skinscan.settings"]


def db() -> Session:
    """Return this request's database session (closed at teardown)."""
    if "db" not in g:
        g.db = session_factory(settings())()
    return g.db


def storage() -> Storage:
    """Return the configured image storage."""
    return get_storage(settings())


def close_db(_exc: BaseException | None = None) -> None:
    """Close the request's session, rolling back anything uncommitted."""
    session = g.pop("db", None)
    if session is not None:
        session.close()
