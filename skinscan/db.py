"""Database engine and sessions, one engine per process, for PostgreSQL or the embedded SQLite file."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from skinscan.settings import Settings, load_settings

log = logging.getLogger(__name__)


_ENGINES: dict[str, Engine] = {}


def engine_for_url(url: str) -> Engine:
    """Return this process's engine for a database URL, creating it on first use."""
    if url in _ENGINES:
        return _ENGINES[url]
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=5, max_overflow=10, pool_recycle=1800)
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    _ENGINES[url] = engine
    return engine


def get_engine(settings: Settings | None = None) -> Engine:
    """Return this process's engine for the configured database."""
    return engine_for_url((settings or load_settings()).database_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """Return a session factory bound to the configured database."""
    return sessionmaker(get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(settings: Settings | None = None) -> None:
    """Run SELECT 1 against the database (raises on failure)."""
    with get_engine(settings).connect() as conn:
        conn.execute(text("SELECT 1"))


def dispose_engines() -> None:
    """Close pooled connections (call after fork so children do not share sockets)."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()
