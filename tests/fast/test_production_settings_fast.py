"""A production node refuses to start without its secret key and services, naming every missing one."""

from __future__ import annotations

import pytest

from skinscan.settings import ConfigError, read_settings

SERVICES = {"DATABASE_URL": "postgresql://db/skinscan", "REDIS_URL": "redis://redis:6379/0", "S3_BUCKET": "images",
            "SECRET_KEY": "a-long-random-production-secret-" + "x" * 32}


def test_production_names_every_missing_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVICES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    with pytest.raises(ConfigError) as refused:
        read_settings().check_production()
    for name in SERVICES:
        assert name in str(refused.value)


@pytest.mark.parametrize("missing", sorted(SERVICES))
def test_production_starts_only_with_everything(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    for name, value in SERVICES.items():
        monkeypatch.setenv(name, value)
    read_settings().check_production()  # all there: no error
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigError, match=missing):
        read_settings().check_production()


def test_embedded_needs_none_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*SERVICES, "SKINSCAN_ENV"]:
        monkeypatch.delenv(name, raising=False)
    read_settings().check_production()


@pytest.mark.parametrize("name,value", [
    ("AWS_SECRET_ACCESS_KEY", "skinscan-minio-secret"),  # the old compose file's MinIO root password
    ("AWS_SECRET_ACCESS_KEY", "minioadmin"),
    ("AWS_ACCESS_KEY_ID", "minioadmin"),
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
    ("DATABASE_URL", "postgresql://skinscan:skinscan@postgres:5432/skinscan"),
    ("REDIS_URL", "redis://:password@redis:6379/0"),
    ("SECRET_KEY", "change-me-to-a-long-random-string"),
])
def test_production_refuses_known_default_credentials(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A published default credential (example files, earlier compose, MinIO's, AWS's documentation) stops a
    production node, naming the variable but not repeating the value; its own credentials start."""
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    for service, setting in SERVICES.items():
        monkeypatch.setenv(service, setting)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "skinscan-app")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-random-app-secret-" + "y" * 20)
    read_settings().check_production()
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name.split("_")[0]) as refused:
        read_settings().check_production()
    assert value not in str(refused.value)
