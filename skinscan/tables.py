"""SQLAlchemy 2 models: clinics, keys, users, jobs, images, predictions, model versions, metrics, audit, re-scores."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Return the current UTC time (timezone-aware)."""
    return datetime.now(UTC)


def new_id() -> str:
    """Return a new opaque random id."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    """Declarative base with JSON columns mapped to the database's JSON type."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Clinic(Base):
    """A customer organisation; every job, image and user belongs to exactly one clinic."""

    __tablename__ = "clinics"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Days a job is kept after its upload; the nightly retention run deletes older ones (None: keep them).
    retention_days: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    """A clinic's API key, stored as a SHA-256 hash with a short public prefix for lookup."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    clinic: Mapped[Clinic] = relationship()


class User(Base):
    """A clinic staff member who signs in to the web pages (password stored as a salted hash)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    clinic: Mapped[Clinic] = relationship()


class ModelVersion(Base):
    """A registered model bundle; at most one is in production at a time."""

    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(120), primary_key=True)
    architecture: Mapped[str] = mapped_column(String(80))
    path: Mapped[str] = mapped_column(Text)  # where it was registered from (the only copy for rows before 0006)
    checksum: Mapped[str] = mapped_column(String(64))  # SHA-256 of weights.pt
    # The bundle in object storage (skinscan.model.store): key prefix and SHA-256 of its file manifest.
    storage_prefix: Mapped[str | None] = mapped_column(Text)
    bundle_checksum: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="registered")  # registered|production|retired
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why the stored bundle cannot be used (a checksum mismatch a machine found), until it is stored again.
    bundle_error: Mapped[str | None] = mapped_column(Text)
    bundle_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NightlyClaim(Base):
    """The one scheduled re-score of a night: the first beat-sent task to insert the night's key runs it."""

    __tablename__ = "nightly_claims"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. "2026-11-27" (+ scope when not all)
    task_id: Mapped[str] = mapped_column(String(155))
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    run_id: Mapped[int | None] = mapped_column(Integer)


class Job(Base):
    """A batch of images a clinic submitted; counters are recomputed from image rows, never incremented."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="upload")  # upload|rescore
    name: Mapped[str | None] = mapped_column(String(200))  # batch name or reference given at upload
    status: Mapped[str] = mapped_column(String(16), default="queued")  # uploading|queued|running|done|failed
    model_version: Mapped[str | None] = mapped_column(String(120))
    total: Mapped[int] = mapped_column(Integer, default=0)
    scored: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)  # includes the refused files
    refused: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # files refused at upload
    # A client's key for the batch (`skinscan submit`: from the files' hashes): sending it again finds this job.
    batch_key: Mapped[str | None] = mapped_column(String(64))
    parts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # upload parts received
    labels_format: Mapped[str | None] = mapped_column(String(32))
    known_labels: Mapped[list[Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_jobs_clinic_created", "clinic_id", "created_at"),
                      Index("ix_jobs_status_updated", "status", "updated_at"),
                      Index("uq_jobs_clinic_batch_key", "clinic_id", "batch_key", unique=True))

    @property
    def progress(self) -> float:
        """Fraction of images finished (scored or failed), 0..1."""
        return 1.0 if self.total == 0 else round((self.scored + self.failed) / self.total, 4)


class ImageRecord(Base):
    """One uploaded file: where it is stored, its checksum, its status and why it failed, if it did."""

    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    filename: Mapped[str] = mapped_column(String(300))
    storage_key: Mapped[str | None] = mapped_column(String(200))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    content_type: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|scored|failed
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    true_label: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_images_job_status", "job_id", "status"),
                      Index("ix_images_job_position", "job_id", "position"))


class Upload(Base):
    """Intent to store an upload request's objects, committed before its first object is put.

    The request stores its objects under `prefix`, and the transaction that commits their image rows deletes this
    row: a row older than the grace period belongs to an upload that was refused or died, and the orphan sweeper
    deletes the objects under its prefix that no committed image claims.
    """

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(String(32))
    prefix: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Prediction(Base):
    """A model version's scores for one image; unique per (image, model version), so rewrites are no-ops."""

    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(120))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    malignancy: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    # Grad-CAM grid (rows of 0..1 values, e.g. 5 x 5) of the predicted class over the network's input, computed
    # while scoring from the ONNX model's feature map; None for bundles without it (a worker renders those).
    heatmap: Mapped[list[list[float]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("image_id", "model_version", name="uq_prediction_image_model"),
                      Index("ix_predictions_model", "model_version"))


class JobMetrics(Base):
    """Metrics of one job for one model version (class distribution; quality figures if labels came)."""

    __tablename__ = "job_metrics"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(120), primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Append-only record of who created, viewed or exported what, and of model changes."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    clinic_id: Mapped[str | None] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(120))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Review(Base):
    """A clinician's review of one image: decision on the flag, diagnosis, note; append-only, latest is current.

    Re-scoring never touches these rows: `model_version` and `flagged` record what the reviewer saw.
    """

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewer: Mapped[str] = mapped_column(String(320))  # the user's email, or the API key's label
    decision: Mapped[str] = mapped_column(String(16))  # agree|disagree|reviewed
    diagnosis: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(120))
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_reviews_job_image", "job_id", "image_id", "id"),
                      Index("ix_reviews_image", "image_id", "id"))


# At most one model version is in production: enforced by the database, not only by the registry's code.
Index("uq_model_versions_one_production", ModelVersion.status, unique=True,
      postgresql_where=ModelVersion.status == "production", sqlite_where=ModelVersion.status == "production")


class RescoreRun(Base):
    """One re-scoring of stored images by the production model: its scope, progress and summary.

    The run's images are those (of its clinic, uploaded since `since`) that had a prediction before
    `started_at` but none from `model_to`; counters are sums over its chunks (RescoreChunk), each added once.
    """

    __tablename__ = "rescore_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_from: Mapped[str | None] = mapped_column(String(120))
    model_to: Mapped[str] = mapped_column(String(120))
    clinic_id: Mapped[str | None] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), index=True)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|superseded
    actor: Mapped[str] = mapped_column(String(320), default="system")
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    changed: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the first RESCORE_ERROR_SAMPLES failures only
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    # Keyset position of the enqueue (the last image sent, by created_at then id); enqueued_at once all are sent.
    cursor_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cursor_id: Mapped[str | None] = mapped_column(String(32))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_rescore_runs_status_model", "status", "model_to"),)

    @property
    def progress(self) -> float:
        """Fraction of the run's images finished (re-scored or failed), 0..1."""
        return 1.0 if self.total == 0 else round(min(1.0, (self.done + self.failed) / self.total), 4)


class RescoreChunk(Base):
    """One chunk of a re-score run: its images, when and as which task it was sent, and its counts once done.

    The run's counters are sums of its completed chunks' counts, added in the transaction that first completes a
    chunk, so a chunk delivered twice counts once. A chunk is named by its run and its first image id.
    """

    __tablename__ = "rescore_chunks"
    run_id: Mapped[int] = mapped_column(ForeignKey("rescore_runs.id", ondelete="CASCADE"), primary_key=True)
    first_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    image_ids: Mapped[list[Any]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(64))
    dispatched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sends: Mapped[int] = mapped_column(Integer, default=1)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    changed: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[int] = mapped_column(Integer, default=0)
    gone: Mapped[int] = mapped_column(Integer, default=0)  # images deleted between enqueue and scoring


class RescoreRunClinic(Base):
    """A run's counters for one clinic's images (what the clinic's API shows), kept like the run's own."""

    __tablename__ = "rescore_run_clinics"
    run_id: Mapped[int] = mapped_column(ForeignKey("rescore_runs.id", ondelete="CASCADE"), primary_key=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), primary_key=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    changed: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[int] = mapped_column(Integer, default=0)


class RescoreChange(Base):
    """One line of a run's change report (an image whose class or referral flag changed), written with its chunk.

    `rank` is 0 for newly flagged images, else 1; the report is read in (rank, order_key, image_id) order, where
    order_key is minus the new malignancy, so one index serves every page.
    """

    __tablename__ = "rescore_changes"
    run_id: Mapped[int] = mapped_column(ForeignKey("rescore_runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    clinic_id: Mapped[str] = mapped_column(String(32))
    change: Mapped[str] = mapped_column(String(24))  # newly_flagged|no_longer_flagged|label_changed
    rank: Mapped[int] = mapped_column(Integer)
    order_key: Mapped[float] = mapped_column(Float)
    previous_model: Mapped[str] = mapped_column(String(120))
    previous_label: Mapped[str] = mapped_column(String(16))
    previous_malignancy: Mapped[float] = mapped_column(Float)
    previous_flagged: Mapped[bool] = mapped_column(Boolean)
    new_model: Mapped[str] = mapped_column(String(120))
    new_label: Mapped[str] = mapped_column(String(16))
    new_malignancy: Mapped[float] = mapped_column(Float)
    new_flagged: Mapped[bool] = mapped_column(Boolean)
    __table_args__ = (Index("ix_rescore_changes_report", "run_id", "clinic_id", "rank", "order_key", "image_id"),)


class JobChunk(Base):
    """When a chunk of a job's images was sent to the workers, and as which task (the stalled-job sweeper reads it).

    Written (and committed) before the task is sent; a resend of a lost chunk updates task_id and dispatched_at.
    """

    __tablename__ = "job_chunks"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_ids: Mapped[list[Any]] = mapped_column(JSON)
    task_id: Mapped[str] = mapped_column(String(64))
    dispatched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sends: Mapped[int] = mapped_column(Integer, default=1)


# Indexes for the hot queries (issue 14; each checked with EXPLAIN on a million images, see benchmarks/scale.py).
Index("ix_images_clinic_created", ImageRecord.clinic_id, ImageRecord.created_at, ImageRecord.id)
Index("ix_images_created", ImageRecord.created_at, ImageRecord.id)
Index("ix_audit_events_action_id", AuditEvent.action, AuditEvent.id)
Index("ix_rescore_chunks_open", RescoreChunk.run_id, RescoreChunk.dispatched_at,
      postgresql_where=RescoreChunk.completed_at.is_(None), sqlite_where=RescoreChunk.completed_at.is_(None))
Index("ix_rescore_chunks_task", RescoreChunk.task_id)
Index("ix_job_chunks_task", JobChunk.task_id)
