"""clinician reviews of images; job names and cancellation (issue 13)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 11:00:00.000000

"""
from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision (filled in by the work on its issue)."""


def downgrade() -> None:
    """Revert this revision."""
