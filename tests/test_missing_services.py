"""A missing service skips its tests on a developer's machine and fails the run under CI=true."""

from __future__ import annotations

import pytest
import realservices
from realservices import missing_service


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), (None, pytest.skip.Exception),
                                             ("false", pytest.skip.Exception)])
def test_missing_service_fails_only_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None,
                                             outcome: type[BaseException]) -> None:
    """CI=true turns the skip into a failure that names the service."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="PostgreSQL is not reachable"):
        missing_service("PostgreSQL is not reachable")


def test_unreachable_services_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable PostgreSQL or S3 endpoint goes through missing_service (so CI fails on it)."""
    port = realservices.free_port()  # nothing listens there
    monkeypatch.setattr(realservices, "PG_ADMIN", f"postgresql://postgres@127.0.0.1:{port}/test")
    assert realservices.postgres_available() is False
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("SKINSCAN_TEST_S3_ENDPOINT", f"http://127.0.0.1:{port}")

    def down(*_args: object, **_kwargs: object) -> None:
        raise TimeoutError("nothing listening")

    monkeypatch.setattr(realservices, "wait_port", down)
    with pytest.raises(pytest.fail.Exception, match="no S3 server"):
        realservices.MotoS3()
