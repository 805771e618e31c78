"""API keys and passwords: generated, stored hashed, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from skinscan.tables import ApiKey, Clinic, User

KEY_PREFIX_LEN = 12


def hash_key(key: str) -> str:
    """Return the SHA-256 hex digest of an API key (keys are 256-bit random, so no slow hash is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, clinic: Clinic) -> str:
    """Create a new API key for a clinic and return it; only its hash is stored."""
    key = "sk_" + secrets.token_urlsafe(32)
    session.add(ApiKey(clinic_id=clinic.id, prefix=key[:KEY_PREFIX_LEN], key_hash=hash_key(key)))
    return key


def clinic_for_key(session: Session, key: str) -> Clinic | None:
    """Return the clinic an API key belongs to, or None; compares hashes in constant time."""
    if not key or len(key) < KEY_PREFIX_LEN or len(key) > 200:
        return None
    digest = hash_key(key)
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == key[:KEY_PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    found = None
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            found = row
    return found.clinic if found else None


def hash_password(password: str) -> str:
    """Return a salted scrypt hash of a password."""
    return generate_password_hash(password, method="scrypt")


def verify_password(user: User | None, password: str) -> bool:
    """Check a password against a user's hash (constant time; also spends the time when there is no user)."""
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(user.password_hash, password)


_DUMMY_HASH = generate_password_hash("not-a-password", method="scrypt")
