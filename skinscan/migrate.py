"""Run the Alembic migrations in `migrations/` against the configured database."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

import migrations
from skinscan.settings import Settings, load_settings

log = logging.getLogger(__name__)


def alembic_config(settings: Settings | None = None) -> Config:
    """Return an Alembic config pointing at the packaged migrations and the configured database."""
    settings = settings or load_settings()
    folder = Path(migrations.__file__).parent
    cfg = Config(str(folder / "alembic.ini"))
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    return cfg


def current_revision(settings: Settings | None = None) -> str | None:
    """Return the database's schema revision (None for an empty database)."""
    from skinscan.db import engine_for_url

    settings = settings or load_settings()
    with engine_for_url(settings.database_url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _quiet_alembic() -> int:
    """Keep Alembic's per-step INFO lines ("Context impl", "Running upgrade") out of routine output (-v shows
    them); return the level to restore."""
    logger = logging.getLogger("alembic")
    level = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    return level


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    """Upgrade the database schema to a revision (default: the latest); logs only when the schema changed."""
    settings = settings or load_settings()
    before = current_revision(settings)
    level = _quiet_alembic()
    try:
        command.upgrade(alembic_config(settings), revision)
    finally:
        logging.getLogger("alembic").setLevel(level)
    after = current_revision(settings)
    if after != before:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    else:
        log.debug("database schema at %s", after)


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    """Downgrade the database schema to a revision (default: empty)."""
    settings = settings or load_settings()
    level = _quiet_alembic()
    try:
        command.downgrade(alembic_config(settings), revision)
    finally:
        logging.getLogger("alembic").setLevel(level)
    log.info("database schema downgraded to %s", current_revision(settings) or "empty")
