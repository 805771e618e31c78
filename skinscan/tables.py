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
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="registered")  # registered|production|retired
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A batch of images a clinic submitted; counters are recomputed from image rows, never incremented."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="upload")  # upload|rescore
    status: Mapped[str] = mapped_column(String(16), default="queued")  # uploading|queued|running|done|failed
    model_version: Mapped[str | None] = mapped_column(String(120))
    total: Mapped[int] = mapped_column(Integer, default=0)
    scored: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    labels_format: Mapped[str | None] = mapped_column(String(32))
    known_labels: Mapped[list[Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_jobs_clinic_created", "clinic_id", "created_at"),
                      Index("ix_jobs_status_updated", "status", "updated_at"))

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


# At most one model version is in production: enforced by the database, not only by the registry's code.
Index("uq_model_versions_one_production", ModelVersion.status, unique=True,
      postgresql_where=ModelVersion.status == "production", sqlite_where=ModelVersion.status == "production")


class RescoreRun(Base):
    """One re-scoring of stored images by the production model: its scope, progress and summary.

    The run's images are those (of its clinic, uploaded since `since`) that had a prediction before
    `started_at` but none from `model_to`; counters are recomputed from the predictions table, never incremented.
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
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    __table_args__ = (Index("ix_rescore_runs_status_model", "status", "model_to"),)

    @property
    def progress(self) -> float:
        """Fraction of the run's images finished (re-scored or failed), 0..1."""
        return 1.0 if self.total == 0 else round(min(1.0, (self.done + self.failed) / self.total), 4)
