"""re-score runs; at most one model version in production

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 19:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PRODUCTION = sa.text("status = 'production'")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('rescore_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('model_from', sa.String(length=120), nullable=True),
    sa.Column('model_to', sa.String(length=120), nullable=False),
    sa.Column('clinic_id', sa.String(length=32), nullable=True),
    sa.Column('since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=320), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('changed', sa.Integer(), nullable=False),
    sa.Column('flagged', sa.Integer(), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['clinic_id'], ['clinics.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rescore_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rescore_runs_clinic_id'), ['clinic_id'], unique=False)
        batch_op.create_index('ix_rescore_runs_status_model', ['status', 'model_to'], unique=False)

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index('uq_model_versions_one_production', ['status'], unique=True,
                              postgresql_where=_PRODUCTION, sqlite_where=_PRODUCTION)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index('uq_model_versions_one_production', postgresql_where=_PRODUCTION,
                            sqlite_where=_PRODUCTION)

    with op.batch_alter_table('rescore_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_rescore_runs_status_model')
        batch_op.drop_index(batch_op.f('ix_rescore_runs_clinic_id'))

    op.drop_table('rescore_runs')
