"""model versions record why their stored bundle is unusable (issue 22)

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-05 16:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the bundle's last fetch error (and when it was found) to model versions."""
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bundle_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('bundle_error_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop the bundle error columns."""
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('bundle_error_at')
        batch_op.drop_column('bundle_error')
