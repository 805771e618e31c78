"""The worker's bookkeeping of a chunk on the embedded database: the try counted at claim, counters moved by the
chunk's own status changes (a redelivery moves nothing), the job finished with a full recount; settings read once
per environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastweb import MODEL_VERSION
from realservices import Api
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.labels import CLASSES
from skinscan.model.scorer import Scored
from skinscan.tables import ImageRecord, Job, Prediction


class _Rules:
    """The two referral rules record_results asks a scorer for (the model itself plays no part here)."""

    version = MODEL_VERSION

    def malignancy(self, probs: dict[str, float]) -> float:
        return probs["mel"]

    def flagged(self, probs: dict[str, float]) -> bool:
        return probs["mel"] >= 0.5


def _probs(mel: float) -> dict[str, float]:
    return {c: (mel if c == "mel" else (1 - mel) if c == "nv" else 0.0) for c in CLASSES}


def _job(settings: Any, job_id: str) -> tuple[str, int, int, int]:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        predictions = session.scalar(select(func.count()).select_from(Prediction).join(
            ImageRecord, ImageRecord.id == Prediction.image_id).where(ImageRecord.job_id == job_id))
        return job.status, job.scored, job.failed, predictions


def test_counters_follow_each_chunk_and_a_redelivery_moves_nothing(
        api: Api, settings: Any, jpeg: Callable[..., bytes]) -> None:
    from worker.pipeline import claim_chunk, record_results

    job_id = api.submit([(f"lesion-{i}.jpg", jpeg(i)) for i in range(4)]).get_json()["id"]
    with session_scope(settings) as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
                                   .order_by(ImageRecord.position)))

    version, todo = claim_chunk(job_id, ids[:3], settings)
    assert version == MODEL_VERSION and [a for _, _, a in todo] == [0, 0, 0]  # attempts before this delivery
    with session_scope(settings) as session:  # ...and this try is already counted, before any scoring
        assert sorted(session.scalars(select(ImageRecord.attempts).where(ImageRecord.job_id == job_id))) == [0, 1, 1, 1]

    first = [Scored(ids[0], _probs(0.9)), Scored(ids[1], _probs(0.1)), Scored(ids[2], error="not an image")]
    record_results(job_id, _Rules(), first, settings)
    assert _job(settings, job_id) == ("running", 2, 1, 2)
    record_results(job_id, _Rules(), first, settings)  # the same chunk again (a redelivery after a crash)
    assert _job(settings, job_id) == ("running", 2, 1, 2)

    claim_chunk(job_id, ids[3:], settings)
    record_results(job_id, _Rules(), [Scored(ids[3], _probs(0.6))], settings)
    assert _job(settings, job_id) == ("done", 3, 1, 3)
    counts = api.get(f"/api/v1/jobs/{job_id}").get_json()["counts"]
    assert (counts["scored"], counts["failed"]) == (3, 1)


def test_settings_are_read_once_then_again_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                      fresh_settings: Callable[[], Any]) -> None:
    """A worker asks for its settings once per task: the first read is kept (a change of environment is seen
    after load_settings.cache_clear(), which the fresh_settings fixture does)."""
    from skinscan.settings import load_settings

    monkeypatch.setenv("SKINSCAN_CHUNK_SIZE", "17")
    first = load_settings()
    assert load_settings() is first and first.chunk_size == 17
    monkeypatch.setenv("SKINSCAN_CHUNK_SIZE", "19")
    assert load_settings() is first
    assert fresh_settings().chunk_size == 19
    monkeypatch.delenv("SKINSCAN_CHUNK_SIZE")
    assert fresh_settings().chunk_size == 32
