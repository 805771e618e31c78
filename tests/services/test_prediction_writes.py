"""A chunk's predictions written to PostgreSQL by the worker's one-statement insert (column arrays): every value
(the heat-map grid too) read back as written, a redelivered chunk writes nothing and moves no counter."""

from __future__ import annotations

from typing import Any

import pytest
from realservices import Api
from sqlalchemy import select
from test_job_management import noise_jpeg

from skinscan.db import session_scope
from skinscan.labels import CLASSES
from skinscan.model.scorer import Scored
from skinscan.tables import ImageRecord, Job, Prediction


class _Rules:
    """The two referral rules the writer asks a scorer for."""

    def __init__(self, version: str) -> None:
        self.version = version

    def malignancy(self, probs: dict[str, float]) -> float:
        return probs["mel"] + probs["bcc"]

    def flagged(self, probs: dict[str, float]) -> bool:
        return probs["mel"] >= 0.5


@pytest.mark.services
def test_chunk_predictions_round_trip_on_postgres(stack: Any, api: Api) -> None:
    from worker.pipeline import claim_chunk, record_results, write_predictions

    settings = stack.settings()
    job_id = api.submit([(f"lesion-{i}.jpg", noise_jpeg(i)) for i in range(3)]).get_json()["id"]
    with session_scope(settings) as session:
        version = session.get(Job, job_id).model_version
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
                                   .order_by(ImageRecord.position)))
    probs = [dict.fromkeys(CLASSES, 0.0) | {"mel": 0.9, "nv": 0.1}, dict.fromkeys(CLASSES, 0.0) | {"nv": 1.0},
             {c: round(1 / len(CLASSES), 6) for c in CLASSES} | {"bcc": 0.25}]
    results = [Scored(i, p) for i, p in zip(ids, probs, strict=True)]
    results[0].heatmap = [[0.0, 0.5], [1.0, 0.25]]  # a Grad-CAM grid kept with the prediction; the others have none
    _, todo = claim_chunk(job_id, ids, settings)
    assert len(todo) == 3
    record_results(job_id, _Rules(version), results, settings)

    with session_scope(settings) as session:
        rows = {p.image_id: p for p in session.scalars(select(Prediction).where(Prediction.image_id.in_(ids)))}
        assert set(rows) == set(ids)
        for result in results:
            row = rows[result.image_id]
            assert row.model_version == version and row.probabilities == result.probabilities
            assert row.label == result.label and row.confidence == max(result.probabilities.values())
            assert row.malignancy == pytest.approx(_Rules(version).malignancy(result.probabilities))
            assert row.flagged is _Rules(version).flagged(result.probabilities) and row.created_at is not None
            assert row.heatmap == result.heatmap
        job = session.get(Job, job_id)
        assert (job.status, job.scored, job.failed) == ("done", 3, 0)
        assert write_predictions(session, _Rules(version), results) == 0  # the same chunk again
    record_results(job_id, _Rules(version), results, settings)
    with session_scope(settings) as session:
        assert session.get(Job, job_id).scored == 3
        assert len(list(session.scalars(select(Prediction.id).where(Prediction.image_id.in_(ids))))) == 3
