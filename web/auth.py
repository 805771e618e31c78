"""API authentication: `Authorization: Bearer <key>` resolves to the clinic that owns the key."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import g, request

from skinscan.security import clinic_for_key, hash_key
from web.context import db, settings
from web.errors import ApiError


@dataclass(frozen=True)
class KeyClinic:
    """The clinic an API key resolved to: what the API's views read (`g.clinic.id`, `g.clinic.name`)."""

    id: str
    name: str


class KeyCache:
    """Per-process memory of key hash -> clinic for a few seconds, so a poll does not look the key up each time.

    Only valid keys are remembered (an invalid key always reaches the database), entries expire after `ttl`
    seconds (a revoked key stops working within that time) and at most `size` keys are kept.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[KeyClinic, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str, now: float) -> KeyClinic | None:
        """Return the remembered clinic for a key hash, or None when unknown or expired."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[0]

    def put(self, digest: str, clinic: KeyClinic, expires: float) -> None:
        """Remember a valid key's clinic until `expires` (a time.monotonic() value)."""
        with self._lock:
            self._entries[digest] = (clinic, expires)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            self._entries.clear()


KEY_CACHE = KeyCache()


def bearer_key() -> str | None:
    """Return the API key this request sends as `Authorization: Bearer <key>`, or None."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def lookup_clinic(key: str) -> KeyClinic | None:
    """Resolve an API key to its clinic: from this process's key cache when fresh, else one database query."""
    ttl = settings().api_key_cache_seconds
    digest = hash_key(key)
    now = time.monotonic()
    if ttl:
        cached = KEY_CACHE.get(digest, now)
        if cached is not None:
            return cached
    clinic = clinic_for_key(db(), key)
    if clinic is None:
        return None
    found = KeyClinic(id=clinic.id, name=clinic.name)
    if ttl:
        KEY_CACHE.put(digest, found, now + ttl)
    return found


def api_clinic() -> KeyClinic | None:
    """Return the clinic owning this request's API key, or None; resolved once per request (the rate limit
    and the view share it) and remembered per process for SKINSCAN_API_KEY_CACHE_SECONDS."""
    if "api_key_clinic" not in g:
        key = bearer_key()
        g.api_key_clinic = lookup_clinic(key) if key else None
    return g.api_key_clinic  # type: ignore[no-any-return]


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an API view so it runs only with a valid key; sets g.clinic, else answers 401."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if bearer_key() is None:
            raise ApiError("missing API key: send 'Authorization: Bearer <key>'", 401)
        clinic = api_clinic()
        if clinic is None:
            raise ApiError("invalid API key", 401)
        g.clinic = clinic
        g.actor = f"api-key:{clinic.name}"
        return view(*args, **kwargs)

    wrapped.requires_api_key = True  # type: ignore[attr-defined]  # read by web.openapi (security: bearer)
    return wrapped
