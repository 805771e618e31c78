"""Small helpers shared by test modules."""

from __future__ import annotations

import uuid
from typing import Any


def other_clinic_headers(settings: Any) -> dict[str, str]:
    """Create a second clinic and return its Authorization header."""
    from skinscan.db import session_scope
    from skinscan.models import Clinic
    from skinscan.security import create_api_key

    with session_scope(settings) as session:
        clinic = Clinic(name=f"other-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        return {"Authorization": f"Bearer {create_api_key(session, clinic)}"}
