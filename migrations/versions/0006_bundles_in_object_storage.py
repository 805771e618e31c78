"""model bundles stored in object storage, keyed by version and checksum (issue 14)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 11:00:00.000000

"""
from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision (filled in by the work on its issue)."""


def downgrade() -> None:
    """Revert this revision."""
