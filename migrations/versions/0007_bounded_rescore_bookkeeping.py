"""per-chunk rescore counters, chunk dispatch records and indexes for the hot queries (issue 14)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 11:00:00.000000

"""
from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision (filled in by the work on its issue)."""


def downgrade() -> None:
    """Revert this revision."""
