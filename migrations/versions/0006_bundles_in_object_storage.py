"""model bundles stored in object storage, keyed by version and checksum (issue 14)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 11:00:00.000000

Rows registered before this revision keep only their bundle's path: they still load from that folder where it
exists, and `skinscan models register PATH` (or the first start, for the configured bundle) uploads the bundle and
fills in its storage prefix and checksum.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the bundle's storage prefix and checksum to model versions; add the nightly re-score claims."""
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('storage_prefix', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('bundle_checksum', sa.String(length=64), nullable=True))

    op.create_table('nightly_claims',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('task_id', sa.String(length=155), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )


def downgrade() -> None:
    """Drop the nightly claims and the bundle storage columns."""
    op.drop_table('nightly_claims')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('bundle_checksum')
        batch_op.drop_column('storage_prefix')
