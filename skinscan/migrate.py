"""Run the Alembic migrations in `migrations/` against the configured database."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

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


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    """Upgrade the database schema to a revision (default: the latest)."""
    command.upgrade(alembic_config(settings), revision)
    log.info("database schema at %s", revision)


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    """Downgrade the database schema to a revision (default: empty)."""
    command.downgrade(alembic_config(settings), revision)
