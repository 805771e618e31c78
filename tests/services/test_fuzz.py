"""Fuzz the JSON API from its own OpenAPI document (schemathesis) against the real WSGI app on real services.

Every operation gets a bounded number of generated requests with a valid key, once with random ids and once with
the id of a real job: no answer may be a 5xx, every answer must match the document (status, content type,
schema), and every error must be JSON {"error", "status"}.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from private_services import make_client
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tests_helpers import replace

pytestmark = [pytest.mark.services]
log = logging.getLogger(__name__)

MAX_EXAMPLES = 25


@pytest.fixture(params=["random-ids", "real-job"])
def fuzz_target(request, stack, isic_test_images) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The app (rate limit off, so the fuzzer measures the API and not the limiter), a key, and a real job."""
    settings = replace(stack.settings(), rate_limit_per_minute=0)
    client = make_client(settings)
    files, _ = isic_test_images(2)
    job = client.submit(files, finalize="false").get_json()["id"] if request.param == "real-job" else None
    return {"app": client.client.application, "key": client.key, "job_id": job}


def errors_are_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """An error answer is JSON with a message and its status (never HTML or a stack trace)."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body.get("status") == response.status_code, body
    assert "Traceback" not in response.text
    return True


def fuzz_operation(operation: Any, mode: GenerationMode, target: dict[str, Any], statuses: list[int]) -> None:
    """Run a bounded number of generated requests against one operation and check every answer."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        if target["job_id"] and case.path_parameters and "job_id" in case.path_parameters:
            case.path_parameters["job_id"] = target["job_id"]
        response = case.call(headers={"Authorization": f"Bearer {target['key']}"})
        statuses.append(response.status_code)
        checks = [not_a_server_error, status_code_conformance, content_type_conformance, errors_are_json]
        if mode == GenerationMode.POSITIVE:
            checks.append(response_schema_conformance)
        case.validate_response(response, checks=checks)

    run()


def test_api_fuzz(fuzz_target) -> None:  # type: ignore[no-untyped-def]
    """Every documented operation, with valid and with invalid input: no 5xx, answers as documented, JSON errors."""
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_target["app"])
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, fuzz_target, statuses)
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE and not operation.path_parameters and not operation.body
            except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, report them all
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    log.info("fuzzed %d operations with %d requests: %s", operations, len(statuses), dict(Counter(statuses)))
    assert operations >= 8 and len(statuses) >= operations * 10
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert not failures, "\n\n".join(failures)
