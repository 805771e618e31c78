"""A production node refuses to start without its secret key and services, naming every missing one."""

from __future__ import annotations

import pytest

from skinscan.settings import ConfigError, load_settings

SERVICES = {"DATABASE_URL": "postgresql://db/skinscan", "REDIS_URL": "redis://redis:6379/0", "S3_BUCKET": "images",
            "SECRET_KEY": "a-long-random-production-secret-" + "x" * 32}


def test_production_names_every_missing_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVICES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    with pytest.raises(ConfigError) as refused:
        load_settings().check_production()
    for name in SERVICES:
        assert name in str(refused.value)


@pytest.mark.parametrize("missing", sorted(SERVICES))
def test_production_starts_only_with_everything(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    for name, value in SERVICES.items():
        monkeypatch.setenv(name, value)
    load_settings().check_production()  # all there: no error
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigError, match=missing):
        load_settings().check_production()


def test_embedded_needs_none_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*SERVICES, "SKINSCAN_ENV"]:
        monkeypatch.delenv(name, raising=False)
    load_settings().check_production()
