"""The secret that signs web sessions when SECRET_KEY is not set: random, made once, kept in the data folder."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from skinscan.settings import DEFAULT_SECRET, Settings

log = logging.getLogger(__name__)

SECRET_FILE = "secret_key"


def stored_secret(data_dir: Path) -> str:
    """Return the secret kept in data_dir/secret_key, creating it (random, mode 0600) on first use.

    The file is written under a temporary name and linked into place, so processes starting together agree on
    one secret and none reads a half-written file.
    """
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=data_dir)  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
            try:
                os.link(tmp, path)
                log.info("session secret created in %s", path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
    secret = path.read_text(encoding="utf-8").strip()
    if len(secret) < 32:
        raise RuntimeError(f"{path} holds no usable secret (delete it to have a new one made, which signs "
                           "everyone out)")
    return secret


def session_secret(settings: Settings) -> str:
    """The key that signs session cookies: SECRET_KEY when set, else the one kept in the data folder."""
    return settings.secret_key if settings.secret_key != DEFAULT_SECRET else stored_secret(settings.data_dir)
