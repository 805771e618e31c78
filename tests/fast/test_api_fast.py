"""The JSON API on the embedded defaults (SQLite, local images folder, no broker): auth, isolation between clinics,
job creation and its validation errors, results and CSV export. Runs in seconds without services."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from fastweb import MODEL_VERSION, SentTasks
from realservices import Api
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.labels import CLASSES
from skinscan.tables import ImageRecord, Job, Prediction

Jpeg = Callable[..., bytes]


def _job_rows(settings: Any, job_id: str) -> list[ImageRecord]:
    with session_scope(settings) as session:
        rows = list(session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)
            .order_by(ImageRecord.position)))
        session.expunge_all()
        return rows


def _stored_files(settings: Any) -> list[str]:
    return sorted(str(p.relative_to(settings.images_dir)) for p in settings.images_dir.rglob("*") if p.is_file())


def test_api_needs_a_valid_key_and_health_needs_none(client, api: Api) -> None:  # type: ignore[no-untyped-def]
    """No key, a key under another scheme or an unknown key answer JSON 401; the health checks need no key."""
    for headers in ({}, {"Authorization": f"Basic {api.key}"}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer sk_not-a-real-key-000000000000"}):
        response = client.get("/api/v1/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["status"] == 401 and "API key" in response.get_json()["error"]
    assert api.get("/api/v1/jobs").get_json() == {"page": 1, "per_page": 20, "total": 0, "jobs": []}
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok", "model": "ok"}


def test_job_is_committed_then_enqueued_in_chunks(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Five images and a text file: 202 with the refused file and its reason, the job queued with its counters,
    one score task per chunk of pending ids in upload order (chunk size 2), images under the local folder."""
    files = [(f"lesion-{i}.jpg", jpeg(i)) for i in range(3)] + [("notes.txt", b"not an image")]
    files += [(f"lesion-{i}.jpg", jpeg(i)) for i in range(3, 5)]
    response = api.submit(files)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "queued" and body["accepted"] == 5
    assert [(r["filename"], r["status"]) for r in body["rejected"]] == [("notes.txt", 415)]
    assert body["counts"] == {"total": 5, "scored": 0, "failed": 0, "refused": 1}
    assert body["model_version"] == MODEL_VERSION and body["progress"] == round(1 / 6, 4)
    assert body["status_url"].endswith(f"/api/v1/jobs/{body['id']}")

    rows = _job_rows(settings, body["id"])
    assert [r.filename for r in rows] == [name for name, _ in files]
    assert [r.status for r in rows] == ["pending"] * 3 + ["failed"] + ["pending"] * 2
    pending = [r.id for r in rows if r.status == "pending"]
    assert [(c["name"], c["args"], c["queue"]) for c in sent.calls] == [
        ("worker.tasks.score_chunk", [body["id"], pending[i:i + 2]], "skinscan") for i in (0, 2, 4)]
    stored = _stored_files(settings)
    assert len(stored) == 5 and not any("lesion" in name for name in stored)  # opaque keys, no file names
    assert {r.storage_key for r in rows if r.storage_key} == set(stored)


def test_refused_uploads_keep_nothing(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """No files, only unsupported files, a labels CSV of unknown columns or with an invalid row: a JSON 4xx that says
    why, and no job, no stored image and no task left behind."""
    assert api.client.post("/api/v1/jobs", data={}, headers=api.headers()).status_code == 400
    only_text = api.submit([("a.txt", b"hello"), ("b.txt", b"world")])
    assert only_text.status_code == 415
    assert {d["filename"] for d in only_text.get_json()["details"]} == {"a.txt", "b.txt"}
    bad_columns = api.submit([("ISIC_1.jpg", jpeg())], labels=b"name,diagnosis\nISIC_1,mel\n")
    assert bad_columns.status_code == 400 and "unrecognised columns" in bad_columns.get_json()["error"]
    bad_row = api.submit([("ISIC_1.jpg", jpeg())], labels=b"image_id,dx\nISIC_1,mel\nISIC_2,cancer\n")
    assert bad_row.status_code == 400 and bad_row.get_json()["error"] == (
        "labels file: line 3: unknown diagnosis 'cancer'; expected one of akiec, bcc, bkl, df, mel, nv, vasc")
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(ImageRecord)) == 0
    assert _stored_files(settings) == [] and sent.calls == []


def test_job_in_parts_then_started(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """finalize=false keeps the job uploading; each part's images are sent for scoring as the part commits (and
    only that part's); start closes the job and sends nothing already sent."""
    first = api.submit([("ISIC_1.jpg", jpeg(1))], finalize="false").get_json()
    job_id = first["id"]
    ids = [r.id for r in _job_rows(settings, job_id)]
    assert first["status"] == "uploading"
    assert [(c["name"], c["args"]) for c in sent.calls] == [("worker.tasks.score_chunk", [job_id, ids])]
    part = api.client.post(f"/api/v1/jobs/{job_id}/images", headers=api.headers(),
                           data={"files": [(io.BytesIO(jpeg(2)), "ISIC_2.jpg")]}, content_type="multipart/form-data")
    assert part.status_code == 202 and part.get_json()["accepted"] == 1
    second = [r.id for r in _job_rows(settings, job_id)][1:]
    assert [c["args"] for c in sent.calls] == [[job_id, ids], [job_id, second]]
    start = api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers(),
                            data={"labels": (io.BytesIO(b"image_id,dx\nISIC_1,mel\nISIC_2,nv\n"), "l.csv")},
                            content_type="multipart/form-data")
    assert start.status_code == 202, start.get_json()
    assert start.get_json()["status"] == "queued" and start.get_json()["has_labels"]
    assert [r.true_label for r in _job_rows(settings, job_id)] == ["mel", "nv"]
    assert len(sent.calls) == 2  # both parts were sent already; nothing again
    again = api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers())
    assert again.status_code == 409 and len(sent.calls) == 2
    late = api.client.post(f"/api/v1/jobs/{job_id}/images", headers=api.headers(),
                           data={"files": [(io.BytesIO(jpeg(3)), "ISIC_3.jpg")]}, content_type="multipart/form-data")
    assert late.status_code == 409
    assert api.get(f"/api/v1/jobs/{job_id}/metrics").status_code == 409  # not done yet


def test_other_clinics_get_404_for_everything(new_api: Callable[[], Api], sent: SentTasks, jpeg: Jpeg) -> None:
    """Every job route answers another clinic exactly as it answers an id that does not exist."""
    owner, stranger = new_api(), new_api()
    job_id = owner.submit([("ISIC_1.jpg", jpeg())], finalize="false").get_json()["id"]
    for job in (job_id, "0" * 32):
        for method, path in (("get", ""), ("get", "/results"), ("get", "/results?format=csv"), ("get", "/metrics"),
                             ("post", "/images"), ("post", "/start")):
            response = getattr(stranger.client, method)(f"/api/v1/jobs/{job}{path}", headers=stranger.headers())
            assert response.status_code == 404, (method, path)
            assert response.get_json() == {"error": "job not found", "status": 404}
    assert stranger.get("/api/v1/jobs").get_json()["total"] == 0
    assert owner.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert owner.get("/api/v1/jobs").get_json()["total"] == 1


def _score(settings: Any, job_id: str, labels: dict[str, str]) -> None:
    """Write predictions for a job's pending images as the worker would (filename -> predicted label)."""
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        for img in session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id,
            ImageRecord.status == "pending")):
            label = labels[img.filename]
            probs = {c: (0.94 if c == label else 0.01) for c in CLASSES}
            malignancy = sum(probs[c] for c in ("mel", "bcc", "akiec"))
            session.add(Prediction(image_id=img.id, model_version=MODEL_VERSION, probabilities=probs, label=label,
                                   confidence=0.94, malignancy=malignancy, flagged=malignancy >= 0.5))
            img.status = "scored"
        job.scored, job.status = len(labels), "done"


def test_a_job_scored_while_uploading_is_finished_at_start(api: Api, settings: Any, sent: SentTasks,
                                                            jpeg: Jpeg) -> None:
    """Every image scored before the job closed: start keeps the counts and sends a worker the job to finish."""
    job_id = api.submit([("ISIC_1.jpg", jpeg(1)), ("ISIC_2.jpg", jpeg(2))], finalize="false").get_json()["id"]
    _score(settings, job_id, {"ISIC_1.jpg": "mel", "ISIC_2.jpg": "nv"})
    with session_scope(settings) as session:  # as a worker leaves an uploading job: counted, not finished
        session.get(Job, job_id).status = "uploading"
    start = api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers())
    assert start.status_code == 202, start.get_json()
    assert start.get_json()["counts"] == {"total": 2, "scored": 2, "failed": 0, "refused": 0}
    assert [c["name"] for c in sent.calls] == ["worker.tasks.score_chunk", "worker.tasks.finish_job"]
    assert sent.calls[-1]["args"] == [job_id]


def test_results_json_and_csv_export(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Results come in upload order with the production model's prediction; the CSV has the documented columns,
    one row per uploaded file (refused ones with their reason), probabilities to six places, and a file name
    that starts like a formula is written as text."""
    from web.results import CSV_COLUMNS

    files = [("ISIC_1.jpg", jpeg(1)), ("=HYPERLINK(1).jpg", jpeg(2)), ("broken.jpg", b"\xff\xd8\xff not a jpeg")]
    job_id = api.submit(files, labels=b"image_id,dx\nISIC_1,mel\n").get_json()["id"]
    _score(settings, job_id, {"ISIC_1.jpg": "mel", "=HYPERLINK(1).jpg": "nv"})

    body = api.get(f"/api/v1/jobs/{job_id}/results").get_json()
    assert body["total"] == 3 and body["job"]["status"] == "done"
    rows = body["results"]
    assert [(r["filename"], r["status"], r["predicted_label"]) for r in rows] == [
        ("ISIC_1.jpg", "scored", "mel"), ("=HYPERLINK(1).jpg", "scored", "nv"), ("broken.jpg", "failed", None)]
    assert rows[0]["flagged"] is True and rows[1]["flagged"] is False and rows[0]["true_label"] == "mel"
    assert rows[0]["model_version"] == MODEL_VERSION and rows[2]["error"]
    page = api.get(f"/api/v1/jobs/{job_id}/results?limit=1&offset=1").get_json()
    assert [r["filename"] for r in page["results"]] == ["=HYPERLINK(1).jpg"]
    history = api.get(f"/api/v1/jobs/{job_id}/results?history=true").get_json()["results"]
    assert [len(r["history"]) for r in history] == [1, 1, 0]

    response = api.get(f"/api/v1/jobs/{job_id}/results?format=csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f'attachment; filename="skinscan-{job_id}.csv"'
    table = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert table[0] == CSV_COLUMNS and len(table) == 4
    first = dict(zip(CSV_COLUMNS, table[1], strict=True))
    assert first["prob_mel"] == "0.940000" and first["prob_nv"] == "0.010000"
    assert first["malignancy_score"] == "0.960000" and first["flagged"] == "1" and first["true_label"] == "mel"
    assert table[2][1] == "'=HYPERLINK(1).jpg" and table[2][CSV_COLUMNS.index("flagged")] == "0"
    failed = dict(zip(CSV_COLUMNS, table[3], strict=True))
    assert failed["status"] == "failed" and failed["predicted_label"] == "" and failed["error"]


def test_query_parameters_are_validated(api: Api, sent: SentTasks, jpeg: Jpeg) -> None:
    """Out-of-range or non-numeric paging and an unknown format answer 400 naming the parameter."""
    job_id = api.submit([("ISIC_1.jpg", jpeg())]).get_json()["id"]
    for query, word in (("limit=0", "limit"), ("limit=abc", "limit"), ("offset=-1", "offset"),
                        ("format=xml", "format")):
        response = api.get(f"/api/v1/jobs/{job_id}/results?{query}")
        assert response.status_code == 400 and word in response.get_json()["error"], query
    assert api.get("/api/v1/jobs?per_page=201").status_code == 400
