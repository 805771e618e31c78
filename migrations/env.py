"""Alembic environment: the database URL comes from SkinScan's settings (DATABASE_URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from skinscan.db import engine_for_url
from skinscan.settings import load_settings
from skinscan.tables import Base

target_metadata = Base.metadata


def _url() -> str:
    """The URL skinscan.migrate put in the config, else the one from the environment."""
    return context.config.get_main_option("sqlalchemy.url") or load_settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL for the configured URL without connecting."""
    context.configure(url=_url(), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a live connection."""
    connectable = context.config.attributes.get("connection")
    if connectable is None:
        engine = engine_for_url(_url())
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection: object) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


_ = pool
if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
