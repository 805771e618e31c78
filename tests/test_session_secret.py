"""Embedded mode signs web sessions with a random secret made on first start and kept in the data folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from realservices import ROOT

from skinscan.session_secret import stored_secret
from skinscan.settings import DEFAULT_SECRET

SIGN = """
import sys
from web import create_app
app = create_app()
serializer = app.session_interface.get_signing_serializer(app)
if sys.argv[1] == "sign":
    print(serializer.dumps({"user": "ana@clinic.example"}))
else:
    try:
        print(serializer.loads(sys.argv[2])["user"])
    except Exception as exc:
        print("refused", type(exc).__name__)
"""


def _app(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", SIGN, *args], env=env, cwd=ROOT, text=True, capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_embedded_secret_is_random_private_and_kept_across_restarts(tmp_path: Path) -> None:
    """No SECRET_KEY: the first start writes a random secret (mode 0600) to the data folder, a restart signs with
    the same one (sessions survive), another install's differs, and a cookie signed with the built-in default is
    refused."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "S3_BUCKET", "SKINSCAN_ENV")}
    env["SKINSCAN_DATA_DIR"] = str(tmp_path / "data")
    cookie = _app(env, "sign")
    secret_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32 and secret != DEFAULT_SECRET
    assert _app(env, "check", cookie) == "ana@clinic.example"  # a restart: the same secret
    assert secret_file.read_text().strip() == secret

    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    forger = Flask("forger")
    forger.secret_key = DEFAULT_SECRET
    forged = SecureCookieSessionInterface().get_signing_serializer(forger).dumps({"user": "ana@clinic.example"})
    assert _app(env, "check", forged) == "refused BadTimeSignature"
    other = {**env, "SKINSCAN_DATA_DIR": str(tmp_path / "other")}
    assert _app(other, "check", cookie) == "refused BadTimeSignature"
    assert (tmp_path / "other" / "secret_key").read_text().strip() != secret


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    """Many first starts at once: every one reads the same secret, and no temporary file is left."""
    with ThreadPoolExecutor(16) as pool:
        secrets = set(pool.map(lambda _: stored_secret(tmp_path), range(64)))
    assert len(secrets) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]
