"""Job management and the results page on the embedded defaults (SQLite, local images folder, no broker): cancel,
delete (rows, stored objects, audit), exports in the page's risk order with the flag reason, per-class figures
over no image shown as null, and the status poll's live tile figures."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastweb import MODEL_VERSION, SentTasks
from flask import Flask
from realservices import Api
from sqlalchemy import func, select
from test_pages_fast import csrf_token, make_user, sign_in

from skinscan.db import session_scope
from skinscan.labels import CLASSES
from skinscan.tables import AuditEvent, ImageRecord, Job, JobMetrics, ModelVersion, Prediction, Upload

Jpeg = Callable[..., bytes]
BUNDLE_META = Path(__file__).resolve().parents[2] / "skinscan" / "bundles" / "default" / "metadata.json"


@pytest.fixture()
def referral_model(settings: Any) -> dict[str, Any]:
    """Give the stand-in production model the shipped bundle's referral operating points; return them."""
    referral = json.loads(BUNDLE_META.read_text())["referral"]
    with session_scope(settings) as session:
        model = session.get(ModelVersion, MODEL_VERSION)
        model.meta = {"classes": list(CLASSES), "referral": referral}
    return referral


def _probs(malignancy: float, label: str = "mel") -> dict[str, float]:
    """Probabilities whose malignant sum is `malignancy` (all of it on `label` if malignant, else on mel)."""
    probs = dict.fromkeys(CLASSES, 0.0)
    probs["mel" if label not in ("bcc", "akiec") else label] = malignancy
    probs["nv" if label in ("mel", "bcc", "akiec") else label] += 1 - malignancy
    return probs


def _default_point() -> dict[str, float]:
    """The shipped bundle's default (92% sensitivity) referral operating point, as its metadata records it."""
    from skinscan.bundles import default_bundle_path

    meta = json.loads((default_bundle_path() / "metadata.json").read_text())
    return next(p for p in meta["referral"]["operating_points"] if p["target_sensitivity"] == 0.92)


def _score(settings: Any, job_id: str, scores: dict[str, tuple[float, str]], threshold: float = 0.18,
           finish: bool = True) -> None:
    """Write predictions as the worker would: file name -> (malignancy, predicted label); then refresh the job."""
    from worker.pipeline import refresh_job

    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job.status == "queued":
            job.status = "running"
        for img in session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id,
                                                             ImageRecord.status == "pending")):
            if img.filename not in scores:
                continue
            malignancy, label = scores[img.filename]
            probs = _probs(malignancy, label)
            session.add(Prediction(image_id=img.id, model_version=MODEL_VERSION, probabilities=probs, label=label,
                                   confidence=max(probs.values()), malignancy=malignancy,
                                   flagged=malignancy >= threshold))
            img.status = "scored"
    if finish:
        refresh_job(job_id, settings)


def _audit(settings: Any, action: str, job_id: str) -> list[AuditEvent]:
    with session_scope(settings) as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.target_id == job_id)))
        session.expunge_all()
        return rows


def _files_under(settings: Any, prefix: str) -> list[str]:
    root = settings.images_dir / prefix
    return sorted(str(p.relative_to(settings.images_dir)) for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []


def _signed_in(app: Flask, settings: Any) -> tuple[Any, Api]:
    """A signed-in page client and the API as the same clinic."""
    clinic_id, key, email = make_user(settings)
    staff = app.test_client()
    assert sign_in(staff, email).status_code == 302
    return staff, Api(app.test_client(), key, clinic_id)


# --- cancel -------------------------------------------------------------------------------------------------------

def test_cancel_stops_pending_images_and_is_terminal(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Cancelling a running job marks its pending images cancelled, keeps what was scored, ends the job
    `cancelled` (audited, counts consistent); the worker's claim then scores nothing and its refresh never flips
    the job back; a prediction a chunk in flight writes late is ignored; cancelling again changes nothing and a
    finished job cannot be cancelled."""
    from worker.pipeline import claim_chunk, refresh_job

    files = [(f"lesion-{i}.jpg", jpeg(i)) for i in range(4)]
    job_id = api.submit(files).get_json()["id"]
    _score(settings, job_id, {"lesion-0.jpg": (0.9, "mel")})
    assert api.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "running"

    response = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "cancelled" and body["cancelled_now"] == 3 and body["finished_at"]
    assert body["counts"] == {"total": 4, "scored": 1, "failed": 0, "refused": 0, "cancelled": 3}
    with session_scope(settings) as session:
        statuses = sorted(session.scalars(select(ImageRecord.status).where(ImageRecord.job_id == job_id)))
        metrics = session.get(JobMetrics, (job_id, MODEL_VERSION))
        assert statuses == ["cancelled"] * 3 + ["scored"] and metrics is not None
        assert metrics.metrics["counts"]["scored"] == 1
        pending_ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id,
                                                                       ImageRecord.status == "cancelled")))
    [event] = _audit(settings, "job.cancel", job_id)
    assert event.details["images_cancelled"] == 3 and event.details["was"] == "running" and event.actor

    # The worker: a chunk delivered now claims nothing; a chunk in flight writes a late prediction and refreshes.
    assert claim_chunk(job_id, pending_ids, settings) == (None, [])
    with session_scope(settings) as session:
        session.add(Prediction(image_id=pending_ids[0], model_version=MODEL_VERSION, probabilities=_probs(0.99),
                               label="mel", confidence=0.99, malignancy=0.99, flagged=True))
    refresh_job(job_id, settings)
    after = api.get(f"/api/v1/jobs/{job_id}").get_json()
    assert after["status"] == "cancelled" and after["counts"] == body["counts"]
    rows = {r["image_id"]: r for r in api.get(f"/api/v1/jobs/{job_id}/results").get_json()["results"]}
    assert rows[pending_ids[0]]["status"] == "cancelled" and rows[pending_ids[0]]["predicted_label"] is None
    assert sum(1 for r in rows.values() if r["flagged"]) == 1

    again = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert again.status_code == 200 and again.get_json()["cancelled_now"] == 0
    assert len(_audit(settings, "job.cancel", job_id)) == 1

    done_id = api.submit([("a.jpg", jpeg(9))]).get_json()["id"]
    _score(settings, done_id, {"a.jpg": (0.1, "nv")})
    refused = api.client.post(f"/api/v1/jobs/{done_id}/cancel", headers=api.headers())
    assert refused.status_code == 409 and "already done" in refused.get_json()["error"]


def test_cancel_and_delete_are_the_clinics_own(new_api: Callable[[], Api], sent: SentTasks, jpeg: Jpeg) -> None:
    """Another clinic's job answers 404 to cancel and delete, and is left as it was."""
    owner, stranger = new_api(), new_api()
    job_id = owner.submit([("a.jpg", jpeg())]).get_json()["id"]
    assert stranger.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=stranger.headers()).status_code == 404
    assert stranger.client.delete(f"/api/v1/jobs/{job_id}", headers=stranger.headers()).status_code == 404
    assert owner.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "queued"


# --- delete -------------------------------------------------------------------------------------------------------

def test_delete_removes_rows_and_stored_objects_and_is_audited(api: Api, settings: Any, sent: SentTasks,
                                                               jpeg: Jpeg) -> None:
    """DELETE removes the job's rows (images, predictions, metrics) and every object under its prefix (images and
    heatmaps), writes an audit event that outlives the job, and answers the same way when repeated."""
    from skinscan.storage import get_storage

    job_id = api.submit([("a.jpg", jpeg(1)), ("b.jpg", jpeg(2)), ("notes.txt", b"text")]).get_json()["id"]
    _score(settings, job_id, {"a.jpg": (0.7, "mel"), "b.jpg": (0.05, "nv")})
    prefix = f"{api.clinic_id}/{job_id}/"
    get_storage(settings).put(f"{prefix}gradcam/someimage-0123.png", b"png", "image/png")
    other = api.submit([("c.jpg", jpeg(3))]).get_json()["id"]
    stored = _files_under(settings, prefix)
    assert len(stored) == 3 and any("/gradcam/" in k for k in stored)

    response = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers())
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["deleted"] and body["complete"] and body["images"] == 3
    assert body["objects_deleted"] == 3 and body["objects_left"] == 0
    assert _files_under(settings, prefix) == []
    assert len(_files_under(settings, f"{api.clinic_id}/{other}/")) == 1  # another job keeps its image
    with session_scope(settings) as session:
        assert session.get(Job, job_id) is None
        assert session.scalar(select(func.count()).where(ImageRecord.job_id == job_id)) == 0
        assert session.scalar(select(func.count()).select_from(Prediction)) == 0
        assert session.scalar(select(func.count()).where(JobMetrics.job_id == job_id)) == 0
        assert session.scalar(select(func.count()).where(Upload.job_id == job_id)) == 0
    [event] = _audit(settings, "job.delete", job_id)
    assert event.clinic_id == api.clinic_id and event.details["images"] == 3
    assert api.get(f"/api/v1/jobs/{job_id}").status_code == 404

    again = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers())
    assert again.status_code == 200 and again.get_json()["already_deleted"] and again.get_json()["complete"]
    assert api.client.delete("/api/v1/jobs/" + "0" * 32, headers=api.headers()).status_code == 404


def test_delete_of_a_ghost_job_left_uploading(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """A job that never started (left `uploading`, its images stored) is deleted with its images."""
    response = api.submit([("a.jpg", jpeg(1))], finalize="false")
    job_id = response.get_json()["id"]
    assert response.get_json()["status"] == "uploading"
    assert len(_files_under(settings, f"{api.clinic_id}/{job_id}/")) == 1
    body = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).get_json()
    assert body["complete"] and body["objects_deleted"] == 1
    assert _files_under(settings, f"{api.clinic_id}/{job_id}/") == []


def test_delete_when_storage_fails_part_way(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage failing after one object: the rows are gone (none points to a deleted object), the answer says how
    many objects are left, and the orphan sweeper (or deleting again) removes them."""
    from skinscan.orphans import sweep_orphans
    from skinscan.storage import LocalStorage, StorageError

    job_id = api.submit([(f"{i}.jpg", jpeg(i)) for i in range(3)]).get_json()["id"]
    prefix = f"{api.clinic_id}/{job_id}/"
    real_delete, calls = LocalStorage.delete, []

    def flaky(self: LocalStorage, key: str) -> None:
        calls.append(key)
        if len(calls) > 1:
            raise StorageError("storage went away")
        real_delete(self, key)

    monkeypatch.setattr(LocalStorage, "delete", flaky)
    body = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).get_json()
    assert body["deleted"] and not body["complete"] and body["objects_deleted"] == 1 and body["objects_left"] == 2
    assert "orphan sweep" in body["message"]
    assert len(_files_under(settings, prefix)) == 2
    with session_scope(settings) as session:
        assert session.get(Job, job_id) is None
        assert session.scalar(select(func.count()).where(ImageRecord.job_id == job_id)) == 0
        assert session.scalar(select(Upload.prefix).where(Upload.job_id == job_id)) == prefix
    monkeypatch.setattr(LocalStorage, "delete", real_delete)
    assert sweep_orphans(settings) == 2
    assert _files_under(settings, prefix) == []
    again = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).get_json()
    assert again["already_deleted"] and again["complete"]


# --- results page, exports, tiles ---------------------------------------------------------------------------------

def _page_order(html: str) -> list[str]:
    return re.findall(r'data-image-id="([0-9a-f]{32})"', html)


def test_exports_follow_the_pages_risk_order_with_the_flag_reason(app: Flask, settings: Any, sent: SentTasks,
                                                                  jpeg: Jpeg, referral_model: dict[str, Any]) -> None:
    """CSV and JSON exports list the images in the page's risk order with their risk rank (the page's first
    column) and, for flagged ones, why: the malignant probability against the operating point's threshold; the
    file refused at upload is not in the page's table (it has its own section) and comes last in the exports."""
    staff, api = _signed_in(app, settings)
    scores = {"low.jpg": (0.02, "nv"), "high.jpg": (0.91, "mel"), "mid.jpg": (0.41, "bcc"), "edge.jpg": (0.2, "mel")}
    files = [(name, jpeg(i)) for i, name in enumerate([*scores, "broken.jpg"])]
    files[-1] = ("broken.jpg", b"\xff\xd8\xff not a jpeg")
    job_id = api.submit(files).get_json()["id"]
    _score(settings, job_id, scores)

    html = staff.get(f"/jobs/{job_id}").text
    order = _page_order(html)
    ranks = re.findall(r'<td class="num muted col-rank" title="Upload #\d+">(\d+)</td>', html)
    assert ranks == ["1", "2", "3", "4"] and "broken.jpg" in html
    exported = list(csv.DictReader(io.StringIO(staff.get(f"/jobs/{job_id}/results.csv").text)))
    assert [r["image_id"] for r in exported][:4] == order and len(exported) == 5
    assert [r["filename"] for r in exported] == ["high.jpg", "mid.jpg", "edge.jpg", "low.jpg", "broken.jpg"]
    assert [r["risk_rank"] for r in exported] == ["1", "2", "3", "4", "5"]
    point = _default_point()
    assert exported[1]["flag_reason"] == (f"malignant probability 0.41 >= threshold {point['threshold']:.2f} "
                                          "(92% sensitivity operating point)")
    assert exported[3]["flag_reason"] == "" and exported[4]["flag_reason"] == ""
    api_csv = list(csv.DictReader(io.StringIO(api.get(f"/api/v1/jobs/{job_id}/results?format=csv").text)))
    assert [r["image_id"] for r in api_csv][:4] == order
    as_json = json.loads(staff.get(f"/jobs/{job_id}/results.json").data)
    assert [r["image_id"] for r in as_json["results"]][:4] == order
    assert [r["risk_rank"] for r in as_json["results"]] == [1, 2, 3, 4, 5]
    assert as_json["results"][0]["flag_reason"].startswith(
        f"malignant probability 0.91 >= threshold {point['threshold']:.2f}")


def test_flag_reason_names_an_unsure_model() -> None:
    """A flag from an unsure model says so; a flag the threshold no longer explains says when it was set."""
    from web.referral import OperatingPoint, flag_reason

    point = OperatingPoint(threshold=0.18, target_sensitivity=0.92, uncertain_below=0.5)
    assert flag_reason(True, 0.1, 0.45, point) == "model unsure: top class probability 0.45 < 0.50"
    assert flag_reason(True, 0.3, 0.4, point).count(";") == 1
    assert flag_reason(False, 0.9, 0.9, point) == "" and flag_reason(None, None, None, point) == ""
    assert "threshold now 0.18" in flag_reason(True, 0.1, 0.9, point)


def test_job_page_shows_name_flag_rate_operating_point_and_table(app: Flask, settings: Any, sent: SentTasks,
                                                                 jpeg: Jpeg, referral_model: dict[str, Any]) -> None:
    """The page names the job, puts the flag count in context with the operating point that produced it, heads
    the columns with what they hold, keeps file extensions whole and offers cancel (while running) and delete."""
    staff, api = _signed_in(app, settings)
    names = ["ISIC_0000001.dermoscopy.jpeg", "b<i>.jpg", "c.png", "d.jpg"]
    job_id = api.submit([(n, jpeg(i)) for i, n in enumerate(names)]).get_json()["id"]
    with session_scope(settings) as session:
        session.get(Job, job_id).name = "Monday clinic <batch 7>"
    _score(settings, job_id, {"ISIC_0000001.dermoscopy.jpeg": (0.5, "mel"), "b<i>.jpg": (0.3, "mel"),
                              "c.png": (0.01, "nv")}, finish=False)
    from worker.pipeline import refresh_job

    refresh_job(job_id, settings)
    html = staff.get(f"/jobs/{job_id}").text
    assert "Monday clinic &lt;batch 7&gt;" in html and "<batch 7>" not in html
    assert re.search(r'data-tile="flagged">2</a>\s*<span class="stat-context" data-tile="flag-context">of 3 scored '
                     r'\(67%\)</span>', html)
    point = _default_point()
    assert f"the threshold <strong>{point['threshold']:.3f}</strong>" in html
    assert "92% sensitivity operating point" in html
    assert f"specificity {100 * point['specificity']:.1f}%" in html
    assert ">Rank</abbr>" in html and "P(predicted class)" in html
    assert ('<span class="fname-stem">ISIC_0000001.dermoscopy</span><span class="fname-ext">.jpeg</span>' in html)
    assert '<span class="fname-stem">b&lt;i&gt;</span>' in html
    assert 'id="cancel-job"' in html and 'id="delete-job"' in html
    listing = staff.get("/jobs").text
    assert "Monday clinic &lt;batch 7&gt;" in listing
    assert re.search(r'data-role="flagged">2</td>', listing)

    _score(settings, job_id, {"d.jpg": (0.02, "nv")})
    assert 'id="cancel-job"' not in staff.get(f"/jobs/{job_id}").text
    assert api.get(f"/api/v1/jobs/{job_id}").get_json()["name"] == "Monday clinic <batch 7>"


def test_status_poll_carries_live_tile_figures(app: Flask, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """While a job runs, the page's status poll answers its class and flag tiles from the images scored so far."""
    staff, api = _signed_in(app, settings)
    job_id = api.submit([(f"{i}.jpg", jpeg(i)) for i in range(5)]).get_json()["id"]
    empty = staff.get(f"/jobs/{job_id}/status").get_json()
    assert empty["tiles"]["flagged"] == 0 and empty["tiles"]["flag_rate"] is None
    _score(settings, job_id, {"0.jpg": (0.9, "mel"), "1.jpg": (0.6, "bcc"), "2.jpg": (0.01, "nv")})
    body = staff.get(f"/jobs/{job_id}/status").get_json()
    assert body["status"] == "running" and body["counts"]["scored"] == 3
    tiles = body["tiles"]
    assert tiles["scored"] == 3 and tiles["flagged"] == 2 and tiles["flag_rate"] == round(2 / 3, 4)
    assert tiles["classes"] == {**dict.fromkeys(CLASSES, 0), "mel": 1, "bcc": 1, "nv": 1}


def test_page_cancel_and_delete_forms(app: Flask, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """The page's cancel button cancels; delete needs its box ticked and a CSRF token, then the job, its rows and
    its images are gone and the jobs list says so."""
    staff, api = _signed_in(app, settings)
    job_id = api.submit([("a.jpg", jpeg(1)), ("b.jpg", jpeg(2))]).get_json()["id"]
    page = staff.get(f"/jobs/{job_id}").text
    token = csrf_token(page)
    assert staff.post(f"/jobs/{job_id}/cancel").status_code == 400  # no CSRF token
    response = staff.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert response.status_code == 302
    page = staff.get(f"/jobs/{job_id}").text
    assert "Job cancelled: 2 images not yet scored will not be scored" in page
    assert 'badge-cancelled' in page and 'id="cancelled-note"' in page and 'id="cancel-job"' not in page

    unconfirmed = staff.post(f"/jobs/{job_id}/delete", data={"csrf_token": token}, follow_redirects=True)
    assert "Tick the box to confirm" in unconfirmed.text
    assert api.get(f"/api/v1/jobs/{job_id}").status_code == 200
    deleted = staff.post(f"/jobs/{job_id}/delete", data={"csrf_token": token, "confirm": "yes"},
                         follow_redirects=True)
    assert deleted.status_code == 200 and "no stored image of it is left" in deleted.text
    assert api.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert _files_under(settings, f"{api.clinic_id}/{job_id}/") == []
    assert staff.get(f"/jobs/{job_id}").status_code == 404


# --- metrics ------------------------------------------------------------------------------------------------------

def test_per_class_figures_over_no_image_are_null(app: Flask, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Recall is null for a class with no labelled image, precision for a class never predicted (F1 with recall);
    the page shows them as n/a and the confusion matrix names its class order."""
    staff, api = _signed_in(app, settings)
    files = [(f"ISIC_{i}.jpg", jpeg(i)) for i in range(4)]
    labels = b"image_id,dx\nISIC_0,mel\nISIC_1,mel\nISIC_2,nv\nISIC_3,bcc\n"
    job_id = api.submit(files, labels=labels).get_json()["id"]
    _score(settings, job_id, {"ISIC_0.jpg": (0.9, "mel"), "ISIC_1.jpg": (0.2, "bkl"), "ISIC_2.jpg": (0.1, "nv"),
                              "ISIC_3.jpg": (0.8, "mel")})
    metrics = api.get(f"/api/v1/jobs/{job_id}/metrics").get_json()["metrics"]
    per_class = metrics["per_class"]
    assert metrics["confusion_matrix_classes"] == list(CLASSES)
    assert per_class["df"]["recall"] is None and per_class["df"]["precision"] is None and per_class["df"]["f1"] is None
    assert per_class["bkl"]["recall"] is None and per_class["bkl"]["precision"] == 0.0  # predicted, never right
    assert per_class["bcc"]["precision"] is None and per_class["bcc"]["recall"] == 0.0 and per_class["bcc"]["f1"] == 0
    assert per_class["mel"]["recall"] == 0.5 and per_class["mel"]["precision"] == 0.5
    html = staff.get(f"/jobs/{job_id}").text
    assert html.count(">n/a<") >= 3
    assert f'<span class="mono" id="confusion-order">{", ".join(CLASSES)}</span>' in html


def test_stored_metrics_from_before_are_nulled_when_read() -> None:
    """Metrics stored before the rule (0.0 for classes with no image) are read with nulls, from their matrix."""
    from skinscan.jobs.metrics import null_unsupported

    matrix = [[0] * len(CLASSES) for _ in CLASSES]
    matrix[CLASSES.index("mel")][CLASSES.index("mel")] = 2
    stored = {"confusion_matrix": matrix,
              "per_class": {c: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for c in CLASSES}}
    stored["per_class"]["mel"] = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    out = null_unsupported(dict(stored))
    assert out["per_class"]["mel"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert all(out["per_class"][c]["recall"] is None for c in CLASSES if c != "mel")
    assert stored["per_class"]["nv"]["recall"] == 0.0  # the stored row itself is not changed
