"""The model registry: which bundles are known, which one serves in production, and changes to that."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.models import ModelVersion, utcnow
from skinscan.settings import Settings

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, bad bundle)."""


def configured_bundle_path(settings: Settings) -> Path:
    """Return the bundle configured by SKINSCAN_MODEL, else the default bundle shipped with the package."""
    if settings.model_path is not None:
        return settings.model_path
    from skinscan.bundles import default_bundle_path

    return default_bundle_path()


def production_model(session: Session) -> ModelVersion | None:
    """Return the model version in production, if any."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "production")).first()


def _add_version(session: Session, path: Path) -> ModelVersion:
    from training.bundle import load_bundle

    bundle = load_bundle(path)
    row = session.get(ModelVersion, bundle.version)
    if row is None:
        row = ModelVersion(
            version=bundle.version, architecture=bundle.meta["architecture"], path=str(path.resolve()),
            checksum=bundle.meta["checksums"].get("weights.pt", ""), meta=bundle.meta, status="registered",
        )
        session.add(row)
        session.flush()
    return row


def ensure_production_model(session: Session, settings: Settings) -> ModelVersion:
    """Return the production model, registering and promoting the configured bundle if none is yet."""
    current = production_model(session)
    if current is not None:
        return current
    path = configured_bundle_path(settings)
    row = _add_version(session, path)
    row.status, row.promoted_at = "production", utcnow()
    audit.record(session, "model.promote", "system", target_type="model", target_id=row.version,
                 details={"reason": "first start: configured bundle", "path": str(path)})
    log.info("model %s put in production (first start)", row.version)
    return row


def bundle_path_for(session: Session, version: str) -> Path:
    """Return the bundle folder of a registered model version."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise RegistryError(f"model version {version!r} is not registered")
    return Path(row.path)
