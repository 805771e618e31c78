"""Small helpers shared by test modules."""

from __future__ import annotations

import struct
import uuid
import zlib
from typing import Any


def other_clinic_headers(settings: Any) -> dict[str, str]:
    """Create a second clinic and return its Authorization header."""
    from skinscan.db import session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    with session_scope(settings) as session:
        clinic = Clinic(name=f"other-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        return {"Authorization": f"Bearer {create_api_key(session, clinic)}"}


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A flat 16-bit greyscale PNG written row by row: a tiny file that decodes to width*height*2 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = b"\x00" + b"\x12\x34" * width
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def replace(settings: Any, **changes: Any) -> Any:
    """Settings with some fields changed, as dataclasses.replace did for them (a copy; not validated again)."""
    return settings.model_copy(update=changes)
