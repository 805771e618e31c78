"""Helpers of the fast web tests (tests/fast): the stand-in model version, recorded tasks, clinics."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

MODEL_VERSION = "fast-test-model-v1"


@dataclass
class SentTasks:
    """Celery tasks the code under test sent, in order, instead of going to a broker."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any] | None = None, **options: Any) -> None:
        """Record one send_task call."""
        self.calls.append({"name": name, "args": args or [], **options})


def make_clinic(settings: Any, name: str | None = None) -> tuple[str, str]:
    """Create a clinic with an API key; return (clinic id, key)."""
    from skinscan.db import session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    with session_scope(settings) as session:
        clinic = Clinic(name=name or f"clinic-{secrets.token_hex(3)}")
        session.add(clinic)
        session.flush()
        return clinic.id, create_api_key(session, clinic)
