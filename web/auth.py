"""API authentication: `Authorization: Bearer <key>` resolves to the clinic that owns the key."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import g, request

from skinscan.security import clinic_for_key
from web.context import db
from web.errors import ApiError


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an API view so it runs only with a valid key; sets g.clinic, else answers 401."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError("missing API key: send 'Authorization: Bearer <key>'", 401)
        clinic = clinic_for_key(db(), key.strip())
        if clinic is None:
            raise ApiError("invalid API key", 401)
        g.clinic = clinic
        g.actor = f"api-key:{clinic.name}"
        return view(*args, **kwargs)

    return wrapped
