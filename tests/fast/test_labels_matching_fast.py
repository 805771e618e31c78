"""Labels files that cover more images than the batch (the normal case), a start that fails, and one count of
accepted images and refused files, on the embedded defaults with the real HAM10000 and ISIC 2017 files."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from fastweb import SentTasks
from flask import Flask
from realservices import Api
from sqlalchemy import select
from test_pages_fast import csrf_token, make_user, sign_in

from skinscan.db import session_scope
from skinscan.labels import match_labels, parse_ground_truth
from skinscan.tables import AuditEvent, ImageRecord, Job


def _ham_batch(ham_dir: Path, n: int) -> tuple[list[tuple[str, bytes]], dict[str, str], bytes]:
    """The first n real HAM10000 images, their true diagnoses, and the whole official metadata file."""
    metadata = (ham_dir / "HAM10000_metadata.csv").read_bytes()
    truth = parse_ground_truth(metadata.decode("utf-8-sig")).labels
    names = sorted(p.name for p in (ham_dir / "images").glob("ISIC_*.jpg"))[:n]
    files = [(name, (ham_dir / "images" / name).read_bytes()) for name in names]
    return files, {name.rsplit(".", 1)[0]: truth[name.rsplit(".", 1)[0]] for name in names}, metadata


def _rows(settings: Any, job_id: str) -> list[ImageRecord]:
    with session_scope(settings) as session:
        rows = list(session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)
                                    .order_by(ImageRecord.position)))
        session.expunge_all()
        return rows


def test_match_labels_counts_rows_for_other_images(ham_dir: Path) -> None:
    """The whole HAM10000 metadata file against 5 of its images: 5 labelled, 10,010 rows counted and ignored."""
    truth = parse_ground_truth((ham_dir / "HAM10000_metadata.csv").read_text(encoding="utf-8-sig"))
    ids = sorted(truth.labels)[:5]
    match = match_labels(truth, {*ids, "holiday_photo"})
    assert match.labels == {i: truth.labels[i] for i in ids}
    assert (match.unmatched_rows, match.unlabelled) == (len(truth.labels) - 5, 1)
    assert match.summary() == ("5 images labelled, 1 without a label row; "
                               f"{len(truth.labels) - 5:,} label rows matched no uploaded image.")
    # The same id in another case still matches (cameras and zips upper-case names); a match is never taken twice.
    folded = match_labels(truth, {ids[0].lower()})
    assert folded.labels == {ids[0].lower(): truth.labels[ids[0]]} and folded.unmatched_rows == len(truth.labels) - 1


def test_whole_metadata_file_labels_a_small_batch(api: Api, settings: Any, sent: SentTasks, ham_dir: Path) -> None:
    """A 5-image upload with the clinic's whole HAM10000 metadata file: accepted, the 5 labelled from it, the other
    rows counted in the answer and the audit, and a file that is not an image neither labelled nor unlabelled."""
    files, expected, metadata = _ham_batch(ham_dir, 5)
    resp = api.submit([*files, ("notes.jpg", b"not a picture")], metadata, name="  Monday\tclinic  ")
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["accepted"] == 5 and [r["filename"] for r in body["rejected"]] == ["notes.jpg"]
    unmatched = 10_015 - 5
    assert body["labels"] == {"labelled": 5, "unlabelled": 0, "unmatched_label_rows": unmatched,
                              "labels_summary": f"5 images labelled; {unmatched:,} label rows matched no uploaded "
                                                "image."}
    assert body["has_labels"] is True
    rows = _rows(settings, body["id"])
    assert {r.filename.rsplit(".", 1)[0]: r.true_label for r in rows if r.storage_key} == expected
    assert [r.true_label for r in rows if not r.storage_key] == [None]
    with session_scope(settings) as session:
        job = session.get(Job, body["id"])
        assert job.name == "Monday clinic" and job.labels_format == "ham10000"
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.create",
                                                         AuditEvent.target_id == body["id"])).one()
        assert audit.details["unmatched_label_rows"] == unmatched and audit.details["labelled"] == 5
    assert len(sent.calls) == 3 and {c["args"][0] for c in sent.calls} == {body["id"]}  # 5 images, chunks of 2


def test_ground_truth_of_a_larger_set_at_start(api: Api, settings: Any, sent: SentTasks,
                                               isic2017_dir: Path) -> None:
    """Parts, then /start with the official ISIC 2017 test ground truth (600 rows) for 3 of its images."""
    gt = (isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv").read_bytes()
    truth = parse_ground_truth(gt.decode("utf-8-sig")).labels
    images = sorted((isic2017_dir / "ISIC-2017_Test_v2_Data").glob("ISIC_*.jpg"))[:3]
    first = api.submit([(images[0].name, images[0].read_bytes())], finalize="false").get_json()
    part = api.client.post(f"/api/v1/jobs/{first['id']}/images", headers=api.headers(),
                           data={"files": [(io.BytesIO(p.read_bytes()), p.name) for p in images[1:]]},
                           content_type="multipart/form-data")
    assert part.status_code == 202
    start = api.client.post(f"/api/v1/jobs/{first['id']}/start", headers=api.headers(),
                            data={"labels": (io.BytesIO(gt), "ISIC-2017_Test_v2_Part3_GroundTruth.csv")},
                            content_type="multipart/form-data")
    assert start.status_code == 202, start.get_json()
    assert start.get_json()["status"] == "queued"
    assert start.get_json()["labels"]["unmatched_label_rows"] == len(truth) - 3
    assert [r.true_label for r in _rows(settings, first["id"])] == [truth[p.stem] for p in images]


def test_a_start_that_fails_leaves_no_ghost(api: Api, settings: Any, sent: SentTasks, jpeg: Any) -> None:
    """A malformed labels file at /start: one sentence (no dump of rows), and the job says failed and why."""
    job_id = api.submit([("ISIC_1.jpg", jpeg(1)), ("ISIC_2.jpg", jpeg(2))], finalize="false").get_json()["id"]
    bad = b"lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\nHAM_2,ISIC_2,cancer\n"
    start = api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers(),
                            data={"labels": (io.BytesIO(bad), "labels.csv")}, content_type="multipart/form-data")
    assert start.status_code == 400
    error = start.get_json()["error"]
    assert error == ("labels file: line 3: unknown diagnosis 'cancer'; expected one of akiec, bcc, bkl, df, mel, "
                     "nv, vasc")
    job = api.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["status"] == "failed" and job["error"] == f"the job could not start: {error}"
    assert job["counts"]["failed"] == 2 and job["progress"] == 1.0
    assert {r.status for r in _rows(settings, job_id)} == {"failed"}
    assert [c["name"] for c in sent.calls] == ["worker.tasks.score_chunk"]  # the part, as it committed; no more
    assert api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers()).status_code == 409


def test_upload_page_counts_images_and_refusals_alike(app: Flask, settings: Any, sent: SentTasks,
                                                      ham_dir: Path) -> None:
    """The upload page: a batch name, the whole metadata file and a refused file. The flash says 3 images
    accepted, the refusal apart; the job page counts 3 images and lists the file under refused at upload."""
    _, _, email = make_user(settings)
    client = app.test_client()
    assert sign_in(client, email).status_code == 302
    form = client.get("/jobs/new").text
    assert 'name="name"' in form and "other rows are ignored and counted" in form
    files, _, metadata = _ham_batch(ham_dir, 3)
    data = {"csrf_token": csrf_token(form), "name": "Ward 3 batch",
            "files": [(io.BytesIO(b), n) for n, b in files] + [(io.BytesIO(b"%PDF-1.4"), "letter.pdf")],
            "labels": (io.BytesIO(metadata), "HAM10000_metadata.csv")}
    resp = client.post("/jobs/new", data=data, content_type="multipart/form-data")
    assert resp.status_code == 302
    page = client.get(resp.headers["Location"]).text
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "3 images accepted and queued for scoring." in text
    assert '<p class="alert alert-error">1 file was refused at upload' in page
    assert "Labels: 3 images labelled; 10,012 label rows matched no uploaded image." in text
    assert "Images 3 " in text and "Files refused at upload 1 " in text
    assert "Files refused at upload (1)" in text and "letter.pdf" in text
    with session_scope(settings) as session:
        assert session.scalars(select(Job.name)).one() == "Ward 3 batch"
