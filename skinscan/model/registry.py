"""The model registry: which bundles are known, which one serves in production, promotions and rollbacks."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.labels import CLASSES
from skinscan.model.health import clear_unusable
from skinscan.model.store import BundleRef, BundleStoreError, StoredBundle, local_bundle, upload_bundle
from skinscan.settings import Settings, load_settings
from skinscan.storage import get_storage
from skinscan.tables import AuditEvent, ModelVersion, utcnow

if TYPE_CHECKING:
    from skinscan.model.bundle import Bundle

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


def _store(path: Path, version: str, settings: Settings | None) -> StoredBundle:
    """Upload a bundle folder to object storage (keyed by version and checksum); RegistryError when it cannot be."""
    try:
        return upload_bundle(get_storage(settings or load_settings()), path, version)
    except BundleStoreError as exc:
        raise RegistryError(f"bundle {path} cannot be stored: {exc}") from None


def _add_version(session: Session, path: Path, stored: StoredBundle) -> ModelVersion:
    """Insert the row of a stored bundle (or fill in the storage of a row registered before bundles were stored)."""
    from skinscan.model.bundle import load_bundle

    bundle = load_bundle(path)
    row = session.get(ModelVersion, bundle.version)
    if row is None:
        row = ModelVersion(
            version=bundle.version, architecture=bundle.meta["architecture"], path=str(path.resolve()),
            checksum=bundle.meta["checksums"].get("weights.pt", ""), meta=bundle.meta, status="registered",
            storage_prefix=stored.prefix, bundle_checksum=stored.checksum,
        )
        session.add(row)
    elif row.storage_prefix is None:
        row.storage_prefix, row.bundle_checksum = stored.prefix, stored.checksum
        log.info("model %s (registered before bundles were stored) now stored under %s", row.version, stored.prefix)
    session.flush()
    return row


def _serialise(session: Session) -> None:
    """Hold the registry lock until the transaction ends: PostgreSQL advisory lock; SQLite's write lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_REGISTRY_LOCK)))
    else:  # a write statement takes SQLite's database write lock, held until commit
        session.execute(update(ModelVersion).where(ModelVersion.version == "").values(status=ModelVersion.status))


_LOCAL_NOTED: set[Any] = set()  # versions (and ("legacy", version)) this process has looked at


def _note_local_bundle(current: ModelVersion, settings: Settings) -> None:
    """Log, once per process, when this machine's configured bundle is not the registered production model."""
    from skinscan.model.bundle import BundleError, load_bundle

    if current.version in _LOCAL_NOTED:
        return
    _LOCAL_NOTED.add(current.version)
    try:
        local = load_bundle(configured_bundle_path(settings), verify=False).version
    except BundleError:
        local = None
    if local != current.version:
        log.info("model %s is in production (registered); this machine's configured bundle %s is not used "
                 "(register and promote it with `skinscan models` to serve it)", current.version, local)


def _store_legacy(session: Session, row: ModelVersion, settings: Settings) -> None:
    """Once per process: upload the bundle of a production row registered before bundles were stored, when this
    machine's configured bundle is that very version (same weights), and record where it lies."""
    from skinscan.model.bundle import BundleError, load_bundle

    if ("legacy", row.version) in _LOCAL_NOTED:
        return
    _LOCAL_NOTED.add(("legacy", row.version))
    try:
        path = configured_bundle_path(settings).resolve()
        bundle = load_bundle(path, verify=True)
    except BundleError:
        return
    if bundle.version != row.version or bundle.meta["checksums"].get("weights.pt") != row.checksum:
        log.warning("model %s was registered before bundles were stored in object storage and is loaded from %s; "
                    "run `skinscan models register` on its bundle folder to store it", row.version, row.path)
        return
    stored = _store(path, bundle.version, settings)
    _add_version(session, path, stored)


def ensure_production_model(session: Session, settings: Settings) -> ModelVersion:
    """Return the production model; on the very first start, store, register and promote the configured bundle.

    Deterministic under concurrent starts: the check and the promotion run under the registry lock, so exactly one
    process puts its configured bundle in production and every other one uses that (and says so). Once a model
    is in production it stays until an explicit `skinscan models promote` or `rollback`.
    """
    from skinscan.model.bundle import BundleError, load_bundle

    current = production_model(session)
    if current is not None:
        _note_local_bundle(current, settings)
        if current.storage_prefix is None:
            _store_legacy(session, current, settings)
        return current
    path = configured_bundle_path(settings).resolve()
    try:
        bundle = load_bundle(path, verify=True)
    except BundleError as exc:
        raise RegistryError(f"no model is in production and the configured bundle is not usable: {exc}") from None
    stored = _store(path, bundle.version, settings)  # idempotent: content-addressed keys, outside the lock
    _serialise(session)
    current = production_model(session)
    if current is not None:  # another process put its bundle in production while this one uploaded
        log.info("model %s was put in production by another process; using it", current.version)
        _note_local_bundle(current, settings)
        return current
    known = session.get(ModelVersion, bundle.version)
    if known is not None and known.checksum != bundle.meta["checksums"].get("weights.pt", ""):
        raise RegistryError(f"version {bundle.version} is registered already with other weights; "
                            "promote a registered version with `skinscan models promote`")
    row = _add_version(session, path, stored)
    row.status, row.promoted_at = "production", utcnow()
    session.flush()
    audit.record(session, "model.promote", "system", target_type="model", target_id=row.version,
                 details={"reason": "first start: configured bundle", "path": str(path),
                          "bundle_checksum": stored.checksum})
    _LOCAL_NOTED.add(row.version)
    log.info("model %s put in production (first start)", row.version)
    return row


def bundle_ref(session: Session, version: str) -> BundleRef:
    """Return where a registered model version's bundle is (storage prefix and checksum, or a legacy path)."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise RegistryError(f"model version {version!r} is not registered")
    return BundleRef(row.version, row.storage_prefix, row.bundle_checksum, row.path)


def bundle_path_for(session: Session, version: str, settings: Settings | None = None) -> Path:
    """Return a local, verified folder of a registered version's bundle (fetched into this machine's cache)."""
    return local_bundle(bundle_ref(session, version), settings or load_settings())


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
    from skinscan.model.bundle import WEIGHTS_FILE, BundleError, load_bundle
    from skinscan.model.scorer import Scorer

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
                    backend: str = "auto", settings: Settings | None = None) -> ModelVersion:
    """Check a bundle, upload it to object storage and register it (never promotes it).

    Registering the same bundle again is a no-op; for a version registered before bundles were stored, it
    uploads the bundle and records where (the upgrade path of such rows).
    """
    path = Path(path).expanduser().resolve()
    bundle = check_bundle(path, image, backend)
    checksum = bundle.meta["checksums"]["weights.pt"]
    row = session.get(ModelVersion, bundle.version)
    if row is not None and row.checksum != checksum:
        raise RegistryError(f"version {bundle.version} is registered already with other weights; "
                            "give the new bundle its own version")
    if row is not None and row.storage_prefix is not None and row.bundle_error is None:
        log.info("model %s is registered already (stored under %s)", row.version, row.storage_prefix)
        return row
    if row is not None and row.storage_prefix is not None:  # found damaged in storage: store it again
        stored = _store(path, bundle.version, settings)
        if stored.prefix != row.storage_prefix:
            raise RegistryError(f"the bundle at {path} is not the one registered as {row.version}")
        audit.record(session, "model.store", actor, target_type="model", target_id=row.version,
                     details={"path": str(path), "repaired": row.bundle_error, "storage_prefix": stored.prefix})
        clear_unusable(session, row.version)
        session.refresh(row)
        log.info("model %s stored again under %s (was unusable: %s)", row.version, stored.prefix, row.bundle_error)
        return row
    stored = _store(path, bundle.version, settings)
    legacy = row is not None
    row = _add_version(session, path, stored)
    audit.record(session, "model.store" if legacy else "model.register", actor, target_type="model",
                 target_id=row.version, details={"path": str(path), "checksum": checksum,
                                                 "architecture": row.architecture, "storage_prefix": stored.prefix,
                                                 "bundle_checksum": stored.checksum})
    log.info("model %s registered from %s, stored under %s (status %s)", row.version, path, stored.prefix,
             row.status)
    return row


def model_summary(m: ModelVersion) -> dict[str, Any]:
    """Return a model version as the JSON the CLI and the API show (never its path on the server)."""
    def ts(v: datetime | None) -> str | None:
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat() if v else None

    meta = m.meta or {}
    return {
        "version": m.version, "status": m.status, "in_production": m.status == "production",
        "architecture": m.architecture, "checksum": m.checksum, "bundle_checksum": m.bundle_checksum,
        "stored": m.storage_prefix is not None, "classes": meta.get("classes"),
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


def _switch(session: Session, target: ModelVersion, current: ModelVersion | None,
            settings: Settings | None = None) -> None:
    """Put target in production and retire current, verifying that target's bundle is still intact (fetched
    from object storage and checked against its checksum)."""
    from skinscan.model.bundle import BundleError, load_bundle

    ref = BundleRef(target.version, target.storage_prefix, target.bundle_checksum, target.path)
    try:
        bundle = load_bundle(local_bundle(ref, settings or load_settings()), verify=True)
    except (BundleError, BundleStoreError) as exc:
        raise RegistryError(f"model {target.version} cannot serve: {exc}") from None
    if bundle.version != target.version or bundle.meta["checksums"].get("weights.pt") != target.checksum:
        raise RegistryError(f"the bundle of {target.version} is no longer model {target.version} as registered")
    if current is not None:
        current.status = "retired"
        session.flush()
    target.bundle_error = target.bundle_error_at = None  # fetched and verified intact just now
    target.status, target.promoted_at = "production", utcnow()
    session.flush()


def promote(session: Session, version: str, actor: str, settings: Settings | None = None) -> ModelVersion:
    """Put a registered version in production (new jobs use it); recorded in the audit trail."""
    current = _lock_production(session)
    target = session.get(ModelVersion, version)
    if target is None:
        raise RegistryError(f"model version {version!r} is not registered (see `skinscan models list`)")
    if current is not None and current.version == version:
        raise RegistryError(f"model {version} is in production already")
    _switch(session, target, current, settings)
    audit.record(session, "model.promote", actor, target_type="model", target_id=version,
                 details={"from": current.version if current else None, "to": version})
    log.info("model %s promoted to production by %s (was %s)", version, actor, current.version if current else None)
    return target


def rollback(session: Session, actor: str, settings: Settings | None = None) -> ModelVersion:
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
    _switch(session, target, current, settings)
    audit.record(session, "model.rollback", actor, target_type="model", target_id=previous,
                 details={"from": current.version, "to": previous})
    log.info("model %s rolled back to %s by %s", current.version, previous, actor)
    return target
