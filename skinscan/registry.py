"""The model registry: which bundles are known, which one serves in production, promotions and rollbacks."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.labels import CLASSES
from skinscan.settings import Settings
from skinscan.tables import AuditEvent, ModelVersion, utcnow

if TYPE_CHECKING:
    from training.bundle import Bundle

log = logging.getLogger(__name__)

# PostgreSQL advisory lock key serialising promotions and rollbacks across processes.
_REGISTRY_LOCK = 0x5C1A_0001


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


def _synthetic_image() -> bytes:
    """Return a JPEG of a dark round 'lesion' on skin tones, made in memory, to prove a bundle scores."""
    import io

    import numpy as np
    from PIL import Image

    size = 320
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(xx - size / 2, yy - size / 2) / (size / 2)
    skin = np.stack([np.full_like(r, 224.0), np.full_like(r, 172.0), np.full_like(r, 150.0)], axis=-1)
    lesion = np.stack([90 + 60 * r, 55 + 50 * r, 40 + 40 * r], axis=-1)
    mask = (r < 0.55)[..., None]
    rgb = np.where(mask, lesion, skin) + np.random.default_rng(0).normal(0, 6, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def check_bundle(path: Path, image: bytes | None = None, backend: str = "auto") -> Bundle:
    """Check a bundle before it is registered: metadata, checksums, and that it loads and scores an image."""
    from training.bundle import WEIGHTS_FILE, BundleError, load_bundle
    from worker.scoring import Scorer

    try:
        bundle = load_bundle(path, verify=True)
    except BundleError as exc:
        raise RegistryError(f"not a usable bundle: {exc}") from None
    meta = bundle.meta
    problems = []
    if not 0 < len(bundle.version) <= 120 or bundle.version.strip() != bundle.version:
        problems.append(f"version {bundle.version!r} must be 1 to 120 characters without surrounding spaces")
    if not isinstance(meta["architecture"], str) or not 0 < len(meta["architecture"]) <= 80:
        problems.append("architecture must be a name of at most 80 characters")
    classes = bundle.classes
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(CLASSES):
        problems.append(f"classes {classes} must be distinct names from {list(CLASSES)}")
    if WEIGHTS_FILE not in meta["checksums"]:
        problems.append(f"checksums must cover {WEIGHTS_FILE}")
    try:
        if not 0 < int(meta["input_size"]) <= int(meta["resize_size"]):
            problems.append("input_size must be positive and at most resize_size")
        referral = meta.get("referral", {})
        for key in ("malignancy_threshold", "uncertain_below"):
            if key in referral and not 0.0 <= float(referral[key]) <= 1.0:
                problems.append(f"referral.{key} must be between 0 and 1")
    except (TypeError, ValueError) as exc:
        problems.append(f"bad number in metadata: {exc}")
    if problems:
        raise RegistryError(f"bundle {path} refused: " + "; ".join(problems))
    try:
        scorer = Scorer(bundle, backend=backend, batch_size=1, decode_workers=1)
        result = scorer.score_bytes([("check", image if image is not None else _synthetic_image())])[0]
    except Exception as exc:  # noqa: BLE001 - any failure to load or run means the bundle cannot serve
        raise RegistryError(f"bundle {path} does not load or score an image: {type(exc).__name__}: {exc}") from None
    if result.probabilities is None:
        raise RegistryError(f"the test image could not be read: {result.error}")
    probs = list(result.probabilities.values())
    if len(probs) != len(classes) or not all(math.isfinite(p) and 0 <= p <= 1 for p in probs) \
            or abs(sum(probs) - 1) > 1e-2:
        raise RegistryError(f"bundle {path} scores the test image to invalid probabilities {result.probabilities}")
    log.info("bundle %s scores a test image: %s (%.3f)", bundle.version, result.label, max(probs))
    return bundle


def register_bundle(session: Session, path: Path, actor: str, image: bytes | None = None,
                    backend: str = "auto") -> ModelVersion:
    """Check a bundle and register it (never promotes it); registering the same bundle again is a no-op."""
    path = Path(path).expanduser().resolve()
    bundle = check_bundle(path, image, backend)
    checksum = bundle.meta["checksums"]["weights.pt"]
    row = session.get(ModelVersion, bundle.version)
    if row is not None:
        if row.checksum != checksum:
            raise RegistryError(f"version {bundle.version} is registered already with other weights; "
                                "give the new bundle its own version")
        log.info("model %s is registered already (%s)", row.version, row.path)
        return row
    row = _add_version(session, path)
    audit.record(session, "model.register", actor, target_type="model", target_id=row.version,
                 details={"path": str(path), "checksum": checksum, "architecture": row.architecture})
    log.info("model %s registered from %s (status %s)", row.version, path, row.status)
    return row


def model_summary(m: ModelVersion) -> dict[str, Any]:
    """Return a model version as the JSON the CLI and the API show (never its path on the server)."""
    def ts(v: datetime | None) -> str | None:
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat() if v else None

    meta = m.meta or {}
    return {
        "version": m.version, "status": m.status, "in_production": m.status == "production",
        "architecture": m.architecture, "checksum": m.checksum, "classes": meta.get("classes"),
        "input_size": meta.get("input_size"), "referral": meta.get("referral"),
        "registered_at": ts(m.registered_at), "promoted_at": ts(m.promoted_at),
    }


def list_models(session: Session) -> list[ModelVersion]:
    """Return every registered model version, oldest registration first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.registered_at, ModelVersion.version)))


def promotion_history(session: Session) -> list[str]:
    """Return the stack of production versions from the audit trail: promotions push, rollbacks pop."""
    stack: list[str] = []
    events = session.execute(
        select(AuditEvent.action, AuditEvent.target_id)
        .where(AuditEvent.action.in_(("model.promote", "model.rollback"))).order_by(AuditEvent.id)
    ).all()
    for action, version in events:
        if action == "model.promote":
            stack.append(version)
        elif stack:
            stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
    return stack


def previous_production(session: Session) -> str | None:
    """Return the version that served before the one in production now (what a rollback restores)."""
    stack = promotion_history(session)
    current = production_model(session)
    if current is None or len(stack) < 2 or stack[-1] != current.version:
        return None
    return stack[-2]


def replaced_model(session: Session) -> str | None:
    """Return the version the production model replaced when it was last promoted or rolled back to."""
    details = session.scalars(
        select(AuditEvent.details).where(AuditEvent.action.in_(("model.promote", "model.rollback")))
        .order_by(AuditEvent.id.desc()).limit(1)
    ).first()
    return (details or {}).get("from")


def _lock_production(session: Session) -> ModelVersion | None:
    """Return the production row, locked until the transaction ends (PostgreSQL) so changes serialise."""
    query = select(ModelVersion).where(ModelVersion.status == "production")
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_REGISTRY_LOCK)))
        query = query.with_for_update()
    return session.scalars(query).first()


def _switch(session: Session, target: ModelVersion, current: ModelVersion | None) -> None:
    """Put target in production and retire current, verifying that target's bundle is still intact."""
    from training.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(target.path, verify=True)
    except BundleError as exc:
        raise RegistryError(f"model {target.version} cannot serve: {exc}") from None
    if bundle.version != target.version or bundle.meta["checksums"].get("weights.pt") != target.checksum:
        raise RegistryError(f"the bundle at {target.path} is no longer model {target.version} as registered")
    if current is not None:
        current.status = "retired"
        session.flush()
    target.status, target.promoted_at = "production", utcnow()
    session.flush()


def promote(session: Session, version: str, actor: str) -> ModelVersion:
    """Put a registered version in production (new jobs use it); recorded in the audit trail."""
    current = _lock_production(session)
    target = session.get(ModelVersion, version)
    if target is None:
        raise RegistryError(f"model version {version!r} is not registered (see `skinscan models list`)")
    if current is not None and current.version == version:
        raise RegistryError(f"model {version} is in production already")
    _switch(session, target, current)
    audit.record(session, "model.promote", actor, target_type="model", target_id=version,
                 details={"from": current.version if current else None, "to": version})
    log.info("model %s promoted to production by %s (was %s)", version, actor, current.version if current else None)
    return target


def rollback(session: Session, actor: str) -> ModelVersion:
    """Put the version that served before the current one back in production; recorded in the audit trail."""
    current = _lock_production(session)
    if current is None:
        raise RegistryError("no model is in production; nothing to roll back")
    previous = previous_production(session)
    if previous is None:
        raise RegistryError(f"model {current.version} is the first that served; there is nothing to roll back to")
    target = session.get(ModelVersion, previous)
    if target is None:
        raise RegistryError(f"the previous model {previous} is no longer registered")
    _switch(session, target, current)
    audit.record(session, "model.rollback", actor, target_type="model", target_id=previous,
                 details={"from": current.version, "to": previous})
    log.info("model %s rolled back to %s by %s", current.version, previous, actor)
    return target
