"""A clinic's API keys: list, revoke and rotate them, each change audited.

A key is named by its public prefix (the first 12 characters, shown by `skinscan clinics keys` and the Keys page)
or, on the pages, by its row id. Revoking is one conditional UPDATE (`... WHERE revoked_at IS NULL`), so two
revocations of one key at once revoke it once and the second is told so. Web processes remember a valid key for
SKINSCAN_API_KEY_CACHE_SECONDS, so a revoked key answers 401 everywhere within that time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.security import KEY_PREFIX_LEN, create_api_key
from skinscan.tables import ApiKey, Clinic, utcnow


class ApiKeyError(LookupError):
    """A key that is not the clinic's, or is already revoked."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of a key: never the key, only its prefix and dates."""

    id: int
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def list_keys(session: Session, clinic_id: str) -> list[KeyInfo]:
    """Return a clinic's keys, active ones first, newest first."""
    rows = session.scalars(select(ApiKey).where(ApiKey.clinic_id == clinic_id)
                           .order_by(ApiKey.revoked_at.is_not(None), ApiKey.created_at.desc(), ApiKey.id.desc()))
    return [KeyInfo(r.id, r.prefix, r.created_at, r.revoked_at) for r in rows]


def _match(clinic_id: str, prefix: str | None, key_id: int | None) -> list[object]:
    where: list[object] = [ApiKey.clinic_id == clinic_id]
    if prefix is not None:
        where.append(ApiKey.prefix == prefix)
    if key_id is not None:
        where.append(ApiKey.id == key_id)
    return where


def revoke_key(session: Session, clinic_id: str, actor: str, *, prefix: str | None = None,
               key_id: int | None = None) -> str:
    """Revoke one active key of the clinic (by prefix or id) in the caller's transaction; return its prefix.

    Raises ApiKeyError when the clinic has no such key or it is revoked already (by someone else just now, too)."""
    if prefix is None and key_id is None:
        raise ValueError("name the key by its prefix or its id")
    where = _match(clinic_id, prefix, key_id)
    revoked = session.execute(update(ApiKey).where(*where, ApiKey.revoked_at.is_(None))  # type: ignore[arg-type]
                              .values(revoked_at=utcnow()).returning(ApiKey.prefix)).scalars().all()
    if not revoked:
        known = session.scalars(select(ApiKey.prefix).where(*where)).first()  # type: ignore[arg-type]
        shown = prefix if prefix is not None else f"#{key_id}"
        raise ApiKeyError(f"key {shown} is already revoked" if known else f"the clinic has no key {shown}")
    if len(revoked) > 1:
        raise ApiKeyError(f"prefix {prefix} names {len(revoked)} keys; nothing was revoked")
    audit.record(session, "clinic.key_revoked", actor, clinic_id, "api_key", revoked[0])
    return revoked[0]


def rotate_key(session: Session, clinic: Clinic, actor: str, *, prefix: str | None = None,
               key_id: int | None = None) -> tuple[str, list[str]]:
    """Issue a new key and revoke the one named (or, naming none, every active key of the clinic); return the new
    key (shown once) and the revoked prefixes. Raises ApiKeyError, changing nothing, if the named key is not active."""
    if prefix is None and key_id is None:
        revoked = list(session.execute(
            update(ApiKey).where(ApiKey.clinic_id == clinic.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow()).returning(ApiKey.prefix)).scalars())
        for old in revoked:
            audit.record(session, "clinic.key_revoked", actor, clinic.id, "api_key", old)
    else:
        revoked = [revoke_key(session, clinic.id, actor, prefix=prefix, key_id=key_id)]
    key = create_api_key(session, clinic)
    audit.record(session, "clinic.key_created", actor, clinic.id, "api_key", key[:KEY_PREFIX_LEN],
                 details={"rotated": revoked})
    return key, revoked
