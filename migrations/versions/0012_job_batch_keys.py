"""jobs.batch_key (a client's key for a batch: the same submit resumes its job) and jobs.parts (parts received)

Revision ID: 0012
Revises: 0007
Create Date: 2026-12-05 16:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('parts', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index('uq_jobs_clinic_batch_key', ['clinic_id', 'batch_key'], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_clinic_batch_key')
        batch_op.drop_column('parts')
        batch_op.drop_column('batch_key')
