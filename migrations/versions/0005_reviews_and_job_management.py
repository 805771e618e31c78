"""clinician reviews of images; job names and cancellation (issue 13)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 11:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.name, jobs.refused and the append-only reviews table."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('refused', sa.Integer(), server_default='0', nullable=False))
    # files refused at upload: failed rows with nothing stored
    op.execute("UPDATE jobs SET refused = (SELECT count(*) FROM images WHERE images.job_id = jobs.id "
               "AND images.status = 'failed' AND images.storage_key IS NULL)")

    op.create_table('reviews',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('image_id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('clinic_id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('reviewer', sa.String(length=320), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('diagnosis', sa.String(length=16), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('model_version', sa.String(length=120), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['clinic_id'], ['clinics.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index('ix_reviews_job_image', ['job_id', 'image_id', 'id'], unique=False)
        batch_op.create_index('ix_reviews_image', ['image_id', 'id'], unique=False)


def downgrade() -> None:
    """Drop the reviews table and jobs.name."""
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index('ix_reviews_image')
        batch_op.drop_index('ix_reviews_job_image')
    op.drop_table('reviews')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('refused')
        batch_op.drop_column('name')
