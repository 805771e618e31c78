"""SKINSCAN_LOG_LEVEL=DEBUG on real services: no request signature or access key id in any log record."""

from __future__ import annotations

import logging

import pytest

pytestmark = [pytest.mark.services]

SECRETS = ("Signature=", "Credential=")


def test_debug_logs_hold_no_signatures(stack, isic_test_images, caplog: pytest.LogCaptureFixture) -> None:
    """A job uploaded (web, in this process) and scored (a worker process) at DEBUG: the web's records and the
    worker's log hold DEBUG lines, but none with `Signature=` or `Credential=` (botocore and urllib3 log both)."""
    from conftest import make_clinic
    from realservices import Api

    from web import create_app

    stack.env["SKINSCAN_LOG_LEVEL"] = "DEBUG"
    worker = stack.worker()
    caplog.set_level(logging.DEBUG)
    settings = stack.settings()
    app = create_app(settings)
    clinic_id, key = make_clinic(settings, "debug-logs")
    api = Api(app.test_client(), key, clinic_id)
    files, _labels = isic_test_images(3)
    response = api.submit(files)
    assert response.status_code == 202, response.get_json()
    assert api.wait(response.get_json()["id"])["status"] == "done"
    assert app.test_client().get("/readyz").status_code == 200  # HEAD bucket through boto3

    web_records = [r.getMessage() for r in caplog.records]
    worker_log = worker.log_path.read_text(errors="replace")
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert "DEBUG" in worker_log, "the worker logs at DEBUG"
    for secret in SECRETS:
        assert not [m for m in web_records if secret in m], f"{secret} in the web's DEBUG records"
        assert secret not in worker_log, f"{secret} in the worker's DEBUG log"
