"""Text a database can store: PostgreSQL refuses a NUL character, and UTF-8 has no lone surrogate."""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """Return what makes text unstorable ('a NUL byte', 'an unpaired surrogate'), or None when it can be stored."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "a NUL byte" if found.group() == "\x00" else "an unpaired surrogate (not valid Unicode text)"
