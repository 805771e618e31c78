"""per-chunk rescore counters, chunk dispatch records and indexes for the hot queries (issue 14)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 11:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("completed_at IS NULL")

# A finished run's change lines: its model's prediction made after it began against the image's latest from before.
_BACKFILL_CHANGES = """
INSERT INTO rescore_changes (run_id, image_id, clinic_id, change, rank, order_key, previous_model, previous_label,
    previous_malignancy, previous_flagged, new_model, new_label, new_malignancy, new_flagged)
SELECT r.id, i.id, i.clinic_id,
    CASE WHEN n.flagged AND NOT o.flagged THEN 'newly_flagged'
         WHEN o.flagged AND NOT n.flagged THEN 'no_longer_flagged' ELSE 'label_changed' END,
    CASE WHEN n.flagged AND NOT o.flagged THEN 0 ELSE 1 END, -n.malignancy,
    o.model_version, o.label, o.malignancy, o.flagged, n.model_version, n.label, n.malignancy, n.flagged
FROM rescore_runs r
JOIN predictions n ON n.model_version = r.model_to AND n.created_at > r.started_at
JOIN images i ON i.id = n.image_id AND (r.clinic_id IS NULL OR i.clinic_id = r.clinic_id)
    AND (r.since IS NULL OR i.created_at >= r.since)
JOIN predictions o ON o.id = (SELECT p.id FROM predictions p WHERE p.image_id = i.id AND p.created_at <= r.started_at
                              ORDER BY p.created_at DESC, p.id DESC LIMIT 1)
WHERE r.status <> 'running' AND (o.label <> n.label OR o.flagged <> n.flagged)
"""
# A finished run's counters per clinic, over its scope (failures: the images of a done run left without a prediction).
_BACKFILL_CLINICS = """
INSERT INTO rescore_run_clinics (run_id, clinic_id, total, done, failed, changed, flagged)
SELECT r.id, i.clinic_id, count(*), count(n.id),
    CASE WHEN r.status = 'done' THEN count(*) - count(n.id) ELSE 0 END,
    (SELECT count(*) FROM rescore_changes c WHERE c.run_id = r.id AND c.clinic_id = i.clinic_id),
    (SELECT count(*) FROM rescore_changes c WHERE c.run_id = r.id AND c.clinic_id = i.clinic_id AND c.rank = 0)
FROM rescore_runs r
JOIN images i ON (r.clinic_id IS NULL OR i.clinic_id = r.clinic_id) AND (r.since IS NULL OR i.created_at >= r.since)
LEFT JOIN predictions n ON n.image_id = i.id AND n.model_version = r.model_to AND n.created_at > r.started_at
WHERE r.status <> 'running'
    AND EXISTS (SELECT 1 FROM predictions p WHERE p.image_id = i.id AND p.created_at <= r.started_at)
    AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.image_id = i.id AND p.model_version = r.model_to
                    AND p.created_at <= r.started_at)
GROUP BY r.id, i.clinic_id, r.status
"""


def upgrade() -> None:
    """Add the run's enqueue cursor, per-chunk and per-clinic counters, the change report, job chunk records."""
    with op.batch_alter_table('rescore_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cursor_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('cursor_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    # Runs begun before this revision kept no chunk records. Finished ones were fully enqueued; a running one starts
    # its bookkeeping afresh: its next resume (nightly, or `skinscan rescore`) sends its images again in recorded
    # chunks, and the images it already re-scored complete at once and are counted then.
    op.execute("UPDATE rescore_runs SET enqueued_at = started_at WHERE status <> 'running'")
    op.execute("UPDATE rescore_runs SET total = 0, done = 0, failed = 0, changed = 0, flagged = 0, "
               "updated_at = started_at WHERE status = 'running'")

    op.create_table('rescore_chunks',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('first_id', sa.String(length=32), nullable=False),
    sa.Column('image_ids', sa.JSON(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('changed', sa.Integer(), nullable=False),
    sa.Column('flagged', sa.Integer(), nullable=False),
    sa.Column('gone', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['rescore_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'first_id')
    )
    with op.batch_alter_table('rescore_chunks', schema=None) as batch_op:
        batch_op.create_index('ix_rescore_chunks_open', ['run_id', 'dispatched_at'], unique=False,
                              postgresql_where=_OPEN, sqlite_where=_OPEN)
        batch_op.create_index('ix_rescore_chunks_task', ['task_id'], unique=False)

    op.create_table('rescore_run_clinics',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('clinic_id', sa.String(length=32), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('changed', sa.Integer(), nullable=False),
    sa.Column('flagged', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['rescore_runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['clinic_id'], ['clinics.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'clinic_id')
    )

    op.create_table('rescore_changes',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.String(length=32), nullable=False),
    sa.Column('clinic_id', sa.String(length=32), nullable=False),
    sa.Column('change', sa.String(length=24), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('order_key', sa.Float(), nullable=False),
    sa.Column('previous_model', sa.String(length=120), nullable=False),
    sa.Column('previous_label', sa.String(length=16), nullable=False),
    sa.Column('previous_malignancy', sa.Float(), nullable=False),
    sa.Column('previous_flagged', sa.Boolean(), nullable=False),
    sa.Column('new_model', sa.String(length=120), nullable=False),
    sa.Column('new_label', sa.String(length=16), nullable=False),
    sa.Column('new_malignancy', sa.Float(), nullable=False),
    sa.Column('new_flagged', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['rescore_runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'image_id')
    )
    with op.batch_alter_table('rescore_changes', schema=None) as batch_op:
        batch_op.create_index('ix_rescore_changes_report', ['run_id', 'clinic_id', 'rank', 'order_key', 'image_id'],
                              unique=False)

    op.create_table('job_chunks',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('image_ids', sa.JSON(), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=False),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'seq')
    )
    with op.batch_alter_table('job_chunks', schema=None) as batch_op:
        batch_op.create_index('ix_job_chunks_task', ['task_id'], unique=False)

    # Finished runs keep their change report and per-clinic counts (read from the predictions table, once).
    op.execute(_BACKFILL_CHANGES)
    op.execute(_BACKFILL_CLINICS)

    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_clinic_created', ['clinic_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_images_created', ['created_at', 'id'], unique=False)
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_action_id', ['action', 'id'], unique=False)


def downgrade() -> None:
    """Drop what upgrade added (runs keep their counters; their chunk records and change lists are lost)."""
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_action_id')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_created')
        batch_op.drop_index('ix_images_clinic_created')
    with op.batch_alter_table('job_chunks', schema=None) as batch_op:
        batch_op.drop_index('ix_job_chunks_task')
    op.drop_table('job_chunks')
    with op.batch_alter_table('rescore_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_rescore_changes_report')
    op.drop_table('rescore_changes')
    op.drop_table('rescore_run_clinics')
    with op.batch_alter_table('rescore_chunks', schema=None) as batch_op:
        batch_op.drop_index('ix_rescore_chunks_task')
        batch_op.drop_index('ix_rescore_chunks_open', postgresql_where=_OPEN, sqlite_where=_OPEN)
    op.drop_table('rescore_chunks')
    with op.batch_alter_table('rescore_runs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('cursor_id')
        batch_op.drop_column('cursor_at')
